"""Row kernels on a materialised fp32 logits chunk: log-sum-exp, target log-prob, entropy, and dlogits in place;
and the scale-and-cast of a half head's fp32 dW sum (also in place, for a gradient scaled by grad_output).

The GEMMs around them (logits = X·Wᵀ, dX = D·W, dW += Dᵀ·X) are cuBLAS calls in launch.py; these kernels do the
row-wise work, one program per row, looping over the vocabulary in tiles of BLOCK_V with an online log-sum-exp.
The two `@triton.jit` helpers `row_stats` and `row_dlogits_store` are the only copies of that arithmetic: the
log-prob kernel here and the on-policy kernel of `ops/fused_loss` both call them, so their log-probs are
bit-identical for the same logits.

Notation per row: x_v the logit (+ bias), y_v = c·tanh(x_v / c) with a softcap c (SOFTCAP; else y = x),
z_v = y_v / temperature, lse = log Σ_v exp z_v, ℓ = min(z_target − lse, 0),
p_v = exp(z_v − lse), entropy H = −Σ p log p = log s − t / s with s = Σ e^(z−m), t = Σ e^(z−m)·(z − m) for the
running max m (no cancellation against m).
"""
import triton
import triton.language as tl


@triton.jit
def tanh_f32(u):
    """tanh in fp32 from exp (the interpreter has no libdevice tanh, and one formula keeps every kernel's logits
    bit-identical): Cephes' odd polynomial below |u| = 0.625, 1 − 2/(e^(2|u|) + 1) above; ±inf → ±1, NaN stays
    NaN. ≤ 2 ulp with an exact exp (the interpreter's, measured); a GPU's approximate exp adds about one more."""
    a = tl.abs(u)
    s = u * u
    small = ((((-5.70498872745e-3 * s + 2.06390887954e-2) * s - 5.37397155531e-2) * s + 1.33314422036e-1) * s
             - 3.33332819422e-1) * s * u + u
    large = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    return tl.where(a < 0.625, small, tl.where(u < 0, -large, large))


@triton.jit
def softcap_tanh(b_x, cap):
    """tanh(x / cap): the soft-capped logit is cap·tanh, and its derivative w.r.t. x is 1 − tanh²."""
    return tanh_f32(b_x / cap)


@triton.jit
def online_lse_update(b_z, m_v, m, s, t, WITH_T: tl.constexpr):
    """One tile of the online log-sum-exp: (m, s[, t]) ← the same over the union with tile b_z (masked by m_v).

    m: running max (scalar fp32), s = Σ exp(z − m), t = Σ exp(z − m)·(z − m) (only when WITH_T).
    """
    m_new = tl.maximum(m, tl.max(tl.where(m_v, b_z, float("-inf")), 0))
    alpha = tl.exp(m - m_new)
    b_d = tl.where(m_v, b_z - m_new, 0.0)
    b_e = tl.where(m_v, tl.exp(b_d), 0.0)
    if WITH_T:
        t = alpha * (t + (m - m_new) * s) + tl.sum(tl.where(b_e > 0, b_e * b_d, 0.0), 0)  # -inf logits: 0, not NaN
    s = s * alpha + tl.sum(b_e, 0)
    return m_new, s, t


@triton.jit
def load_logits(row_ptr, bias_ptr, o_v, m_v, cap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """Logits y (+ bias, soft-capped with SOFTCAP) of one row at vocabulary indices o_v (masked by m_v), in fp32."""
    b_x = tl.load(row_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_x += tl.load(bias_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)
    if SOFTCAP:
        b_x = cap * softcap_tanh(b_x, cap)
    return b_x


@triton.jit
def row_stats(row_ptr, bias_ptr, tgt, V, inv_t, cap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
              WITH_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    """(lse, ℓ, H) of one row of logits at `row_ptr` (fp32, V contiguous values); H is 0 unless WITH_ENT.

    ℓ is clamped to ≤ 0 and H to [0, log V] (rounding can step over either bound by an ulp).
    """
    # a finite start for the running max (−3e38, not −inf): (m − m_new)·s stays 0·finite = 0, never −inf·0 = NaN
    m = tl.full((), -3.0e38, tl.float32)
    s = tl.full((), 0.0, tl.float32)
    t = tl.full((), 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_x = load_logits(row_ptr, bias_ptr, o_v, m_v, cap, HAS_BIAS, SOFTCAP)
        m, s, t = online_lse_update(b_x * inv_t, m_v, m, s, t, WITH_ENT)
    log_s = tl.log(s)
    lse = m + log_s
    m_t = (tgt >= 0) & (tgt < V)
    x_t = load_logits(row_ptr, bias_ptr, tgt, m_t, cap, HAS_BIAS, SOFTCAP)
    lp = tl.minimum(x_t * inv_t - lse, 0.0)
    ent = tl.full((), 0.0, tl.float32)
    if WITH_ENT:
        # tl.full, not V.to: Triton passes V = 1 as a Python int constant (V is specialised)
        ent = tl.minimum(tl.maximum(log_s - t / s, 0.0), tl.log(tl.full((), V, tl.float32)))
    return lse, lp, ent


@triton.jit
def row_dlogits_store(row_ptr, bias_ptr, dl_row_ptr, tgt, lse, ent, g_lp, g_ent, V, inv_t, cap,
                      HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT_GRAD: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    """dlogits_v = (g_lp·(1[v = target] − p_v) − g_ent·p_v·(log p_v + H)) / temperature, stored at dl_row_ptr
    (times 1 − tanh²(x_v / c) with SOFTCAP: the derivative of the soft-capped logit w.r.t. the head's output).

    dl_row_ptr may alias row_ptr (fp32 in place) or its first half (a 2-byte dtype written over the fp32 row it
    was read from). A 2-byte store at index v touches the fp32 element v/2, which another warp of this program
    loads, in this tile (v0 = 0) or an earlier one: the barrier after each tile's loads orders every warp's loads
    of the tile before any warp's stores, and barriers of earlier tiles cover the earlier elements.
    """
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_x = load_logits(row_ptr, bias_ptr, o_v, m_v, 1.0, HAS_BIAS, False)
        tl.debug_barrier()
        b_d = dlogits_of(b_x, o_v == tgt, lse, g_lp, ent, g_ent, inv_t, cap, SOFTCAP, WITH_ENT_GRAD)
        tl.store(dl_row_ptr + o_v, b_d.to(dl_row_ptr.dtype.element_ty), mask=m_v)


@triton.jit
def dlogits_of(b_x, is_target, lse, g_lp, ent, g_ent, inv_t, cap, SOFTCAP: tl.constexpr, WITH_ENT_GRAD: tl.constexpr):
    """(g_lp·(1[target] − p) − g_ent·p·(log p + H))·∂z/∂x for the head's outputs b_x (bias added, not yet
    soft-capped): the one formula of the row kernels (`row_dlogits_store`) and the LSE GEMM's DLOGITS epilogue,
    whose operands come broadcast to the tile (lse, g_lp, ent, g_ent per row)."""
    b_dy = inv_t  # ∂z/∂x: 1/temperature, times 1 − tanh² when soft-capped
    if SOFTCAP:
        b_th = softcap_tanh(b_x, cap)
        b_x = cap * b_th  # as load_logits computes it: the same z as the forward's
        b_dy = inv_t * (1.0 - b_th * b_th)
    b_lp = b_x * inv_t - lse
    b_p = tl.exp(b_lp)
    b_dz = g_lp * (tl.where(is_target, 1.0, 0.0) - b_p)
    if WITH_ENT_GRAD:
        b_dz -= tl.where(b_p > 0, g_ent * b_p * (b_lp + ent), 0.0)  # p = 0 at a −inf logit: 0, not NaN
    return b_dz * b_dy


@triton.jit  # V and the strides specialised: divisible by 16 they give 16-byte loads (checked in the PTX)
def logprob_rows_kernel(logits_ptr, bias_ptr, tgt_ptr, lp_ptr, lse_ptr, ent_ptr, stride_l, V, inv_t, cap,
                        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    """ℓ_r = log softmax(y_r / temperature)[target_r], lse_r and (WITH_ENT) entropy H_r of each row r.

    logits [M, V] fp32 (row stride stride_l), bias [V] (HAS_BIAS), targets [M] int32/int64 (already checked to
    lie in [0, V)), lp/lse/ent [M] fp32. Grid (M,).
    """
    i_r = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + i_r).to(tl.int64)
    lse, lp, ent = row_stats(logits_ptr + i_r * stride_l, bias_ptr, tgt, V, inv_t, cap, HAS_BIAS, SOFTCAP, WITH_ENT,
                             BLOCK_V)
    tl.store(lp_ptr + i_r, lp)
    tl.store(lse_ptr + i_r, lse)
    if WITH_ENT:
        tl.store(ent_ptr + i_r, ent)


@triton.jit  # V and the strides specialised: divisible by 16 they give 16-byte loads and stores
def dlogits_rows_kernel(logits_ptr, bias_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dl_ptr,
                        stride_l, stride_dl, V, inv_t, cap,
                        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT_GRAD: tl.constexpr,
                        BLOCK_V: tl.constexpr):
    """Backward of (ℓ, H) through the softmax: dlogits_r = ∂(Σ g_lp·ℓ + g_ent·H)/∂x_r, written over the logits.

    logits [M, V] fp32 (stride stride_l); dl [M, V] (stride stride_dl) the GEMM input dtype, may alias logits;
    lse, ent, g_lp, g_ent [M] fp32; targets [M] int. Grid (M,).
    """
    i_r = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + i_r).to(tl.int64)
    lse = tl.load(lse_ptr + i_r)
    g_lp = tl.load(glp_ptr + i_r)
    ent = tl.full((), 0.0, tl.float32)
    g_ent = tl.full((), 0.0, tl.float32)
    if WITH_ENT_GRAD:
        ent = tl.load(ent_ptr + i_r)
        g_ent = tl.load(gent_ptr + i_r)
    row_dlogits_store(logits_ptr + i_r * stride_l, bias_ptr, dl_ptr + i_r * stride_dl, tgt, lse, ent, g_lp, g_ent,
                      V, inv_t, cap, HAS_BIAS, SOFTCAP, WITH_ENT_GRAD, BLOCK_V)


@triton.jit
def scale_cast_kernel(src_ptr, scale_ptr, dst_ptr, n, SKIP_ONE: tl.constexpr, BLOCK: tl.constexpr):
    """dst = (src · scale) in dst's dtype, fp32 arithmetic: a half LM head's fp32 dW sum becomes its gradient in one
    pass (read 4, write 2 bytes per element) instead of a cast and a scaling (`dw_sum`). SKIP_ONE (in place: dst is
    src, a gradient scaled by grad_output): where scale is 1, as after a plain `loss.backward()`, each program
    returns after one scalar load instead of reading and writing every byte.

    src [n], scale [1] fp32 (read on the device: no host sync), dst [n]. Grid (cdiv(n, BLOCK),).
    """
    scale = tl.load(scale_ptr)
    if SKIP_ONE:
        if scale != 1.0:
            _scale_block(src_ptr, scale, dst_ptr, n, BLOCK)
    else:
        _scale_block(src_ptr, scale, dst_ptr, n, BLOCK)


@triton.jit
def _scale_block(src_ptr, scale, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(src_ptr + offs, mask=inside).to(tl.float32)
    tl.store(dst_ptr + offs, (x * scale).to(dst_ptr.dtype.element_ty), mask=inside)
