"""The clipped GRPO-λ objective: one forward kernel and one backward kernel, one program per row."""
import triton
import triton.language as tl

from ..scan_helpers import trace_backward_block, trace_forward_block

# columns of the per-row statistics written by the forward kernel
STAT_LOSS, STAT_KL, STAT_LOW, STAT_HIGH, STAT_REGION, STAT_RATIO = 0, 1, 2, 3, 4, 5
N_STATS = 8


@triton.jit(do_not_specialize=["T"])
def objective_fwd_kernel(lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, scale_ptr, coef_ptr, stats_ptr, scratch_ptr,
                         T, a, log2a, clamp_min, ratio_low, ratio_high, beta,
                         STYLE: tl.constexpr, ON_POLICY: tl.constexpr, ADV_PER_TOKEN: tl.constexpr,
                         HAS_CLAMP: tl.constexpr, HAS_KL: tl.constexpr, NEED_GRAD: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    """Per row i: Σ_t n_t·L_t with L = −min(ρ̃Â, clip(ρ̃, ratio_low, ratio_high)Â) + β·kl, ρ̃ = exp(trace(m·(ℓ − ℓ_old))).

    lp, old, ref [B, T] any float (old unused when ON_POLICY, ref unless HAS_KL); adv [B] or [B, T] (ADV_PER_TOKEN);
    mask [B, T] fp32; scale [B] fp32 (n_t = m_t·scale_i); coef [B, T] fp32 out (NEED_GRAD): ∂loss/∂z_t of the
    clipped term; stats [B, N_STATS] fp32 out (loss, Σm·kl, low/high/region clipped counts, Σm·ρ̃);
    scratch [B, 2, T] fp32 (STYLE 2). Grid (B,).
    """
    i_b = tl.program_id(0).to(tl.int64)
    row = i_b * T
    scratch_f = scratch_ptr + 2 * row
    scratch_p = scratch_f + T
    scale = tl.load(scale_ptr + i_b)
    carry_f = tl.full((), 0.0, tl.float32)
    carry_p = tl.full((), 0.0, tl.float32)
    acc_loss = tl.zeros((BLOCK_T,), tl.float32)
    acc_kl = tl.zeros((BLOCK_T,), tl.float32)
    acc_low = tl.zeros((BLOCK_T,), tl.float32)
    acc_high = tl.zeros((BLOCK_T,), tl.float32)
    acc_ratio = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        b_m = tl.load(mask_ptr + row + o_t, mask=m_t, other=0.0)
        b_valid = b_m != 0
        b_lp = tl.load(lp_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
        if ON_POLICY:
            b_d = tl.zeros((BLOCK_T,), tl.float32)
        else:
            b_old = tl.load(old_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
            b_d = tl.where(b_valid, b_m * (b_lp - b_old), 0.0)
        b_z, carry_f, carry_p = trace_forward_block(b_d, o_t, m_t, carry_f, carry_p, scratch_f, scratch_p,
                                                    a, log2a, T, STYLE)
        b_ratio = tl.exp(b_z)
        if ADV_PER_TOKEN:
            b_adv = tl.load(adv_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
        else:
            b_adv = tl.zeros((BLOCK_T,), tl.float32) + tl.load(adv_ptr + i_b).to(tl.float32)
        if HAS_CLAMP:
            b_adv = tl.maximum(b_adv, clamp_min)
        b_clipped = tl.minimum(tl.maximum(b_ratio, ratio_low), ratio_high)
        b_tok = -tl.minimum(b_ratio * b_adv, b_clipped * b_adv)
        if HAS_KL:
            b_ref = tl.load(ref_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
            b_dr = b_ref - b_lp
            b_kl = tl.exp(b_dr) - b_dr - 1.0
            b_tok += beta * b_kl
            acc_kl += tl.where(b_valid, b_m * b_kl, 0.0)
        b_n = b_m * scale
        acc_loss += tl.where(b_valid, b_n * b_tok, 0.0)
        b_low = b_valid & (b_ratio < ratio_low) & (b_adv < 0)
        b_high = b_valid & (b_ratio > ratio_high) & (b_adv > 0)
        acc_low += tl.where(b_low, b_m, 0.0)
        acc_high += tl.where(b_high, b_m, 0.0)
        acc_ratio += tl.where(b_valid, b_m * b_ratio, 0.0)
        if NEED_GRAD:
            # d(−min(ρ̃Â, clip(ρ̃)Â))/dz = −Â·ρ̃ where the unclipped branch is active, 0 where clipping fired
            b_c = tl.where(b_valid & ~(b_low | b_high), -b_n * b_adv * b_ratio, 0.0)
            tl.store(coef_ptr + row + o_t, b_c, mask=m_t)
    stats = stats_ptr + i_b * 8
    tl.store(stats + 0, tl.sum(acc_loss, axis=0))
    tl.store(stats + 1, tl.sum(acc_kl, axis=0))
    low = tl.sum(acc_low, axis=0)
    high = tl.sum(acc_high, axis=0)
    tl.store(stats + 2, low)
    tl.store(stats + 3, high)
    tl.store(stats + 4, low + high)  # a token cannot be clipped low and high at once (signs of Â differ)
    tl.store(stats + 5, tl.sum(acc_ratio, axis=0))


@triton.jit(do_not_specialize=["T"])
def objective_bwd_kernel(coef_ptr, lp_ptr, ref_ptr, mask_ptr, scale_ptr, gout_ptr, glp_ptr, scratch_ptr,
                         T, a, log2a, beta,
                         STYLE: tl.constexpr, HAS_KL: tl.constexpr, BLOCK_T: tl.constexpr):
    """∂loss/∂ℓ_j = g_out·(m_j·Σ_{t≥j} w(t, j)·coef_t + β·n_j·(1 − exp(ℓ_ref,j − ℓ_j))), rows walked right to left.

    coef [B, T] fp32 (from the forward), lp, ref [B, T] any float (ref only when HAS_KL), mask [B, T] fp32,
    scale [B] fp32, gout [] fp32, glp [B, T] out (lp's dtype), scratch [B, 2, T] fp32 (STYLE 2). Grid (B,).
    """
    i_b = tl.program_id(0).to(tl.int64)
    row = i_b * T
    scratch_r = scratch_ptr + 2 * row
    scratch_s = scratch_r + T
    g_out = tl.load(gout_ptr).to(tl.float32)
    scale = tl.load(scale_ptr + i_b)
    carry_r = tl.full((), 0.0, tl.float32)
    carry_s = tl.full((), 0.0, tl.float32)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_blocks):
        t0 = (n_blocks - 1 - i) * BLOCK_T
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        b_c = tl.load(coef_ptr + row + o_t, mask=m_t, other=0.0)
        b_g, carry_r, carry_s = trace_backward_block(b_c, o_t, m_t, carry_r, carry_s, scratch_r, scratch_s,
                                                     a, log2a, T, STYLE)
        b_m = tl.load(mask_ptr + row + o_t, mask=m_t, other=0.0)
        b_grad = b_m * b_g
        if HAS_KL:
            b_lp = tl.load(lp_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
            b_ref = tl.load(ref_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
            b_grad += beta * b_m * scale * (1.0 - tl.exp(b_ref - b_lp))
        b_grad = tl.where(b_m != 0, b_grad, 0.0) * g_out
        tl.store(glp_ptr + row + o_t, b_grad.to(glp_ptr.dtype.element_ty), mask=m_t)
