import itertools

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R
from lambda_kernels.reference.trace import trace_scan

from ._helpers import LOSS_TYPES, poisoned_outputs, random_mask

TRACES = [None, "recent", "both"]


def make_batch(B, T, *, seed=0, dtype=torch.float64, spread=0.3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = random_mask(B, T, seed=seed)
    to = dict(device=device, dtype=dtype)
    return lp.to(**to).requires_grad_(), old.to(**to), adv.to(**to), mask.to(device), ref.to(**to)


def run_both(lp, old, adv, mask, **kw):
    """(loss, grad, metrics) from the kernels and from the reference on the same inputs."""
    with poisoned_outputs():
        loss, metrics = lk.grpo_lambda_loss(lp, old, adv, mask, impl="triton", **kw)
        (grad,) = torch.autograd.grad(loss, lp)
    lp_ref = lp.detach().cpu().double().requires_grad_()
    cpu = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    kw_ref = {k: cpu(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}  # (ref_logprobs, weights)
    loss_ref, metrics_ref = R.grpo_lambda_loss(lp_ref, cpu(old), cpu(adv), mask.cpu(), **kw_ref)
    (grad_ref,) = torch.autograd.grad(loss_ref, lp_ref)
    return (loss, grad, metrics), (loss_ref, grad_ref, metrics_ref)


def assert_padding_never_read(lp, old, adv, mask, impl, ref=None, ref_poison=torch.nan, **kw):
    """The objective with −inf log-probs, NaN old log-probs and `ref_poison` reference log-probs at the masked
    positions equals the reference on the clean inputs (loss, gradient), with zero gradient and finite metrics there.
    Returns (our metrics, the reference's)."""
    real = mask != 0
    lp_p = torch.where(real, lp.detach(), -torch.inf).requires_grad_()
    old_p = None if old is None else torch.where(real, old, torch.nan)
    ref_p = None if ref is None else torch.where(real, ref, ref_poison)
    loss, metrics = lk.grpo_lambda_loss(lp_p, old_p, adv, mask, ref_logprobs=ref_p, impl=impl, **kw)
    (grad,) = torch.autograd.grad(loss, lp_p)
    lp_c = lp.detach().clone().requires_grad_()
    want, want_metrics = R.grpo_lambda_loss(lp_c, old, adv, mask, ref_logprobs=ref, **kw)
    (grad_want,) = torch.autograd.grad(want, lp_c)
    torch.testing.assert_close(loss.double(), want.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad_want.double(), rtol=1e-4, atol=1e-6)
    assert (grad[~real] == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    return metrics, want_metrics


def assert_matches(ours, ref, atol=1e-5):
    loss, grad, metrics = ours
    loss_ref, grad_ref, metrics_ref = ref
    assert loss.dtype == torch.float32
    assert set(metrics) == set(metrics_ref)
    torch.testing.assert_close(loss.double().cpu(), loss_ref, atol=atol, rtol=1e-5)
    torch.testing.assert_close(grad.double().cpu(), grad_ref, atol=atol, rtol=1e-4)
    for k in metrics_ref:
        assert metrics[k].dtype == torch.float32 and not metrics[k].requires_grad
        torch.testing.assert_close(metrics[k].double().cpu(), metrics_ref[k].double(), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("trace, loss_type, on_policy, per_token, beta",
                         list(itertools.product(TRACES, LOSS_TYPES, [False, True], [False, True], [0.0, 0.04])))
def test_matches_reference(trace, loss_type, on_policy, per_token, beta, device):
    B, T = 5, 29
    lp, old, adv, mask, ref = make_batch(B, T, seed=10 * TRACES.index(trace) + LOSS_TYPES.index(loss_type),
                                         device=device)  # deterministic: str hashes are salted per process
    mask[2] = False  # an all-masked row
    if per_token:
        adv = torch.randn(B, T, dtype=torch.float64, device=device)
    kw = dict(ref_logprobs=ref, trace=trace, lam=0.95, gamma=0.99, beta=beta, loss_type=loss_type,
              adv_clamp_min=-0.1 if trace else None, epsilon_high=0.28, max_completion_length=40)
    ours, expected = run_both(lp, None if on_policy else old, adv, mask, **kw)
    assert_matches(ours, expected)
    assert (ours[1][2] == 0).all()


@pytest.mark.parametrize("trace", ["recent", "both"])
def test_long_row_and_t1(trace, device):
    lp, old, adv, mask, ref = make_batch(2, 3001, seed=1, spread=0.01, device=device)
    ours, expected = run_both(lp, old, adv, mask, ref_logprobs=ref, trace=trace, lam=0.99, beta=0.1)
    assert_matches(ours, expected, atol=2e-5)
    lp, old, adv, mask, ref = make_batch(3, 1, seed=2, device=device)
    ours, expected = run_both(lp, old, adv, mask, ref_logprobs=ref, trace=trace, beta=0.1)
    assert_matches(ours, expected)


def trl_grpo_loss(lp, old, adv, mask, eps_low, eps_high):
    """TRL's token-level (dapo/bnpo) GRPO loss, written out: the trace=None contract."""
    ratio = torch.exp(lp - old)
    a = adv.unsqueeze(1)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def test_trace_none_is_plain_grpo(device):
    lp, old, adv, mask, _ = make_batch(4, 33, seed=5, device=device)
    loss, _ = lk.grpo_lambda_loss(lp, old, adv, mask, trace=None, epsilon_low=0.2, epsilon_high=0.28)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_()
    loss2 = trl_grpo_loss(lp2, old, adv, mask.double(), 0.2, 0.28)
    (grad2,) = torch.autograd.grad(loss2, lp2)
    torch.testing.assert_close(loss.double(), loss2.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, grad2, atol=1e-6, rtol=1e-5)


def verl_agg_loss(loss_mat, mask, mode):
    """verl's `agg_loss` (trainer/ppo/core_algos.py, single process) written out."""
    seq_sum = (loss_mat * mask).sum(-1)
    if mode == "token-mean":
        return seq_sum.sum() / mask.sum()
    if mode == "seq-mean-token-sum":
        return seq_sum.mean()
    if mode == "seq-mean-token-mean":
        return (seq_sum / mask.sum(-1)).mean()
    if mode == "seq-mean-token-sum-norm":  # the Dr. GRPO paper's: no division by the number of sequences
        return seq_sum.sum() / mask.shape[-1]
    raise ValueError(mode)


@pytest.mark.parametrize("mode, options", [
    ("token-mean", lambda B, T: dict(loss_type="bnpo")),
    ("seq-mean-token-sum", lambda B, T: dict(loss_type="dapo", num_items_in_batch=B)),
    ("seq-mean-token-mean", lambda B, T: dict(loss_type="grpo")),
    ("seq-mean-token-sum-norm", lambda B, T: dict(loss_type="dapo", num_items_in_batch=T)),
])
def test_verl_loss_agg_modes_map_to_loss_types(mode, options, device):
    """The README's mapping of verl's loss_agg_mode onto loss_type (every row has a token: verl's seq-mean-token-mean
    divides an empty row's 0 by 0)."""
    B, T = 4, 21
    lp, old, adv, mask, _ = make_batch(B, T, seed=8, device=device)
    mask[:, 0] = True
    loss, _ = lk.grpo_lambda_loss(lp, old, adv, mask, trace=None, **options(B, T))
    ratio = torch.exp(lp.detach() - old)
    a = adv.unsqueeze(1)
    loss_mat = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    torch.testing.assert_close(loss.double(), verl_agg_loss(loss_mat, mask.double(), mode), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("on_policy", [False, True])
def test_importance_weights_fold_into_per_token_advantages(on_policy, device):
    """Per-token advantages w·max(Â, c) with no clamp in the loss give the loss whose policy term is weighted by
    w ≥ 0 (zeros included), the KL term not, with a trace; value and gradient (the fold the trainers used before
    `policy_weights`, which also keeps the clip metrics of zero-weight tokens: tests/test_policy_weights.py)."""
    B, T, a, c = 4, 19, 0.9, -0.1
    lp, old, adv, mask, ref = make_batch(B, T, seed=11, spread=0.3, device=device)
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device) * 2
    w[0, :5] = 0.0
    old_or_lp = lp.detach() if on_policy else old
    kw = dict(ref_logprobs=ref, trace="both", lam=a, beta=0.1, loss_type="dapo")
    loss, _ = lk.grpo_lambda_loss(lp, None if on_policy else old, w * adv.clamp(min=c).unsqueeze(1), mask,
                                  adv_clamp_min=None, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_()
    m = mask.double()
    ratio = torch.exp(trace_scan(m * (lp2 - old_or_lp), a, "both"))
    a_c = adv.clamp(min=c).unsqueeze(1)
    policy = -w * torch.minimum(ratio * a_c, ratio.clamp(0.8, 1.2) * a_c)
    d = ref - lp2
    want = (m * (policy + 0.1 * (torch.exp(d) - d - 1))).sum() / m.sum()
    (grad_want,) = torch.autograd.grad(want, lp2)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), grad_want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("trace", ["recent", "both"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_gradient_is_grpo_with_scanned_advantages(trace, loss_type, device):
    """On-policy, ∂L/∂ℓ_j = −m_j Σ_{t≥j} w(t, j) n_t Â^c_t: GRPO with per-token advantages from the reverse scan."""
    B, T, a, clamp = 4, 24, 0.9, -0.1
    lp, _, adv, mask, _ = make_batch(B, T, seed=7, device=device)
    loss, metrics = lk.grpo_lambda_loss(lp, None, adv, mask, trace=trace, lam=a, adv_clamp_min=clamp,
                                        loss_type=loss_type)
    (grad,) = torch.autograd.grad(loss, lp)
    # n_t from a trace=None GRPO run with unit advantages: ∂L/∂ℓ_t = −n_t
    lp_n = lp.detach().clone().requires_grad_()
    (neg_n,) = torch.autograd.grad(
        lk.grpo_lambda_loss(lp_n, None, torch.ones_like(adv), mask, trace=None, loss_type=loss_type)[0], lp_n)
    n = -neg_n
    W = R.trace_weight_matrix(T, a, trace).to(device)
    c = n * adv.clamp(min=clamp).unsqueeze(1)
    scanned = (c @ W) * mask  # Σ_{t≥j} w(t, j)·n_t·Â_t
    torch.testing.assert_close(grad, -scanned, atol=1e-6, rtol=1e-5)
    # the same gradient from plain GRPO with per-token advantages A^eff = scanned / n on valid tokens
    a_eff = torch.where(n > 0, scanned / n.clamp(min=1e-30), torch.zeros((), dtype=n.dtype, device=device))
    lp2 = lp.detach().clone().requires_grad_()
    loss2, _ = lk.grpo_lambda_loss(lp2, None, a_eff, mask, trace=None, loss_type=loss_type)
    (grad2,) = torch.autograd.grad(loss2, lp2)
    torch.testing.assert_close(grad, grad2, atol=1e-6, rtol=1e-5)
    assert metrics["ratio_mean"].item() == 1.0 and metrics["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("loss_type, expected", [
    ("dapo", lambda m, B, L: 1.0),
    ("bnpo", lambda m, B, L: 1.0),
    ("grpo", lambda m, B, L: (m.sum(1) > 0).double().sum() / B),
    ("dr_grpo", lambda m, B, L: m.sum() / (B * L)),
    ("luspo", lambda m, B, L: m.sum() / B),
])
@pytest.mark.parametrize("max_len", [None, 50])
def test_normalisers(loss_type, expected, max_len, device):
    """With on-policy ratios and unit advantages every token's loss is −1, so −loss is Σ n: the normaliser."""
    B, T = 4, 30
    mask = random_mask(B, T, seed=3).to(device)
    mask[3] = False
    lp = torch.zeros(B, T, device=device, requires_grad=True)
    loss, _ = lk.grpo_lambda_loss(lp, None, torch.ones(B, device=device), mask, trace=None, loss_type=loss_type,
                                  max_completion_length=max_len)
    L = T if max_len is None else max_len
    torch.testing.assert_close(-loss.double().cpu(), torch.as_tensor(expected(mask.cpu(), B, L), dtype=torch.float64))


def test_dapo_num_items_in_batch(device):
    mask = random_mask(3, 20, seed=4).to(device)
    lp = torch.zeros(3, 20, device=device, requires_grad=True)
    n_items = 4 * mask.sum().item()
    for value in (n_items, torch.tensor(n_items, device=device)):
        loss, _ = lk.grpo_lambda_loss(lp, None, torch.ones(3, device=device), mask, trace=None,
                                      num_items_in_batch=value)
        assert abs(loss.item() + 0.25) < 1e-6


@pytest.mark.parametrize("log_ratio, adv, clipped, which", [
    (0.4, 1.0, True, "high"),    # ρ = 1.49 > 1.28 with Â > 0: clipped, no gradient
    (0.4, -1.0, False, None),    # ρ above the range but Â < 0: the unclipped branch is the minimum
    (-0.4, -1.0, True, "low"),   # ρ = 0.67 < 0.8 with Â < 0: clipped
    (-0.4, 1.0, False, None),    # ρ below the range but Â > 0: not clipped
    (0.1, 1.0, False, None),     # inside the range
])
def test_clipping_fires_in_the_advantage_direction(log_ratio, adv, clipped, which, device):
    B, T = 1, 6
    lp = torch.full((B, T), -1.0, device=device, requires_grad=True)
    old = lp.detach() - log_ratio
    loss, metrics = lk.grpo_lambda_loss(lp, old, torch.full((B,), adv, device=device), torch.ones(B, T, device=device),
                                        trace=None, epsilon_low=0.2, epsilon_high=0.28)
    (grad,) = torch.autograd.grad(loss, lp)
    assert bool((grad == 0).all()) == clipped
    assert metrics["clip_ratio/region_mean"].item() == float(clipped)
    assert metrics["clip_ratio/high_mean"].item() == float(which == "high")
    assert metrics["clip_ratio/low_mean"].item() == float(which == "low")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("advantages, low_min, high_max", [
    ([-1.0, -1.0, 1.0], 0.0, 0.25),     # a sequence with Â > 0 has no low-clipped token: TRL's low_min is then 0
    ([-1.0, -1.0, -1.0], 0.25, 0.0),    # low-clipped: row 0 1 of 4 tokens, row 1 2 of 3 (its 4th is padding), row 2 3/4
])
def test_per_sequence_clip_extremes(impl, advantages, low_min, high_max, device):
    """TRL's clip_ratio/low_min and high_max: the extremes over sequences of each one's clipped fraction (a masked
    per-sequence mean); sequences without tokens (row 3) are left out."""
    log_ratio = torch.tensor([[-0.5, 0.0, 0.0, 0.0], [-0.5, -0.5, 0.0, 9.0], [-0.5, -0.5, -0.5, 0.5], [9.0] * 4],
                             device=device)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], device=device)
    lp = torch.full((4, 4), -1.0, device=device)
    adv = torch.tensor(advantages + [1.0], device=device)
    _, metrics = lk.grpo_lambda_loss(lp, lp - log_ratio, adv, mask, trace=None, impl=impl)
    assert metrics["clip_ratio/low_min"].item() == pytest.approx(low_min, abs=1e-7)
    assert metrics["clip_ratio/high_max"].item() == pytest.approx(high_max, abs=1e-7)
    _, empty = lk.grpo_lambda_loss(lp, lp - log_ratio, adv, torch.zeros_like(mask), trace=None, impl=impl)
    assert empty["clip_ratio/low_min"].item() == 0 and empty["clip_ratio/high_max"].item() == 0


def test_trace_clipping_uses_traced_ratio(device):
    """With a trace, small per-token log-ratios accumulate: later tokens clip although each Δ is inside the range."""
    T = 40
    lp = torch.full((1, T), -1.0, device=device, requires_grad=True)
    old = lp.detach() - 0.05
    loss, metrics = lk.grpo_lambda_loss(lp, old, torch.ones(1, device=device), torch.ones(1, T, device=device),
                                        trace="recent", lam=0.99)
    assert 0 < metrics["clip_ratio/high_mean"].item() < 1
    loss_none, metrics_none = lk.grpo_lambda_loss(lp, old, torch.ones(1, device=device),
                                                  torch.ones(1, T, device=device), trace=None)
    assert metrics_none["clip_ratio/high_mean"].item() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_fp32_math(dtype, device):
    lp, old, adv, mask, ref = make_batch(3, 40, seed=9, device=device, dtype=dtype)
    loss, metrics = lk.grpo_lambda_loss(lp, old, adv, mask, ref_logprobs=ref, beta=0.05, trace="both")
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    lp_ref = lp.detach().double().requires_grad_()
    loss_ref, _ = R.grpo_lambda_loss(lp_ref, old.double(), adv.double(), mask,
                                     ref_logprobs=ref.double(), beta=0.05, trace="both")
    (grad_ref,) = torch.autograd.grad(loss_ref, lp_ref)
    torch.testing.assert_close(loss.double().cpu(), loss_ref.cpu(), atol=1e-5, rtol=1e-5)
    # fp32 arithmetic, one rounding to lp's dtype at the end: relative to the largest gradient entry
    scale = grad_ref.abs().max().item()
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(grad.double(), grad_ref, atol=tol * scale, rtol=tol)


def test_module_and_impls_agree(device):
    lp, old, adv, mask, ref = make_batch(3, 25, seed=11, device=device, dtype=torch.float32)
    module = lk.GRPOLambdaLoss(trace="both", lam=0.99, adv_clamp_min=-0.1, beta=0.01)
    loss_module, _ = module(lp, old, adv, mask, ref_logprobs=ref)
    loss_torch, _ = lk.grpo_lambda_loss(lp, old, adv, mask, ref_logprobs=ref, trace="both", lam=0.99,
                                        adv_clamp_min=-0.1, beta=0.01, impl="torch")
    torch.testing.assert_close(loss_module, loss_torch, atol=1e-6, rtol=1e-5)
    assert "trace='both'" in repr(module)


def test_no_gradient_to_constants(device):
    lp, old, adv, mask, ref = make_batch(2, 10, device=device)
    old.requires_grad_()
    adv.requires_grad_()
    loss, _ = lk.grpo_lambda_loss(lp, old, adv, mask, ref_logprobs=ref, beta=0.1, impl="triton")
    assert torch.autograd.grad(loss, [old, adv], allow_unused=True) == (None, None)


def test_no_grad_forward(device):
    lp, old, adv, mask, ref = make_batch(2, 10, device=device)
    with torch.no_grad():
        loss, _ = lk.grpo_lambda_loss(lp, old, adv, mask)
    ref_loss, _ = R.grpo_lambda_loss(lp.detach(), old, adv, mask)
    torch.testing.assert_close(loss.double(), ref_loss.double().to(loss.device), atol=1e-6, rtol=1e-5)


def bad_call(**overrides):
    B, T = 2, 5
    args = dict(logprobs=torch.randn(B, T), old_logprobs=torch.randn(B, T), advantages=torch.randn(B),
                mask=torch.ones(B, T))
    kw = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return lk.grpo_lambda_loss(args["logprobs"], args["old_logprobs"], args["advantages"], args["mask"], **kw)


@pytest.mark.parametrize("overrides, exc, match", [
    (dict(logprobs=torch.randn(2, 5, 1)), ValueError,
     r"grpo_lambda_loss: `logprobs` must be 2-D; got shape \[2, 5, 1\]"),
    (dict(old_logprobs=torch.randn(2, 4)), ValueError, r"`old_logprobs` must have shape \[2, 5\]; got \[2, 4\]"),
    (dict(advantages=torch.randn(3)), ValueError,
     r"`advantages` must have shape \[2\]; got \[3\]\. Pass one advantage"),
    (dict(mask=torch.ones(2, 6)), ValueError, r"`mask` must have shape \[2, 5\]"),
    (dict(logprobs=torch.ones(2, 5, dtype=torch.long)), TypeError, r"`logprobs` must be a floating tensor"),
    (dict(mask=torch.ones(2, 5, dtype=torch.complex64)), TypeError, r"`mask` must be bool, integer or floating"),
    (dict(old_logprobs=torch.randn(2, 5, device="meta")), ValueError, r"one device"),
    (dict(lam=-0.5), ValueError, r"`lam` must be a number in \[0, 1\]; got -0.5"),
    (dict(gamma=2), ValueError, r"`gamma` must be a number in \[0, 1\]; got 2"),
    (dict(trace="forward"), ValueError, r"`trace` must be one of \('recent', 'both', None\)"),
    (dict(loss_type="sequence"), ValueError,
     r"`loss_type` must be one of \('dapo', 'bnpo', 'grpo', 'dr_grpo', 'luspo'\)"),
    (dict(beta=0.1), ValueError, r"`ref_logprobs` is required when beta > 0"),
    (dict(beta=-1.0), ValueError, r"`beta` must be a finite number >= 0"),
    (dict(epsilon_low=-0.1), ValueError, r"`epsilon_low` must be a finite number >= 0"),
    (dict(max_completion_length=0), ValueError, r"`max_completion_length` must be a positive integer"),
    (dict(num_items_in_batch=0), ValueError, r"`num_items_in_batch` must be a positive number"),
    (dict(adv_clamp_min=float("nan")), ValueError, r"`adv_clamp_min` must be a finite number or None"),
    (dict(impl="fast"), ValueError, r"`impl` must be one of \('auto', 'triton', 'torch'\)"),
])
def test_bad_input(overrides, exc, match):
    with pytest.raises(exc, match=match):
        bad_call(**overrides)


@pytest.mark.gpu
@pytest.mark.parametrize("trace", ["recent", "both"])
def test_65536_token_row_on_gpu(trace):
    lp, old, adv, mask, ref = make_batch(1, 65536, seed=3, spread=0.001)
    kw = dict(ref_logprobs=ref, trace=trace, lam=0.99, beta=0.04, adv_clamp_min=-0.1)
    loss, metrics = lk.grpo_lambda_loss(lp.cuda(), old.cuda(), adv.cuda(), mask.cuda(),
                                        **{**kw, "ref_logprobs": ref.cuda()})
    loss_ref, metrics_ref = R.grpo_lambda_loss(lp, old, adv, mask, **kw)
    torch.testing.assert_close(loss.cpu().double(), loss_ref.detach(), atol=1e-4, rtol=1e-4)
    for k in metrics_ref:
        torch.testing.assert_close(metrics[k].cpu().double(), metrics_ref[k].double(), atol=1e-4, rtol=1e-4)


def test_per_sequence_clip_extremes_past_one_block_of_rows(device):
    """The finalize kernel walks the rows in blocks of 1024: a minimum in the second block counts too."""
    B, T = 1026, 2
    lp = torch.full((B, T), -1.0, device=device)
    log_ratio = torch.full((B, T), -0.5, device=device)  # every token low-clipped (Â < 0) ...
    log_ratio[1025, 0] = 0.0  # ... but one: this row's fraction, 1/2, is the least
    _, metrics = lk.grpo_lambda_loss(lp, lp - log_ratio, -torch.ones(B, device=device), torch.ones(B, T, device=device),
                                     trace=None)
    assert metrics["clip_ratio/low_min"].item() == 0.5 and metrics["clip_ratio/high_max"].item() == 0.0
