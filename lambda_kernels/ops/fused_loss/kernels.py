"""On-policy row kernel of the fused loss: log-prob and the logits' gradient of each row in one program.

On-policy the objective's per-token gradient is known before the log-probs (grpo_lambda.md §5), except the KL
term β·n·(1 − exp(ℓ_ref − ℓ)) (β·n·(ℓ − ℓ_ref) for the ratio-weighted KL), which only needs this token's ℓ: so
each program computes ℓ (same helper as the log-prob kernel, hence bit-identical), completes its token gradient and
overwrites the row with dlogits.
"""
import triton
import triton.language as tl

from ..linear_logprobs.kernels import row_dlogits_store, row_stats


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
    if WITH_STATS:
        tl.store(lse_ptr + i_r, lse)
        tl.store(g_ptr + i_r, g)
    g_ent = tl.full((), 0.0, tl.float32)
    if WITH_ENT_GRAD:
        g_ent = tl.load(gent_ptr + i_r)
    row_dlogits_store(row_ptr, bias_ptr, dl_ptr + i_r * stride_dl, tgt, lse, ent, g, g_ent, V, inv_t, cap,
                      HAS_BIAS, SOFTCAP, WITH_ENT_GRAD, BLOCK_V)
