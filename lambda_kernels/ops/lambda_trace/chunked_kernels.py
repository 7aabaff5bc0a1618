"""Chunk-parallel λ-trace for long rows and small batches: grid (chunks, B) instead of (B,).

With one program per row, a batch of 8 rows of 32k tokens keeps 8 SMs busy walking 16 blocks each. Here every
chunk of BLOCK_T steps gets its own program, in two launches:

1. `trace_chunk_local_kernel`: the chunk's scans from a zero state; writes the chunk's end state (its first
   state, walking backwards) to `summary [B, C, 2]` and, for "both", the local scans to the row's scratch.
2. `trace_chunk_apply_kernel`: folds the summaries of the chunks before it (after it, backwards) into its carry,
   rescans with that carry, and for "both" corrects the gathered local values of other chunks with their carries.

Every value read in launch 2 was written in launch 1, so no program waits for another. Forward (REVERSE 0):
x = m·input, F the recent scan, P_k = Σ_{j≤k} a^j x_j. Backward (REVERSE 1): c = the upstream gradient, R the
reverse recent scan, S_k = Σ_{t≥k} c_t, output m·G. The formulas are those of `scan_helpers` (see README.md).
"""
import triton
import triton.language as tl

from ..scan_helpers import decayed_scan, pick, pow_a


@triton.jit
def _chunk_input(in_ptr, mask_ptr, row, o_t, m_t, REVERSE: tl.constexpr):
    b_x = tl.load(in_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
    if REVERSE:
        return b_x
    b_m = tl.load(mask_ptr + row + o_t, mask=m_t, other=0).to(tl.float32)
    return tl.where(b_m != 0, b_x * b_m, 0.0)


@triton.jit
def _chunk_scans(b_x, o_t, carry_1, carry_2, a, log2a, REVERSE: tl.constexpr):
    """(recent scan, plain sum scan) of a chunk continuing from its carries: (F, P) forward, (R, S) backward."""
    b_1 = decayed_scan(b_x, tl.zeros_like(b_x) + a, carry_1, REVERSE)
    if REVERSE:
        b_2 = tl.cumsum(b_x, axis=0, reverse=True) + carry_2
    else:
        b_2 = tl.cumsum(b_x * pow_a(o_t, log2a), axis=0) + carry_2
    return b_1, b_2


@triton.jit(do_not_specialize=["T", "n_chunks"])
def trace_chunk_local_kernel(in_ptr, mask_ptr, summary_ptr, scratch_ptr, T, n_chunks, a, log2a,
                             STYLE: tl.constexpr, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr):
    """Local scans of one chunk. in, mask [B, T]; summary [B, C, 2] fp32 out; scratch [B, 2, T] fp32 (STYLE 2).

    Grid (C, B).
    """
    i_c = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    row = i_b * T
    o_t = i_c * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    b_x = _chunk_input(in_ptr, mask_ptr, row, o_t, m_t, REVERSE)
    zero = tl.full((), 0.0, tl.float32)
    b_1, b_2 = _chunk_scans(b_x, o_t, zero, zero, a, log2a, REVERSE)
    if REVERSE:
        edge = i_c * BLOCK_T
    else:
        edge = tl.minimum(i_c * BLOCK_T + BLOCK_T, T) - 1
    summary = summary_ptr + (i_b * n_chunks + i_c) * 2
    tl.store(summary, pick(b_1, o_t, edge))
    tl.store(summary + 1, pick(b_2, o_t, edge))
    if STYLE == 2:
        tl.store(scratch_ptr + 2 * row + o_t, b_1, mask=m_t)
        tl.store(scratch_ptr + 2 * row + T + o_t, b_2, mask=m_t)


@triton.jit(do_not_specialize=["T", "n_chunks"])
def trace_chunk_apply_kernel(in_ptr, mask_ptr, summary_ptr, scratch_ptr, out_ptr, T, n_chunks, a, log2a,
                             STYLE: tl.constexpr, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr):
    """The chunk's trace (forward: z) or gradient (backward: m·G) from the carries of the other chunks.

    in, mask [B, T]; summary [B, C, 2] fp32 and scratch [B, 2, T] fp32 from the local kernel; out [B, T]
    (fp32 forward, the input's dtype backward). Grid (C, B).
    """
    i_c = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    row = i_b * T
    t0 = i_c * BLOCK_T
    o_t = t0 + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    b_x = _chunk_input(in_ptr, mask_ptr, row, o_t, m_t, REVERSE)
    # "both" reads other chunks' local values: those at t/2 (forward) or 2t+1 (backward) span ≤ 2 chunks, k_g and
    # k_g + 1, whose carries are recorded while folding
    if REVERSE:
        k_g = (2 * t0 + 1) // BLOCK_T
    else:
        k_g = tl.maximum((t0 + 1) // 2 - 1, 0) // BLOCK_T
    c_1 = tl.full((), 0.0, tl.float32)
    c_2 = tl.full((), 0.0, tl.float32)
    g_1a = c_1
    g_2a = c_1
    g_1b = c_1
    g_2b = c_1
    n_fold = (n_chunks - 1 - i_c) if REVERSE else i_c
    for j in range(0, n_fold):
        if REVERSE:
            kk = n_chunks - 1 - j
        else:
            kk = j
        g_1a = tl.where(kk == k_g, c_1, g_1a)
        g_2a = tl.where(kk == k_g, c_2, g_2a)
        g_1b = tl.where(kk == k_g + 1, c_1, g_1b)
        g_2b = tl.where(kk == k_g + 1, c_2, g_2b)
        summary = summary_ptr + (i_b * n_chunks + kk) * 2
        length = tl.minimum(BLOCK_T, T - kk * BLOCK_T)
        c_1 = tl.load(summary) + pow_a(length, log2a) * c_1
        c_2 = tl.load(summary + 1) + c_2
    g_1a = tl.where(i_c == k_g, c_1, g_1a)
    g_2a = tl.where(i_c == k_g, c_2, g_2a)
    g_1b = tl.where(i_c == k_g + 1, c_1, g_1b)
    g_2b = tl.where(i_c == k_g + 1, c_2, g_2b)
    b_1, b_2 = _chunk_scans(b_x, o_t, c_1, c_2, a, log2a, REVERSE)
    b_out = b_1
    if STYLE == 2:
        if REVERSE:
            idx = 2 * o_t + 1
        else:
            idx = (o_t + 1) // 2 - 1
        has = m_t & (idx >= 0) & (idx < T)
        k_idx = idx // BLOCK_T
        first = k_idx == k_g
        carry_1 = tl.where(first, g_1a, g_1b)
        carry_2 = tl.where(first, g_2a, g_2b)
        loc_1 = tl.load(scratch_ptr + 2 * row + idx, mask=has, other=0.0)
        loc_2 = tl.load(scratch_ptr + 2 * row + T + idx, mask=has, other=0.0)
        if REVERSE:
            # R_j = R_loc_j + a^(end − j)·carry with `end` the end of j's chunk; S_j = S_loc_j + carry
            end = tl.minimum((k_idx + 1) * BLOCK_T, T)
            v_1 = tl.where(has, loc_1 + pow_a(tl.maximum(end - idx, 0), log2a) * carry_1, 0.0)
            v_2 = tl.where(has, loc_2 + carry_2, 0.0)
            b_out = b_1 - pow_a(o_t + 1, log2a) * v_1 + pow_a(o_t, log2a) * v_2
        else:
            # F_k = F_loc_k + a^(k − start + 1)·carry with `start` the start of k's chunk; P_k = P_loc_k + carry
            v_1 = tl.where(has, loc_1 + pow_a(idx - k_idx * BLOCK_T + 1, log2a) * carry_1, 0.0)
            v_2 = tl.where(has, loc_2 + carry_2, 0.0)
            b_out = b_1 - pow_a(o_t - idx, log2a) * v_1 + v_2
    if REVERSE:
        b_m = tl.load(mask_ptr + row + o_t, mask=m_t, other=0).to(tl.float32)
        b_out = b_m * b_out
    tl.store(out_ptr + row + o_t, b_out.to(out_ptr.dtype.element_ty), mask=m_t)
