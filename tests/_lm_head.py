"""Inputs, fp64 oracles and comparators of the LM-head tests (linear_logprobs and the fused loss), shared by the
test files of both and of the plans, the LSE GEMM and vocabulary-parallel heads."""
import math

import torch

from lambda_kernels import reference as R

from ._helpers import random_mask


def make_inputs(N, H, V, dtype=torch.float32, device="cpu", bias=True, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * (scale / math.sqrt(H)) * 3
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    to = dict(dtype=dtype, device=device)
    return (x.to(**to).requires_grad_(), w.to(**to).requires_grad_(),
            None if b is None else b.to(**to).requires_grad_(), t.to(device))


def upstream(N, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=g).to(device), torch.randn(N, generator=g).to(device)


def grads_of(lp, ent, g_lp, g_ent, inputs):
    obj = (lp.float() * g_lp).sum() + (0 if ent is None else (ent.float() * g_ent).sum())
    return torch.autograd.grad(obj, [t for t in inputs if t is not None])


def oracle(x, w, b, t, temperature, mask=None, softcap=None):
    """fp64 log-probs, entropy and grads on the same inputs."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    lp, ent = R.linear_logprobs(x64, w64, t, bias=b64, temperature=temperature, return_entropy=True, mask=mask,
                                softcap=softcap)
    return lp, ent, (x64, w64, b64)


def assert_fp32_matches_oracle(lp, ent, x, w, b, t, temperature, softcap=None):
    """fp32 log-probs, entropy and every gradient (hidden, weight, bias) within fp32 tolerance of the fp64 oracle."""
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == t.shape
    lp_ref, ent_ref, leaves = oracle(x, w, b, t, temperature, softcap=softcap)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=2e-5)
    g_lp, g_ent = upstream(t.shape[0], device=x.device)
    got = grads_of(lp, ent, g_lp, g_ent, (x, w, b))
    want = grads_of(lp_ref, ent_ref, g_lp.double(), g_ent.double(), leaves)
    for name, a, e in zip(["hidden", "weight", "bias"], got, want):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=2e-5 * e.abs().max().item() + 1e-7, msg=name)


def naive_half_logprobs(x, w, b, t, temperature, g_lp, g_ent):
    """Plain PyTorch in the inputs' half dtype (logits and their gradient in half, softmax in fp32): (ℓ, H, grads of
    Σ g_lp·ℓ + g_ent·H w.r.t. hidden, weight, bias) — what "no worse than PyTorch in half" is measured against."""
    xh, wh, bh = (v.detach().clone().requires_grad_() for v in (x, w, b))
    lsm = torch.log_softmax((xh @ wh.t() + bh).float() / temperature, -1)
    lp_n, ent_n = lsm.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(lsm.exp() * lsm).sum(-1)
    return lp_n, ent_n, grads_of(lp_n, ent_n, g_lp, g_ent, (xh, wh, bh))


def assert_no_worse_than_naive(triples):
    """(ours, naive, fp64 oracle) triples: our error at most 1.05× the naive one, plus a small floor."""
    for a, n, e in triples:
        err = (a.double() - e).abs().max().item()
        err_naive = (n.double() - e).abs().max().item()
        assert err <= 1.05 * err_naive + 1e-3 * e.abs().max().item() + 1e-6, (err, err_naive)


def assert_loss_no_worse_than_naive(ours, oracle, naive):
    """(loss, grads) triples of ours in half precision, the fp32 oracle and plain PyTorch in half precision: our loss
    error at most 1.05× the naive one's (+1e-4), each gradient's relative error at most 1.05× the naive one's
    (+1e-3) — the relative oracle for bf16."""
    (loss, grads), (loss_r, grads_r), (loss_n, grads_n) = ours, oracle, naive
    assert abs(loss.item() - loss_r.item()) <= 1.05 * abs(loss_n.item() - loss_r.item()) + 1e-4
    for a, n, e in zip(grads, grads_n, grads_r):
        err = ((a.float() - e).norm() / e.norm()).item()
        err_n = ((n.float() - e).norm() / e.norm()).item()
        assert err <= 1.05 * err_n + 1e-3, (err, err_n)


def bf16_oracle_case(on_policy: bool):
    """The GPU's bf16 relative-oracle case of the fused loss (B 4 × T 256, H 512, V 32000, k3 KL, trace both):
    (hidden, weight, ids, mask, adv, loss kwargs, (loss, grads) of the fp32 oracle, (loss, grads) of plain PyTorch
    in bf16), for `assert_loss_no_worse_than_naive`."""
    dev = torch.device("cuda")
    hidden, weight, _, ids, mask, adv = make_batch(B=4, T=256, H=512, V=32000, dtype=torch.bfloat16, device=dev,
                                                   bias=False, seed=2)
    old = None if on_policy else perturbed_old(hidden, weight, None, ids, 1.0, scale=0.05)
    ref = perturbed_old(hidden, weight, None, ids, 1.0, seed=9, scale=0.05)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.01, trace="both", lam=0.99, adv_clamp_min=-0.1)
    objective = {k: v for k, v in kw.items() if k != "old_logprobs"}
    leaves32 = [t.detach().float().requires_grad_() for t in (hidden, weight)]
    loss_r, _ = R.grpo_lambda_loss(R.linear_logprobs(leaves32[0], leaves32[1], ids), old, adv, mask, **objective)
    oracle = (loss_r, torch.autograd.grad(loss_r, leaves32))
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    lp_n = torch.log_softmax((leaves[0] @ leaves[1].t()).float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    loss_n, _ = R.grpo_lambda_loss(lp_n, old, adv, mask, **objective)
    return hidden, weight, ids, mask, adv, kw, oracle, (loss_n, torch.autograd.grad(loss_n, leaves))


def make_batch(B=3, T=17, H=40, V=123, dtype=torch.float32, device="cpu", seed=0, bias=True, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (3 / math.sqrt(H))
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = random_mask(B, T, seed=seed)
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    to = dict(dtype=dtype, device=device)
    hidden, weight = hidden.to(**to).requires_grad_(), weight.to(**to).requires_grad_()
    b = None if b is None else b.to(**to).requires_grad_()
    return hidden, weight, b, ids.to(device), mask.to(device), adv.to(device)


def perturbed_old(hidden, weight, b, ids, temperature, seed=1, scale=0.15):
    """Old log-probs = current ones plus noise, so some ratios are clipped."""
    with torch.no_grad():
        lp = R.linear_logprobs(hidden.double(), weight.double(), ids, bias=None if b is None else b.double(),
                               temperature=temperature)
    g = torch.Generator().manual_seed(seed)
    return (lp + scale * torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device)).float()


def reference_run(hidden, weight, b, ids, mask, adv, **kw):
    """The oracle in fp64: loss, metrics, grads of (hidden, weight, bias)."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    kw = dict(kw)
    for k in ("old_logprobs", "ref_logprobs"):
        if kw.get(k) is not None:
            kw[k] = kw[k].double()
    loss, metrics = R.fused_grpo_lambda_loss(leaves[0], leaves[1], ids, mask, adv.double(), bias=leaves[2], **kw)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return loss, metrics, grads


def assert_matches(loss, metrics, grads, ref, atol_loss=2e-6, rtol_grad=2e-5):
    loss_r, metrics_r, grads_r = ref
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), loss_r, rtol=1e-5, atol=atol_loss)
    assert set(metrics) == set(metrics_r), (set(metrics), set(metrics_r))
    for k in metrics:
        assert metrics[k].dtype == torch.float32 and not metrics[k].requires_grad
        torch.testing.assert_close(metrics[k].double(), metrics_r[k].double(), rtol=1e-4, atol=1e-5, msg=k)
    assert len(grads) == len(grads_r)
    for name, a, e in zip(["hidden", "weight", "bias"], grads, grads_r):
        scale = e.abs().max().item() + 1e-12
        err = (a.double() - e).abs().max().item()
        assert err <= rtol_grad * scale, (name, err, scale)
