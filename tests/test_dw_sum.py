"""The fp32 dW sum of a half LM head (`linear_logprobs.dw_sum`): half of it lives in the gradient's own bytes, and
its cast runs in place. Exactness of the cast, the layout, the run-once rule, and the memory it saves."""
import pytest
import torch

import lambda_kernels as lk
from lambda_kernels.ops.linear_logprobs import dw_sum as dw_sum_mod
from lambda_kernels.ops.linear_logprobs import lse_gemm, plan
from lambda_kernels.ops.linear_logprobs.dw_sum import HalfHeadGradSum

from ._helpers import IMPLS, record_calls
from ._memory import PeakNewBytes

def _filled(V, H, dtype, device, seed=0):
    """A sum with random fp32 values in every part, and the whole [V, H] fp32 sum it holds."""
    s = HalfHeadGradSum.allocate(torch.empty((V, H), dtype=dtype, device=device))
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(V, H, generator=g) * 3).to(device)
    for rows, acc in s.parts():
        acc.copy_(full[rows])
    return s, full


# the interpreter's bf16 arithmetic is wrong (environment.md): the Triton bf16 cast is checked on a GPU
IMPL_DTYPES = [("triton", torch.float16), ("torch", torch.float16), ("torch", torch.bfloat16),
               pytest.param("triton", torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES)
@pytest.mark.parametrize("V,H", [(1, 5), (15, 3), (16, 1), (123, 40), (301, 7)])
def test_finish_is_the_cast_of_the_scaled_sum(impl, dtype, V, H, device, monkeypatch):
    """Bit-identical to (sum·scale).to(dtype), with blocks small enough that the cast takes its first block through a
    temporary, then doubling blocks (and, for PyTorch, capped ones)."""
    monkeypatch.setattr(dw_sum_mod, "FIRST_BLOCK", 5)
    monkeypatch.setattr(dw_sum_mod, "TORCH_BLOCK", 64)
    s, full = _filled(V, H, dtype, device)
    scale = torch.tensor(0.37, device=device)
    grad = s.finish(impl, scale)
    assert grad.dtype == dtype and grad.shape == (V, H)
    assert torch.equal(grad, (full * scale.reshape(1)).to(dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V,H", [(123, 40), (301, 7), (4000, 3)])
def test_finish_casts_in_an_order_that_is_safe_on_a_gpu(impl, V, H, device, monkeypatch):
    """The rules that keep the in-place cast right when many programs of a launch run at once (the interpreter runs
    them one by one, so the values alone would not show a break): the first block through a temporary, then blocks
    whose outputs lie below their own inputs (disjoint bytes, landing on fp32 values earlier launches read), in
    order; `rest` last."""
    monkeypatch.setattr(dw_sum_mod, "FIRST_BLOCK", 5)
    monkeypatch.setattr(dw_sum_mod, "TORCH_BLOCK", 300)
    s, full = _filled(V, H, torch.float16, device)
    base = s.grad.untyped_storage().data_ptr()
    calls = []

    def byte_range(t):
        start = t.data_ptr() - base if t.untyped_storage().data_ptr() == base else None
        return None if start is None else (start, start + t.numel() * t.element_size())

    original = dw_sum_mod.scale_cast

    def spy(rows_impl, src, scale, dtype, out=None):
        calls.append((byte_range(src), None if out is None else byte_range(out)))
        return original(rows_impl, src, scale, dtype, out=out)

    monkeypatch.setattr(dw_sum_mod, "scale_cast", spy)
    grad = s.finish(impl)
    assert torch.equal(grad, full.to(torch.float16))
    low_bytes = 4 * plan.split_rows(V) * H
    low = [c for c in calls if c[0] is not None]
    assert low[0] == ((0, 20), None) and calls[:len(low)] == low  # first block (5 values) via a temporary; rest last
    read = 20
    for (src0, src1), (out0, out1) in low[1:]:
        assert src0 == read and out1 <= src0  # the next block; outputs below its own inputs
        read = src1
    assert read == low_bytes and len(low) > 3  # several in-place blocks covered the low part
    assert all(src is None and out[1] <= 2 * V * H for src, out in calls[len(low):])  # rest, into the gradient


@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES)
def test_finish_without_scale_and_with_default_blocks(impl, dtype, device):
    s, full = _filled(123, 40, dtype, device, seed=1)
    assert torch.equal(s.finish(impl), full.to(dtype))


@pytest.mark.parametrize("V", [1, 7, 16, 123, 152064])
def test_layout_half_in_the_gradient_bytes(V):
    H = 3
    s = HalfHeadGradSum.allocate(torch.empty((V, H), dtype=torch.bfloat16, device="meta"))
    parts = s.parts()
    assert [rows for rows, _ in parts][-1] == slice(plan.split_rows(V), V)
    assert sum(acc.shape[0] for _, acc in parts) == V and all(acc.dtype == torch.float32 for _, acc in parts)
    assert s.rest.numel() * 4 == plan.rest_bytes(V, H)
    assert plan.split_rows(V) % plan.SPLIT_ALIGN == 0 and 2 * plan.split_rows(V) <= V
    if plan.split_rows(V):
        low = parts[0][1]
        assert low.untyped_storage().data_ptr() == s.grad.untyped_storage().data_ptr()
        assert low.numel() * 4 <= s.grad.numel() * 2  # inside the gradient's bytes


def test_finish_runs_once(device):
    s, _ = _filled(40, 4, torch.bfloat16, device)
    s.finish("torch")
    with pytest.raises(RuntimeError, match="already cast"):
        s.finish("torch")


def test_fused_loss_second_backward_raises_instead_of_casting_twice(device):
    from ._lm_head import make_batch

    hidden, weight, b, ids, mask, adv = make_batch(dtype=torch.float16, device=device, seed=3)
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b)
    torch.autograd.grad(loss, weight, retain_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss, weight)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_loss_leaves_the_sums_own_tensor_as_the_gradient(impl, device, monkeypatch):
    """weight.grad is the tensor `finish` cast in place: autograd takes it over, no copy (which it would make if
    anything still held a reference to it when the gradient is accumulated)."""
    from ._lm_head import make_batch

    cast = record_calls(monkeypatch, HalfHeadGradSum, "finish", lambda self, *a, **kw: self.grad.data_ptr())
    hidden, weight, b, ids, mask, adv = make_batch(dtype=torch.float16, device=device, seed=3)
    lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl)[0].backward()
    assert cast == [weight.grad.data_ptr()]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["linear_logprobs", "fused_loss"])
@pytest.mark.parametrize("grad_plan", ["tokens", "split"])
def test_half_head_holds_half_the_fp32_sum_beside_its_gradient(impl, op, grad_plan, device, monkeypatch):
    """What a half head's gradient pass holds beyond its returned gradients: one logits chunk and the sum's `rest`
    (≈ 2·V·H bytes), not a 4·V·H fp32 sum, and no third copy at the cast; on the CPU also fp32 copies of the weight
    and of a chunk's dlogits (no half GEMM with an fp32 output there). The split plan, under a memory budget that
    leaves room for the sums of 300 rows beyond the gradient's bytes, holds that much less."""
    B, T, H, V, rows = 4, 50, 64, 3000, 16
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "cublas")  # (the bound counts fp32 logits chunks)
    monkeypatch.setenv(plan.BUDGET_ENV, str(4 * V * rows))
    monkeypatch.delenv(plan.MEMORY_BUDGET_ENV, raising=False)
    monkeypatch.setenv(plan.PLAN_ENV, grad_plan)
    if grad_plan == "split":
        monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, str(4 * V * rows + 4 * 300 * H))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.2).to(device=device, dtype=torch.bfloat16).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    with PeakNewBytes() as mem:
        if op == "linear_logprobs":
            lk.linear_logprobs(hidden, weight, ids, impl=impl).sum().backward()
        else:
            adv = torch.randn(B, generator=g).to(device)
            lk.fused_grpo_lambda_loss(hidden, weight, ids, torch.ones_like(ids, dtype=torch.bool), adv,
                                      impl=impl)[0].backward()
    extra = mem.peak_excluding(hidden.grad, weight.grad)
    per_token = 128 * B * T + 3 * 4 * B * T * H + 8192  # per-token vectors; gathered x, dX and its cast
    chunk = 4 * V * plan.chunk_rows(B * T, V)
    # CPU: the fp32 copy of the weight, and of a chunk's dlogits for each GEMM
    upcast = 0 if weight.is_cuda else 4 * V * H + chunk
    torch_temporaries = 6 * chunk if impl == "torch" else 0
    sums = plan.rest_bytes(V, H) if grad_plan == "tokens" else 4 * 300 * H
    bound = upcast + sums + chunk + per_token + torch_temporaries
    assert extra <= bound, (extra, bound)
    if impl == "triton":  # (the PyTorch rows' temporaries blur the difference)
        assert bound < upcast + 4 * V * H + chunk  # what a whole fp32 sum beside a chunk would hold at least


@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES + [(impl, dt) for impl in IMPLS
                                                      for dt in (torch.float32, torch.float64)])
def test_scale_unless_one(impl, dtype, device):
    """A gradient scaled in place by grad_output: by the fp32 scale (the torch fallback and fp64 by the scale in the
    gradient's dtype); bytes untouched when the scale is 1; autograd's version counter bumped either way."""
    g = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3).to(device=device, dtype=dtype)
    for scale in (1.0, -2.5, 0.3, float("nan")):
        got = g.clone()
        version = got._version
        out = dw_sum_mod.scale_unless_one(impl, got, torch.tensor(scale, device=device))
        assert out is got and got._version > version
        s = torch.tensor(scale, dtype=torch.float32)
        exact = impl == "triton" and dtype != torch.float64
        want = (g.float() * s).to(dtype) if exact else g * s.to(dtype)
        if scale == 1.0:
            assert torch.equal(got, g)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("budget", [None, "1G"])
def test_fused_loss_second_backward_of_cast_gradients_raises(budget, device, monkeypatch):
    """Gradients already in their dtype (dX, db; dW too under a budget) are scaled in place by the backward: a
    second backward through a retained graph must fail autograd's version check, not scale them twice."""
    from ._lm_head import make_batch

    if budget:
        monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, budget)
    hidden, weight, b, ids, mask, adv = make_batch(dtype=torch.float16, device=device, seed=5)
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b)
    first = torch.autograd.grad(loss * 2.0, (hidden, b), retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss * 2.0, (hidden, b))
    assert all(torch.isfinite(g).all() for g in first)
