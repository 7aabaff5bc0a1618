"""λ-trace kernels: causal scan forward, reverse scan backward, one program per row, blocks with carried state."""
import triton
import triton.language as tl

from ..scan_helpers import row_mean, row_scan_start, trace_backward_block, trace_forward_block


@triton.jit(do_not_specialize=["T"])
def lambda_trace_fwd_kernel(x_ptr, mask_ptr, z_ptr, scratch_ptr, T, a, log2a,
                            STYLE: tl.constexpr, BLOCK_T: tl.constexpr):
    """z_t = Σ_{j≤t} w(t, j)·m_j·x_j.

    x [B, T] any float, mask [B, T] (uint8/int/float), z [B, T] fp32, scratch [B, 2, T] fp32 (STYLE 2 only);
    all contiguous. Grid (B,).
    """
    _, row, scratch_f, scratch_p, carry_f, carry_p = row_scan_start(scratch_ptr, T)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        b_x = tl.load(x_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
        b_m = tl.load(mask_ptr + row + o_t, mask=m_t, other=0).to(tl.float32)
        b_d = tl.where(b_m != 0, b_x * b_m, 0.0)
        b_z, carry_f, carry_p = trace_forward_block(b_d, o_t, m_t, carry_f, carry_p, scratch_f, scratch_p,
                                                    a, log2a, T, STYLE)
        tl.store(z_ptr + row + o_t, b_z, mask=m_t)


@triton.jit(do_not_specialize=["T"])
def lambda_trace_bwd_kernel(gz_ptr, mask_ptr, gx_ptr, scratch_ptr, T, a, log2a,
                            STYLE: tl.constexpr, BLOCK_T: tl.constexpr):
    """∂/∂x_j = m_j·Σ_{t≥j} w(t, j)·gz_t.

    gz [B, T] fp32, mask [B, T], gx [B, T] (x's dtype), scratch [B, 2, T] fp32 (STYLE 2 only). STYLE 3 (the
    sequence mean, GSPO: only the objective's on-policy gradient comes here) reduces Σ_t gz_t / max(Σ m, 1) over the
    real t in a first walk. Grid (B,).
    """
    _, row, scratch_r, scratch_s, carry_r, carry_s = row_scan_start(scratch_ptr, T)
    if STYLE == 3:
        carry_r = row_mean(gz_ptr, gz_ptr, mask_ptr, row, T, 0, BLOCK_T)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_blocks):
        t0 = (n_blocks - 1 - i) * BLOCK_T
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        b_c = tl.load(gz_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
        b_m = tl.load(mask_ptr + row + o_t, mask=m_t, other=0).to(tl.float32)
        b_g, carry_r, carry_s = trace_backward_block(b_c, o_t, m_t, carry_r, carry_s, scratch_r, scratch_s,
                                                     a, log2a, T, STYLE)
        tl.store(gx_ptr + row + o_t, (b_m * b_g).to(gx_ptr.dtype.element_ty), mask=m_t)
