"""GAE as two reverse linear recurrences per row: one program per row walking its blocks right to left, or, for
few long rows, one program per chunk (grid (chunks, B)) with the carries folded from per-chunk summaries."""
import triton
import triton.language as tl

from ..scan_helpers import _linear_combine, decayed_scan, pick


@triton.jit
def _gae_load(r_ptr, v_ptr, mask_ptr, row, o_t, T):
    """(in-row mask, r, V, valid, valid at t+1, V at t+1) of a block of steps, fp32 / bool."""
    m_t = o_t < T
    m_next = (o_t + 1) < T
    b_r = tl.load(r_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
    b_v = tl.load(v_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
    b_valid = tl.load(mask_ptr + row + o_t, mask=m_t, other=0).to(tl.float32) != 0
    b_valid_next = tl.load(mask_ptr + row + o_t + 1, mask=m_next, other=0).to(tl.float32) != 0
    b_v_next = tl.load(v_ptr + row + o_t + 1, mask=m_next, other=0.0).to(tl.float32)
    return m_t, b_r, b_v, b_valid, b_valid_next, b_v_next


@triton.jit
def _gae_block(r_ptr, v_ptr, mask_ptr, adv_ptr, ret_ptr, row, t0, T, gamma, gamma_lam, carry_nv, carry_a,
               BLOCK_T: tl.constexpr):
    """Advantages and returns of steps [t0, t0 + BLOCK_T) given the state just after the block; returns the state
    at t0 (next valid value, advantage)."""
    o_t = t0 + tl.arange(0, BLOCK_T)
    m_t, b_r, b_v, b_valid, b_valid_next, b_v_next = _gae_load(r_ptr, v_ptr, mask_ptr, row, o_t, T)
    b_nv = decayed_scan(tl.where(b_valid_next, b_v_next, 0.0), tl.where(b_valid_next, 0.0, 1.0), carry_nv, True)
    b_delta = b_r + gamma * b_nv - b_v
    b_a = decayed_scan(tl.where(b_valid, b_delta, 0.0), tl.where(b_valid, gamma_lam, 1.0), carry_a, True)
    tl.store(adv_ptr + row + o_t, tl.where(b_valid, b_a, 0.0), mask=m_t)
    tl.store(ret_ptr + row + o_t, tl.where(b_valid, b_a + b_v, 0.0), mask=m_t)
    return pick(b_nv, o_t, t0), pick(b_a, o_t, t0)


@triton.jit(do_not_specialize=["T"])
def gae_kernel(r_ptr, v_ptr, mask_ptr, adv_ptr, ret_ptr, T, gamma, gamma_lam, BLOCK_T: tl.constexpr):
    """advantages and returns of one row.

    next_value_t = m_{t+1}·V_{t+1} + (1 − m_{t+1})·next_value_{t+1}   (the value of the next valid token, 0 after
    the last), δ_t = r_t + γ·next_value_t − V_t, and over valid tokens A_t = δ_t + γλ·A_next: at a masked token
    the state passes through (decay 1, input 0). r, v [B, T] any float; mask [B, T]; adv, ret [B, T] fp32.
    Grid (B,).
    """
    i_b = tl.program_id(0).to(tl.int64)
    row = i_b * T
    carry_nv = tl.full((), 0.0, tl.float32)
    carry_a = tl.full((), 0.0, tl.float32)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_blocks):
        carry_nv, carry_a = _gae_block(r_ptr, v_ptr, mask_ptr, adv_ptr, ret_ptr, row, (n_blocks - 1 - i) * BLOCK_T,
                                       T, gamma, gamma_lam, carry_nv, carry_a, BLOCK_T)


@triton.jit(do_not_specialize=["T", "n_chunks"])
def gae_chunk_local_kernel(r_ptr, v_ptr, mask_ptr, summary_ptr, T, n_chunks, gamma, gamma_lam,
                           BLOCK_T: tl.constexpr):
    """Summary of one chunk: its state at the chunk start as an affine function of the state (nv_in, A_in) after it.

    nv_t0 = nv_loc + D1·nv_in and A_t0 = A_loc + U·nv_in + D2·A_in, with D1, D2 the products of the two decays over
    the chunk and U the advantage recurrence driven by γ·[m]·D1 (how nv_in enters through δ). summary [B, C, 5]
    fp32 out: (nv_loc, D1, A_loc, U, D2). Grid (C, B).
    """
    i_c = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    row = i_b * T
    t0 = i_c * BLOCK_T
    o_t = t0 + tl.arange(0, BLOCK_T)
    m_t, b_r, b_v, b_valid, b_valid_next, b_v_next = _gae_load(r_ptr, v_ptr, mask_ptr, row, o_t, T)
    b_d1, b_nv = tl.associative_scan((tl.where(b_valid_next, 0.0, 1.0), tl.where(b_valid_next, b_v_next, 0.0)), 0,
                                     _linear_combine, reverse=True)
    b_delta = b_r + gamma * b_nv - b_v
    b_decay = tl.where(b_valid, gamma_lam, 1.0)
    b_d2, b_a = tl.associative_scan((b_decay, tl.where(b_valid, b_delta, 0.0)), 0, _linear_combine, reverse=True)
    b_u = decayed_scan(tl.where(b_valid, gamma * b_d1, 0.0), b_decay, 0.0, True)
    summary = summary_ptr + (i_b * n_chunks + i_c) * 5
    tl.store(summary + 0, pick(b_nv, o_t, t0))
    tl.store(summary + 1, pick(b_d1, o_t, t0))
    tl.store(summary + 2, pick(b_a, o_t, t0))
    tl.store(summary + 3, pick(b_u, o_t, t0))
    tl.store(summary + 4, pick(b_d2, o_t, t0))


@triton.jit(do_not_specialize=["T", "n_chunks"])
def gae_chunk_apply_kernel(r_ptr, v_ptr, mask_ptr, summary_ptr, adv_ptr, ret_ptr, T, n_chunks, gamma, gamma_lam,
                           BLOCK_T: tl.constexpr):
    """One chunk of GAE: fold the summaries of the chunks after it into its carries, then the block as usual.

    Grid (C, B).
    """
    i_c = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    row = i_b * T
    carry_nv = tl.full((), 0.0, tl.float32)
    carry_a = tl.full((), 0.0, tl.float32)
    for j in range(0, n_chunks - 1 - i_c):
        summary = summary_ptr + (i_b * n_chunks + n_chunks - 1 - j) * 5
        nv_loc = tl.load(summary + 0)
        d1 = tl.load(summary + 1)
        a_loc = tl.load(summary + 2)
        u = tl.load(summary + 3)
        d2 = tl.load(summary + 4)
        carry_a = a_loc + u * carry_nv + d2 * carry_a  # uses the nv carry from after that chunk: update it second
        carry_nv = nv_loc + d1 * carry_nv
    _gae_block(r_ptr, v_ptr, mask_ptr, adv_ptr, ret_ptr, row, i_c * BLOCK_T, T, gamma, gamma_lam, carry_nv, carry_a,
               BLOCK_T)
