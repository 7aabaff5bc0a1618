"""Log-probs straight from the GEMM: logits tiles reduced to per-row log-sum-exp statistics in the epilogue.

The cuBLAS path writes each chunk of fp32 logits to memory and reads it back (4·V bytes per token each way, 1.3–1.8×
the 2·N·H·V floor on an H100). Here every tile of X·Wᵀ [BLOCK_M, BLOCK_N] is accumulated in fp32 and reduced to,
per row, the tile's max m, s = Σ e^(z−m) and (WITH_ENT) t = Σ e^(z−m)·(z−m), plus the target's logit when the
target falls in the tile: 12 bytes per row per tile instead of 4·BLOCK_N. A second kernel merges the tiles of each
row (the same algebra as `kernels.online_lse_update`).

Two main loops share that epilogue (`_store_tile_stats`):

    lse_gemm_tiles_kernel       one program per tile, pointer loads (cp.async pipelined): any H and strides
    lse_gemm_persistent_kernel  one program per SM (two where two fit) walking the tiles, TMA descriptor loads,
                                the tile and K loops flattened into one software pipeline so the next tile's loads
                                are in flight during this tile's epilogue (the Triton persistent-matmul recipe);
                                16-byte aligned rows

Tiles are visited in groups of GROUP_M row blocks (the Triton matmul tutorial's order), so that a column of W tiles
is reused from L2 by the row blocks that run together.

EMIT (the fused loss's token chunks, `lse_gemm.LseGemm`): the epilogue also stores each tile's probabilities up to a
per-row factor, u = e^(z − m)·2¹⁴ in fp16 over a [rows, V] buffer (2 bytes a logit where the cuBLAS path holds 4 of
fp32 logits), with the max m of each column range (the quarter, or the whole tile) in qm [rows, ranges]. Once the
merge has the row's lse, p = u·2⁻¹⁴·e^(m − lse) for any column (`fused_loss.kernels.probs_dlogits_kernel`). u lies in
(0, 2¹⁴]: fp16 keeps 11 significant bits down to u = 2⁻¹⁴ (p 2⁻²⁸ of its range's largest), finer than the bf16
dlogits the GEMMs then read (8 bits).

DLOGITS (a backward whose rows' lse is known, `lse_gemm.LseGemm` with dlogits): the epilogue writes each tile's
dlogits = (g_lp·(1[v = target] − p) − g_ent·p·(log p + H))·∂z/∂x in the head's 2-byte dtype straight from the fp32
accumulator (`row_dlogits_store`'s formula, softcap included): no logits in memory, 2 bytes a logit written.
The main loops then take [4, M] row statistics (lse, g_lp, H, g_ent) in place of the partials and the dlogits
buffer in place of u.

The interpreter computes bf16 dots on raw bits: UPCAST (set only under the interpreter) casts operands to fp32.
"""
import triton
import triton.language as tl

from .kernels import dlogits_of, softcap_tanh


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a·b for the main loops (tensor cores on a GPU); UPCAST: operands in fp32 (the interpreter's bf16 dots
    are wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _column_halves(acc, HALF: tl.constexpr):
    """acc [rows, 2·HALF] as its two column halves [rows, HALF] (the epilogues' quarter-by-quarter reductions)."""
    return tl.split(tl.permute(tl.reshape(acc, (acc.shape[0], 2, HALF)), (0, 2, 1)))


@triton.jit
def _grouped_tile(tile, n_m, n_v, GROUP_M: tl.constexpr):
    """(row block, column block) of tile number `tile` in the grouped order."""
    per_group = GROUP_M * n_v
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def _range_stats(b_z, o_v, tgt, pick, col0, V, WITH_ENT: tl.constexpr, WIDTH: tl.constexpr):
    """(max m, Σ e^(z−m), Σ e^(z−m)·(z−m) or 0, z at the target or 0) per row of tempered logits b_z [rows, WIDTH]
    over vocabulary columns o_v = col0 … col0 + WIDTH − 1 (int32), targets tgt [rows] (int32); pick: whether the
    tile holds some row's target (else z at the target is not looked for); and e^(z−m) [rows, WIDTH] itself.

    Element-wise work is what the epilogue costs, so the masks are only paid where needed: the columns past V only
    in the range that holds V, the target only in tiles holding some row's target (both uniform branches)."""
    if col0 + WIDTH > V:  # the last range of the vocabulary: columns past V are no tokens
        b_z = tl.where((o_v < V)[None, :], b_z, float("-inf"))
    b_zt = tl.zeros((b_z.shape[0],), tl.float32)
    if pick:  # (first: z's last use is then b_d, not a branch after the exponentials, fewer registers live)
        b_zt = tl.sum(tl.where(o_v[None, :] == tgt[:, None], b_z, 0.0), 1)
    b_max = tl.maximum(tl.max(b_z, 1), -3.0e38)  # finite even for a range of −inf logits (a −inf bias, past V)
    b_d = b_z - b_max[:, None]  # −inf where z is
    b_e = tl.exp(b_d)
    if WITH_ENT:
        b_t = tl.sum(tl.where(b_e > 0, b_e * b_d, 0.0), 1)  # not 0·(−inf)
    else:
        b_t = tl.zeros_like(b_max)
    return b_max, tl.sum(b_e, 1), b_t, b_zt, b_e


@triton.jit
def _merge_stats(m_0, s_0, t_0, zt_0, m_1, s_1, t_1, zt_1):
    """Statistics of two column ranges of the same rows merged (the algebra of `lse_gemm_merge_kernel`)."""
    b_max = tl.maximum(m_0, m_1)
    a_0 = tl.exp(m_0 - b_max)
    a_1 = tl.exp(m_1 - b_max)
    b_t = a_0 * (t_0 + (m_0 - b_max) * s_0) + a_1 * (t_1 + (m_1 - b_max) * s_1)
    return b_max, a_0 * s_0 + a_1 * s_1, b_t, zt_0 + zt_1  # the target lies in one range at most: the other adds 0


@triton.jit
def _cols_stats(acc, col0, bias_ptr, tgt, pick, V, inv_t, cap, o_m, m_m, u_ptr, qm_ptr, stride_u, stride_qm,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr, EMIT: tl.constexpr,
                WIDTH: tl.constexpr):
    """Statistics of acc [rows, WIDTH], the GEMM sums of vocabulary columns col0 … col0 + WIDTH − 1 (int32);
    SOFTCAP: of the soft-capped logits cap·tanh(x / cap), computed as the row kernels' `load_logits` does.
    EMIT: also store e^(z − m)·2¹⁴ in fp16 at u[o_m, columns] and m at qm[o_m, col0 / WIDTH] (rows o_m, masked by
    m_m; row strides stride_u ≥ V, columns past V being the rows' padding, and stride_qm)."""
    o_v = col0 + tl.arange(0, WIDTH)
    b_z = acc
    if HAS_BIAS:
        b_z += tl.load(bias_ptr + o_v, mask=o_v < V, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        b_z = cap * softcap_tanh(b_z, cap)
    b_max, b_s, b_t, b_zt, b_e = _range_stats(b_z * inv_t, o_v, tgt, pick, col0, V, WITH_ENT, WIDTH)
    if EMIT:
        # (columns up to the row stride, as `_cols_dlogits`: those past V hold u = 0, e^(−inf))
        p_u = u_ptr + o_m[:, None] * stride_u + o_v[None, :]
        b_u = (b_e * 16384.0).to(tl.float16)  # 2¹⁴: a power of two, so the scaling itself is exact
        tl.store(p_u, b_u, mask=m_m[:, None] & (o_v < stride_u)[None, :])
        tl.store(qm_ptr + o_m * stride_qm + col0 // WIDTH, b_max, mask=m_m)
    return b_max, b_s, b_t, b_zt


@triton.jit
def _halves_stats(acc, col0, bias_ptr, tgt, pick, V, inv_t, cap, o_m, m_m, u_ptr, qm_ptr, stride_u, stride_qm,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr, EMIT: tl.constexpr,
                  WIDTH: tl.constexpr):
    """`_cols_stats` of the two column halves of acc [rows, WIDTH] one after the other, merged."""
    HALF: tl.constexpr = WIDTH // 2
    z_0, z_1 = _column_halves(acc, HALF)
    m_0, s_0, t_0, zt_0 = _cols_stats(z_0, col0, bias_ptr, tgt, pick, V, inv_t, cap, o_m, m_m, u_ptr, qm_ptr,
                                      stride_u, stride_qm, HAS_BIAS, SOFTCAP, WITH_ENT, EMIT, HALF)
    m_1, s_1, t_1, zt_1 = _cols_stats(z_1, col0 + HALF, bias_ptr, tgt, pick, V, inv_t, cap, o_m, m_m, u_ptr, qm_ptr,
                                      stride_u, stride_qm, HAS_BIAS, SOFTCAP, WITH_ENT, EMIT, HALF)
    return _merge_stats(m_0, s_0, t_0, zt_0, m_1, s_1, t_1, zt_1)


@triton.jit
def _store_tile_stats(acc, i_m, i_v, bias_ptr, tgt_ptr, part_ptr, zt_ptr, u_ptr, qm_ptr, M, V, stride_stat,
                      stride_col, stride_u, stride_qm, inv_t, cap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                      WITH_ENT: tl.constexpr, EMIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      QUARTERS: tl.constexpr):
    """The epilogue of tile (i_m, i_v) with fp32 acc = X·Wᵀ: per-row (m, s, t) into part[0..2, i_v, row], and the
    target's tempered logit into zt[row] when the target lies in this tile's columns; EMIT: the tile's u and qm
    (`_cols_stats`; a range per quarter with QUARTERS, else the tile).

    QUARTERS: reduce the tile's four column quarters one after the other and merge their statistics, so that the
    epilogue's temporaries are quarter-sized: a wide tile's whole-tile epilogue spills registers
    (`lse_gemm.quarter_epilogue`)."""
    o_m = (i_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_m = o_m < M
    tgt = tl.load(tgt_ptr + o_m, mask=m_m, other=-1).to(tl.int32)  # ids < V < 2³¹: 32-bit compares
    col0 = i_v * BLOCK_N
    in_tile = m_m & (tgt >= col0) & (tgt < col0 + BLOCK_N) & (tgt < V)
    pick = tl.max(in_tile.to(tl.int32), 0) > 0  # one reduction over the rows per tile (true in ~1 in 10 at V 152k)
    if QUARTERS:
        HALF: tl.constexpr = BLOCK_N // 2
        z_0, z_1 = _column_halves(acc, HALF)
        m_0, s_0, t_0, zt_0 = _halves_stats(z_0, col0, bias_ptr, tgt, pick, V, inv_t, cap, o_m, m_m, u_ptr, qm_ptr,
                                            stride_u, stride_qm, HAS_BIAS, SOFTCAP, WITH_ENT, EMIT, HALF)
        m_1, s_1, t_1, zt_1 = _halves_stats(z_1, col0 + HALF, bias_ptr, tgt, pick, V, inv_t, cap, o_m, m_m, u_ptr,
                                            qm_ptr, stride_u, stride_qm, HAS_BIAS, SOFTCAP, WITH_ENT, EMIT, HALF)
        b_max, b_s, b_t, b_zt = _merge_stats(m_0, s_0, t_0, zt_0, m_1, s_1, t_1, zt_1)
    else:
        b_max, b_s, b_t, b_zt = _cols_stats(acc, col0, bias_ptr, tgt, pick, V, inv_t, cap, o_m, m_m, u_ptr, qm_ptr,
                                            stride_u, stride_qm, HAS_BIAS, SOFTCAP, WITH_ENT, EMIT, BLOCK_N)
    stat = stride_stat.to(tl.int64)  # 2·stride_stat may pass 2³¹ with a large budget
    p_part = part_ptr + i_v.to(tl.int64) * stride_col + o_m
    tl.store(p_part, b_max, mask=m_m)
    tl.store(p_part + stat, b_s, mask=m_m)
    if WITH_ENT:
        tl.store(p_part + 2 * stat, b_t, mask=m_m)
    tl.store(zt_ptr + o_m, b_zt, mask=in_tile)


@triton.jit
def _cols_dlogits(acc, col0, bias_ptr, tgt, lse, g_lp, ent, g_ent, o_m, m_m, dl_ptr, stride_dl, V, inv_t, cap,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT_GRAD: tl.constexpr, WIDTH: tl.constexpr):
    """dlogits of acc [rows, WIDTH], the GEMM sums of vocabulary columns col0 … col0 + WIDTH − 1, stored at
    dl[o_m, columns] (rows masked by m_m; columns up to the row stride stride_dl ≥ V, those past V being padding):
    the row kernels' formula (`kernels.dlogits_of`) on a tile."""
    o_v = col0 + tl.arange(0, WIDTH)
    b_x = acc
    if HAS_BIAS:
        b_x += tl.load(bias_ptr + o_v, mask=o_v < V, other=0.0).to(tl.float32)[None, :]
    b_d = dlogits_of(b_x, o_v[None, :] == tgt[:, None], lse[:, None], g_lp[:, None], ent[:, None], g_ent[:, None],
                     inv_t, cap, SOFTCAP, WITH_ENT_GRAD)
    # columns up to the row stride: those past V are the rows' padding (finite values from zero-filled W rows), and a
    # stride divisible by 16 lets the mask keep 16-byte stores (a branch on the last tile instead broke the persistent
    # loop's flattening in triton 3.6 here: a TritonGPUFuseNestedLoops failure)
    p_dl = dl_ptr + o_m[:, None] * stride_dl + o_v[None, :]
    tl.store(p_dl, b_d.to(dl_ptr.dtype.element_ty), mask=m_m[:, None] & (o_v < stride_dl)[None, :])


@triton.jit
def _halves_dlogits(acc, col0, bias_ptr, tgt, lse, g_lp, ent, g_ent, o_m, m_m, dl_ptr, stride_dl, V, inv_t, cap,
                    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT_GRAD: tl.constexpr, WIDTH: tl.constexpr):
    """`_cols_dlogits` of the two column halves of acc [rows, WIDTH] one after the other."""
    HALF: tl.constexpr = WIDTH // 2
    z_0, z_1 = _column_halves(acc, HALF)
    _cols_dlogits(z_0, col0, bias_ptr, tgt, lse, g_lp, ent, g_ent, o_m, m_m, dl_ptr, stride_dl, V, inv_t, cap,
                  HAS_BIAS, SOFTCAP, WITH_ENT_GRAD, HALF)
    _cols_dlogits(z_1, col0 + HALF, bias_ptr, tgt, lse, g_lp, ent, g_ent, o_m, m_m, dl_ptr, stride_dl, V, inv_t, cap,
                  HAS_BIAS, SOFTCAP, WITH_ENT_GRAD, HALF)


@triton.jit
def _store_tile_dlogits(acc, i_m, i_v, bias_ptr, tgt_ptr, stat_ptr, dl_ptr, M, V, stride_stat, stride_dl, inv_t, cap,
                        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT_GRAD: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUARTERS: tl.constexpr):
    """The DLOGITS epilogue of tile (i_m, i_v): the rows' lse, g_lp (and H, g_ent with WITH_ENT_GRAD) from
    stat[0..3, row] (stride stride_stat), their dlogits into dl[row, tile columns] (row stride stride_dl); by column
    quarters with QUARTERS, as `_store_tile_stats`."""
    o_m = (i_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_m = o_m < M
    tgt = tl.load(tgt_ptr + o_m, mask=m_m, other=-1).to(tl.int32)
    stat = stride_stat.to(tl.int64)
    lse = tl.load(stat_ptr + o_m, mask=m_m, other=0.0)
    g_lp = tl.load(stat_ptr + stat + o_m, mask=m_m, other=0.0)
    ent = tl.zeros_like(lse)
    g_ent = tl.zeros_like(lse)
    if WITH_ENT_GRAD:
        ent = tl.load(stat_ptr + 2 * stat + o_m, mask=m_m, other=0.0)
        g_ent = tl.load(stat_ptr + 3 * stat + o_m, mask=m_m, other=0.0)
    col0 = i_v * BLOCK_N
    if QUARTERS:
        HALF: tl.constexpr = BLOCK_N // 2
        z_0, z_1 = _column_halves(acc, HALF)
        _halves_dlogits(z_0, col0, bias_ptr, tgt, lse, g_lp, ent, g_ent, o_m, m_m, dl_ptr, stride_dl, V, inv_t, cap,
                        HAS_BIAS, SOFTCAP, WITH_ENT_GRAD, HALF)
        _halves_dlogits(z_1, col0 + HALF, bias_ptr, tgt, lse, g_lp, ent, g_ent, o_m, m_m, dl_ptr, stride_dl, V, inv_t,
                        cap, HAS_BIAS, SOFTCAP, WITH_ENT_GRAD, HALF)
    else:
        _cols_dlogits(acc, col0, bias_ptr, tgt, lse, g_lp, ent, g_ent, o_m, m_m, dl_ptr, stride_dl, V, inv_t, cap,
                      HAS_BIAS, SOFTCAP, WITH_ENT_GRAD, BLOCK_N)


@triton.jit
def _epilogue(acc, i_m, i_v, bias_ptr, tgt_ptr, part_ptr, zt_ptr, u_ptr, qm_ptr, M, V, stride_stat, stride_col,
              stride_u, stride_qm, inv_t, cap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr,
              EMIT: tl.constexpr, DLOGITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              QUARTERS: tl.constexpr):
    """Either main loop's epilogue: DLOGITS (part: the row statistics, u: the dlogits, WITH_ENT: the entropy's
    gradient), or the statistics (with EMIT the probabilities too)."""
    if DLOGITS:
        _store_tile_dlogits(acc, i_m, i_v, bias_ptr, tgt_ptr, part_ptr, u_ptr, M, V, stride_stat, stride_u, inv_t,
                            cap, HAS_BIAS, SOFTCAP, WITH_ENT, BLOCK_M, BLOCK_N, QUARTERS)
    else:
        _store_tile_stats(acc, i_m, i_v, bias_ptr, tgt_ptr, part_ptr, zt_ptr, u_ptr, qm_ptr, M, V, stride_stat,
                          stride_col, stride_u, stride_qm, inv_t, cap, HAS_BIAS, SOFTCAP, WITH_ENT, EMIT, BLOCK_M,
                          BLOCK_N, QUARTERS)


# K and the row strides stay specialised: their divisibility by 16 is what lets Triton prove 16-byte aligned rows,
# hence vectorised, cp.async-pipelined operand loads (without it: 2-byte loads, no pipelining, register spills).
@triton.jit(do_not_specialize=["M", "V", "stride_stat", "stride_col", "stride_qm"])
def lse_gemm_tiles_kernel(x_ptr, w_ptr, bias_ptr, tgt_ptr, part_ptr, zt_ptr, u_ptr, qm_ptr, M, V, K, stride_x,
                          stride_w, stride_stat, stride_col, stride_u, stride_qm, inv_t, cap, HAS_BIAS: tl.constexpr,
                          SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr, EMIT: tl.constexpr, DLOGITS: tl.constexpr,
                          EVEN_K: tl.constexpr,
                          UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          QUARTERS: tl.constexpr):
    """One tile of z = (X·Wᵀ + b)·inv_t (soft-capped first with SOFTCAP) → per-row (m, s, t) of the tile into
    part[0..2, tile column, row], and z at the target into zt[row] for the one tile column that holds it.

    x [M, K] (row stride stride_x), w [V, K] (stride_w), bias [V], tgt [M] int in [0, V), part [3, n_tiles_v, ≥M]
    fp32 (strides stride_stat, stride_col, 1), zt [M] fp32; with EMIT u [M, V] fp16 (row stride stride_u, a multiple
    of 16 for 16-byte rows) and qm [M, ranges] fp32 (row stride stride_qm). Grid (cdiv(M, BLOCK_M)·cdiv(V, BLOCK_N),).
    """
    i_m, i_v = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(V, BLOCK_N), GROUP_M)
    o_m = (i_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_v = (i_v * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_v = o_v < V
    p_x = x_ptr + o_m[:, None] * stride_x + o_k[None, :]
    p_w = w_ptr + o_v[None, :] * stride_w + o_k[:, None]  # [BLOCK_K, BLOCK_N]: Wᵀ tile, K contiguous
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            b_x = tl.load(p_x, mask=m_m[:, None], other=0.0)
            b_w = tl.load(p_w, mask=m_v[None, :], other=0.0)
        else:
            m_k = (k0 + o_k) < K
            b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)
            b_w = tl.load(p_w, mask=m_k[:, None] & m_v[None, :], other=0.0)
        acc = _dot(b_x, b_w, acc, UPCAST)
        p_x += BLOCK_K
        p_w += BLOCK_K
    _epilogue(acc, i_m, i_v, bias_ptr, tgt_ptr, part_ptr, zt_ptr, u_ptr, qm_ptr, M, V, stride_stat, stride_col,
              stride_u, stride_qm, inv_t, cap, HAS_BIAS, SOFTCAP, WITH_ENT, EMIT, DLOGITS, BLOCK_M, BLOCK_N, QUARTERS)


@triton.jit(do_not_specialize=["M", "V", "stride_stat", "stride_col", "stride_qm"])
def lse_gemm_persistent_kernel(x_desc, w_desc, bias_ptr, tgt_ptr, part_ptr, zt_ptr, u_ptr, qm_ptr, M, V, K,
                               stride_stat, stride_col, stride_u, stride_qm, inv_t, cap, HAS_BIAS: tl.constexpr,
                               SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr, EMIT: tl.constexpr,
                               DLOGITS: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr, QUARTERS: tl.constexpr):
    """`lse_gemm_tiles_kernel`'s outputs from NUM_PROGRAMS programs, each taking every NUM_PROGRAMS-th tile.

    x_desc: TMA descriptor of x [M, K] with block [BLOCK_M, BLOCK_K]; w_desc: of w [V, K] with block [BLOCK_N,
    BLOCK_K]. Loads past M, V or K read zeros (TMA bounds), so the tails need no masks in the main loop.
    Grid (NUM_PROGRAMS,).
    """
    n_m = tl.cdiv(M, BLOCK_M)
    n_v = tl.cdiv(V, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), n_m * n_v, NUM_PROGRAMS, flatten=True):
        i_m, i_v = _grouped_tile(tile, n_m, n_v, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_tiles):
            b_x = x_desc.load([i_m * BLOCK_M, kk * BLOCK_K])
            b_w = w_desc.load([i_v * BLOCK_N, kk * BLOCK_K])
            acc = _dot(b_x, b_w.T, acc, UPCAST)
        _epilogue(acc, i_m, i_v, bias_ptr, tgt_ptr, part_ptr, zt_ptr, u_ptr, qm_ptr, M, V, stride_stat, stride_col,
                  stride_u, stride_qm, inv_t, cap, HAS_BIAS, SOFTCAP, WITH_ENT, EMIT, DLOGITS, BLOCK_M, BLOCK_N,
                  QUARTERS)


@triton.jit(do_not_specialize=["M", "n_v", "stride_stat", "stride_col"])
def lse_gemm_merge_kernel(part_ptr, zt_ptr, lp_ptr, lse_ptr, ent_ptr, M, n_v, stride_stat, stride_col, log_v,
                          WITH_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row: merge the tiles' (m, s, t) into lse and H; ℓ = min(z_target − lse, 0), H clamped to [0, log V].

    part [3, n_v, ≥M] fp32 (strides stride_stat, stride_col, 1), zt [M]; lp, lse, ent [M] fp32.
    Grid (cdiv(M, BLOCK_M),). A program reduces [BLOCK_V, BLOCK_M] blocks of partials at a time, coalesced along the
    rows: a program per 256 rows walking the ~600 tile columns of a 152k vocabulary one by one left a chunk's merge
    latency-bound (0.27 ms for 1408 rows on an H100, a grid of 6). The order of the sums depends on the tile columns
    alone, never on which rows share a program, so every pass merges a row bit-identically.
    """
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    stat = stride_stat.to(tl.int64)
    col = stride_col.to(tl.int64)
    m = tl.full((BLOCK_M,), -3.0e38, tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    t = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(0, n_v, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        live = (o_v < n_v)[:, None] & m_m[None, :]
        p = part_ptr + o_v.to(tl.int64)[:, None] * col + o_m[None, :]
        m_i = tl.load(p, mask=live, other=-3.0e38)  # (an absent partial weighs e^(−3e38 − m) = 0; tiles' m ≥ −3e38)
        s_i = tl.load(p + stat, mask=live, other=0.0)
        m_new = tl.maximum(m, tl.max(m_i, 0))
        shift = m_i - m_new[None, :]
        w = tl.exp(shift)
        alpha = tl.exp(m - m_new)
        if WITH_ENT:
            t_i = tl.load(p + 2 * stat, mask=live, other=0.0)
            t = alpha * (t + (m - m_new) * s) + tl.sum(w * (t_i + shift * s_i), 0)
        s = alpha * s + tl.sum(w * s_i, 0)
        m = m_new
    s = tl.where(m_m, s, 1.0)  # rows past M: nothing is stored, keep them finite
    log_s = tl.log(s)
    lse = m + log_s
    zt = tl.load(zt_ptr + o_m, mask=m_m, other=0.0)
    tl.store(lp_ptr + o_m, tl.minimum(zt - lse, 0.0), mask=m_m)
    tl.store(lse_ptr + o_m, lse, mask=m_m)
    if WITH_ENT:
        tl.store(ent_ptr + o_m, tl.minimum(tl.maximum(log_s - t / s, 0.0), log_v), mask=m_m)
