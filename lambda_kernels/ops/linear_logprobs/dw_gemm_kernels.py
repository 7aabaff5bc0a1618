"""dW sums from the Triton GEMM: C [V, H] fp32 (+)= Dᵀ·X with the fp32 read and write of C off the critical path.

A chunk's dW GEMM adds Dᵀ·X (D [M, V] the chunk's 2-byte dlogits, X [M, H] its rows) into an fp32 sum C that
outlives the chunk. cuBLAS's accumulating GEMM reads C after its main loop and writes it back: on an H100 (run 6,
benchmarks/RESULTS.md) that took its matmul time *plus* its 8·V·H bytes of traffic, ~1 ms per 7B chunk. Here a
persistent program walks C's tiles (TMA loads of Dᵀ and X, the tile and K loops flattened into one software pipeline,
as `lse_gemm_persistent_kernel`), and each finished tile leaves through an asynchronous TMA *reduction*
(cp.reduce.async.bulk.tensor .add): the L2 reads C, adds the tile and writes it back while the program's tensor
cores run the next tile. The epilogue itself stays on the program's path: the accumulator's copy into shared memory
and, between pieces, the wait for the TMA engine to have read the previous piece (not for its global writes).

The epilogue hands the tile over in EPILOGUE_PIECES column pieces, one shared-memory staging buffer reused: a whole
[128, 256] fp32 tile would take 128 KiB beside the pipeline's 144 KiB.

Each element of C gets one addition per launch (no split K), so the sums are deterministic; ACCUMULATE false writes
the first piece's product (no read of C, no zero fill). The interpreter has no TMA reductions: REDUCE false (set only
there) adds by a TMA load and store instead. UPCAST: the interpreter's bf16 dots are wrong, the operands go fp32.
"""
import triton
import triton.language as tl

from .lse_gemm_kernels import _column_halves, _dot


@triton.jit
def _add_piece(c_desc, row0, col0, piece, ACCUMULATE: tl.constexpr, REDUCE: tl.constexpr):
    """C[row0:, col0:] += piece (or = piece without ACCUMULATE), the piece's shape being c_desc's block."""
    if not ACCUMULATE:
        c_desc.store([row0, col0], piece)
    elif REDUCE:
        c_desc.atomic_add([row0, col0], piece)  # TMA reduce: asynchronous, the adds done in the L2
    else:
        c_desc.store([row0, col0], c_desc.load([row0, col0]) + piece)


@triton.jit(do_not_specialize=["M", "V"])
def dw_gemm_kernel(d_desc, x_desc, c_desc, M, V, H, ACCUMULATE: tl.constexpr, REDUCE: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                   EPILOGUE_PIECES: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    """C (+)= Dᵀ·X from NUM_PROGRAMS programs, each taking every NUM_PROGRAMS-th tile of C.

    d_desc: TMA descriptor of D [M, V] (2-byte, block [BLOCK_K, BLOCK_V]); x_desc: of X [M, H] (block [BLOCK_K,
    BLOCK_H]); c_desc: of C [V, H] fp32 (block [BLOCK_V, BLOCK_H / EPILOGUE_PIECES]). Loads past M read zeros and
    stores past V or H are dropped (TMA bounds): no masks. Tiles in row-major order over [V / BLOCK_V, H / BLOCK_H]:
    the programs that run together share D's columns, read from memory once, and X (a chunk's rows, a few MB) stays
    in the L2. Grid (NUM_PROGRAMS,).
    """
    n_h = tl.cdiv(H, BLOCK_H)
    k_tiles = tl.cdiv(M, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tl.cdiv(V, BLOCK_V) * n_h, NUM_PROGRAMS, flatten=True):
        i_v = tile // n_h
        i_h = tile % n_h
        acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
        for kk in range(k_tiles):
            b_d = d_desc.load([kk * BLOCK_K, i_v * BLOCK_V])
            b_x = x_desc.load([kk * BLOCK_K, i_h * BLOCK_H])
            acc = _dot(b_d.T, b_x, acc, UPCAST)
        row0 = i_v * BLOCK_V
        col0 = i_h * BLOCK_H
        if EPILOGUE_PIECES == 2:
            HALF: tl.constexpr = BLOCK_H // 2
            a_0, a_1 = _column_halves(acc, HALF)
            _add_piece(c_desc, row0, col0, a_0, ACCUMULATE, REDUCE)
            _add_piece(c_desc, row0, col0 + HALF, a_1, ACCUMULATE, REDUCE)
        else:
            _add_piece(c_desc, row0, col0, acc, ACCUMULATE, REDUCE)
