"""Row kernels of the fused loss's one-pass chunks: log-prob and the logits' gradient of each row in one program.

On-policy the objective's per-token gradient is known before the log-probs (grpo_lambda.md §5), except the KL
term β·n·(1 − exp(ℓ_ref − ℓ)) (β·n·(ℓ − ℓ_ref) for the ratio-weighted KL), which only needs this token's ℓ: so
`onpolicy_rows_kernel` computes ℓ from a chunk of fp32 logits (same helper as the log-prob kernel, hence
bit-identical), completes its token gradient (`token_grad`) and overwrites the row with dlogits; and
`probs_dlogits_kernel` does the same from the probabilities the Triton LSE GEMM emitted (ℓ already merged).
"""
import triton
import triton.language as tl

from ..linear_logprobs.kernels import row_dlogits_store, row_stats


@triton.jit
def token_grad(g0_ptr, n_ptr, ref_ptr, i_r, lp, beta, HAS_KL: tl.constexpr, KL_CORRECTED: tl.constexpr):
    """Row i_r's token gradient g0 + β·n·(1 − exp(ref − ℓ)) (β·n·(ℓ − ref) with KL_CORRECTED; g0 alone without
    HAS_KL) for its log-prob lp."""
    g = tl.load(g0_ptr + i_r)
    if HAS_KL:
        # a token of weight n = 0 gets no KL term, even where exp overflows (0·inf): the filler rows of a pass that
        # runs ahead of the count of real tokens have n = 0 and whatever ℓ their padding targets give
        n = tl.load(n_ptr + i_r)
        ref = tl.load(ref_ptr + i_r)
        if KL_CORRECTED:
            kl_grad = lp - ref
        else:
            kl_grad = 1.0 - tl.exp(ref - lp)
        g += tl.where(n != 0.0, beta * n * kl_grad, 0.0)
    return g


@triton.jit  # V and the strides specialised: divisible by 16 they give 16-byte loads and stores
def onpolicy_rows_kernel(logits_ptr, bias_ptr, tgt_ptr, g0_ptr, n_ptr, ref_ptr, gent_ptr, lp_ptr, ent_ptr, lse_ptr,
                         g_ptr, dl_ptr, stride_l, stride_dl, V, inv_t, cap, beta,
                         HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KL: tl.constexpr,
                         KL_CORRECTED: tl.constexpr, WITH_ENT: tl.constexpr, WITH_ENT_GRAD: tl.constexpr,
                         WITH_STATS: tl.constexpr, BLOCK_V: tl.constexpr):
    """g_r = g0_r + β·n_r·(1 − exp(ref_r − ℓ_r)); dlogits_r = g_r·(onehot(target_r) − p_r) / temperature
    (times 1 − tanh² of the soft-capped logits with SOFTCAP).

    KL_CORRECTED: the KL weighted by the token's ratio π/π_old, whose gradient at ratio 1 is β·n_r·(ℓ_r − ref_r).
    WITH_ENT_GRAD (needs WITH_ENT): an entropy bonus's gradient g_ent_r w.r.t. H_r, known before the logits like
    g0, adds −g_ent_r·p·(log p + H_r) to the row's dlogits.

    logits [M, V] fp32 (stride stride_l); dl (stride stride_dl, the GEMM input dtype) may alias logits;
    targets [M] int; g0, n, ref, gent [M] fp32 (n, ref only with HAS_KL, gent with WITH_ENT_GRAD); outputs lp [M]
    fp32, ent [M] fp32 (WITH_ENT), and with WITH_STATS lse and g [M] fp32 (what a later pass over vocabulary slabs
    needs for the same dlogits).
    Grid (M,).
    """
    i_r = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + i_r).to(tl.int64)
    row_ptr = logits_ptr + i_r * stride_l
    lse, lp, ent = row_stats(row_ptr, bias_ptr, tgt, V, inv_t, cap, HAS_BIAS, SOFTCAP, WITH_ENT, BLOCK_V)
    tl.store(lp_ptr + i_r, lp)
    if WITH_ENT:
        tl.store(ent_ptr + i_r, ent)
    g = token_grad(g0_ptr, n_ptr, ref_ptr, i_r, lp, beta, HAS_KL, KL_CORRECTED)
    if WITH_STATS:
        tl.store(lse_ptr + i_r, lse)
        tl.store(g_ptr + i_r, g)
    g_ent = tl.full((), 0.0, tl.float32)
    if WITH_ENT_GRAD:
        g_ent = tl.load(gent_ptr + i_r)
    row_dlogits_store(row_ptr, bias_ptr, dl_ptr + i_r * stride_dl, tgt, lse, ent, g, g_ent, V, inv_t, cap,
                      HAS_BIAS, SOFTCAP, WITH_ENT_GRAD, BLOCK_V)


@triton.jit(do_not_specialize=["stride_qm"])
def probs_dlogits_kernel(u_ptr, qm_ptr, tgt_ptr, lse_ptr, lp_ptr, g0_ptr, n_ptr, ref_ptr, g_ptr, dl_ptr,
                         stride_u, stride_qm, stride_dl, V, inv_t, beta,
                         HAS_KL: tl.constexpr, KL_CORRECTED: tl.constexpr, WITH_STATS: tl.constexpr,
                         RANGE: tl.constexpr, RANGES: tl.constexpr):
    """dlogits of a token chunk from what the probability-emitting LSE GEMM left (`lse_gemm_kernels`, EMIT): per row,
    p_v = u_v·2⁻¹⁴·e^(qm[range of v] − lse), and dlogits = g·(1[v = target] − p)/temperature with the token gradient
    g = g0 (+ β·n·(1 − exp(ref − ℓ)), or β·n·(ℓ − ref) with KL_CORRECTED, under HAS_KL: `onpolicy_rows_kernel`'s).

    u [M, V] fp16 (row stride stride_u); qm [M, ranges] fp32 (stride_qm), the max of each range of RANGE columns;
    lse, lp, g0, n, ref [M] fp32 (lp, n, ref with HAS_KL); targets [M] int; dl [M, V] (stride stride_dl, 2-byte)
    may alias u: each element is read before it is written, in the same tile. WITH_STATS: g [M] ← the token gradient
    (for a later pass over vocabulary slabs). One e^ per range, not per logit. Grid (M,).
    """
    i_r = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + i_r).to(tl.int32)
    lse = tl.load(lse_ptr + i_r)
    lp = tl.load(lp_ptr + i_r) if HAS_KL else 0.0
    g = token_grad(g0_ptr, n_ptr, ref_ptr, i_r, lp, beta, HAS_KL, KL_CORRECTED)
    if WITH_STATS:
        tl.store(g_ptr + i_r, g)
    g_t = g * inv_t
    u_row = u_ptr + i_r * stride_u
    dl_row = dl_ptr + i_r * stride_dl
    o_r = tl.arange(0, RANGES)
    o_c = tl.arange(0, RANGE)
    for v0 in range(0, V, RANGES * RANGE):
        r0 = v0 // RANGE
        o_v = v0 + o_r[:, None] * RANGE + o_c[None, :]
        m_v = o_v < V
        b_u = tl.load(u_row + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_m = tl.load(qm_ptr + i_r * stride_qm + r0 + o_r, mask=(r0 + o_r) * RANGE < V, other=0.0)
        b_scale = g_t * 6.103515625e-05 * tl.exp(b_m - lse)  # 2⁻¹⁴·e^(m − lse): p = u·that
        b_d = tl.where(o_v == tgt, g_t, 0.0) - b_u * b_scale[:, None]
        tl.debug_barrier()  # (every load of the tile before any store over it)
        tl.store(dl_row + o_v, b_d.to(dl_ptr.dtype.element_ty), mask=m_v)
