"""`policy_loss="vespo"`: TRL 1.16's VESPO, `−sg(φ(w))·Â·ℓ` with φ a gamma-shaped function of each sequence's
importance weight w = exp(clamp(Σ_t m·clamp(ℓ − ℓ_old, ±20), log 1e-8, 20)).

The reference is checked against TRL's `get_gamma_weights` and `_compute_loss` written out (its metric included);
the objective kernels and the fused loss (every plan) against the reference; padding, overflow and bad input."""
import itertools
import math

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R

from ._helpers import IMPLS, PLANS, assert_module_is_function, force_plan, poisoned_outputs
from ._lm_head import assert_matches, make_batch, perturbed_old, reference_run
from .test_objective import assert_matches as assert_objective_matches
from .test_objective import assert_padding_never_read
from .test_objective import make_batch as make_logprob_batch
from .test_objective import run_both

VESPO = lk.VESPO(k_pos=2.5, lambda_pos=3.0, k_neg=3.5, lambda_neg=1.5)  # (not the defaults: each one is used)
TOKEN = dict(trace=None, policy_loss=VESPO)


def trl_vespo(lp, old, adv, mask, n_items):
    """TRL 1.16's `get_gamma_weights` and its vespo loss (normalised as dapo), written out: (loss, phi_seq_mean)."""
    m = mask.to(lp.dtype)
    log_ratio = lp - old
    a = adv.unsqueeze(1) if adv.dim() == 1 else adv
    seq_log_ratio = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * m, dim=-1, keepdim=True)
    log_w_seq = torch.clamp(seq_log_ratio, math.log(1e-8), 20.0)
    w_seq = torch.exp(log_w_seq)
    is_nonneg_adv = a >= 0
    k_seq = torch.where(is_nonneg_adv, VESPO.k_pos, VESPO.k_neg)
    lambda_seq = torch.where(is_nonneg_adv, VESPO.lambda_pos, VESPO.lambda_neg).clamp(min=1e-4)
    phi_seq = torch.exp(lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq).nan_to_num(nan=0.0, posinf=0.0,
                                                                                           neginf=0.0).detach()
    per_token_loss = -phi_seq * a * lp
    loss = (per_token_loss * m).sum() / n_items
    phi_mean = phi_seq.mean() if phi_seq.shape[1] == 1 else (phi_seq * m).sum() / m.sum()  # global_masked_mean
    return loss, phi_mean


@pytest.mark.parametrize("per_token", [False, True])
def test_reference_is_trls(per_token):
    lp, old, adv, mask, _ = make_logprob_batch(6, 21, seed=1, spread=0.1)
    mask[3] = False  # a sequence without tokens: w = 1, counted in the sequence mean
    old[0] = lp[0].detach() - 0.02  # w above 1 (a little: φ = e^λ·w^k·e^(−λw) falls fast)
    old[1, :3] = lp[1, :3].detach() + 30.0  # log-ratios past the ±20 clamp, and a sum past log 1e-8
    old[4] = lp[4].detach() - 5.0  # a sum past the upper clamp, w = e^20: φ underflows to 0 (no NaN)
    adv[5] = 0.0
    if per_token:
        adv = adv.unsqueeze(1) * torch.randn(6, 21, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    n_items = 2.0 * mask.sum().item()
    loss, metrics = R.grpo_lambda_loss(lp, old, adv, mask, loss_type="dapo", num_items_in_batch=n_items, **TOKEN)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_()
    want, phi_mean = trl_vespo(lp2, torch.where(mask, old, lp2.detach()), adv, mask, n_items)
    (grad_want,) = torch.autograd.grad(want, lp2)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_want, rtol=1e-12, atol=1e-14)
    assert set(metrics) == {"vespo/phi_seq_mean", "ratio_mean"}
    torch.testing.assert_close(metrics["vespo/phi_seq_mean"].double(), phi_mean, rtol=1e-6, atol=0)
    assert 0 < phi_mean < 1 and (grad[0] != 0).any() and (grad[4] == 0).all()  # (w = e^20: φ = 0)


@pytest.mark.parametrize("on_policy, per_token, extras", list(itertools.product(
    [False, True], [False, True], ["kl", "w+clamp"])))
def test_objective_kernels_match_reference(on_policy, per_token, extras, device):
    lp, old, adv, mask, ref = make_logprob_batch(5, 23, seed=3, spread=0.1, device=device)
    mask[1] = False  # an all-masked row
    # row 3 (14 tokens): a log-ratio of 25, clamped to 20, and the others' −20.2 in all: w = e^(−0.2), not e^4.8
    real = mask[3].nonzero().flatten()
    old[3, real[0]] = lp[3, real[0]].detach() - 25.0
    old[3, real[1:]] = lp[3, real[1:]].detach() + 20.2 / (len(real) - 1)
    old[0] = lp[0].detach() - 2.0  # a sum past 20 (w = e^20: φ = 0)
    old[4] = lp[4].detach() + 30.0  # a sum below log 1e-8 (w = 1e-8)
    adv[2] = 0.0  # Â = 0 takes the positive pair (k_pos, λ_pos) in φ's metric
    adv[3] = -adv[3].abs()  # (k, λ) of both signs
    if per_token:
        g = torch.Generator().manual_seed(2)
        adv = adv.unsqueeze(1) * torch.randn(5, 23, generator=g, dtype=torch.float64).to(device)
    kw = dict(ref_logprobs=ref, loss_type="grpo", **TOKEN)
    if extras == "kl":
        kw.update(beta=0.1, kl_bias_correction=on_policy)  # (off-policy row 3's ratio e^25 would weigh its KL)
    else:
        g = torch.Generator().manual_seed(3)
        kw.update(adv_clamp_min=-0.4, policy_weights=torch.rand(5, 23, generator=g, dtype=torch.float64).to(device))
    ours, expected = run_both(lp, None if on_policy else old, adv, mask, **kw)
    assert_objective_matches(ours, expected)


def test_on_policy_is_reinforce(device):
    """φ(1) = 1: on-policy the gradient is −n_j·Â_j on each log-prob (no scan), the metric 1."""
    lp, _, adv, mask, _ = make_logprob_batch(4, 19, seed=6, device=device)
    loss, metrics = lk.grpo_lambda_loss(lp, None, adv, mask, loss_type="bnpo", **TOKEN)
    (grad,) = torch.autograd.grad(loss, lp)
    m = mask.to(grad.dtype)
    torch.testing.assert_close(grad, -m / m.sum() * adv.unsqueeze(1), rtol=1e-6, atol=1e-9)
    assert metrics["vespo/phi_seq_mean"].item() == 1.0


@pytest.mark.parametrize("impl", IMPLS)
def test_poisoned_padding_is_never_read(impl, device):
    lp, old, adv, mask, ref = make_logprob_batch(4, 17, seed=9, spread=0.1, device=device)
    ours, want = assert_padding_never_read(lp, old, adv, mask, impl, ref=ref, beta=0.05, **TOKEN)
    torch.testing.assert_close(ours["vespo/phi_seq_mean"].double(), want["vespo/phi_seq_mean"].double())


@pytest.mark.parametrize("impl", IMPLS)
def test_log_weight_clamps(impl, device):
    """With a small k, φ still tells the clamps apart: a row whose Σ log-ratio is −30 (w clamped to 1e-8), and one
    whose first log-ratio 25 is clamped to 20 while the others sum to −20.2 (w = e^(−0.2), not e^4.8)."""
    lp = -torch.rand(2, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
    lp.requires_grad_()
    old = lp.detach() + 5.0
    old[1, 0] = lp[1, 0].detach() - 25.0
    old[1, 1:] = lp[1, 1:].detach() + 20.2 / 5
    policy = lk.VESPO(k_pos=0.05, lambda_pos=0.5)
    ours, expected = run_both(lp, old, torch.tensor([1.0, 0.8], dtype=torch.float64, device=device),
                              torch.ones(2, 6, dtype=torch.bool, device=device), trace=None, policy_loss=policy)
    assert_objective_matches(ours, expected)
    phi = [math.exp(0.5 + 0.05 * log_w - 0.5 * math.exp(log_w)) for log_w in (math.log(1e-8), -0.2)]
    torch.testing.assert_close(expected[2]["vespo/phi_seq_mean"].double(), torch.tensor(sum(phi) / 2,
                               dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_overflowing_phi_counts_zero(impl, device):
    """A k so large that φ overflows: 0 (TRL's nan_to_num), no NaN in the loss or the gradient."""
    lp = torch.tensor([[-1.0, -0.5, -2.0]], device=device, requires_grad=True)
    old = lp.detach() - 6.0  # Σ log-ratio 18: log w = 18, φ = exp(λ + k·18 − λ·e^18) = 0 for λ > 0 ...
    policy = lk.VESPO(k_pos=1e6, lambda_pos=0.0)  # ... but with λ clamped to 1e-4 and k = 1e6: exp(≈1.8e7) = inf
    loss, metrics = lk.grpo_lambda_loss(lp, old, torch.tensor([1.0], device=device), torch.ones(1, 3, device=device),
                                        trace=None, policy_loss=policy, impl=impl)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == 0.0 and (grad == 0).all() and metrics["vespo/phi_seq_mean"].item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan, rows", PLANS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_fused_loss_matches_reference(impl, plan, rows, on_policy, device, monkeypatch):
    force_plan(monkeypatch, plan, rows)
    hidden, weight, b, ids, mask, adv = make_batch(B=4, device=device, seed=20 + PLANS.index((plan, rows)))
    g = torch.Generator().manual_seed(rows)
    mask = mask * (0.5 + torch.rand(mask.shape, generator=g)).to(device)  # float weights: m enters the sum once
    old = perturbed_old(hidden, weight, b, ids, 0.8, scale=0.05)
    kw = dict(old_logprobs=None if on_policy else old, temperature=0.8, beta=0.05, ref_logprobs=old,
              return_entropy=True, **TOKEN)
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    expected = reference_run(hidden, weight, b, ids, mask, adv, **kw)
    # φ is an exponential of a sum over the sequence of ℓ's: the fp32 log-probs' rounding (~1e-6 each) moves it by
    # ~1e-5 relative, and the loss −φ·Â·ℓ sums terms of ~|ℓ| ≈ 5 that cancel to ~0.2 (the same inputs through the
    # fp64 objective on our fp32 log-probs differ from the oracle as much)
    assert_matches(loss, metrics, grads, expected, atol_loss=5e-5, rtol_grad=1e-4)
    assert (expected[1]["vespo/phi_seq_mean"] == 1) == on_policy


def test_names_and_modules(device):
    assert lk.VESPO() == lk.VESPO(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)  # TRL's defaults
    lp, old, adv, mask, _ = make_logprob_batch(3, 9, seed=6, dtype=torch.float32, spread=0.2, device=device)
    by_name, _ = lk.grpo_lambda_loss(lp, old, adv, mask, trace=None, policy_loss="vespo")
    by_instance, _ = lk.grpo_lambda_loss(lp, old, adv, mask, trace=None, policy_loss=lk.VESPO())
    assert torch.equal(by_name, by_instance)
    assert_module_is_function(lk.GRPOLambdaLoss, lk.grpo_lambda_loss, TOKEN, (lp, old, adv, mask))
    hidden, weight, b, ids, mask, adv = make_batch(B=3, device=device, seed=4)
    assert_module_is_function(lk.FusedGRPOLambdaLoss, lk.fused_grpo_lambda_loss, TOKEN,
                              (hidden, weight, ids, mask, adv), old_logprobs=perturbed_old(hidden, weight, b, ids, 1),
                              bias=b)


@pytest.mark.parametrize("kw, match", [
    (dict(policy_loss="vespo"), r"policy_loss='vespo'.*got trace='both', importance_sampling_level='token'. Pass "
                                r"trace=None"),  # the default trace
    (dict(policy_loss="vespo", trace=None, importance_sampling_level="sequence"),
     r"policy_loss='vespo'.*importance_sampling_level='sequence'"),
    (dict(epsilon_high=0.28, **TOKEN), r"`epsilon_high` is the clipped objective's"),
    (dict(dual_clip=3.0, **TOKEN), r"`dual_clip` caps the clipped objective's ratio"),
])
def test_bad_combinations_are_clear_errors(kw, match):
    lp, old, adv, mask, ref = make_logprob_batch(2, 5, seed=7)
    with pytest.raises(ValueError, match=match):
        lk.grpo_lambda_loss(lp, old, adv, mask, **kw)
    hidden, weight, _, ids, mask, adv = make_batch(B=2, T=3, H=8, V=20)
    with pytest.raises(ValueError, match=match):
        lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(k_pos=float("nan")), r"VESPO: `k_pos` must be a finite number; got nan"),
    (dict(lambda_neg=True), r"VESPO: `lambda_neg` must be a finite number; got True"),
    (dict(k_neg="3"), r"VESPO: `k_neg` must be a finite number; got '3'"),
])
def test_bad_parameters_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        lk.VESPO(**kw)
