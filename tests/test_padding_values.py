"""Masked tokens' values are never used, by either implementation: padding may hold anything (NaN, ±inf, ids out
of range) and every output and gradient is exactly what the same call gives with clean padding (grpo_lambda.md §4:
masked positions carry Δ = 0 and c = 0). A trainer's old/reference log-probs often hold -inf or garbage there."""
import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R

from ._helpers import IMPLS, random_mask
from ._lm_head import make_batch

B, T = 3, 17


def _garbage(t: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(mask, t, torch.full_like(t, value))


def _assert_same(dirty, clean):
    for d, c in zip(dirty, clean):
        if d is not None:
            assert torch.isfinite(d).all() and torch.equal(d, c)


def _objective_run(impl, lp, old, adv, mask, ref, **kw):
    leaf = lp.detach().clone().requires_grad_()
    loss, metrics = lk.grpo_lambda_loss(leaf, old, adv, mask, ref_logprobs=ref, impl=impl, **kw)
    loss.backward()
    return [loss, *metrics.values(), leaf.grad]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("on_policy", [True, False])
@pytest.mark.parametrize("trace", [None, "both"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_objective_ignores_padding(impl, on_policy, trace, per_token_adv, device):
    g = torch.Generator().manual_seed(3)
    mask = random_mask(B, T, seed=3).to(device)
    lp = (-torch.rand(B, T, generator=g)).to(device)
    old = None if on_policy else lp + 0.1 * torch.randn(B, T, generator=g).to(device)
    ref = lp + 0.2 * torch.randn(B, T, generator=g).to(device)
    adv = torch.randn(*((B, T) if per_token_adv else (B,)), generator=g).to(device)
    kw = dict(trace=trace, lam=0.9, beta=0.04, adv_clamp_min=-0.1)
    clean = _objective_run(impl, torch.where(mask, lp, 0.0), None if old is None else torch.where(mask, old, 0.0),
                           torch.where(mask, adv, 0.0) if per_token_adv else adv, mask, torch.where(mask, ref, 0.0),
                           **kw)
    dirty = _objective_run(impl, _garbage(lp, mask, float("nan")),
                           None if old is None else _garbage(old, mask, float("inf")),
                           _garbage(adv, mask, float("nan")) if per_token_adv else adv, mask,
                           _garbage(ref, mask, float("-inf")), **kw)
    _assert_same(dirty, clean)
    assert (dirty[-1][~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_trace_ignores_padding(impl, device):
    mask = random_mask(B, T, seed=4).to(device)
    x = torch.randn(B, T, generator=torch.Generator().manual_seed(4)).to(device)
    outs = []
    for values in (torch.where(mask, x, 0.0), _garbage(x, mask, float("nan"))):
        leaf = values.clone().requires_grad_()
        z = lk.lambda_trace(leaf, mask, lam=0.9, style="both", impl=impl)
        (z * torch.linspace(-1, 1, T, device=device)).sum().backward()
        outs.append([z, leaf.grad])
    _assert_same(outs[1], outs[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_gae_ignores_padding(impl, device):
    mask = random_mask(B, T, seed=5).to(device)
    g = torch.Generator().manual_seed(5)
    r, v = torch.randn(B, T, generator=g).to(device), torch.randn(B, T, generator=g).to(device)
    clean = lk.gae(torch.where(mask, r, 0.0), torch.where(mask, v, 0.0), mask, gamma=0.99, lam=0.95, impl=impl)
    dirty = lk.gae(_garbage(r, mask, float("inf")), _garbage(v, mask, float("nan")), mask, gamma=0.99, lam=0.95,
                   impl=impl)
    _assert_same(dirty, clean)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_fused_loss_ignores_padding(impl, on_policy, device):
    """NaN hidden states, ids out of range, ℓ_old = +inf and ℓ_ref = −inf at the padding."""
    hidden, weight, b, ids, mask, adv = make_batch(device=device, seed=6)
    with torch.no_grad():
        lp = R.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double()).float()
    old = None if on_policy else lp + 0.1
    ref = lp - 0.05
    kw = dict(beta=0.04, trace="both", lam=0.9, adv_clamp_min=-0.1, return_entropy=True, impl=impl)

    def run(h, i, o, r):
        leaves = [t.detach().clone().requires_grad_() for t in (h, weight, b)]
        loss, metrics = lk.fused_grpo_lambda_loss(leaves[0], leaves[1], i, mask, adv, bias=leaves[2],
                                                  old_logprobs=o, ref_logprobs=r, **kw)
        loss.backward()
        return [loss, *metrics.values(), *(t.grad for t in leaves)]

    hmask = mask.unsqueeze(-1)
    clean = run(torch.where(hmask, hidden, 0.0), torch.where(mask, ids, 0),
                None if old is None else torch.where(mask, old, 0.0), torch.where(mask, ref, 0.0))
    dirty = run(_garbage(hidden, hmask, float("nan")), torch.where(mask, ids, -100),
                None if old is None else _garbage(old, mask, float("inf")), _garbage(ref, mask, float("-inf")))
    _assert_same(dirty[:-3], clean[:-3])  # loss and metrics
    for d, c in zip(dirty[-3:], clean[-3:]):  # gradients: padding rows of dX are 0; dW, db only from real rows
        assert torch.isfinite(d).all()
        torch.testing.assert_close(d, c, rtol=1e-6, atol=1e-7)
    assert (dirty[-3][~mask] == 0).all()


def test_reference_fused_loss_ignores_padding():
    """The oracle keeps the same contract: -100 ids and NaN hidden states at the padding change nothing."""
    hidden, weight, b, ids, mask, adv = make_batch(seed=10, dtype=torch.float64)
    results = []
    for h, i in ((torch.where(mask.unsqueeze(-1), hidden, 0.0), torch.where(mask, ids, 0)),
                 (_garbage(hidden, mask.unsqueeze(-1), float("nan")), torch.where(mask, ids, -100))):
        leaves = [t.detach().clone().requires_grad_() for t in (h, weight, b)]
        loss, metrics = R.fused_grpo_lambda_loss(leaves[0], leaves[1], i, mask, adv, bias=leaves[2], beta=0.04,
                                                 ref_logprobs=torch.zeros(mask.shape, dtype=torch.float64) - 3,
                                                 return_entropy=True)
        loss.backward()
        results.append([loss, *metrics.values(), *(t.grad for t in leaves)])
    _assert_same(results[1], results[0])
