"""Allocation, grid and launch of the λ-trace kernels."""
from __future__ import annotations

import torch

from ..._core.params import SEQUENCE_STYLE, TraceParams
from ..._core.tuning import scan_config, use_chunked_scan
from .chunked_kernels import trace_chunk_apply_kernel, trace_chunk_local_kernel
from .kernels import lambda_trace_bwd_kernel, lambda_trace_fwd_kernel


def kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """A contiguous mask the kernels can load: bool is reinterpreted as uint8 (no copy)."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def scratch_for(params: TraceParams, B: int, T: int, device) -> torch.Tensor:
    """Per-row fp32 scratch [B, 2, T] that the "both" closed form reads back at other time steps."""
    if params.style == 2:
        return torch.empty((B, 2, T), dtype=torch.float32, device=device)
    return torch.empty((1,), dtype=torch.float32, device=device)


def _chunked(inp: torch.Tensor, mask: torch.Tensor, params: TraceParams, out: torch.Tensor, block: int, warps: int,
             reverse: bool) -> torch.Tensor:
    """Two launches over a (chunks, B) grid: local scans and summaries, then carries folded in (chunked_kernels)."""
    B, T = inp.shape
    n_chunks = -(-T // block)
    summary = torch.empty((B, n_chunks, 2), dtype=torch.float32, device=inp.device)
    scratch = scratch_for(params, B, T, inp.device)
    mask_k = kernel_mask(mask)
    common = dict(STYLE=params.style, REVERSE=reverse, BLOCK_T=block, num_warps=warps)
    trace_chunk_local_kernel[(n_chunks, B)](inp, mask_k, summary, scratch, T, n_chunks, params.a, params.log2a,
                                            **common)
    trace_chunk_apply_kernel[(n_chunks, B)](inp, mask_k, summary, scratch, out, T, n_chunks, params.a,
                                            params.log2a, **common)
    return out


def _scan(inp: torch.Tensor, mask: torch.Tensor, params: TraceParams, out_dtype: torch.dtype,
          reverse: bool) -> torch.Tensor:
    """One direction of the trace over rows [B, T]: one program per row, or chunk-parallel for few long rows."""
    inp = inp.contiguous()
    B, T = inp.shape
    if params.style == SEQUENCE_STYLE and not reverse:  # (only the objective's on-policy gradient: the backward)
        raise NotImplementedError("the sequence style's forward runs inside the objective kernels only")
    out = torch.empty((B, T), dtype=out_dtype, device=inp.device)
    if B == 0 or T == 0:
        return out
    block, warps = scan_config(T)
    if params.style not in (0, SEQUENCE_STYLE) and use_chunked_scan(B, T, block):  # (a row mean is not a scan)
        return _chunked(inp, mask, params, out, block, warps, reverse=reverse)
    kernel = lambda_trace_bwd_kernel if reverse else lambda_trace_fwd_kernel
    kernel[(B,)](inp, kernel_mask(mask), out, scratch_for(params, B, T, inp.device), T, params.a, params.log2a,
                 STYLE=params.style, BLOCK_T=block, num_warps=warps)
    return out


def trace_forward(x: torch.Tensor, mask: torch.Tensor, params: TraceParams) -> torch.Tensor:
    """z [B, T] fp32 = the trace of m·x."""
    return _scan(x, mask, params, torch.float32, reverse=False)


def trace_backward(grad_z: torch.Tensor, mask: torch.Tensor, params: TraceParams,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """grad_x [B, T] (out_dtype) with grad_x_j = m_j·Σ_{t≥j} w(t, j)·grad_z_t."""
    return _scan(grad_z, mask, params, out_dtype, reverse=True)
