"""`importance_sampling_level="sequence"`: GSPO's sequence-level ratio (Zheng et al. 2025; TRL's and verl's name),
and the `luspo` normaliser it is paired with in TRL.

Every token of a sequence shares ρ̃_i = exp(Σ_t m·(ℓ − ℓ_old) / max(Σ_t m, 1)). The reference is checked against
TRL 1.16's `_compute_loss` written out (loss, gradient and its sequence-level clip metrics, the KL weighted by the
sequence's ratio with use_bias_correction_kl); the objective kernels,
the on-policy token gradient and the fused loss (every plan, on- and off-policy) against the reference."""
import itertools

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

SEQ = dict(trace=None, importance_sampling_level="sequence")
EPS_LOW, EPS_HIGH = 0.03, 0.04  # GSPO's ranges are narrow (TRL's docs: 3e-4 / 4e-4): here some sequences clip


def trl_gspo(lp, old, adv, mask, ref, beta, loss_type, num_items=None, corrected=False):
    """TRL 1.16's `_compute_loss` with importance_sampling_level="sequence" (no vLLM, no masks), and its logged
    clip metrics, written out."""
    m = mask.to(lp.dtype)
    log_weights = ((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    coef_1 = torch.exp(log_weights).unsqueeze(-1)  # [B, 1]
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    if beta > 0:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        per_token = per_token + beta * (kl * coef_1 if corrected else kl)  # (use_bias_correction_kl)
    per_token = per_token.expand_as(m)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "luspo":
        loss = (per_token * m).sum(-1).mean()
    else:  # dapo with TRL's num_items_in_batch
        loss = (per_token * m).sum() / num_items
    low = ((coef_1 < 1 - EPS_LOW) & (a < 0)).to(lp.dtype).squeeze(1)
    high = ((coef_1 > 1 + EPS_HIGH) & (a > 0)).to(lp.dtype).squeeze(1)
    metrics = {"clip_ratio/low_mean": low.mean(), "clip_ratio/high_mean": high.mean(),
               "clip_ratio/region_mean": (low + high).clamp(max=1).mean(), "clip_ratio/low_min": low.min(),
               "clip_ratio/high_max": high.max()}
    if beta > 0:  # TRL logs the KL it adds (weighted by the sequence's ratio with use_bias_correction_kl)
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        metrics["kl"] = ((kl * coef_1 if corrected else kl) * m).sum() / m.sum()
    return loss, metrics


def _batch(device="cpu", seed=0, B=6, T=21):
    lp, old, adv, mask, ref = make_logprob_batch(B, T, seed=seed, spread=0.15, device=device)
    mask[2] = False  # a sequence without tokens: ratio 1, counted in the sequence-level means (as TRL)
    adv = torch.tensor([-1.0, 0.7, 0.4, 1.2, -0.3, 0.9][:B], dtype=torch.float64, device=device)
    return lp, old, adv, mask, ref


@pytest.mark.parametrize("loss_type, beta, corrected", [
    ("grpo", 0.0, False), ("grpo", 0.04, False), ("dapo", 0.04, False), ("luspo", 0.0, False), ("grpo", 0.3, True),
    ("dapo", 0.3, True)])
def test_reference_is_trls_gspo(loss_type, beta, corrected):
    lp, old, adv, mask, ref = _batch(seed=1)
    n_items = 3.0 * mask.sum().item()
    loss, metrics = R.grpo_lambda_loss(lp, old, adv, mask, ref_logprobs=ref, beta=beta, loss_type=loss_type,
                                       epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, num_items_in_batch=n_items,
                                       kl_bias_correction=corrected, **SEQ)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_()
    want, want_metrics = trl_gspo(lp2, old, adv, mask, ref, beta, loss_type, n_items, corrected)
    (grad_want,) = torch.autograd.grad(want, lp2)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_want, rtol=1e-12, atol=1e-14)
    for k, v in want_metrics.items():
        torch.testing.assert_close(metrics[k].double(), v, rtol=1e-6, atol=0, msg=k)
    assert 0 < want_metrics["clip_ratio/region_mean"] < 1  # some sequences clipped, some not
    if beta == 0:  # the ratio is shared: one gradient value over a sequence's tokens (0 where it clipped)
        rows = [grad[i][mask[i]] for i in range(len(adv)) if mask[i].any()]
        assert all(torch.allclose(r, r[0].expand_as(r), rtol=1e-12, atol=0) for r in rows)
        assert sum(bool(r[0] != 0) for r in rows) >= 2


@pytest.mark.parametrize("on_policy, loss_type, per_token, extras",
                         list(itertools.product([False, True], LOSS_TYPES, [False, True],
                                                ["kl", "corrected kl", "dual+w+clamp"])))
def test_objective_kernels_match_reference(on_policy, loss_type, per_token, extras, device):
    lp, old, adv, mask, ref = _batch(device, seed=LOSS_TYPES.index(loss_type))
    if per_token:
        g = torch.Generator().manual_seed(2)
        adv = adv.unsqueeze(1) * torch.rand(mask.shape, generator=g, dtype=torch.float64).to(device)
    kw = dict(ref_logprobs=ref, loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
              max_completion_length=30, **SEQ)
    if extras != "dual+w+clamp":
        kw.update(beta=0.1, kl_bias_correction=extras == "corrected kl")
    else:
        g = torch.Generator().manual_seed(3)
        kw.update(dual_clip=1.02, adv_clamp_min=-0.5,
                  policy_weights=torch.rand(mask.shape, generator=g, dtype=torch.float64).to(device))
    ours, expected = run_both(lp, None if on_policy else old, adv, mask, **kw)
    assert_objective_matches(ours, expected)
    if not on_policy:  # the sequence level is not the token level
        _, token = run_both(lp, old, adv, mask, **dict(kw, importance_sampling_level="token"))
        assert (ours[1].double().cpu() - token[1]).abs().max() > 1e-3


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_gradient_is_the_sequence_mean(loss_type, device):
    """On-policy every ratio is 1 and nothing clips: ∂L/∂ℓ_j = −m_j·Σ_t n_t·Â_t / max(Σ_t m, 1), the same value
    at every token of a sequence, known before the log-probs (so the fused loss stays one pass)."""
    lp, _, adv, mask, _ = _batch(device, seed=4)
    loss, metrics = lk.grpo_lambda_loss(lp, None, adv, mask, loss_type=loss_type, max_completion_length=30, **SEQ)
    (grad,) = torch.autograd.grad(loss, lp)
    lp_n = lp.detach().clone().requires_grad_()
    (neg_n,) = torch.autograd.grad(  # n_t: token-level GRPO with unit advantages has ∂L/∂ℓ_t = −n_t
        lk.grpo_lambda_loss(lp_n, None, torch.ones_like(adv), mask, trace=None, loss_type=loss_type,
                            max_completion_length=30)[0], lp_n)
    m = mask.to(grad.dtype)
    per_seq = (neg_n * adv.unsqueeze(1)).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
    torch.testing.assert_close(grad, m * per_seq, atol=1e-7, rtol=1e-6)
    assert metrics["ratio_mean"].item() == 1.0 and metrics["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan, rows", PLANS)
@pytest.mark.parametrize("on_policy, corrected", [(True, False), (False, False), (True, True), (False, True)])
def test_fused_loss_matches_reference(impl, plan, rows, on_policy, corrected, device, monkeypatch):
    """Every plan; with the KL weighted by the sequence's ratio, on-policy too takes the passes that know a row's
    log-probs before its gradient (whole sequences per chunk, or two passes)."""
    force_plan(monkeypatch, plan, rows)
    hidden, weight, b, ids, mask, adv = make_batch(B=4, device=device, seed=PLANS.index((plan, rows)))
    old = perturbed_old(hidden, weight, b, ids, 0.8, scale=0.05)
    old[1] -= 0.2  # sequence 1 (Â > 0) clips high
    adv = torch.tensor([-1.0, 0.8, -0.6, 1.5], device=device)
    kw = dict(old_logprobs=None if on_policy else old, temperature=0.8, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
              loss_type="luspo" if on_policy else "grpo", beta=0.3 if corrected else 0.05, ref_logprobs=old,
              kl_bias_correction=corrected, **SEQ)
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    expected = reference_run(hidden, weight, b, ids, mask, adv, **kw)
    assert_matches(loss, metrics, grads, expected)
    if not on_policy:
        assert 0 < expected[1]["clip_ratio/region_mean"] < 1  # the clip fired for some sequences


@pytest.mark.parametrize("impl", IMPLS)
def test_poisoned_padding_is_never_read(impl, device):
    lp, old, adv, mask, ref = _batch(device, seed=9)
    assert_padding_never_read(lp, old, adv, mask, impl, ref=ref, beta=0.05, epsilon_low=EPS_LOW,
                              epsilon_high=EPS_HIGH, **SEQ)


@pytest.mark.parametrize("impl", IMPLS)
def test_overflowing_sequence_ratio(impl, device):
    """A sequence whose mean log-ratio is past exp's range: clipped where Â > 0 (constant, no gradient), and a
    sequence with Â = 0 adds exactly 0 (no inf·0)."""
    lp = torch.tensor([[-1.0, -0.5, -2.0], [-1.0, -0.5, -2.0]], device=device, requires_grad=True)
    old = torch.full((2, 3), -400.0, device=device)
    mask = torch.ones(2, 3, device=device)
    loss, metrics = lk.grpo_lambda_loss(lp, old, torch.tensor([1.0, 0.0], device=device), mask, loss_type="bnpo",
                                        impl=impl, **SEQ)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(loss, torch.tensor(-1.2 * 3 / 6, device=device))
    assert (grad == 0).all()
    assert metrics["clip_ratio/high_mean"].item() == 0.5 and metrics["clip_ratio/high_max"].item() == 1.0


def test_modules_pass_it_on(device):
    lp, old, adv, mask, _ = make_logprob_batch(3, 9, seed=6, dtype=torch.float32, spread=0.2, device=device)
    assert_module_is_function(lk.GRPOLambdaLoss, lk.grpo_lambda_loss, dict(SEQ, loss_type="luspo"),
                              (lp, old, adv, mask))
    hidden, weight, b, ids, mask, adv = make_batch(B=3, device=device, seed=4)
    old = perturbed_old(hidden, weight, b, ids, 1.0, scale=0.2)
    assert_module_is_function(lk.FusedGRPOLambdaLoss, lk.fused_grpo_lambda_loss, SEQ,
                              (hidden, weight, ids, mask, adv), old_logprobs=old, bias=b)


@pytest.mark.parametrize("kw, match", [
    (dict(importance_sampling_level="sequence"),  # the default trace="both"
     r"importance_sampling_level='sequence' \(GSPO\).*got trace='both'. Pass trace=None"),
    (dict(importance_sampling_level="seq"), r"importance_sampling_level.*'token', 'sequence'"),
])
def test_bad_combinations_are_clear_errors(kw, match):
    lp, old, adv, mask, ref = make_logprob_batch(2, 5, seed=7)
    with pytest.raises(ValueError, match=match):
        lk.grpo_lambda_loss(lp, old, adv, mask, ref_logprobs=ref, **kw)
    hidden, weight, _, ids, mask, adv = make_batch(B=2, T=3, H=8, V=20)
    with pytest.raises(ValueError, match=match):
        lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, ref_logprobs=torch.zeros(2, 3), **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_sequences_without_tokens_count_in_the_sequence_metrics(impl, device):
    """At the sequence level every sequence counts, one without tokens as unclipped (TRL's [B, 1] masks): three
    low-clipped sequences and an empty one give low_mean 3/4 and low_min 0; at the token level 1 and 1."""
    lp = torch.zeros(4, 3, device=device, requires_grad=True)
    old = torch.full((4, 3), 0.5, device=device)  # ratio e^−0.5 < 1 − ε everywhere
    mask = torch.ones(4, 3, device=device)
    mask[2] = 0
    adv = -torch.ones(4, device=device)
    for level, (mean, least) in (("sequence", (0.75, 0.0)), ("token", (1.0, 1.0))):
        _, metrics = lk.grpo_lambda_loss(lp, old, adv, mask, trace=None, importance_sampling_level=level, impl=impl)
        assert metrics["clip_ratio/low_mean"].item() == pytest.approx(mean), level
        assert metrics["clip_ratio/low_min"].item() == least, level


@pytest.mark.parametrize("impl", IMPLS)
def test_per_token_advantages_keep_token_means(impl, device):
    """With advantages [B, T], TRL's clip masks would broadcast to [B, T]: token means, and extremes over the
    sequences with tokens, as at the token level (a 1-token low-clipped row and a 3-token unclipped one: 1/4)."""
    lp = torch.zeros(2, 3, device=device, requires_grad=True)
    old = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]], device=device)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], device=device)
    adv = -torch.ones(2, 3, device=device)
    _, metrics = lk.grpo_lambda_loss(lp, old, adv, mask, trace=None, importance_sampling_level="sequence", impl=impl)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(0.25)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(0.25)
    assert metrics["clip_ratio/low_min"].item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["luspo", "dr_grpo"])
def test_empty_batch(impl, loss_type, device):
    """B = 0: a zero loss and zero gradients, no division by B."""
    hidden = torch.zeros(0, 5, 8, device=device, requires_grad=True)
    weight = torch.randn(20, 8, device=device, requires_grad=True)
    ids = torch.zeros(0, 5, dtype=torch.long, device=device)
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, torch.zeros(0, 5, device=device),
                                        torch.zeros(0, device=device), loss_type=loss_type, impl=impl, **SEQ)
    grad_w, = torch.autograd.grad(loss, weight)
    assert loss.item() == 0.0 and (grad_w == 0).all()
