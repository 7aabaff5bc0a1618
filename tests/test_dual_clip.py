"""`dual_clip`: dual-clip PPO (Ye et al. 2020), verl's `clip_ratio_c` (and TRL's `delta` for c ≥ 1 + ε_high): a
token with Â < 0 whose ratio passes c contributes the constant −c·Â.

The reference is checked against TRL's and verl's formulas written out; the objective kernels and the fused loss
(off-policy: one pass, two passes, split plan) against the reference, with the cap firing; on-policy it changes
nothing (ratios are 1)."""
import itertools
import math

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R

from ._helpers import IMPLS, LOSS_TYPES, PLANS, assert_module_is_function, force_plan, poisoned_outputs
from ._lm_head import assert_matches, make_batch, perturbed_old, reference_run
from .test_objective import assert_matches as assert_objective_matches
from .test_objective import assert_padding_never_read
from .test_objective import make_batch as make_logprob_batch
from .test_objective import run_both

C = 1.5  # low, so that many tokens of the test batches (ratios e^(±0.8)) pass it


def trl_loss(lp, old, adv, mask, delta, eps_low=0.2, eps_high=0.28):
    """TRL 1.16's `_compute_loss` policy term with `delta` (loss_type "bnpo"), written out."""
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    coef_1 = torch.clamp(coef_1, max=delta)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    m = mask.to(lp.dtype)
    return (per_token * m).sum() / m.sum()


def verl_loss(lp, old, adv, mask, clip_ratio_c, eps_low=0.2, eps_high=0.28):
    """verl's `compute_policy_loss` (vanilla, dual-clip) with loss_agg_mode "token-mean", written out."""
    ratio = torch.exp(lp - old)
    a = adv.unsqueeze(1).expand_as(ratio)
    clip_1 = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    clip_2 = torch.minimum(-a * clip_ratio_c, clip_1)
    per_token = torch.where(a < 0, clip_2, clip_1)
    m = mask.to(lp.dtype)
    return (per_token * m).sum() / m.sum()


@pytest.mark.parametrize("formula, c", [(trl_loss, C), (verl_loss, C), (verl_loss, 1.1)])  # 1.1 < 1 + ε_high
def test_reference_is_trls_delta_and_verls_dual_clip(formula, c):
    lp, old, adv, mask, _ = make_logprob_batch(6, 21, seed=1, spread=0.8)
    loss, _ = R.grpo_lambda_loss(lp, old, adv, mask, trace=None, epsilon_high=0.28, loss_type="bnpo", dual_clip=c)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_()
    want = formula(lp2, old, adv, mask, c)
    (grad_want,) = torch.autograd.grad(want, lp2)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_want, rtol=1e-12, atol=1e-14)
    capped = (torch.exp(lp - old) > c) & (adv.unsqueeze(1) < 0) & mask
    assert capped.sum() >= 5  # the cap fired
    assert (grad[capped] == 0).all()
    plain, _ = R.grpo_lambda_loss(lp, old, adv, mask, trace=None, epsilon_high=0.28, loss_type="bnpo")
    assert loss < plain - 1e-3  # capped tokens pay less


@pytest.mark.parametrize("trace, loss_type, per_token",
                         list(itertools.product([None, "recent", "both"], LOSS_TYPES, [False, True])))
def test_objective_kernels_match_reference(trace, loss_type, per_token, device):
    lp, old, adv, mask, ref = make_logprob_batch(5, 23, seed=LOSS_TYPES.index(loss_type), spread=0.8, device=device)
    mask[1] = False  # an all-masked row
    adv = torch.tensor([-1.0, 0.5, -0.7, 1.2, -0.3], dtype=torch.float64, device=device)  # three rows that can cap
    if per_token:
        adv = adv.unsqueeze(1) * torch.rand(5, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
                                             ).to(device)
    kw = dict(ref_logprobs=ref, trace=trace, lam=0.95, beta=0.1, loss_type=loss_type, epsilon_high=0.28,
              adv_clamp_min=-0.5 if trace else None, max_completion_length=30, dual_clip=C)
    ours, expected = run_both(lp, old, adv, mask, **kw)
    assert_objective_matches(ours, expected)
    _, plain = run_both(lp, old, adv, mask, **dict(kw, dual_clip=None))
    assert (ours[1].double().cpu() - plain[1]).abs().max() > 100 * 1e-5  # the cap changed the gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_on_policy_it_changes_nothing(impl, device):
    lp, _, adv, mask, ref = make_logprob_batch(3, 17, seed=3, device=device)
    out = {}
    for c in (None, 1.01):
        loss, metrics = lk.grpo_lambda_loss(lp, None, adv, mask, ref_logprobs=ref, beta=0.1, dual_clip=c, impl=impl)
        out[c] = loss, metrics, torch.autograd.grad(loss, lp)[0]
    assert torch.equal(out[None][0], out[1.01][0]) and torch.equal(out[None][2], out[1.01][2])
    assert all(torch.equal(out[None][1][k], out[1.01][1][k]) for k in out[None][1])
    # the fused loss's on-policy pass, which never evaluates a ratio
    hidden, weight, b, ids, mask, adv = make_batch(B=3, device=device, seed=8)
    grads = {}
    for c in (None, 1.01):
        loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, -adv.abs(), bias=b, dual_clip=c, impl=impl)
        grads[c] = loss.detach(), torch.autograd.grad(loss, (hidden, weight, b))
    assert torch.equal(grads[None][0], grads[1.01][0])
    assert all(torch.equal(a, e) for a, e in zip(grads[None][1], grads[1.01][1]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c", [None, C])
def test_overflowing_ratio_and_nan_advantage(impl, c, device):
    """A ratio past exp's range with Â < 0 is dual-clipped to −c·Â with no gradient (no inf·0); a NaN advantage at a
    real token gives a NaN gradient there, as the reference does, with or without the dual clip."""
    lp = torch.tensor([[-1.0, -0.5, -2.0]], device=device, requires_grad=True)
    old = torch.tensor([[-200.0, -0.7, -2.2]], device=device)
    mask = torch.ones(1, 3, device=device)
    loss, _ = lk.grpo_lambda_loss(lp, old, torch.tensor([-1.0], device=device), mask, trace=None, loss_type="bnpo",
                                  dual_clip=c, impl=impl)
    (grad,) = torch.autograd.grad(loss, lp)
    if c is not None:
        r = torch.exp((lp - old).detach()[0, 1:])
        torch.testing.assert_close(loss, (C + r.sum()) / 3, rtol=1e-6, atol=0)  # −(−1)·c for the capped token
        assert grad[0, 0] == 0 and torch.isfinite(grad).all()
    adv = torch.tensor([[-1.0, float("nan"), 0.5]], device=device)
    loss, _ = lk.grpo_lambda_loss(lp, old, adv, mask, trace=None, dual_clip=c, impl=impl)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isnan(grad[0, 1]) and torch.isnan(loss)


@pytest.mark.parametrize("impl", IMPLS)
def test_poisoned_padding_is_never_read(impl, device):
    lp, old, adv, mask, _ = make_logprob_batch(3, 15, seed=9, spread=0.8, device=device)
    assert_padding_never_read(lp, old, adv, mask, impl, trace="both", lam=0.9, dual_clip=C, epsilon_high=0.28)


# the off-policy paths through the objective's row gradients (the vocab plan's passes are the two-pass path's)
OFF_POLICY_PLANS = PLANS[:3]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan, rows", OFF_POLICY_PLANS)
@pytest.mark.parametrize("trace", [None, "both"])
def test_fused_loss_matches_reference(impl, plan, rows, trace, device, monkeypatch):
    force_plan(monkeypatch, plan, rows)
    hidden, weight, b, ids, mask, adv = make_batch(B=4, device=device, seed=OFF_POLICY_PLANS.index((plan, rows)))
    old = perturbed_old(hidden, weight, b, ids, 0.8, scale=0.8)
    adv = torch.tensor([-1.0, 0.8, -0.6, -1.5], device=device)  # three rows that can cap
    kw = dict(old_logprobs=old, temperature=0.8, trace=trace, lam=0.9, epsilon_high=0.28, dual_clip=C)
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, b, ids, mask, adv, **kw))
    plain = reference_run(hidden, weight, b, ids, mask, adv, **dict(kw, dual_clip=None))
    assert abs(loss.item() - plain[0].item()) > 1e-3  # the cap fired


def test_modules_pass_it_on(device):
    lp, old, adv, mask, _ = make_logprob_batch(3, 9, seed=6, dtype=torch.float32, spread=0.8, device=device)
    assert_module_is_function(lk.GRPOLambdaLoss, lk.grpo_lambda_loss, dict(dual_clip=C, epsilon_high=0.28),
                              (lp, old, adv, mask))
    hidden, weight, b, ids, mask, adv = make_batch(B=3, device=device, seed=4)
    old = perturbed_old(hidden, weight, b, ids, 1.0, scale=0.8)
    assert_module_is_function(lk.FusedGRPOLambdaLoss, lk.fused_grpo_lambda_loss, dict(dual_clip=3.0),
                              (hidden, weight, ids, mask, adv), old_logprobs=old, bias=b)


@pytest.mark.parametrize("bad", [1.0, 0.5, -3.0, math.inf, math.nan, True, "3"])
def test_bad_dual_clip_is_a_clear_error(bad):
    lp, old, adv, mask, _ = make_logprob_batch(2, 5, seed=7)
    match = r"`dual_clip` must be None or a finite number > 1; got .*clip_ratio_c"
    with pytest.raises(ValueError, match=match):
        lk.grpo_lambda_loss(lp, old, adv, mask, epsilon_high=0.28, dual_clip=bad)
    hidden, weight, _, ids, mask, adv = make_batch(B=2, T=3, H=8, V=20)
    with pytest.raises(ValueError, match=match):
        lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, epsilon_high=0.28, dual_clip=bad)
