"""`policy_loss`: the policy term beside PPO's clip, CISPO (`−sg(min(ρ̃, c))·Â·ℓ`) and SAPO (`−(4/τ)·σ(τ(ρ̃ − 1))·Â`),
TRL's `loss_type="cispo"` / `"sapo"`.

The reference is checked against TRL 1.16's `_compute_loss` written out (token and sequence level, with its metrics);
the objective kernels, the on-policy token gradient and the fused loss (every plan) against the reference."""
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

CAP = 1.3  # CISPO's cap, low enough that the test batches' ratios (e^(±0.5)) pass it
POLICIES = {"cispo": lk.CISPO(max_ratio=CAP), "sapo": lk.SAPO(temperature_pos=1.5, temperature_neg=2.5)}
# (trace, importance_sampling_level)
RATIOS = [(None, "token"), ("recent", "token"), ("both", "token"), (None, "sequence")]


def trl_loss(lp, old, adv, mask, loss_type, level, n_items=None):
    """TRL 1.16's `_compute_loss` for loss_type "cispo" (normalised as dapo, by num_items_in_batch) or "sapo"
    (normalised as grpo), written out, with its logged cispo_clip_ratio."""
    m = mask.to(lp.dtype)
    log_ratio = lp - old
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    a = adv.unsqueeze(1)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=CAP).detach() * a * lp
        loss = (per_token * m).sum() / n_items
        clipped = ((coef_1 > CAP) & (a > 0)).to(lp.dtype)
        if level == "sequence":
            return loss, clipped.mean()
        return loss, (clipped * m).sum() / m.sum()
    sapo = POLICIES["sapo"]
    tau = torch.where(a > 0, sapo.temperature_pos, sapo.temperature_neg).to(lp.dtype)
    per_token = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * a
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean(), None


@pytest.mark.parametrize("name, level", list(itertools.product(POLICIES, ["token", "sequence"])))
def test_reference_is_trls(name, level):
    lp, old, adv, mask, _ = make_logprob_batch(6, 21, seed=1, spread=0.5)
    mask[3] = False
    old[:3] -= 0.5  # sequences whose mean ratio passes CISPO's cap
    n_items = 2.0 * mask.sum().item()
    loss, metrics = R.grpo_lambda_loss(lp, old, adv, mask, trace=None, importance_sampling_level=level,
                                       policy_loss=POLICIES[name], loss_type="dapo" if name == "cispo" else "grpo",
                                       num_items_in_batch=n_items)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_()
    want, clip_ratio = trl_loss(lp2, old, adv, mask, name, level, n_items)
    (grad_want,) = torch.autograd.grad(want, lp2)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_want, rtol=1e-12, atol=1e-14)
    assert (grad != 0).sum() > 0.8 * mask.sum()  # neither clips a gradient away
    if name == "cispo":
        assert set(metrics) == {"cispo_clip_ratio", "ratio_mean"}
        torch.testing.assert_close(metrics["cispo_clip_ratio"].double(), clip_ratio, rtol=1e-6, atol=0)
        assert clip_ratio > 0
    else:
        assert set(metrics) == {"ratio_mean"}


@pytest.mark.parametrize("name, ratio, on_policy, per_token, extras", list(itertools.product(
    POLICIES, RATIOS, [False, True], [False, True], ["kl", "w+clamp"])))
def test_objective_kernels_match_reference(name, ratio, on_policy, per_token, extras, device):
    trace, level = ratio
    lp, old, adv, mask, ref = make_logprob_batch(5, 23, seed=RATIOS.index(ratio), spread=0.5, device=device)
    mask[1] = False  # an all-masked row
    adv[2] = 0.0  # a zero-std group's
    if per_token:
        g = torch.Generator().manual_seed(2)
        adv = adv.unsqueeze(1) * torch.rand(5, 23, generator=g, dtype=torch.float64).to(device)
    kw = dict(ref_logprobs=ref, trace=trace, lam=0.9, importance_sampling_level=level, policy_loss=POLICIES[name],
              loss_type="bnpo")
    if extras == "kl":
        kw.update(beta=0.1, kl_bias_correction=level == "token")
    else:
        g = torch.Generator().manual_seed(3)
        kw.update(adv_clamp_min=-0.4, policy_weights=torch.rand(5, 23, generator=g, dtype=torch.float64).to(device))
    ours, expected = run_both(lp, None if on_policy else old, adv, mask, **kw)
    assert_objective_matches(ours, expected)


@pytest.mark.parametrize("trace", ["recent", "both"])
def test_cispo_gradient_is_on_each_log_prob(trace, device):
    """With a trace the CISPO weight is the traced ratio's, but each token's gradient stays on its own log-prob:
    ∂L/∂ℓ_j = −n_j·min(ρ̃_j, c)·Â_j, no scan (TRL's gradient with the traced weight)."""
    lp, old, adv, mask, _ = make_logprob_batch(4, 19, seed=5, spread=0.5, device=device)
    loss, _ = lk.grpo_lambda_loss(lp, old, adv, mask, trace=trace, lam=0.8, policy_loss=POLICIES["cispo"],
                                  loss_type="bnpo")
    (grad,) = torch.autograd.grad(loss, lp)
    m = mask.to(lp.dtype)
    z = lk.lambda_trace((lp - old).detach(), mask, lam=0.8, style=trace).double()
    want = -m / m.sum() * torch.exp(z).clamp(max=CAP) * adv.unsqueeze(1)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("trace", ["recent", "both"])
def test_on_policy_gradients(trace, device):
    """On-policy (ρ̃ ≡ 1): SAPO's gradient is the clipped objective's (σ' = 1/4, times 4); CISPO's is GRPO's without
    the trace (its gradient is on each log-prob), times min(1, c)."""
    lp, _, adv, mask, _ = make_logprob_batch(4, 19, seed=6, device=device)
    grads = {}
    for name, policy, tr in [("clip", "clip", trace), ("sapo", POLICIES["sapo"], trace), ("grpo", "clip", None),
                             ("cispo", POLICIES["cispo"], trace), ("cispo_low", lk.CISPO(max_ratio=0.5), trace)]:
        loss, _ = lk.grpo_lambda_loss(lp, None, adv, mask, trace=tr, policy_loss=policy, loss_type="grpo")
        grads[name] = torch.autograd.grad(loss, lp)[0]
    torch.testing.assert_close(grads["sapo"], grads["clip"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grads["cispo"], grads["grpo"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grads["cispo_low"], 0.5 * grads["grpo"], rtol=1e-6, atol=1e-9)
    assert (grads["clip"] - grads["grpo"]).abs().max() > 1e-3  # (the trace does change the clip's)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan, rows", PLANS)
@pytest.mark.parametrize("name, on_policy, level", list(itertools.product(POLICIES, [True, False],
                                                                          ["token", "sequence"])))
def test_fused_loss_matches_reference(impl, plan, rows, name, on_policy, level, device, monkeypatch):
    force_plan(monkeypatch, plan, rows)
    hidden, weight, b, ids, mask, adv = make_batch(B=4, device=device, seed=PLANS.index((plan, rows)))
    old = perturbed_old(hidden, weight, b, ids, 0.8, scale=0.5)
    kw = dict(old_logprobs=None if on_policy else old, temperature=0.8, trace="both" if level == "token" else None,
              lam=0.9, beta=0.05, ref_logprobs=old, policy_loss=POLICIES[name], return_entropy=True,
              importance_sampling_level=level)
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, b, ids, mask, adv, **kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_overflowing_ratio(impl, device):
    """A ratio past exp's range: SAPO's gate is 1 there (the constant −(4/τ)·Â, no gradient), CISPO's weight is the
    cap; a token with Â = 0 adds exactly 0 (no inf·0)."""
    lp = torch.tensor([[-1.0, -0.5, -2.0]], device=device, requires_grad=True)
    old = torch.tensor([[-400.0, -0.7, -400.0]], device=device)
    mask = torch.ones(1, 3, device=device)
    adv = torch.tensor([[1.0, -1.0, 0.0]], device=device)
    sapo = POLICIES["sapo"]
    loss, _ = lk.grpo_lambda_loss(lp, old, adv, mask, trace=None, loss_type="bnpo", policy_loss=sapo, impl=impl)
    (grad,) = torch.autograd.grad(loss, lp)
    gate = torch.sigmoid(torch.tensor(sapo.temperature_neg * (math.exp(0.2) - 1)))
    want = (-(4 / sapo.temperature_pos) + (4 / sapo.temperature_neg) * gate) / 3
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-5, atol=1e-7)
    assert grad[0, 0] == 0 and grad[0, 2] == 0 and grad[0, 1] != 0
    loss, metrics = lk.grpo_lambda_loss(lp, old, adv, mask, trace=None, loss_type="bnpo",
                                        policy_loss=POLICIES["cispo"], impl=impl)
    (grad,) = torch.autograd.grad(loss, lp)
    # −min(ρ̃, c)·Â·ℓ: −c·1·(−1) + −e^0.2·(−1)·(−0.5) + 0
    torch.testing.assert_close(loss.cpu(), torch.tensor((CAP - math.exp(0.2) * 0.5) / 3), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.cpu(), torch.tensor([[-CAP, math.exp(0.2), 0.0]]) / 3, rtol=1e-5, atol=1e-7)
    assert metrics["cispo_clip_ratio"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", POLICIES)
def test_poisoned_padding_is_never_read(impl, name, device):
    lp, old, adv, mask, _ = make_logprob_batch(3, 15, seed=9, spread=0.5, device=device)
    assert_padding_never_read(lp, old, adv, mask, impl, trace="both", lam=0.9, policy_loss=POLICIES[name])


def test_names_and_modules(device):
    lp, old, adv, mask, _ = make_logprob_batch(3, 9, seed=6, dtype=torch.float32, spread=0.4, device=device)
    for name, default in (("clip", lk.Clip()), ("cispo", lk.CISPO()), ("sapo", lk.SAPO())):
        by_name = lk.grpo_lambda_loss(lp, old, adv, mask, policy_loss=name)
        by_object = lk.grpo_lambda_loss(lp, old, adv, mask, policy_loss=default)
        assert torch.equal(by_name[0], by_object[0]) and by_name[1].keys() == by_object[1].keys()
    assert_module_is_function(lk.GRPOLambdaLoss, lk.grpo_lambda_loss, dict(policy_loss="sapo"),
                              (lp, old, adv, mask))
    hidden, weight, b, ids, mask, adv = make_batch(B=3, device=device, seed=4)
    old = perturbed_old(hidden, weight, b, ids, 1.0, scale=0.5)
    assert_module_is_function(lk.FusedGRPOLambdaLoss, lk.fused_grpo_lambda_loss, dict(policy_loss=POLICIES["cispo"]),
                              (hidden, weight, ids, mask, adv), old_logprobs=old, bias=b)


@pytest.mark.parametrize("make, match", [
    (lambda: "ppo", r"`policy_loss` must be one of \('clip', 'cispo', 'sapo', 'vespo'\) or an instance of .*got 'ppo'"),
    (lambda: lk.CISPO(max_ratio=0.0), r"CISPO: `max_ratio` must be a finite number > 0; got 0.0"),
    (lambda: lk.SAPO(temperature_neg=math.inf), r"SAPO: `temperature_neg` must be a finite number > 0; got inf"),
    (lambda: lk.SAPO(temperature_pos="1"), r"SAPO: `temperature_pos` must be a finite number > 0; got '1'"),
])
def test_bad_policy_loss_is_a_clear_error(make, match):
    lp, old, adv, mask, _ = make_logprob_batch(2, 5, seed=7)
    with pytest.raises(ValueError, match=match):
        lk.grpo_lambda_loss(lp, old, adv, mask, policy_loss=make())


def test_dual_clip_needs_the_clip():
    lp, old, adv, mask, _ = make_logprob_batch(2, 5, seed=7)
    with pytest.raises(ValueError, match=r"`dual_clip` caps the clipped objective's ratio; it does not apply to "
                                         r"policy_loss='sapo'"):
        lk.grpo_lambda_loss(lp, old, adv, mask, policy_loss="sapo", dual_clip=3.0)
    hidden, weight, _, ids, mask, adv = make_batch(B=2, T=3, H=8, V=20)
    with pytest.raises(ValueError, match="does not apply to policy_loss='cispo'"):
        lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, policy_loss="cispo", dual_clip=3.0)


@pytest.mark.parametrize("name, level, on_policy", list(itertools.product(
    POLICIES, ["token", "sequence"], [False, True])))
def test_fractional_mask_weighs_each_token_once(name, level, on_policy, device):
    """A float mask m weighs a token's term by m (n = m·s), once: CISPO's coefficient is on ℓ itself, so the kernels
    must not multiply it by m again as they do the traced terms' (whose z is built from m·Δ)."""
    lp, old, adv, mask, _ = make_logprob_batch(3, 11, seed=12, spread=0.5, device=device)
    g = torch.Generator().manual_seed(5)
    mask_f = mask.to(torch.float64) * (0.25 + torch.rand(mask.shape, generator=g, dtype=torch.float64)).to(device)
    kw = dict(trace=None, importance_sampling_level=level, policy_loss=POLICIES[name], loss_type="luspo")
    ours, expected = run_both(lp, None if on_policy else old, adv, mask_f, **kw)
    assert_objective_matches(ours, expected)
    hidden, weight, b, ids, mask, adv = make_batch(B=3, device=device, seed=13)
    mask_f = mask.to(torch.float32) * (0.25 + torch.rand(mask.shape, generator=g)).to(device)
    kw = dict(kw, old_logprobs=None if on_policy else perturbed_old(hidden, weight, b, ids, 1.0, scale=0.5))
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask_f, adv, bias=b, impl="triton", **kw)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, b, ids, mask_f, adv, **kw))


@pytest.mark.parametrize("policy", ["clip", "sapo"])
def test_epsilon_high_is_the_clips(policy):
    lp, old, adv, mask, _ = make_logprob_batch(2, 5, seed=7)
    lk.grpo_lambda_loss(lp, old, adv, mask, policy_loss=policy, epsilon_low=0.3)  # (epsilon_low: unused, allowed)
    with pytest.raises(ValueError, match=r"`epsilon_high` is the clipped objective's upper clip range; policy_loss="
                                         r"'cispo' does not use it \(got epsilon_high=4.0\).*CISPO\(max_ratio=...\)"):
        lk.grpo_lambda_loss(lp, old, adv, mask, policy_loss="cispo", epsilon_high=4.0)
    loss, _ = lk.grpo_lambda_loss(lp, old, adv, mask, policy_loss=policy, epsilon_high=0.28) if policy == "clip" \
        else (None, None)
    if policy == "sapo":
        with pytest.raises(ValueError, match="policy_loss='sapo' does not use it"):
            lk.grpo_lambda_loss(lp, old, adv, mask, policy_loss=policy, epsilon_high=0.28)
    else:
        assert torch.isfinite(loss)


def test_integer_settings_are_floats():
    assert lk.CISPO(2) == lk.CISPO(2.0) and isinstance(lk.CISPO(2).max_ratio, float)
    assert isinstance(lk.SAPO(1, 2).temperature_neg, float)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cap, want", [(0.2, 0.75), (CAP, 0.0)])
def test_cispo_counts_an_empty_sequence_as_trl(impl, cap, want, device):
    """At the sequence level TRL flags every sequence, one without loss tokens too, whose ratio is then exp(0) = 1:
    capped where the cap is below 1 (TRL's cispo with epsilon_high unset: 0.2) and Â > 0. On-policy, advantages
    [1, −0.8, 0.5, 0.7] with row 3 empty: 3 of 4 sequences capped under 0.2, none under 1.3."""
    lp = torch.zeros(4, 3, device=device, requires_grad=True)
    mask = torch.ones(4, 3, device=device)
    mask[3] = 0
    adv = torch.tensor([1.0, -0.8, 0.5, 0.7], device=device)
    _, metrics = lk.grpo_lambda_loss(lp, None, adv, mask, trace=None, importance_sampling_level="sequence",
                                     policy_loss=lk.CISPO(max_ratio=cap), impl=impl)
    assert metrics["cispo_clip_ratio"].item() == pytest.approx(want)
    _, metrics = lk.grpo_lambda_loss(lp, None, adv, mask, trace=None, policy_loss=lk.CISPO(max_ratio=cap),
                                     impl=impl)
    assert metrics["cispo_clip_ratio"].item() == pytest.approx(2 / 3 if cap < 1 else 0.0)  # (tokens: 6 of 9)
