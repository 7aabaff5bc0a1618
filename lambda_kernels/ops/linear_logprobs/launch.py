"""The token-chunked pipeline: cuBLAS GEMMs per chunk of rows, the row kernels on the fp32 logits chunk in between.

Per chunk of M rows (M from the logits budget, see `chunk_rows`):

    logits = X_c·Wᵀ                      fp32 output (torch.mm(..., out_dtype=float32) for bf16/fp16 on CUDA)
    row kernel                           lse, ℓ, H; or dlogits written over the chunk (in the GEMM input dtype)
    dX_c   = D·W                         rows of grad_hidden, one GEMM over V (fp32 accumulation inside cuBLAS)
    dW    += Dᵀ·X_c                      fp32 accumulator across chunks (the weight's grad itself when W is fp32)
    db    += Σ_rows D                    fp32

Only one logits chunk exists at a time. dlogits in bf16/fp16 are written into the first half of each fp32 row
(a strided view with row stride 2V that cuBLAS reads directly), so a chunk costs 4·M·V bytes in all.
"""
from __future__ import annotations

import os
import re
from typing import Callable

import torch
import triton

from ..._core.runtime import interpreter_enabled
from . import chunked_torch
from .kernels import dlogits_rows_kernel, logprob_rows_kernel

BUDGET_ENV = "LAMBDA_KERNELS_LOGITS_BUDGET"
DEFAULT_BUDGET = 1 << 30  # 1 GiB of fp32 logits per chunk


def logits_budget_bytes() -> int:
    """Bytes of fp32 logits one chunk may hold: env LAMBDA_KERNELS_LOGITS_BUDGET ("1G", "256M", "65536"), else 1 GiB."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET
    match = re.fullmatch(r"(\d+)\s*([kKmMgG]?)(i?[bB])?", raw)
    if match is None:
        raise RuntimeError(f"{BUDGET_ENV} must be a byte count such as 1073741824, 512M or 1G; got {raw!r}.")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(match.group(1)) * scale


def chunk_rows(N: int, V: int, budget: int | None = None) -> int:
    """Rows per chunk: as many as the budget allows (multiples of 128 once ≥ 256, for cuBLAS), balanced over N.

    Depends only on (N, V, budget), so the grad and no-grad paths cut the same chunks (same GEMM shapes).
    """
    budget = logits_budget_bytes() if budget is None else budget
    rows = max(1, budget // (4 * max(V, 1)))
    if rows >= 256:
        rows = rows // 128 * 128
    if N <= rows:
        return max(N, 1)
    n_chunks = -(-N // rows)
    balanced = -(-N // n_chunks)
    if rows >= 256:
        balanced = -(-balanced // 128) * 128
    return min(rows, balanced)


def row_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernels: 4096-wide tiles on GPU, whole small rows in the interpreter."""
    cap = 2048 if interpreter_enabled() else 4096
    block = min(max(triton.next_power_of_2(V), 16), cap)
    return block, (8 if block >= 2048 else 4)


# ---------------------------------------------------------------------------------------------------- GEMMs
_CUDA_CAPS: dict[str, dict[str, bool]] = {}


def cuda_gemm_caps(device) -> dict[str, bool]:
    """Which fp32-output half-precision GEMM forms this CUDA build supports, probed once per device on tiny inputs.

    mm_out:    torch.mm(a, b, out_dtype=float32, out=buf)            (writes the logits chunk in place)
    mm:        torch.mm(a, b, out_dtype=float32)                     (torch >= 2.11 on CUDA)
    addmm_acc: torch.addmm(acc, a, b, out_dtype=float32, out=acc)    (dW accumulated in place, fp32)
    """
    key = str(device)
    if key not in _CUDA_CAPS:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(64, 48, device=device, generator=g).to(torch.bfloat16)
        b = torch.randn(48, 32, device=device, generator=g).to(torch.bfloat16)
        want = a.float() @ b.float()
        caps = {}
        for name, fn in [
            ("mm_out", lambda: torch.mm(a, b, out_dtype=torch.float32,
                                        out=torch.empty(64, 32, device=device))),
            ("mm", lambda: torch.mm(a, b, out_dtype=torch.float32)),
            ("addmm_acc", lambda: (lambda acc: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc) - want)(
                torch.ones(64, 32, device=device))),
        ]:
            try:
                got = fn()
                ref = torch.ones_like(want) if name == "addmm_acc" else want
                caps[name] = got.dtype == torch.float32 and bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-3))
            except (RuntimeError, TypeError):
                caps[name] = False
        _CUDA_CAPS[key] = caps
    return _CUDA_CAPS[key]


class Gemm:
    """The three LM-head GEMMs for one call, with fp32 output/accumulation wherever it matters.

    native: fp32/fp64 anywhere, and bf16/fp16 on CUDA (fp32-output GEMMs from half inputs, see `cuda_gemm_caps`).
    upcast: bf16/fp16 on CPU (the interpreter and the torch fallback), where half-input/fp32-output GEMMs do not
    exist: operands are upcast to fp32 (the weight once per call).
    """

    SLAB_BYTES = 64 << 20  # temporaries of the fallbacks for CUDA builds without the fused forms

    def __init__(self, weight: torch.Tensor):
        self.dtype = weight.dtype
        self.half = weight.dtype not in (torch.float32, torch.float64)
        self.native = not self.half or weight.is_cuda
        self.weight = weight if self.native else weight.to(torch.float32)
        self.caps = cuda_gemm_caps(weight.device) if self.half and self.native else {}

    def _slabs(self, n_rows: int, row_bytes: int):
        step = max(1, self.SLAB_BYTES // max(row_bytes, 1))
        for v0 in range(0, n_rows, step):
            yield slice(v0, min(v0 + step, n_rows))

    def logits(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out [m, V] fp32 ← x·Wᵀ."""
        w = self.weight
        if not self.half:
            torch.mm(x.to(out.dtype), w.t().to(out.dtype), out=out)
        elif not self.native:
            torch.mm(x.to(torch.float32), w.t(), out=out)
        elif self.caps["mm_out"]:
            torch.mm(x, w.t(), out_dtype=torch.float32, out=out)
        elif self.caps["mm"]:
            for sl in self._slabs(w.shape[0], 4 * x.shape[0]):
                out[:, sl].copy_(torch.mm(x, w[sl].t(), out_dtype=torch.float32))
        else:  # exact but slow: fp32 GEMM per vocabulary slab
            xf = x.to(torch.float32)
            for sl in self._slabs(w.shape[0], 4 * (x.shape[0] + w.shape[1])):
                torch.mm(xf, w[sl].to(torch.float32).t(), out=out[:, sl])

    def dx(self, d: torch.Tensor, out: torch.Tensor) -> None:
        """out [m, H] (hidden's dtype) ← D·W (one GEMM over V, fp32 accumulation inside it)."""
        if self.native:
            if out.dtype == d.dtype == self.weight.dtype:
                torch.mm(d, self.weight, out=out)
            else:
                out.copy_(torch.mm(d.to(self.weight.dtype), self.weight))
        else:
            out.copy_(torch.mm(d.to(torch.float32), self.weight))

    def dw_accumulate(self, acc: torch.Tensor, d: torch.Tensor, x: torch.Tensor) -> None:
        """acc [V, H] fp32 (fp64 for fp64) += Dᵀ·x."""
        if not self.half:
            acc.addmm_(d.t().to(acc.dtype), x.to(acc.dtype))
        elif not self.native:
            acc.addmm_(d.t().to(torch.float32), x.to(torch.float32))
        elif self.caps["addmm_acc"]:
            torch.addmm(acc, d.t(), x, out_dtype=torch.float32, out=acc)
        else:  # fp32-output GEMM per vocabulary slab, then add (bounded temporary)
            for sl in self._slabs(acc.shape[0], 4 * acc.shape[1]):
                if self.caps["mm"]:
                    acc[sl].add_(torch.mm(d[:, sl].t(), x, out_dtype=torch.float32))
                else:
                    acc[sl].addmm_(d[:, sl].t().to(torch.float32), x.to(torch.float32))


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dlogits_view(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where a chunk's dlogits go: the fp32 logits buffer itself, or its first half per row for a 2-byte dtype."""
    if dtype == buf.dtype:
        return buf
    V = buf.shape[1]
    return buf.view(dtype)[:, :V]


# ------------------------------------------------------------------------------------------- row operations
def logprob_rows(rows_impl: str, logits, bias, tgt, inv_t: float, lp, lse, ent) -> None:
    """lp, lse (ent) [m] of a logits chunk [m, V]."""
    if rows_impl == "torch" or logits.dtype == torch.float64:
        chunked_torch.logprob_rows(logits, bias, tgt, inv_t, lp, lse, ent)
        return
    M, V = logits.shape
    block, warps = row_config(V)
    logprob_rows_kernel[(M,)](
        logits, logits if bias is None else bias, tgt, lp, lse, lp if ent is None else ent, logits.stride(0), V,
        inv_t, HAS_BIAS=bias is not None, WITH_ENT=ent is not None, BLOCK_V=block, num_warps=warps)


def dlogits_rows(rows_impl: str, logits, bias, tgt, lse, ent, g_lp, g_ent, inv_t: float, dl) -> None:
    """dl [m, V] ← dlogits of a chunk from the upstream grads g_lp (and g_ent, may be None) [m] fp32."""
    if rows_impl == "torch" or logits.dtype == torch.float64:
        chunked_torch.dlogits_rows(logits, bias, tgt, lse, ent, g_lp, g_ent, inv_t, dl)
        return
    M, V = logits.shape
    block, warps = row_config(V)
    with_ent = g_ent is not None
    dlogits_rows_kernel[(M,)](
        logits, logits if bias is None else bias, tgt, lse, ent if with_ent else lse, g_lp,
        g_ent if with_ent else g_lp, dl, logits.stride(0), dl.stride(0), V, inv_t,
        HAS_BIAS=bias is not None, WITH_ENT_GRAD=with_ent, BLOCK_V=block, num_warps=warps)


# ------------------------------------------------------------------------------------------------ pipelines
def _chunks(N: int, V: int):
    M = chunk_rows(N, V)
    for r0 in range(0, N, M):
        yield slice(r0, min(r0 + M, N))


def _logits_buffer(N: int, V: int, x: torch.Tensor) -> torch.Tensor:
    return torch.empty((min(chunk_rows(N, V), N), V), dtype=stats_dtype(x), device=x.device)


def logprobs_forward(x, weight, bias, tgt, inv_t: float, with_ent: bool, rows_impl: str):
    """(ℓ [N], lse [N], H [N] or None), fp32, from x [N, H], weight [V, H], tgt [N]; no gradient work."""
    N, V = x.shape[0], weight.shape[0]
    sdt = stats_dtype(x)
    lp = torch.empty((N,), dtype=sdt, device=x.device)
    lse = torch.empty((N,), dtype=sdt, device=x.device)
    ent = torch.empty((N,), dtype=sdt, device=x.device) if with_ent else None
    if N == 0:
        return lp, lse, ent
    gemm = Gemm(weight)
    buf = _logits_buffer(N, V, x)
    for sl in _chunks(N, V):
        logits = buf[: sl.stop - sl.start]
        gemm.logits(x[sl], logits)
        logprob_rows(rows_impl, logits, bias, tgt[sl], inv_t, lp[sl], lse[sl], None if ent is None else ent[sl])
    return lp, lse, ent


RowGradFn = Callable[[slice, torch.Tensor, torch.Tensor], None]


def grad_pipeline(x, weight, bias, row_fn: RowGradFn, need_dx: bool, need_dw: bool, need_db: bool):
    """For each chunk: logits, then `row_fn(rows, logits, dl)` writes the chunk's dlogits into dl, then the GEMMs.

    Returns (dX [N, H] in x's dtype, dW [V, H] in weight's dtype, db [V] in bias's dtype), None where not needed.
    The dW accumulator is fp32 (fp64 for fp64): it is the returned grad itself for an fp32 weight, an extra
    4·V·H bytes for a half-precision one (cast at the end).
    """
    N, V = x.shape[0], weight.shape[0]
    sdt = stats_dtype(x)
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.zeros(weight.shape, dtype=sdt, device=weight.device) if need_dw else None
    db = torch.zeros((V,), dtype=sdt, device=x.device) if need_db else None
    if N > 0:
        gemm = Gemm(weight)
        buf = _logits_buffer(N, V, x)
        for sl in _chunks(N, V):
            logits = buf[: sl.stop - sl.start]
            gemm.logits(x[sl], logits)
            dl = dlogits_view(logits, x.dtype if gemm.half else sdt)
            row_fn(sl, logits, dl)
            if need_dx:
                gemm.dx(dl, dx[sl])
            if need_dw:
                gemm.dw_accumulate(dw, dl, x[sl])
            if need_db:
                db += dl.sum(dim=0, dtype=sdt)
        del buf, logits, dl  # the logits chunk is gone before the dW cast below allocates the weight-dtype grad
    if need_dw and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    if need_db and db.dtype != bias.dtype:
        db = db.to(bias.dtype)
    return dx, dw, db


def logprobs_backward(x, weight, bias, tgt, lse, ent, g_lp, g_ent, inv_t: float, rows_impl: str,
                      need_dx: bool, need_dw: bool, need_db: bool):
    """Gradients of Σ g_lp·ℓ + g_ent·H w.r.t. x, weight, bias by recomputing each chunk's logits."""
    sdt = stats_dtype(x)
    g_lp = g_lp.to(sdt).contiguous()
    g_ent = None if g_ent is None else g_ent.to(sdt).contiguous()

    def row_fn(sl, logits, dl):
        dlogits_rows(rows_impl, logits, bias, tgt[sl], lse[sl], None if ent is None else ent[sl], g_lp[sl],
                     None if g_ent is None else g_ent[sl], inv_t, dl)

    return grad_pipeline(x, weight, bias, row_fn, need_dx, need_dw, need_db)
