"""The clipped GRPO-λ objective: one forward kernel and one backward kernel, one program per row."""
import triton
import triton.language as tl

from ..scan_helpers import row_mean, row_scan_start, row_sums, trace_backward_block, trace_forward_block

# Columns of the per-row statistics written by the forward kernel (sums over the row's tokens, unscaled):
# 0 Σm·L, 1 Σm·kl, 2 low-clipped mass, 3 high-clipped mass, 4 Σm·ρ̃, 5 Σm, 6 and 7 VESPO's φ mass and its count
# (the row's φ and 1 with advantages [B], TRL's mean over sequences; Σm·φ and Σm with [B, T]; else 0).
N_STATS = 8
# the finalize kernel's metric outputs (the loss has a buffer of its own): token means, then the extremes over
# sequences of their clipped fractions (TRL's clip_ratio/low_min and high_max), then VESPO's mean φ
OUT_LOW, OUT_HIGH, OUT_REGION, OUT_RATIO, OUT_KL, OUT_LOW_MIN, OUT_HIGH_MAX, OUT_PHI = 0, 1, 2, 3, 4, 5, 6, 7
LOG_1E8 = tl.constexpr(-18.420680743952367)  # log(1e-8): TRL's lower clamp of VESPO's log-weight (a global that
# a kernel reads must be a constexpr instance)
N_OUT = 8
# LOSS_TYPE constexpr: the index in lambda_kernels._core.normalizers.LOSS_TYPES (dapo, bnpo, grpo, dr_grpo, luspo)


@triton.jit(do_not_specialize=["T"])
def objective_fwd_kernel(lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, w_ptr, coef_ptr, stats_ptr, scratch_ptr,
                         T, a, log2a, clamp_min, ratio_low, ratio_high, dual_clip, beta, cispo_cap, tau_pos, tau_neg,
                         k_pos, lam_pos, k_neg, lam_neg, STYLE: tl.constexpr, POLICY: tl.constexpr,
                         ON_POLICY: tl.constexpr, ADV_PER_TOKEN: tl.constexpr,
                         HAS_CLAMP: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_KL: tl.constexpr,
                         KL_CORRECTED: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per row: Σ_t m_t·L_t with L = −min(ρ̃Â, clip(ρ̃, ratio_low, ratio_high)Â) + β·kl, ρ̃ = exp(trace(m·(ℓ − ℓ_old))),
    kl the k3 estimate, times the token's own ratio exp(ℓ − ℓ_old) when KL_CORRECTED (1 on-policy; the sequence's
    ratio at STYLE 3, as TRL). HAS_DUAL: the
    policy term of a token with Â < 0 and ρ̃ > dual_clip (> 1) is the constant −dual_clip·Â (dual clip). HAS_W: the
    policy term (not the KL) times the token's weight w [B, T] (a weight of 0 adds exactly 0); the clip statistics
    are the unweighted ones.

    The aggregation scale of the row is not known yet (it may need the whole batch's Σm): the finalize kernel
    applies it to the row sums, the backward kernel to the coefficients.
    lp, old, ref [B, T] any float (old unused when ON_POLICY, ref unless HAS_KL); adv [B] or [B, T] (ADV_PER_TOKEN);
    mask [B, T] uint8/int/float; coef [B, T] fp32 out (NEED_GRAD): ∂(Σ m·L)/∂z_t of the policy term (CISPO:
    ∂L_t/∂ℓ_t, which the backward does not scan);
    stats [B, N_STATS] fp32 out (Σm·L, Σm·kl, low/high clipped mass, Σm·ρ̃, Σm, VESPO's φ mass and count);
    scratch [B, 2, T] fp32 (STYLE 2).
    POLICY (lambda_kernels.policy_losses): 0 the clipped term above; 1 CISPO, −min(ρ̃, cispo_cap)·Â·ℓ with its
    coefficient on ℓ itself (the caller's backward does not scan it), the capped tokens with Â > 0 in the high
    slot; 2 SAPO, −(4/τ)·σ(τ·(ρ̃ − 1))·Â with τ = tau_pos where Â > 0 and tau_neg elsewhere, nothing clipped;
    3 VESPO, −φ·Â·ℓ with φ = exp(λ + k·log w − λ·w), log w the row's clamped Σ m·clamp(ℓ − ℓ_old, ±20) (a first
    walk; 0 on-policy), (k, λ) = (k_pos, lam_pos) where Â ≥ 0 else (k_neg, lam_neg), its coefficient on ℓ itself
    as CISPO's, nothing clipped, φ's mass in stats 6 and 7.
    STYLE 3 (GSPO's sequence level): ρ̃ is the row's exp(Σ m·(ℓ − ℓ_old) / max(Σ m, 1)) at every token, its mean
    reduced in a first walk over the row (1 on-policy, without one).
    Grid (B,).
    """
    i_b, row, scratch_f, scratch_p, carry_f, carry_p = row_scan_start(scratch_ptr, T)
    if STYLE == 3 and not ON_POLICY:
        carry_f = row_mean(lp_ptr, old_ptr, mask_ptr, row, T, 1, BLOCK_T)
    if POLICY == 3:  # VESPO's sequence weight w: its log from the row's clamped log-ratio sum (0 on-policy)
        log_w = tl.full((), 0.0, tl.float32)
        if not ON_POLICY:
            log_ratio_sum, _ = row_sums(lp_ptr, old_ptr, mask_ptr, row, T, 3, BLOCK_T)
            log_w = tl.minimum(tl.maximum(log_ratio_sum, LOG_1E8), 20.0)
        w_seq = tl.exp(log_w)
        acc_phi = tl.zeros((BLOCK_T,), tl.float32)
    acc_loss = tl.zeros((BLOCK_T,), tl.float32)
    acc_kl = tl.zeros((BLOCK_T,), tl.float32)
    acc_low = tl.zeros((BLOCK_T,), tl.float32)
    acc_high = tl.zeros((BLOCK_T,), tl.float32)
    acc_ratio = tl.zeros((BLOCK_T,), tl.float32)
    acc_count = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        b_m = tl.load(mask_ptr + row + o_t, mask=m_t, other=0).to(tl.float32)
        b_valid = b_m != 0
        # padding's ℓ, ℓ_old, ℓ_ref are zeroed by selects (they may be ±inf or NaN: no inf − inf in any lane); the
        # loads stay masked by the bounds only, so that they need not wait for the mask's
        b_lp = tl.where(b_valid, tl.load(lp_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32), 0.0)
        if ON_POLICY:
            b_d = tl.zeros((BLOCK_T,), tl.float32)
        else:
            b_old = tl.where(b_valid, tl.load(old_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32), 0.0)
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
        # a token with Â = 0 adds exactly 0, also where exp(z) overflowed to inf (inf·0 would be NaN)
        b_live = b_adv != 0
        b_none = o_t < 0  # (all false: the clip slots of the terms that do not clip)
        if POLICY == 0:
            b_clipped = tl.minimum(tl.maximum(b_ratio, ratio_low), ratio_high)
            b_tok = tl.where(b_live, -tl.minimum(b_ratio * b_adv, b_clipped * b_adv), 0.0)
            if HAS_DUAL:
                b_tok = tl.where((b_adv < 0) & (b_ratio > dual_clip), -dual_clip * b_adv, b_tok)
            b_low = b_valid & (b_ratio < ratio_low) & (b_adv < 0)
            b_high = b_valid & (b_ratio > ratio_high) & (b_adv > 0)
        elif POLICY == 1:
            b_weight = tl.minimum(b_ratio, cispo_cap)
            b_tok = tl.where(b_live, -b_weight * b_adv * b_lp, 0.0)
            b_low = b_none
            b_high = b_valid & (b_ratio > cispo_cap) & (b_adv > 0)
        elif POLICY == 3:
            b_phi = vespo_phi(b_adv, log_w, w_seq, k_pos, lam_pos, k_neg, lam_neg)
            b_tok = tl.where(b_live, -b_phi * b_adv * b_lp, 0.0)
            b_low = b_none
            b_high = b_none
            if ADV_PER_TOKEN:
                acc_phi += tl.where(b_valid, b_m * b_phi, 0.0)
        else:
            b_tau = tl.where(b_adv > 0, tau_pos, tau_neg)
            b_x = b_tau * (b_ratio - 1.0)
            # σ(x) = 1/(1 + e) for x ≥ 0 and e/(1 + e) below, e = exp(−|x|) ≤ 1 (no overflow; x = inf gives 1), and
            # σ' = e/(1 + e)², 0 where e underflowed (the gradient's ρ̃ may be inf there: no inf·0)
            b_e = tl.exp(-tl.abs(b_x))
            b_sig = tl.where(b_x >= 0, 1.0, b_e) / (1.0 + b_e)
            b_tok = tl.where(b_live, -(4.0 / b_tau) * b_sig * b_adv, 0.0)
            b_low = b_none
            b_high = b_none
        if HAS_W:  # (padding's weight zeroed by a select: it may hold anything)
            b_w = tl.where(b_valid, tl.load(w_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32), 0.0)
            b_tok = tl.where(b_w != 0, b_w * b_tok, 0.0)
        if HAS_KL:
            b_ref = tl.where(b_valid, tl.load(ref_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32), 0.0)
            b_dr = b_ref - b_lp
            b_kl = tl.exp(b_dr) - b_dr - 1.0
            if KL_CORRECTED and STYLE == 3:  # TRL weighs it by the sequence's ratio there (1 on-policy)
                b_kl = tl.where(b_kl != 0, b_kl * b_ratio, 0.0)
            elif KL_CORRECTED and not ON_POLICY:
                # (padding: both zeroed, ratio 1); a zero KL stays 0 where the ratio overflowed (0·inf would be NaN)
                b_kl = tl.where(b_kl != 0, b_kl * tl.exp(b_lp - b_old), 0.0)
            b_tok += beta * b_kl
            acc_kl += tl.where(b_valid, b_m * b_kl, 0.0)
        acc_loss += tl.where(b_valid, b_m * b_tok, 0.0)
        acc_low += tl.where(b_low, b_m, 0.0)
        acc_high += tl.where(b_high, b_m, 0.0)
        acc_ratio += tl.where(b_valid, b_m * b_ratio, 0.0)
        acc_count += b_m
        if NEED_GRAD:
            if POLICY == 0:
                # d(−min(ρ̃Â, clip(ρ̃)Â))/dz = −Â·ρ̃ where the unclipped branch is active, 0 where clipping fired
                b_active = b_valid & b_live & ~(b_low | b_high)
                if HAS_DUAL:
                    b_active = b_active & ~((b_adv < 0) & (b_ratio > dual_clip))
                b_c = tl.where(b_active, -b_m * b_adv * b_ratio, 0.0)
            elif POLICY == 1:
                # ∂L_t/∂ℓ_t itself, −min(ρ̃, c)·Â (the weight is a constant), without m_t: the unscanned backward
                # multiplies by m_t once (the other terms' m_t is that of z = trace(m·Δ))
                b_c = tl.where(b_valid & b_live, -b_adv * b_weight, 0.0)
            elif POLICY == 3:  # −φ·Â on ℓ itself, as CISPO's
                b_c = tl.where(b_valid & b_live, -b_adv * b_phi, 0.0)
            else:  # d/dz of −(4/τ)·σ(τ(ρ̃ − 1))·Â = −4·σ'·ρ̃·Â
                b_d = 4.0 * b_e / ((1.0 + b_e) * (1.0 + b_e))
                b_c = tl.where(b_valid & b_live & (b_e != 0), -b_m * b_adv * b_d * b_ratio, 0.0)
            if HAS_W:
                b_c = tl.where(b_w != 0, b_w * b_c, 0.0)
            tl.store(coef_ptr + row + o_t, b_c, mask=m_t)
    high = tl.sum(acc_high, axis=0)
    if STYLE == 3 and POLICY == 1 and not ADV_PER_TOKEN:
        # TRL's sequence-level CISPO flag counts a sequence without loss tokens too: its ratio is exp(0) = 1, capped
        # where the cap is below 1 and Â > 0 (the finalize reads this row's high slot as its fraction, 0 or 1)
        a_row = row_advantage(adv_ptr, i_b, clamp_min, HAS_CLAMP)
        empty_capped = (tl.sum(acc_count, axis=0) == 0) & (cispo_cap < 1.0) & (a_row > 0)
        high += tl.where(empty_capped, 1.0, 0.0)
    o_s = tl.arange(0, 8)
    stats = tl.zeros((8,), tl.float32)
    if POLICY == 3:
        if ADV_PER_TOKEN:
            phi_mass, phi_count = tl.sum(acc_phi, axis=0), tl.sum(acc_count, axis=0)
        else:  # TRL's φ per sequence, every sequence counted (one without tokens has w = 1)
            a_row = row_advantage(adv_ptr, i_b, clamp_min, HAS_CLAMP)
            phi_mass, phi_count = vespo_phi(a_row, log_w, w_seq, k_pos, lam_pos, k_neg, lam_neg), 1.0
        stats += tl.where(o_s == 6, phi_mass, 0.0)
        stats += tl.where(o_s == 7, phi_count, 0.0)
    stats += tl.where(o_s == 0, tl.sum(acc_loss, axis=0), 0.0)
    stats += tl.where(o_s == 1, tl.sum(acc_kl, axis=0), 0.0)
    stats += tl.where(o_s == 2, tl.sum(acc_low, axis=0), 0.0)
    stats += tl.where(o_s == 3, high, 0.0)
    stats += tl.where(o_s == 4, tl.sum(acc_ratio, axis=0), 0.0)
    stats += tl.where(o_s == 5, tl.sum(acc_count, axis=0), 0.0)
    tl.store(stats_ptr + i_b * 8 + o_s, stats)


@triton.jit
def row_advantage(adv_ptr, i_b, clamp_min, HAS_CLAMP: tl.constexpr):
    """Row i_b's advantage of advantages [B] (clamped from below with HAS_CLAMP), for the per-sequence metrics of
    rows that may have no tokens."""
    a_row = tl.load(adv_ptr + i_b).to(tl.float32)
    if HAS_CLAMP:
        a_row = tl.maximum(a_row, clamp_min)
    return a_row


@triton.jit
def vespo_phi(adv, log_w, w, k_pos, lam_pos, k_neg, lam_neg):
    """VESPO's φ(w) = exp(λ + k·log w − λ·w), (k, λ) by the sign of Â (Â ≥ 0: the positive pair), λ ≥ 1e-4; an
    overflow counts 0 (TRL's nan_to_num)."""
    pos = adv >= 0
    lam = tl.maximum(tl.where(pos, lam_pos, lam_neg), 1e-4)
    phi = tl.exp(lam + tl.where(pos, k_pos, k_neg) * log_w - lam * w)
    return tl.where(phi < float("inf"), phi, 0.0)


@triton.jit
def objective_finalize_kernel(stats_ptr, num_items_ptr, scale_ptr, out_ptr, loss_ptr, B, num_items, inv_b_len,
                              LOSS_TYPE: tl.constexpr, NUM_ITEMS: tl.constexpr, SEQ_LEVEL: tl.constexpr,
                              BLOCK_B: tl.constexpr):
    """Aggregation: the row scales s_i of `loss_type`, the loss Σ_i s_i·(Σ_t m·L)_i and the token-mean metrics.

    stats [B, N_STATS] fp32 (forward kernel); num_items [1] (NUM_ITEMS 2: a tensor; 1: the scalar `num_items`;
    0: none); scale [B] fp32 out; out [N_OUT] fp32 out, the metrics (low, high, region, ratio, kl token means; the
    least low-clipped and the most high-clipped fraction of a sequence with tokens, 0 when none has; VESPO's mean
    φ, stats 6 over stats 7, 0 for the other terms); loss [] fp32 out, in storage of its own (a caller may edit it
    in place: not a view of the metrics' buffer). `inv_b_len` is
    1/(B·max_completion_length) for dr_grpo. SEQ_LEVEL (GSPO): the clipped fractions are TRL's sequence-level
    ones, means over all B sequences of each one's clipped fraction (0 without tokens), extremes over all of them.
    Grid (1,): B is small and this replaces a dozen tiny torch ops.
    """
    o_b = tl.arange(0, BLOCK_B)
    tot = tl.zeros((8,), tl.float32)
    o_s = tl.arange(0, 8)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + o_b
        block = tl.load(stats_ptr + rows[:, None] * 8 + o_s[None, :], mask=(rows < B)[:, None], other=0.0)
        tot += tl.sum(block, axis=0)
    count = tl.sum(tl.where(o_s == 5, tot, 0.0), axis=0)
    inv_count = 1.0 / tl.maximum(count, 1.0)
    if LOSS_TYPE == 0:
        if NUM_ITEMS == 2:
            row_scale = 1.0 / tl.maximum(tl.load(num_items_ptr).to(tl.float32), 1e-12)
        elif NUM_ITEMS == 1:
            row_scale = 1.0 / num_items
        else:
            row_scale = inv_count
    elif LOSS_TYPE == 1:
        row_scale = inv_count
    elif LOSS_TYPE == 3:
        row_scale = inv_b_len
    else:
        row_scale = 1.0 / B
    loss_acc = tl.zeros((BLOCK_B,), tl.float32)
    low_min = tl.full((BLOCK_B,), float("inf"), tl.float32)
    high_max = tl.zeros((BLOCK_B,), tl.float32)
    low_seq = tl.zeros((BLOCK_B,), tl.float32)
    high_seq = tl.zeros((BLOCK_B,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + o_b
        in_b = rows < B
        loss_rows = tl.load(stats_ptr + rows * 8 + 0, mask=in_b, other=0.0)
        # per-sequence clipped fractions, over the rows that have tokens (TRL's masked per-sequence means); at the
        # sequence level over every row (TRL's per-sequence values: a row without tokens is unclipped)
        n_rows = tl.load(stats_ptr + rows * 8 + 5, mask=in_b, other=0.0)
        has = n_rows > 0
        inv_rows = 1.0 / tl.where(has, n_rows, 1.0)
        low_rows = tl.load(stats_ptr + rows * 8 + 2, mask=in_b, other=0.0) * inv_rows
        high_rows = tl.load(stats_ptr + rows * 8 + 3, mask=in_b, other=0.0) * inv_rows
        if SEQ_LEVEL:
            has = in_b
            low_seq += low_rows
            high_seq += high_rows
        low_min = tl.minimum(low_min, tl.where(has, low_rows, float("inf")))
        high_max = tl.maximum(high_max, tl.where(has, high_rows, 0.0))
        if LOSS_TYPE == 2:
            scales = 1.0 / (B * tl.maximum(n_rows, 1.0))
        else:
            scales = tl.zeros((BLOCK_B,), tl.float32) + row_scale
        tl.store(scale_ptr + rows, scales, mask=in_b)
        loss_acc += tl.where(in_b, scales * loss_rows, 0.0)
    low = tl.sum(tl.where(o_s == 2, tot, 0.0), axis=0)
    high = tl.sum(tl.where(o_s == 3, tot, 0.0), axis=0)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0))
    if SEQ_LEVEL:
        low_mean = tl.sum(low_seq, axis=0) / B
        high_mean = tl.sum(high_seq, axis=0) / B
    else:
        low_mean = low * inv_count
        high_mean = high * inv_count
    out = tl.where(o_s == 0, low_mean, 0.0)
    out += tl.where(o_s == 1, high_mean, 0.0)
    out += tl.where(o_s == 2, low_mean + high_mean, 0.0)  # never both: the sign of Â (or the row's ratio) picks
    out += tl.where(o_s == 3, tl.sum(tl.where(o_s == 4, tot, 0.0), axis=0) * inv_count, 0.0)
    out += tl.where(o_s == 4, tl.sum(tl.where(o_s == 1, tot, 0.0), axis=0) * inv_count, 0.0)
    least_low = tl.min(low_min, axis=0)
    out += tl.where(o_s == 5, tl.where(least_low == float("inf"), 0.0, least_low), 0.0)
    out += tl.where(o_s == 6, tl.max(high_max, axis=0), 0.0)
    phi_count = tl.sum(tl.where(o_s == 7, tot, 0.0), axis=0)
    out += tl.where(o_s == 7, tl.sum(tl.where(o_s == 6, tot, 0.0), axis=0) / tl.maximum(phi_count, 1.0), 0.0)
    tl.store(out_ptr + o_s, out)


@triton.jit(do_not_specialize=["T"])
def objective_bwd_kernel(coef_ptr, lp_ptr, old_ptr, ref_ptr, mask_ptr, scale_ptr, gout_ptr, glp_ptr, scratch_ptr,
                         T, a, log2a, beta,
                         STYLE: tl.constexpr, HAS_KL: tl.constexpr, KL_CORRECTED: tl.constexpr,
                         KL_SEQ: tl.constexpr, ON_POLICY: tl.constexpr, BLOCK_T: tl.constexpr):
    """∂loss/∂ℓ_j = g_out·s_i·m_j·(Σ_{t≥j} w(t, j)·coef_t + β·∂kl_j/∂ℓ_j), rows walked right to left.

    ∂kl/∂ℓ = 1 − exp(ℓ_ref − ℓ) for the k3 estimate; with KL_CORRECTED, d(kl·r)/dℓ for r = exp(ℓ − ℓ_old) is
    r·(1 − exp(ℓ_ref − ℓ) + kl) = r·(ℓ − ℓ_ref) (the unbiased reverse-KL gradient; r = 1 on-policy).
    coef [B, T] fp32 (forward), lp, old, ref [B, T] any float (ref only when HAS_KL, old only when KL_CORRECTED and
    not ON_POLICY), mask [B, T], scale [B] fp32 (finalize), gout [1] fp32, glp [B, T] out (lp's dtype), scratch
    [B, 2, T] fp32 (STYLE 2). STYLE 3 (the sequence level): Σ_{t≥j} w(t, j)·coef_t is the row's Σ_t coef_t /
    max(Σ m, 1) for every j, reduced in a first walk over the row. KL_SEQ (with KL_CORRECTED, at the sequence
    level): the KL term is Σ_t m_t·kl_t·ρ_i with ρ_i the sequence's ratio exp(Σ m·(ℓ − ℓ_old) / L), L = max(Σ m, 1),
    so ∂/∂ℓ_j = m_j·β·ρ_i·(∂kl_j/∂ℓ_j + Σ_t m_t·kl_t / L): ρ_i and the row's mean KL from a first walk. Grid (B,).
    """
    i_b, row, scratch_r, scratch_s, carry_r, carry_s = row_scan_start(scratch_ptr, T)
    if STYLE == 3:
        carry_r = row_mean(coef_ptr, coef_ptr, mask_ptr, row, T, 0, BLOCK_T)
    if KL_SEQ:  # the sequence's ratio (1 on-policy) and its mean k3 KL, in first walks over the row
        seq_kl = row_mean(lp_ptr, ref_ptr, mask_ptr, row, T, 2, BLOCK_T)
        if ON_POLICY:
            seq_ratio = 1.0
        else:
            seq_ratio = tl.exp(row_mean(lp_ptr, old_ptr, mask_ptr, row, T, 1, BLOCK_T))
    row_scale = tl.load(gout_ptr).to(tl.float32) * tl.load(scale_ptr + i_b)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_blocks):
        t0 = (n_blocks - 1 - i) * BLOCK_T
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        b_c = tl.load(coef_ptr + row + o_t, mask=m_t, other=0.0)
        b_g, carry_r, carry_s = trace_backward_block(b_c, o_t, m_t, carry_r, carry_s, scratch_r, scratch_s,
                                                     a, log2a, T, STYLE)
        b_m = tl.load(mask_ptr + row + o_t, mask=m_t, other=0).to(tl.float32)
        if HAS_KL:  # (padding's ℓ, ℓ_ref zeroed, as in the forward)
            b_lp = tl.where(b_m != 0, tl.load(lp_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32), 0.0)
            b_ref = tl.where(b_m != 0, tl.load(ref_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32), 0.0)
            if KL_SEQ:
                b_kl_g = 1.0 - tl.exp(b_ref - b_lp) + seq_kl
                b_g += beta * tl.where(b_kl_g != 0, b_kl_g * seq_ratio, 0.0)  # (no 0·inf)
            elif KL_CORRECTED:
                b_kl_g = b_lp - b_ref
                if not ON_POLICY:
                    b_old = tl.where(b_m != 0, tl.load(old_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32),
                                     0.0)
                    b_kl_g = tl.where(b_kl_g != 0, b_kl_g * tl.exp(b_lp - b_old), 0.0)  # (no 0·inf)
                b_g += beta * b_kl_g
            else:
                b_g += beta * (1.0 - tl.exp(b_ref - b_lp))
        b_grad = tl.where(b_m != 0, row_scale * b_m * b_g, 0.0)
        tl.store(glp_ptr + row + o_t, b_grad.to(glp_ptr.dtype.element_ty), mask=m_t)
