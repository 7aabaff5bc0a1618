"""linear_logprobs(mask=): only the unmasked tokens' rows are computed (old-policy and reference log-probs of the
completion tokens), exactly; the masked ones are 0, get no gradient and reach no result."""
import math

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R

from ._helpers import IMPLS, logits_gemm_shapes, poisoned_outputs, random_mask, record_calls, set_chunk_rows
from ._lm_head import grads_of, make_inputs, upstream
from ._memory import PeakNewBytes

B, T, H, V = 3, 13, 40, 123


def masked_inputs(device, dtype=torch.float32, seed=0, bias=True):
    """[B, T, H] hidden, head, bias, [B, T] targets and a mask with holes and right padding."""
    x, w, b, t = make_inputs(B * T, H, V, dtype=dtype, device=device, bias=bias, seed=seed)
    hidden = x.detach().reshape(B, T, H).requires_grad_()
    return hidden, w, b, t.reshape(B, T), random_mask(B, T, seed=seed).to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
def test_masked_matches_fp64_reference(impl, temperature, mask_dtype, device, monkeypatch):
    """Values and every gradient (hidden, weight, bias; through ℓ and H) against the full-logits fp64 reference."""
    set_chunk_rows(monkeypatch, 7)
    hidden, w, b, t, mask = masked_inputs(device)
    m = mask.to(mask_dtype)
    lp, ent = lk.linear_logprobs(hidden, w, t, bias=b, temperature=temperature, return_entropy=True, impl=impl,
                                 mask=m)
    assert lp.shape == ent.shape == (B, T) and lp.dtype == ent.dtype == torch.float32
    leaves = [v.detach().double().requires_grad_() for v in (hidden, w, b)]
    lp_r, ent_r = R.linear_logprobs(*leaves[:2], t, bias=leaves[2], temperature=temperature, return_entropy=True,
                                    mask=m)
    torch.testing.assert_close(lp.double(), lp_r, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_r, rtol=0, atol=2e-5)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    g_lp, g_ent = (g.reshape(B, T) for g in upstream(B * T, device=device))
    got = grads_of(lp, ent, g_lp, g_ent, (hidden, w, b))
    want = grads_of(lp_r, ent_r, g_lp.double(), g_ent.double(), leaves)
    for name, a, e in zip(["hidden", "weight", "bias"], got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=2e-5 * e.abs().max().item() + 1e-7, msg=name)
    assert (got[0][~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_are_never_read(impl, device, monkeypatch):
    """NaN hidden states and -100 ids at masked positions: they reach no output and no gradient, and the real
    tokens' values are bit-identical to a call on just their rows (same chunks, same GEMM shapes)."""
    set_chunk_rows(monkeypatch, 7)
    hidden, w, b, t, mask = masked_inputs(device)
    poisoned = hidden.detach().clone()
    poisoned[~mask] = math.nan
    poisoned.requires_grad_()
    t = torch.where(mask, t, torch.full_like(t, -100))
    lp, ent = lk.linear_logprobs(poisoned, w, t, bias=b, return_entropy=True, impl=impl, mask=mask)
    x_real = hidden.detach()[mask].clone().requires_grad_()
    lp_real, ent_real = lk.linear_logprobs(x_real, w, t[mask], bias=b, return_entropy=True, impl=impl)
    assert torch.equal(lp[mask], lp_real) and torch.equal(ent[mask], ent_real)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    g_lp, g_ent = (g.reshape(B, T) for g in upstream(B * T, device=device))
    gx, gw, gb = grads_of(lp, ent, g_lp, g_ent, (poisoned, w, b))
    gx_real, gw_real, gb_real = grads_of(lp_real, ent_real, g_lp[mask], g_ent[mask], (x_real, w, b))
    assert torch.equal(gx[mask], gx_real) and (gx[~mask] == 0).all()
    assert torch.equal(gw, gw_real) and torch.equal(gb, gb_real)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_grad_and_no_grad_bit_identical(impl, device, monkeypatch):
    """Old-policy log-probs under no_grad equal the differentiable call's bit for bit (on-policy ratio exactly 1)."""
    set_chunk_rows(monkeypatch, 5)
    hidden, w, b, t, mask = masked_inputs(device, seed=2)
    lp, ent = lk.linear_logprobs(hidden, w, t, bias=b, return_entropy=True, impl=impl, mask=mask)
    with torch.no_grad():
        lp_ng, ent_ng = lk.linear_logprobs(hidden, w, t, bias=b, return_entropy=True, impl=impl, mask=mask)
    assert torch.equal(lp.detach(), lp_ng) and torch.equal(ent.detach(), ent_ng)


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_costs_no_gemm_rows(impl, device, monkeypatch):
    """The logits GEMMs cover the real tokens only, forward and backward, in chunks within the budget."""
    set_chunk_rows(monkeypatch, 7)
    hidden, w, b, t, mask = masked_inputs(device)
    seen = logits_gemm_shapes(monkeypatch)
    lk.linear_logprobs(hidden, w, t, bias=b, impl=impl, mask=mask).sum().backward()
    n_real = int(mask.sum())
    assert n_real < B * T
    assert sum(rows for rows, _ in seen) == 2 * n_real and all(rows <= 7 for rows, _ in seen)


def test_no_grad_gathers_rows_per_chunk_not_all_at_once(device, monkeypatch):
    """Under no_grad no [n_real, H] copy of hidden is made: only a chunk of rows besides the chunk of logits."""
    N, chunk = 400, 16
    set_chunk_rows(monkeypatch, chunk)
    x, w, _, t = make_inputs(N, H, V, device=device, bias=False)
    mask = torch.arange(N, device=device) % 4 != 0  # 300 real tokens
    with torch.no_grad(), PeakNewBytes() as mem:
        lp = lk.linear_logprobs(x, w, t, impl="torch", mask=mask)
    out_and_index = lp.numel() * 4 * 3 + (N + 1) * 8 * 2  # ℓ, lse, the scatter; the [N + 1] positions, cumsum
    per_chunk = chunk * V * 4 + chunk * H * 4
    assert mem.peak <= out_and_index + 2 * per_chunk, (mem.peak, out_and_index, per_chunk)
    assert mem.peak < 300 * H * 4  # below the gathered copy alone


@pytest.mark.parametrize("impl", IMPLS)
def test_all_real_and_all_masked(impl, device):
    hidden, w, b, t, _ = masked_inputs(device)
    full = torch.ones(B, T, dtype=torch.bool, device=device)
    assert torch.equal(lk.linear_logprobs(hidden, w, t, bias=b, impl=impl, mask=full),
                       lk.linear_logprobs(hidden, w, t, bias=b, impl=impl))
    lp, ent = lk.linear_logprobs(hidden, w, torch.full_like(t, -1), bias=b, return_entropy=True, impl=impl,
                                 mask=~full)
    assert (lp == 0).all() and (ent == 0).all()
    gx, gw = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, w), allow_unused=True)
    assert (gx is None or (gx == 0).all()) and (gw is None or (gw == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_outputs_fully_written_under_nan_poison(impl, device, monkeypatch):
    set_chunk_rows(monkeypatch, 7)
    hidden, w, b, t, mask = masked_inputs(device)
    with poisoned_outputs():
        lp, ent = lk.linear_logprobs(hidden, w, t, bias=b, return_entropy=True, impl=impl, mask=mask)
        grads = grads_of(lp, ent, *(g.reshape(B, T) for g in upstream(B * T, device=device)), (hidden, w, b))
    for v in (lp, ent) + tuple(grads):
        assert torch.isfinite(v).all()


def test_half_masked_equals_call_on_real_rows(device, monkeypatch):
    """fp16 (bf16 on GPU): the mask changes which rows run, not how (bit-identical to the real rows' call)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    set_chunk_rows(monkeypatch, 6)
    hidden, w, b, t, mask = masked_inputs(device, dtype=dtype)
    with torch.no_grad():
        lp = lk.linear_logprobs(hidden, w, t, bias=b, mask=mask)
        lp_real = lk.linear_logprobs(hidden[mask], w, t[mask], bias=b)
    assert torch.equal(lp[mask], lp_real) and (lp[~mask] == 0).all()


def test_one_host_sync_counts_and_checks(monkeypatch):
    """The id check and the count of real tokens share one device→host read, grad and no-grad (no other read of a
    tensor's value by the host: item, bool, int, float, nonzero)."""
    hidden, w, b, t, mask = masked_inputs("cpu")
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        reads += [record_calls(monkeypatch, torch.Tensor, name, lambda self, *a, name=name, **k: (name, self.shape))]
    lk.linear_logprobs(hidden, w, t, bias=b, mask=mask)
    with torch.no_grad():
        lk.linear_logprobs(hidden, w, t, bias=b, mask=mask)
    assert [r for seen in reads for r in seen] == [("tolist", (3,))] * 2  # min, max, and the count


def test_bad_mask():
    hidden, w, b, t, mask = masked_inputs("cpu")
    with pytest.raises(ValueError, match=r"linear_logprobs: `mask` must have shape \[3, 13\]; got \[3, 12\]"):
        lk.linear_logprobs(hidden, w, t, mask=mask[:, :12])
    with pytest.raises(TypeError, match=r"`mask` must be bool, integer or floating; got torch.complex64"):
        lk.linear_logprobs(hidden, w, t, mask=mask.to(torch.complex64))
    bad = t.clone()
    bad[0, 0] = -100  # row 0 is never padded and position 0 is unmasked here: a real token with a bad id
    real = mask.clone()
    real[0, 0] = True
    with pytest.raises(ValueError, match=r"`targets` must hold token ids in \[0, V\) = \[0, 123\) at unmasked "
                                         r"positions; got min -100"):
        lk.linear_logprobs(hidden, w, bad, mask=real)
    with pytest.raises(ValueError, match=r"or pass mask= to skip those positions"):
        lk.linear_logprobs(hidden, w, bad)
