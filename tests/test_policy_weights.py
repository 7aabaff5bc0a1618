"""`policy_weights`: per-token weights w ≥ 0 of the policy term (importance-sampling corrections, token masks), the KL
term unweighted and the clip metrics those of the unweighted loss, as TRL and verl weight and count.

The reference against TRL's weighted loss written out and against the per-token-advantage fold it replaces; the
objective kernels and the fused loss (every plan, on- and off-policy) against the reference; padding, zero weights
where the ratio overflows, bad input."""
import itertools
import math

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R

from ._helpers import IMPLS, LOSS_TYPES, PLANS, assert_module_is_function, force_plan, poisoned_outputs
from ._lm_head import assert_matches, make_batch, perturbed_old, reference_run
from .test_objective import assert_matches as assert_objective_matches
from .test_objective import make_batch as make_logprob_batch
from .test_objective import run_both


def weights_like(t, seed=0, zeros=True):
    """Weights in [0, 2) with some exact zeros (TRL's masking modes, an entropy mask)."""
    g = torch.Generator().manual_seed(seed)
    w = 2 * torch.rand(t.shape, generator=g, dtype=torch.float64)
    if zeros:
        w[torch.rand(t.shape, generator=g) < 0.25] = 0.0
    return w.to(device=t.device, dtype=t.dtype)


def trl_loss(lp, old, adv, mask, ref, w, beta, eps_low=0.2, eps_high=0.28):
    """TRL 1.16's `_compute_loss` (loss_type "bnpo") with its vLLM importance-sampling weights, written out."""
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a) * w
    per_token = per_token + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
    m = mask.to(lp.dtype)
    return (per_token * m).sum() / m.sum()


def test_reference_is_trls_weighted_loss():
    lp, old, adv, mask, ref = make_logprob_batch(5, 19, seed=1, spread=0.6)
    w = weights_like(lp)
    loss, _ = R.grpo_lambda_loss(lp, old, adv, mask, ref_logprobs=ref, trace=None, beta=0.1, epsilon_high=0.28,
                                 loss_type="bnpo", policy_weights=w)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_()
    want = trl_loss(lp2, old, adv, mask, ref, w, 0.1)
    (grad_want,) = torch.autograd.grad(want, lp2)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("trace", [None, "both"])
def test_reference_is_the_advantage_fold_with_trls_metrics(trace):
    """The weighted loss equals per-token advantages w·max(Â, c) without a clamp (value and gradient), but its clip
    metrics are the unweighted loss's (the fold drops zero-weight tokens from them)."""
    lp, old, adv, mask, ref = make_logprob_batch(5, 19, seed=2, spread=0.6)
    w = weights_like(lp, seed=3)
    kw = dict(ref_logprobs=ref, trace=trace, lam=0.9, beta=0.1, loss_type="grpo")
    loss, metrics = R.grpo_lambda_loss(lp, old, adv, mask, adv_clamp_min=-0.1, policy_weights=w, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    folded = w * adv.clamp(min=-0.1).unsqueeze(1)
    loss_f, metrics_f = R.grpo_lambda_loss(lp, old, folded, mask, **kw)
    (grad_f,) = torch.autograd.grad(loss_f, lp)
    torch.testing.assert_close(loss, loss_f, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_f, rtol=1e-12, atol=1e-14)
    _, unweighted = R.grpo_lambda_loss(lp, old, adv, mask, adv_clamp_min=-0.1, **kw)
    for k in unweighted:
        torch.testing.assert_close(metrics[k], unweighted[k], rtol=0, atol=0, msg=k)
    assert metrics["clip_ratio/region_mean"] > metrics_f["clip_ratio/region_mean"]


@pytest.mark.parametrize("trace, loss_type, on_policy",
                         list(itertools.product([None, "recent", "both"], LOSS_TYPES, [False, True])))
def test_objective_kernels_match_reference(trace, loss_type, on_policy, device):
    lp, old, adv, mask, ref = make_logprob_batch(5, 23, seed=LOSS_TYPES.index(loss_type), spread=0.6, device=device)
    mask[1] = False  # an all-masked row
    kw = dict(ref_logprobs=ref, trace=trace, lam=0.95, beta=0.1, loss_type=loss_type, epsilon_high=0.28,
              adv_clamp_min=-0.1 if trace else None, max_completion_length=30, dual_clip=1.5,
              policy_weights=weights_like(lp, seed=4))
    ours, expected = run_both(lp, None if on_policy else old, adv, mask, **kw)
    assert_objective_matches(ours, expected)
    _, plain = run_both(lp, None if on_policy else old, adv, mask, **dict(kw, policy_weights=None))
    assert (ours[1].double().cpu() - plain[1]).abs().max() > 100 * 1e-5  # the weights changed the gradient
    for k in plain[2]:  # and not the metrics
        torch.testing.assert_close(ours[2][k].double().cpu(), plain[2][k].double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_is_not_read_and_zero_weights_add_nothing(impl, device):
    """NaN weights at padding change nothing; a zero weight where an unclipped ratio overflows (Â < 0: the ratio
    term is live) adds 0 to value and gradient, no 0·inf, in the objective and in the fused loss."""
    lp = torch.tensor([[-1.0, -0.5, -2.0, -1.0]], device=device, requires_grad=True)
    old = torch.tensor([[-200.0, -0.7, -2.2, -1.1]], device=device)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], device=device)
    w = torch.tensor([[0.0, 1.5, 0.5, math.nan]], device=device)
    adv = torch.tensor([-2.0], device=device)
    loss, _ = lk.grpo_lambda_loss(lp, old, adv, mask, trace=None, epsilon_high=0.5, loss_type="bnpo",
                                  policy_weights=w, impl=impl)
    (grad,) = torch.autograd.grad(loss, lp)
    r = torch.exp((lp - old).detach()[0, 1:3])
    torch.testing.assert_close(loss, (1.5 * r[0] + 0.5 * r[1]) * 2 / 3, rtol=1e-6, atol=0)
    assert grad[0, 0] == 0 and grad[0, 3] == 0 and torch.isfinite(grad).all()
    # the fused loss off-policy: the same token through the log-prob rows
    hidden, weight, b, ids, mask, _ = make_batch(B=2, T=5, device=device, seed=9)
    with torch.no_grad():
        old = R.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double()).float() + 0.1
    old[0, 0] = -300.0  # ratio e^300: overflows
    mask[0, 0] = True
    w = torch.ones(2, 5, device=device)
    w[0, 0] = 0.0
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, torch.tensor([-1.0, -0.5], device=device),
                                        old_logprobs=old, bias=b, trace=None, policy_weights=w, impl=impl)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan, rows", PLANS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_fused_loss_matches_reference(impl, plan, rows, on_policy, device, monkeypatch):
    force_plan(monkeypatch, plan, rows)
    hidden, weight, b, ids, mask, adv = make_batch(B=4, device=device, seed=PLANS.index((plan, rows)))
    old = None if on_policy else perturbed_old(hidden, weight, b, ids, 0.8, scale=0.5)
    w = weights_like(mask.float(), seed=5)
    w[~mask] = math.nan  # never read
    with torch.no_grad():
        ref = R.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double(), temperature=0.8).float()
    kw = dict(old_logprobs=old, ref_logprobs=ref - 0.1, beta=0.1, temperature=0.8, trace="both", lam=0.9,
              adv_clamp_min=-0.1, return_entropy=True, policy_weights=w)
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert_matches(loss, metrics, grads,
                   reference_run(hidden, weight, b, ids, mask, adv, **dict(kw, policy_weights=w.nan_to_num(0.0))))
    plain = reference_run(hidden, weight, b, ids, mask, adv, **dict(kw, policy_weights=None))
    assert abs(loss.item() - plain[0].item()) > 1e-4


def test_modules_pass_it_on(device):
    lp, old, adv, mask, _ = make_logprob_batch(3, 9, seed=6, dtype=torch.float32, spread=0.6, device=device)
    assert_module_is_function(lk.GRPOLambdaLoss, lk.grpo_lambda_loss, {}, (lp, old, adv, mask),
                              policy_weights=weights_like(lp, seed=7))
    hidden, weight, b, ids, mask, adv = make_batch(B=3, device=device, seed=4)
    assert_module_is_function(lk.FusedGRPOLambdaLoss, lk.fused_grpo_lambda_loss, {}, (hidden, weight, ids, mask, adv),
                              bias=b, policy_weights=weights_like(mask.float(), seed=8))


def test_bad_policy_weights_are_clear_errors():
    lp, old, adv, mask, _ = make_logprob_batch(2, 5, seed=7)
    with pytest.raises(ValueError, match=r"`policy_weights` must have shape \[2, 5\].*One weight >= 0 per token"):
        lk.grpo_lambda_loss(lp, old, adv, mask, policy_weights=torch.ones(2, 4, dtype=lp.dtype))
    with pytest.raises(TypeError, match="`policy_weights`"):
        lk.grpo_lambda_loss(lp, old, adv, mask, policy_weights=torch.ones(2, 5, dtype=torch.long))
    hidden, weight, _, ids, mask, adv = make_batch(B=2, T=3, H=8, V=20)
    with pytest.raises(ValueError, match=r"`policy_weights` must have shape \[2, 3\]"):
        lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, policy_weights=torch.ones(3))
