"""`kl_bias_correction`: the k3 KL weighted by each token's own ratio π/π_old (DeepSeek-V3.2; TRL's
`use_bias_correction_kl`, its default).

The reference is checked against the formula written out as TRL writes it, and against the closed-form gradient
β·n·r·(ℓ − ℓ_ref); the kernels (objective, fused loss in every plan: on-policy rows, off-policy one pass, two
passes, split, vocabulary slabs) against the reference."""
import itertools

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R

from ._helpers import IMPLS, LOSS_TYPES, PLANS, assert_module_is_function, force_plan, poisoned_outputs, \
    set_chunk_rows
from ._lm_head import assert_matches, make_batch, perturbed_old, reference_run
from .test_objective import assert_matches as assert_objective_matches
from .test_objective import assert_padding_never_read
from .test_objective import make_batch as make_logprob_batch
from .test_objective import run_both

BETA = 0.3  # large, so that a wrong KL term shows beside the clipped one


def trl_loss(lp, old, adv, mask, ref, beta, eps=0.2):
    """TRL 1.16's token-level loss (`_compute_loss`, loss_type "bnpo") with use_bias_correction_kl, written out."""
    coef_1 = torch.exp(lp - old)
    per_token_kl = (torch.exp(ref - lp) - (ref - lp) - 1) * coef_1
    a = adv.unsqueeze(1)
    per_token = -torch.minimum(coef_1 * a, coef_1.clamp(1 - eps, 1 + eps) * a) + beta * per_token_kl
    m = mask.to(lp.dtype)
    return (per_token * m).sum() / m.sum(), (per_token_kl * m).sum() / m.sum()


@pytest.mark.parametrize("on_policy", [True, False])
def test_reference_is_trls_bias_corrected_kl(on_policy):
    lp, old, adv, mask, ref = make_logprob_batch(4, 13, seed=3)
    old_or_lp = lp.detach() if on_policy else old
    loss, metrics = R.grpo_lambda_loss(lp, None if on_policy else old, adv, mask, ref_logprobs=ref, trace=None,
                                       beta=BETA, loss_type="bnpo", kl_bias_correction=True)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_()
    want, want_kl = trl_loss(lp2, old_or_lp, adv, mask, ref, BETA)
    (grad_want,) = torch.autograd.grad(want, lp2)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["kl"].double(), want_kl, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("on_policy", [True, False])
def test_reference_kl_gradient_is_ratio_times_log_ratio_to_ref(on_policy):
    """With Â = 0 only the KL acts: ∂loss/∂ℓ = β·n·r·(ℓ − ℓ_ref), r = exp(ℓ − ℓ_old) (1 on-policy), whatever the
    trace; uncorrected it is β·n·(1 − exp(ℓ_ref − ℓ)). On-policy the values agree (r = 1), the gradients do not."""
    lp, old, _, mask, ref = make_logprob_batch(3, 11, seed=4)
    adv = torch.zeros(3, dtype=torch.float64)
    m = mask.double()
    n = m / m.sum()
    r = torch.ones_like(old) if on_policy else torch.exp(lp.detach() - old)
    grads, values = {}, {}
    for corrected in (False, True):
        loss, _ = R.grpo_lambda_loss(lp, None if on_policy else old, adv, mask, ref_logprobs=ref, trace="both",
                                     beta=BETA, kl_bias_correction=corrected)
        values[corrected] = loss.detach()
        (grads[corrected],) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grads[True], BETA * n * r * (lp.detach() - ref), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[False], BETA * n * (1 - torch.exp(ref - lp.detach())), rtol=1e-12, atol=1e-14)
    if on_policy:
        torch.testing.assert_close(values[True], values[False], rtol=1e-14, atol=0)


@pytest.mark.parametrize("trace, loss_type, on_policy",
                         list(itertools.product([None, "recent", "both"], LOSS_TYPES, [False, True])))
def test_objective_kernels_match_reference(trace, loss_type, on_policy, device):
    lp, old, adv, mask, ref = make_logprob_batch(5, 23, seed=LOSS_TYPES.index(loss_type), spread=0.4, device=device)
    mask[1] = False  # an all-masked row
    kw = dict(ref_logprobs=ref, trace=trace, lam=0.95, beta=1.0, loss_type=loss_type, epsilon_high=0.28,
              adv_clamp_min=-0.1 if trace else None, max_completion_length=30, kl_bias_correction=True)
    ours, expected = run_both(lp, None if on_policy else old, adv, mask, **kw)
    assert_objective_matches(ours, expected)
    # and it is not the uncorrected loss (off-policy: the value; on-policy: the gradient)
    _, plain = run_both(lp, None if on_policy else old, adv, mask, **dict(kw, kl_bias_correction=False))
    assert (ours[1].double().cpu() - plain[1]).abs().max() > 100 * 1e-5  # 100 × the comparison's tolerance


@pytest.fixture
def small_chunks(monkeypatch):
    set_chunk_rows(monkeypatch, 8)


def _fused_case(device, on_policy, seed=0):
    hidden, weight, b, ids, mask, adv = make_batch(B=4, device=device, seed=seed)
    old = None if on_policy else perturbed_old(hidden, weight, b, ids, 0.8, scale=0.3)
    with torch.no_grad():
        ref = R.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double(), temperature=0.8).float()
        ref = ref + 0.2 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(5)).to(device)
    kw = dict(old_logprobs=old, ref_logprobs=ref, temperature=0.8, beta=BETA, kl_bias_correction=True,
              adv_clamp_min=-0.1, epsilon_high=0.28, return_entropy=True)
    return (hidden, weight, b, ids, mask, adv), kw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan, rows", PLANS)
@pytest.mark.parametrize("trace", [None, "both"])
@pytest.mark.parametrize("on_policy", [True, False])
def test_fused_loss_matches_reference_in_every_plan(impl, plan, rows, trace, on_policy, device, monkeypatch):
    force_plan(monkeypatch, plan, rows)
    (hidden, weight, b, ids, mask, adv), kw = _fused_case(device, on_policy, seed=PLANS.index((plan, rows)))
    kw["trace"] = trace
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, b, ids, mask, adv, **kw))


def test_fused_loss_on_policy_kl_gradient_differs_from_uncorrected(device):
    """The on-policy row kernel's KL term changes (the values of loss and metrics do not: r = 1)."""
    (hidden, weight, b, ids, mask, adv), kw = _fused_case(device, on_policy=True)
    out = {}
    for corrected in (False, True):
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b,
                                                  **dict(kw, kl_bias_correction=corrected))
        out[corrected] = loss.detach(), metrics["kl"], torch.autograd.grad(loss, hidden)[0]
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-6, atol=1e-7)
    assert (out[True][2] - out[False][2]).abs().max() > 1e-4


def test_modules_pass_it_on(device):
    lp, old, adv, mask, ref = make_logprob_batch(3, 9, seed=6, dtype=torch.float32, device=device)
    assert_module_is_function(lk.GRPOLambdaLoss, lk.grpo_lambda_loss, dict(beta=BETA, kl_bias_correction=True),
                              (lp, old, adv, mask), ref_logprobs=ref)
    (hidden, weight, b, ids, mask, adv), kw = _fused_case(device, on_policy=False)
    options = {k: kw[k] for k in ("temperature", "beta", "kl_bias_correction", "adv_clamp_min", "epsilon_high")}
    assert_module_is_function(lk.FusedGRPOLambdaLoss, lk.fused_grpo_lambda_loss, options,
                              (hidden, weight, ids, mask, adv), old_logprobs=kw["old_logprobs"],
                              ref_logprobs=kw["ref_logprobs"], bias=b)


def test_flag_must_be_a_bool():
    lp, old, adv, mask, ref = make_logprob_batch(2, 5, seed=7)
    with pytest.raises(TypeError, match="`kl_bias_correction` must be a bool; got str"):
        lk.grpo_lambda_loss(lp, old, adv, mask, ref_logprobs=ref, beta=0.1, kl_bias_correction="yes")


@pytest.mark.parametrize("on_policy", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_float_mask_and_poisoned_padding(impl, on_policy, device):
    """Weights other than 0/1 in the mask (the ratio stays exp(ℓ − ℓ_old): only the trace sees m), and NaN/±inf in
    every input at padding, which is never read."""
    lp, old, adv, _, ref = make_logprob_batch(3, 15, seed=9, spread=0.4, device=device)
    mask = torch.tensor([0.0, 0.5, 2.0, 1.0, 0.25], device=device).repeat(3, 3)
    mask[1] = 0.0
    metrics, want_m = assert_padding_never_read(lp, None if on_policy else old, adv, mask, impl, ref=ref,
                                                ref_poison=torch.inf, trace="both", lam=0.9, beta=BETA,
                                                loss_type="grpo", kl_bias_correction=True)
    torch.testing.assert_close(metrics["kl"].double(), want_m["kl"].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_kl_with_an_overflowing_ratio_adds_nothing(impl, device):
    """ℓ = ℓ_ref where ℓ − ℓ_old is past exp's range: kl·r is 0·inf; it adds 0 to value and gradient, not NaN (the
    other tokens are unaffected)."""
    lp = torch.tensor([[-1.0, -2.0, -0.5]], device=device, requires_grad=True)
    ref = torch.tensor([[-1.2, -2.0, -0.6]], device=device)
    old = torch.tensor([[-1.0, -200.0, -0.7]], device=device)
    mask, adv = torch.ones(1, 3, device=device), torch.zeros(1, device=device)
    loss, metrics = lk.grpo_lambda_loss(lp, old, adv, mask, ref_logprobs=ref, trace=None, beta=1.0,
                                        loss_type="bnpo", kl_bias_correction=True, impl=impl)
    (grad,) = torch.autograd.grad(loss, lp)
    d = (ref - lp).detach()[0, [0, 2]].double()
    r = torch.exp((lp.detach() - old)[0, [0, 2]]).double()
    torch.testing.assert_close(loss.double(), ((torch.exp(d) - d - 1) * r).sum() / 3, rtol=1e-5, atol=0)
    torch.testing.assert_close(metrics["kl"].double(), loss.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad[0].double(), torch.stack([-d[0] * r[0], torch.zeros((), dtype=torch.float64,
                               device=device), -d[1] * r[1]]) / 3, rtol=1e-5, atol=0)


def test_old_logprobs_are_saved_only_where_the_backward_reads_them(device):
    """A caller may reuse its ℓ_old buffer between forward and backward (the kernels read it in the backward only for
    the ratio-weighted KL off-policy); with that KL, autograd's version check guards it."""
    lp, old, adv, mask, ref = make_logprob_batch(2, 9, seed=10, dtype=torch.float32, device=device)
    for beta, corrected, reused_ok in ((0.0, True, True), (0.1, False, True), (0.1, True, False)):
        old_buf = old.clone()
        loss, _ = lk.grpo_lambda_loss(lp, old_buf, adv, mask, ref_logprobs=ref, beta=beta,
                                      kl_bias_correction=corrected, impl="triton")
        old_buf.add_(1.0)
        if reused_ok:
            torch.autograd.grad(loss, lp)
        else:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(loss, lp)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_loss_with_poisoned_padding(impl, device, small_chunks):
    (hidden, weight, b, ids, mask, adv), kw = _fused_case(device, on_policy=False, seed=3)
    kw["trace"] = "both"
    real = mask != 0
    poisoned = dict(kw, old_logprobs=torch.where(real, kw["old_logprobs"], torch.nan),
                    ref_logprobs=torch.where(real, kw["ref_logprobs"], -torch.inf))
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **poisoned)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, b, ids, mask, adv, **kw))
