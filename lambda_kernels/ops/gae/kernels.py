"""GAE as two reverse linear recurrences per row, one program per row, blocks walked right to left."""
import triton
import triton.language as tl

from ..scan_helpers import decayed_scan, pick


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
        t0 = (n_blocks - 1 - i) * BLOCK_T
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        m_next = (o_t + 1) < T
        b_r = tl.load(r_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
        b_v = tl.load(v_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
        b_valid = tl.load(mask_ptr + row + o_t, mask=m_t, other=0).to(tl.float32) != 0
        b_valid_next = tl.load(mask_ptr + row + o_t + 1, mask=m_next, other=0).to(tl.float32) != 0
        b_v_next = tl.load(v_ptr + row + o_t + 1, mask=m_next, other=0.0).to(tl.float32)

        b_nv = decayed_scan(tl.where(b_valid_next, b_v_next, 0.0), tl.where(b_valid_next, 0.0, 1.0), carry_nv, True)
        b_delta = b_r + gamma * b_nv - b_v
        b_a = decayed_scan(tl.where(b_valid, b_delta, 0.0), tl.where(b_valid, gamma_lam, 1.0), carry_a, True)
        carry_nv = pick(b_nv, o_t, t0)
        carry_a = pick(b_a, o_t, t0)
        tl.store(adv_ptr + row + o_t, tl.where(b_valid, b_a, 0.0), mask=m_t)
        tl.store(ret_ptr + row + o_t, tl.where(b_valid, b_a + b_v, 0.0), mask=m_t)
