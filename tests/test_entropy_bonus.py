"""The fused loss's entropy bonus (`entropy_coef`, `entropy_weights`): loss − c·Σ m·w·H / max(Σ m·w, 1) with its
exact gradient, in every pass of the fused loss (on-policy one pass, also run ahead of the token count; off-policy
whole-sequence chunks; two passes; the split plan's vocabulary tail), against the fp64 reference, with the
padding's weights, hidden states and ids poisoned; TRL's formula written out; and bad input."""
import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R
from lambda_kernels.reference.linear_logprobs import entropy_bonus_mean

from ._helpers import IMPLS, PLANS, assert_module_is_function, force_plan, poisoned_outputs
from ._lm_head import assert_matches, make_batch, perturbed_old, reference_run


def _weights(mask, seed=0):
    """Weights in [0, 2) with some exact zeros (TRL's top-entropy mask is 0/1), NaN at the padding (never read)."""
    g = torch.Generator().manual_seed(seed)
    w = 2 * torch.rand(mask.shape, generator=g)
    w[torch.rand(mask.shape, generator=g) < 0.3] = 0.0
    return torch.where(mask.cpu() != 0, w, torch.nan).to(mask.device)


# PLANS, and the split plan with chunks of whole sequences (off-policy one pass, then its tail over the vocabulary)
ALL_PLANS = PLANS + [("split", 40)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan, rows", ALL_PLANS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_fused_loss_matches_reference(impl, plan, rows, on_policy, device, monkeypatch):
    force_plan(monkeypatch, plan, rows)
    hidden, weight, b, ids, mask, adv = make_batch(B=4, device=device, seed=10 + ALL_PLANS.index((plan, rows)))
    old = perturbed_old(hidden, weight, b, ids, 0.8, scale=0.2)
    kw = dict(old_logprobs=None if on_policy else old, ref_logprobs=old - 0.1, beta=0.05, temperature=0.8,
              trace="both", lam=0.9, adv_clamp_min=-0.1, return_entropy=True, entropy_coef=0.7,
              entropy_weights=_weights(mask, seed=rows))
    with torch.no_grad():
        hidden[mask == 0] = torch.nan  # the padding's states and ids are never read
    ids = torch.where(mask != 0, ids, -100)
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert (grads[0][mask == 0] == 0).all()
    clean = torch.where(mask.unsqueeze(-1) != 0, hidden.detach(), 0.0)
    assert_matches(loss, metrics, grads, reference_run(clean, weight, b, ids.clamp(min=0), mask, adv, **kw))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_bonus_is_trls_entropy_term(impl, softcap, device):
    """loss(c) − loss(0) = −c·Σ m·w·H / max(Σ m·w, 1), TRL's `entropy_loss` over its effective mask written out
    on the log-softmax of the full logits, and the gradients differ by that term's; the metrics do not change
    (`entropy` stays the completion mask's mean, as TRL logs it)."""
    hidden, weight, b, ids, mask, adv = make_batch(B=3, device=device, seed=4)
    top = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(2)) < 0.6).float().to(device)
    common = dict(bias=b, temperature=1.3, softcap=softcap, return_entropy=True, impl=impl, loss_type="grpo")
    loss0, metrics0 = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, **common)
    grads0 = torch.autograd.grad(loss0, (hidden, weight, b))
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, entropy_coef=0.25,
                                              entropy_weights=top, **common)
    grads = torch.autograd.grad(loss, (hidden, weight, b))

    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    logits = leaves[0] @ leaves[1].t() + leaves[2]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits / 1.3, dim=-1)
    entropies = -(logp.exp() * logp).sum(-1)
    effective_mask = mask.double() * top.double()  # TRL: mask * entropy_mask
    entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)
    term_grads = torch.autograd.grad(-0.25 * entropy_loss, leaves)

    torch.testing.assert_close((loss - loss0).double(), -0.25 * entropy_loss.detach(), rtol=1e-5, atol=1e-6)
    for got, got0, want in zip(grads, grads0, term_grads):
        torch.testing.assert_close((got - got0).double(), want, rtol=1e-4, atol=1e-6)
    assert metrics.keys() == metrics0.keys()
    for k in metrics:
        assert torch.equal(metrics[k], metrics0[k]), k


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan", ["tokens", "split"])
def test_fp16_head_relative_oracle(impl, plan, device, monkeypatch):
    """A half head (its dW summed in fp32, in the chunks or the split tail): no further from the fp64 oracle than
    PyTorch's fp16 logits are (the interpreter's fp16 arithmetic is sound; bf16's is not)."""
    from ._lm_head import assert_loss_no_worse_than_naive

    force_plan(monkeypatch, plan, 8)
    hidden, weight, b, ids, mask, adv = make_batch(B=4, dtype=torch.float16, device=device, seed=14)
    kw = dict(entropy_coef=0.5, entropy_weights=_weights(mask, seed=3), loss_type="grpo")
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    loss_r, _, grads_r = reference_run(hidden, weight, b, ids, mask, adv, **kw)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
    logp_all = torch.log_softmax((leaves[0] @ leaves[1].t() + leaves[2]).float(), -1)  # PyTorch's fp16 logits
    lp_n = torch.where(mask != 0, logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1), 0.0)
    ent_n = -(logp_all.exp() * logp_all).sum(-1)
    loss_n = R.grpo_lambda_loss(lp_n, None, adv, mask, loss_type="grpo")[0] \
        - 0.5 * entropy_bonus_mean(ent_n, mask, kw["entropy_weights"])
    assert_loss_no_worse_than_naive((loss, grads), (loss_r, [g.float() for g in grads_r]),
                                    (loss_n, torch.autograd.grad(loss_n, leaves)))


@pytest.mark.parametrize("impl", IMPLS)
def test_without_gradients_and_with_a_frozen_head(impl, device):
    """Under no_grad the value still carries the bonus; a frozen head (hidden only) gets the same dX."""
    hidden, weight, b, ids, mask, adv = make_batch(B=3, device=device, seed=6)
    kw = dict(bias=b, entropy_coef=-0.4, impl=impl)  # a negative coefficient: an entropy penalty
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, **kw)
    (dx,) = torch.autograd.grad(loss, (hidden,))
    with torch.no_grad():
        loss_ng, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, **kw)
    torch.testing.assert_close(loss_ng, loss.detach())
    frozen, _ = lk.fused_grpo_lambda_loss(hidden, weight.detach(), ids, mask, adv, **{**kw, "bias": b.detach()})
    (dx_frozen,) = torch.autograd.grad(frozen, (hidden,))
    torch.testing.assert_close(dx_frozen, dx)
    loss_r, _, _ = reference_run(hidden, weight, b, ids, mask, adv, entropy_coef=-0.4)
    torch.testing.assert_close(loss.double(), loss_r, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_weights_zero(impl, device):
    """No token weighted (every weight 0, or nothing unmasked): the bonus is exactly 0, its gradient too."""
    hidden, weight, b, ids, mask, adv = make_batch(B=2, device=device, seed=8)
    loss0, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl)
    grads0 = torch.autograd.grad(loss0, (hidden, weight, b))
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, entropy_coef=0.5,
                                        entropy_weights=torch.zeros_like(mask, dtype=torch.float32))
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert torch.equal(loss, loss0) and all(torch.equal(g, g0) for g, g0 in zip(grads, grads0))
    empty = torch.zeros_like(mask)
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, empty, adv, bias=b, impl=impl, entropy_coef=0.5)
    assert loss.item() == 0.0 and all((g == 0).all() for g in torch.autograd.grad(loss, (hidden, weight, b)))


def test_module_passes_it_on(device):
    hidden, weight, b, ids, mask, adv = make_batch(B=3, device=device, seed=5)
    assert_module_is_function(lk.FusedGRPOLambdaLoss, lk.fused_grpo_lambda_loss, dict(entropy_coef=0.3),
                              (hidden, weight, ids, mask, adv), bias=b, entropy_weights=_weights(mask))


@pytest.mark.parametrize("kw, error, match", [
    (dict(entropy_coef=float("nan")), ValueError, r"`entropy_coef` must be a finite number; got nan"),
    (dict(entropy_coef=True), ValueError, r"`entropy_coef` must be a finite number; got True"),
    (dict(entropy_coef="0.01"), ValueError, r"`entropy_coef` must be a finite number; got '0.01'"),
    (dict(entropy_coef=0.1, entropy_weights=torch.ones(2, 4)), ValueError, r"`entropy_weights`.*\[2, 3\].*\[2, 4\]"),
    (dict(entropy_coef=0.1, entropy_weights=[[1.0] * 3] * 2), TypeError, r"`entropy_weights` must be a torch.Tensor"),
    (dict(entropy_coef=0.1, entropy_weights=torch.ones(2, 3, dtype=torch.complex64)), TypeError,
     r"`entropy_weights` must be bool, integer or floating; got torch.complex64"),
])
def test_bad_input_is_a_clear_error(kw, error, match):
    hidden, weight, _, ids, mask, adv = make_batch(B=2, T=3, H=8, V=20)
    with pytest.raises(error, match=match):
        lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("on_policy", [True, False])
def test_gpu_bf16_relative_oracle(on_policy):
    """bf16 on the GPU: loss and gradients no further from the fp32 oracle than PyTorch's bf16 logits are."""
    from ._lm_head import assert_loss_no_worse_than_naive

    dev = torch.device("cuda")
    hidden, weight, _, ids, mask, adv = make_batch(B=4, T=256, H=512, V=32000, dtype=torch.bfloat16, device=dev,
                                                   bias=False, seed=3)
    old = None if on_policy else perturbed_old(hidden, weight, None, ids, 1.0, scale=0.05)
    kw = dict(old_logprobs=old, trace="both", lam=0.99, adv_clamp_min=-0.1, loss_type="grpo")
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, entropy_coef=0.01, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight))

    def composed(h, w, logits_dtype):
        logp_all = torch.log_softmax((h @ w.t()).to(logits_dtype), -1)
        lp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
        ent = -(logp_all.exp() * logp_all).sum(-1).float()
        m = mask.float()
        rest = {k: v for k, v in kw.items() if k != "old_logprobs"}  # (old passed by position)
        return R.grpo_lambda_loss(lp, old, adv, mask, **rest)[0] - 0.01 * (m * ent).sum() / m.sum()

    leaves32 = [t.detach().float().requires_grad_() for t in (hidden, weight)]
    loss_r = composed(*leaves32, torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    loss_n = composed(*leaves, torch.bfloat16)
    assert_loss_no_worse_than_naive((loss, grads), (loss_r, torch.autograd.grad(loss_r, leaves32)),
                                    (loss_n, torch.autograd.grad(loss_n, leaves)))
