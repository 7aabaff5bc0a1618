"""Device helpers shared by the scan kernels (λ-trace, GAE, the objective): one copy of each.

A block of a linear recurrence `y_t = x_t + d_t·y_{t∓1}` is one `tl.associative_scan` over (decay, value) pairs,
continued from the state just outside the block. The "both" trace needs values at other time steps (t/2 forward,
2t+1 backward); those go through a per-row fp32 scratch row written by the same program, then read back after a
barrier (a gather from registers is not expressible in Triton).

The sequence style (3, GSPO's sequence-level ratio) is not a recurrence: every step of a row gets the row's mean,
which the kernel reduces in a first walk over the row and passes in as the carry (`row_mean`).
"""
import triton
import triton.language as tl


@triton.jit
def _linear_combine(d1, y1, d2, y2):
    # (d1, y1) is the earlier element in scan order (the later time step for reverse scans): apply it, then (d2, y2).
    return d1 * d2, d2 * y1 + y2


@triton.jit
def decayed_scan(x, decay, carry, REVERSE: tl.constexpr):
    """y_t = x_t + decay_t·y_{t−1} (REVERSE: y_t = x_t + decay_t·y_{t+1}) over a 1-D block, continuing from `carry`.

    Returns the block of y; the carry for the next block is y's last (first, when REVERSE) element.
    """
    acc_decay, y = tl.associative_scan((decay, x), 0, _linear_combine, reverse=REVERSE)
    return y + acc_decay * carry


@triton.jit
def row_scan_start(scratch_ptr, T):
    """A one-program-per-row scan's start (grid (B,), [B, T] tensors): (row index, offset of the row, its two
    scratch rows of the [B, 2, T] scratch, two zero carries)."""
    i_b = tl.program_id(0).to(tl.int64)
    row = i_b * T
    scratch_1 = scratch_ptr + 2 * row
    zero = tl.full((), 0.0, tl.float32)
    return i_b, row, scratch_1, scratch_1 + T, zero, zero


@triton.jit
def pick(block, offs, idx):
    """The element of `block` at absolute offset `idx` (a scalar), as a scalar."""
    return tl.sum(tl.where(offs == idx, block, 0.0), axis=0)


@triton.jit
def pow_a(k, log2a):
    """a^k for integer k ≥ 0, given log2(a) (a finite −1000 stands for a = 0: 0^0 = 1, 0^k underflows to 0)."""
    return tl.exp2(k.to(tl.float32) * log2a)


@triton.jit
def trace_forward_block(d, offs, in_row, carry_f, carry_p, scratch_f, scratch_p, a, log2a, T, STYLE: tl.constexpr):
    """One block of z_t = Σ_{j≤t} w(t, j)·d_j (STYLE 0 none: z = d; 1 recent; 2 both), carries updated.

    both (grpo_lambda.md §4): z_t = F_t − a^(t−m+1)·F_{m−1} + P_{m−1}, m = ceil(t/2), F the recent scan and
    P_k = Σ_{j≤k} a^j·d_j. F and P are written to the row's scratch and read back at m−1 ≤ t after a barrier.
    STYLE 3 (the sequence mean, GSPO): z_t = carry_f for every t, the row's mean that the calling kernel reduced
    before its walk; carries unchanged.
    """
    if STYLE == 0:
        return d, carry_f, carry_p
    if STYLE == 3:
        return tl.zeros_like(d) + carry_f, carry_f, carry_p
    f = decayed_scan(d, tl.zeros_like(d) + a, carry_f, False)
    last = tl.max(tl.where(in_row, offs, -1), axis=0)
    new_carry_f = pick(f, offs, last)
    if STYLE == 1:
        return f, new_carry_f, carry_p
    p = tl.cumsum(d * pow_a(offs, log2a), axis=0) + carry_p
    new_carry_p = pick(p, offs, last)
    tl.store(scratch_f + offs, f, mask=in_row)
    tl.store(scratch_p + offs, p, mask=in_row)
    tl.debug_barrier()
    prev = (offs + 1) // 2 - 1
    has_prev = in_row & (prev >= 0)
    f_prev = tl.load(scratch_f + prev, mask=has_prev, other=0.0)
    p_prev = tl.load(scratch_p + prev, mask=has_prev, other=0.0)
    z = f - pow_a(offs - prev, log2a) * f_prev + p_prev
    # no second barrier: later blocks write slots > t, never the slots ≤ t read here
    return z, new_carry_f, new_carry_p


@triton.jit
def trace_backward_block(c, offs, in_row, carry_r, carry_s, scratch_r, scratch_s, a, log2a, T, STYLE: tl.constexpr):
    """One block (walking rows right to left) of G_j = Σ_{t≥j} w(t, j)·c_t, carries updated.

    both: G_j = R_j − a^(j+1)·R_{2j+1} + a^j·S_{2j+1}, R the reverse recent scan and S_k = Σ_{t≥k} c_t; R and S at
    2j+1 > j belong to this block or to later ones, already written to scratch.
    STYLE 3 (the sequence mean): G_j = carry_r for every j, the row's Σ_t c_t / max(Σ_t m_t, 1) that the calling
    kernel reduced before its walk; carries unchanged.
    """
    if STYLE == 0:
        return c, carry_r, carry_s
    if STYLE == 3:
        return tl.zeros_like(c) + carry_r, carry_r, carry_s
    first = tl.min(offs, axis=0)
    r = decayed_scan(c, tl.zeros_like(c) + a, carry_r, True)
    new_carry_r = pick(r, offs, first)
    if STYLE == 1:
        return r, new_carry_r, carry_s
    s = tl.cumsum(c, axis=0, reverse=True) + carry_s
    new_carry_s = pick(s, offs, first)
    tl.store(scratch_r + offs, r, mask=in_row)
    tl.store(scratch_s + offs, s, mask=in_row)
    tl.debug_barrier()
    nxt = 2 * offs + 1
    has_next = in_row & (nxt < T)
    r_next = tl.load(scratch_r + nxt, mask=has_next, other=0.0)
    s_next = tl.load(scratch_s + nxt, mask=has_next, other=0.0)
    g = r - pow_a(offs + 1, log2a) * r_next + pow_a(offs, log2a) * s_next
    return g, new_carry_r, new_carry_s


@triton.jit
def row_sums(x_ptr, y_ptr, mask_ptr, row, T, MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    """(Σ_t of a per-token term, Σ_t m_t) over a row, a first walk over it (the row reductions before a scan):
    MODE 0: x_t, a row of coefficients that already carry m_t (0 at padding);
    MODE 1: m_t·(x_t − y_t), the sequence's log-ratio (x = ℓ, y = ℓ_old);
    MODE 2: m_t·kl_t, kl = exp(y − x) − (y − x) − 1 the k3 KL (x = ℓ, y = ℓ_ref);
    MODE 3: m_t·clamp(x_t − y_t, −20, 20), VESPO's clamped log-ratio (x = ℓ, y = ℓ_old).
    Values where m = 0 are never used (selected away: they may be ±inf or NaN)."""
    acc_x = tl.zeros((BLOCK_T,), tl.float32)
    acc_m = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        b_m = tl.load(mask_ptr + row + o_t, mask=m_t, other=0).to(tl.float32)
        b_x = tl.load(x_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
        if MODE == 1:
            b_x = b_m * (b_x - tl.load(y_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32))
        elif MODE == 2:
            b_d = tl.load(y_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32) - b_x
            b_x = b_m * (tl.exp(b_d) - b_d - 1.0)
        elif MODE == 3:
            b_d = b_x - tl.load(y_ptr + row + o_t, mask=m_t, other=0.0).to(tl.float32)
            b_x = b_m * tl.minimum(tl.maximum(b_d, -20.0), 20.0)
        acc_x += tl.where(b_m != 0, b_x, 0.0)
        acc_m += b_m
    return tl.sum(acc_x, axis=0), tl.sum(acc_m, axis=0)


@triton.jit
def row_mean(x_ptr, y_ptr, mask_ptr, row, T, MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    """The mean over max(Σ_t m_t, 1) of `row_sums`' term (the sequence style's reductions)."""
    total, count = row_sums(x_ptr, y_ptr, mask_ptr, row, T, MODE, BLOCK_T)
    return total / tl.maximum(count, 1.0)
