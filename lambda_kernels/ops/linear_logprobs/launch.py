"""The LM-head pipelines: cuBLAS GEMMs per chunk of rows (and, in the vocab plan, per slab of the vocabulary), the
row kernels on the fp32 logits chunk in between. Plans and budgets: plan.py; vocabulary-parallel heads:
vocab_parallel.py; the Triton log-prob GEMM (the default on Hopper): lse_gemm.py.

Per chunk of M rows (the token plan; M from the logits budget: `plan.chunk_rows`, `plan.log_prob_pieces`):

    logits = X_c·Wᵀ                      fp32 output (torch.mm(..., out_dtype=float32) for bf16/fp16 on CUDA)
    row kernel                           lse, ℓ, H; or dlogits written over the chunk (in the GEMM input dtype)
    dX_c   = D·W                         rows of grad_hidden, one GEMM over V (fp32 accumulation inside cuBLAS)
    dW    += Dᵀ·X_c                      fp32 sum across chunks: the weight's grad itself when W is fp32, half in the
                                         grad's own bytes when W is bf16/fp16 (dw_sum.py)
    db    += Σ_rows D                    fp32

Only one logits chunk exists at a time. dlogits in bf16/fp16 are written into the first half of each fp32 row
(a strided view with row stride 2V that cuBLAS reads directly), so a chunk costs 4·M·V bytes in all.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton

from ..._core.runtime import interpreter_enabled
from ..real_tokens import gather_rows
from . import chunked_torch, dw_gemm
from .dw_sum import HalfHeadGradSum
from .gemm import Gemm
from .kernels import dlogits_rows_kernel, logprob_rows_kernel
from .logit_transform import LogitTransform
from .lse_gemm import LseGemm, emit_row_bytes, lse_gemm_pass, use_lse_gemm
from .plan import GradPlan, forward_budget_bytes, grad_plan, log_prob_pieces, piece_cap, pieces as _pieces


def row_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernels: 4096-wide tiles on GPU, whole small rows in the interpreter.

    A V not divisible by 16 gets 2048-wide tiles: its loads cannot be vectorised, and at 4096 the ptxas of triton
    3.6 (torch 2.11's) spilled the bias + entropy variant (tests/test_sm90_compile.py)."""
    cap = 2048 if interpreter_enabled() or V % 16 else 4096
    block = min(max(triton.next_power_of_2(V), 16), cap)
    return block, (8 if block >= 2048 else 4)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dlogits_view(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where a chunk's dlogits go: the fp32 logits buffer itself, or its first half per row for a 2-byte dtype."""
    if dtype == buf.dtype:
        return buf
    V = buf.shape[1]
    return buf.view(dtype)[:, :V]


# ------------------------------------------------------------------------------------------- row operations
def torch_rows(rows_impl: str, logits: torch.Tensor) -> bool:
    """Whether a chunk's row operations run in PyTorch (`chunked_torch`): asked for, or fp64 (kernels are fp32)."""
    return rows_impl == "torch" or logits.dtype == torch.float64


def logprob_rows(rows_impl: str, logits, bias, tgt, tf: LogitTransform, lp, lse, ent) -> None:
    """lp, lse (ent) [m] of a logits chunk [m, V]."""
    if torch_rows(rows_impl, logits):
        chunked_torch.logprob_rows(logits, bias, tgt, tf, lp, lse, ent)
        return
    M, V = logits.shape
    block, warps = row_config(V)
    logprob_rows_kernel[(M,)](
        logits, logits if bias is None else bias, tgt, lp, lse, lp if ent is None else ent, logits.stride(0), V,
        *tf.kernel_args(), HAS_BIAS=bias is not None, SOFTCAP=tf.capped, WITH_ENT=ent is not None, BLOCK_V=block,
        num_warps=warps)


def dlogits_rows(rows_impl: str, logits, bias, tgt, lse, ent, g_lp, g_ent, tf: LogitTransform, dl) -> None:
    """dl [m, V] ← dlogits of a chunk from the upstream grads g_lp (and g_ent, may be None) [m] fp32."""
    if torch_rows(rows_impl, logits):
        chunked_torch.dlogits_rows(logits, bias, tgt, lse, ent, g_lp, g_ent, tf, dl)
        return
    M, V = logits.shape
    block, warps = row_config(V)
    with_ent = g_ent is not None
    dlogits_rows_kernel[(M,)](
        logits, logits if bias is None else bias, tgt, lse, ent if with_ent else lse, g_lp,
        g_ent if with_ent else g_lp, dl, logits.stride(0), dl.stride(0), V, *tf.kernel_args(),
        HAS_BIAS=bias is not None, SOFTCAP=tf.capped, WITH_ENT_GRAD=with_ent, BLOCK_V=block, num_warps=warps)


# ------------------------------------------------------------------------------------------------ pipelines
def logprobs_forward(x, weight, bias, tgt, tf: LogitTransform, with_ent: bool, rows_impl: str, shard=None, rows=None):
    """(ℓ [n], lse [n], H [n] or None), fp32 (fp64 for fp64), from x [N, H], weight [V, H]; no gradient work.

    rows: None (every row of x, tgt [N]), or a `PendingRows` (tgt holds a target per entry of rows.positions, or per
    row of x when it has none): rows whose number n the host learns from the argument check's one device→host read.
    The pass queues its first chunk before it waits for that read (so the GPU has that GEMM to run meanwhile): always
    for every row of x (n = N), and for positions when there are at least two chunks' rows in all, as the first
    chunk is then the same for any n above one chunk (`log_prob_pieces`; if the real rows fit one chunk after all, it
    is redone as that chunk). Gathered rows go chunk by chunk into a chunk-sized buffer: no [n, H] copy.
    shard (`vocab_parallel.VocabShard`): weight/bias are this rank's rows of a vocabulary-parallel head; the
    statistics returned are the whole vocabulary's (collectives over shard.group).
    """
    if shard is not None:  # the collectives need n: the read is waited for first
        n = tgt.shape[0] if rows is None else rows.count()
        lp_r, lse_r, ent_r = logprobs_forward(x, weight, bias, shard.local_targets(tgt[:n]), tf, with_ent,
                                              rows_impl, rows=rows)
        return shard.combine(lp_r, lse_r, ent_r, tgt[:n])
    N = tgt.shape[0]  # the rows of tgt: n or more
    sdt = stats_dtype(x)
    lp = torch.empty((N,), dtype=sdt, device=x.device)
    lse = torch.empty((N,), dtype=sdt, device=x.device)
    ent = torch.empty((N,), dtype=sdt, device=x.device) if with_ent else None
    positions = None if rows is None else rows.positions
    pass_args = (x, weight, bias, tgt, tf, lp, lse, ent, positions is not None)
    cap, run = lse_gemm_pass(*pass_args) if use_lse_gemm(x, weight, rows_impl) else _cublas_pass(rows_impl, *pass_args)
    first = None
    if rows is not None and N > 0 and (positions is None or N >= 2 * cap):
        first = log_prob_pieces(N, cap)[0]
        run(first, positions)
    n = N if rows is None else rows.count()  # waits for the check (and raises on a bad id)
    index = None if rows is None else rows.rows()
    for sl in log_prob_pieces(n, cap):
        if sl != first:  # real rows that fit one piece: the first is redone as that piece (the pieces of a call on
            run(sl, index)  # just them)
    if n == N:  # whole tensors: autograd lets a caller modify the outputs in place (not views of a larger buffer)
        return lp, lse, ent
    return lp[:n], lse[:n], (None if ent is None else ent[:n])


def _cublas_pass(rows_impl: str, x, weight, bias, tgt, tf: LogitTransform, lp, lse, ent, gathered: bool):
    """(rows per chunk, run(rows slice, positions or None)) of the cuBLAS log-prob pass: fp32 logits chunk, then
    the row kernel, into lp/lse/ent[slice]. gathered: run takes positions, so rows go through a chunk buffer."""
    N, V = tgt.shape[0], weight.shape[0]
    cap = piece_cap(forward_budget_bytes() // (4 * V))
    gemm = Gemm(weight)
    buf = torch.empty((min(cap, N), V), dtype=lp.dtype, device=x.device)
    x_buf = torch.empty((min(cap, N), x.shape[1]), dtype=x.dtype, device=x.device) if gathered else None

    def run(sl: slice, positions) -> None:
        logits = buf[: sl.stop - sl.start]
        gemm.logits(gather_rows(x, positions, sl, x_buf), logits)
        logprob_rows(rows_impl, logits, bias, tgt[sl], tf, lp[sl], lse[sl], None if ent is None else ent[sl])

    return cap, run


def plan_for(x, weight, need_dx: bool, need_dw: bool, fp32_dx: bool = False, lse_known: bool = False,
             n: int | None = None, probs: bool = False, rows_impl: str = "triton") -> GradPlan:
    """The gradient plan (`plan.grad_plan`) of a pass over n rows (default: all N) of x [N, H] and weight [V, H];
    probs: its token chunks hold 2-byte rows from the Triton GEMM (`probs_row_bytes`): the probabilities it emits
    with their statistics, or with lse_known the dlogits it writes; rows_impl: the row backend (whether the dW sums
    may take the Triton dW GEMM, `dw_gemm.takes`)."""
    half = weight.dtype not in (torch.float32, torch.float64)
    return grad_plan(x.shape[0] if n is None else n, weight.shape[0], x.shape[1], dw_accumulator=need_dw and half,
                     dx_accumulator=need_dx and half, dx_sum_in_tokens=fp32_dx and need_dx and half,
                     lse_known=lse_known, gathered=x.element_size() * (2 if need_dx else 1), dw_forced=need_dw,
                     row_bytes=probs_row_bytes(weight.shape[0], not lse_known) if probs else None,
                     triton_dw=need_dw and dw_gemm.takes(weight, rows_impl))


def probs_row_stride(V: int) -> int:
    """Row stride (elements) of a chunk of 2-byte probabilities or dlogits: V up to a multiple of 16, so that every
    row starts 16-byte aligned (cuBLAS reads the dlogits as a GEMM operand) and Triton, which marks an integer
    argument divisible only by 16, knows it (vector stores in the GEMM's epilogue)."""
    return -(-V // 16) * 16


def probs_row_bytes(V: int, with_stats: bool = True) -> int:
    """What a token chunk through the Triton GEMM holds per row: its 2-byte row and, where it emits probabilities,
    the GEMM's per-row statistics (`lse_gemm.emit_row_bytes`; a chunk of dlogits has none)."""
    return 2 * probs_row_stride(V) + (emit_row_bytes(V) if with_stats else 0)


RowGradFn = Callable[[slice, slice, torch.Tensor, torch.Tensor], None]  # (rows, vocabulary columns, logits, dl)
# (rows, vocabulary columns, the rows' hidden states x_c, dl): a piece's dlogits straight from its hidden states
ChunkDlogitsFn = Callable[[slice, slice, torch.Tensor, torch.Tensor], None]


def grad_pipeline(x, weight, bias, row_fn: RowGradFn, need_dx: bool, need_dw: bool, need_db: bool,
                  pieces: int | list[slice], rows_impl: str, slab_cols: int | None = None, fp32_dx: bool = False,
                  cast_dw: bool = True, dw_rows: int | None = None, dw_out: torch.Tensor | None = None,
                  rows: torch.Tensor | None = None, live: torch.Tensor | None = None,
                  chunk_dlogits: ChunkDlogitsFn | None = None):
    """The token and vocab plans (and each pass of the split plan): per slab of `slab_cols` vocabulary rows (None:
    the whole vocabulary, the token plan) and per piece of rows (`pieces`: row slices in order, or a piece size),
    the fp32 logits, then `row_fn(rows, cols, logits, dl)` writes their dlogits into dl, then the GEMMs. rows_impl:
    the backend of the dW sum's cast.

    dW is summed over the pieces in fp32 (fp64 for fp64): for one slab that sum is the whole head's (the gradient
    itself for an fp32 head; for a half one a `dw_sum.HalfHeadGradSum`, half of it in the gradient's own bytes, cast
    in place at the end); for several, a slab's dW is final after its pieces, so a half head needs one slab-sized
    fp32 buffer, cast into the gradient slab by slab. dX is written per piece for one slab and summed over slabs in
    fp32 for several (or when fp32_dx asks for it).
    Returns (dX [N, H] in x's dtype, fp32 with fp32_dx; dW [V, H] in weight's dtype, or with cast_dw=False the
    uncast `HalfHeadGradSum` where there is one (the caller scales and casts it in one pass later); db [V] in bias's
    dtype), None where not needed. The first piece of each dW sum is written, not added, so no accumulator is
    zero-filled.
    dw_rows (the split plan's chunks, one slab): dW is summed for the vocabulary rows [0, dw_rows) only; the
    gradient's other rows are left for the tail pass. dw_out (its tail pass): the weight-dtype gradient the slabs'
    dW is cast into, instead of a new one.
    rows: None (the pass is over every row of x), or the positions [n] in x of the rows it is over (the real tokens):
    `pieces` then cut [0, n), each piece's rows are gathered into a piece-sized buffer (no [n, H] copy of x), and dX
    comes back for every row of x, 0 at the others (scattered piece by piece, or at the end when summed in fp32).
    `pieces` may then also be an iterable with a `most` attribute (its largest piece), whose later pieces the host
    learns while the GPU runs the first (`fused_loss.launch._PiecesAhead`). live (with rows, bool per entry of rows):
    the entries that are real rows; the others (filler of a pass that runs ahead of the count of real rows) go to
    the GEMMs as zeros, so that with dlogits 0 from row_fn they add exactly 0 whatever their hidden states hold.
    chunk_dlogits (a half head): instead of the cuBLAS logits and row_fn, `chunk_dlogits(rows, cols, x_c, dl)`
    writes a piece's dlogits [m, cols] (x's dtype) from its hidden states x_c: the fused loss's chunks through the
    probability-emitting Triton GEMM, or the Triton GEMM's dlogits epilogue where the rows' lse is known
    (`slab_dlogits_gemm`); their buffer holds 2 bytes a logit (`probs_row_stride`), not 4.
    """
    assert live is None or rows is not None, "live rows need gathered rows: x itself is never written"
    H = x.shape[1]
    N = x.shape[0] if rows is None else rows.shape[0]
    V = weight.shape[0]
    sdt = stats_dtype(x)
    pieces = _pieces(N, pieces) if isinstance(pieces, int) else pieces
    slabs = _pieces(V, slab_cols or V)
    sum_dx = fp32_dx or len(slabs) > 1
    most = getattr(pieces, "most", None) or max((sl.stop - sl.start for sl in pieces), default=0)
    x_buf = torch.empty((most, H), dtype=x.dtype, device=x.device) if rows is not None else None
    dx = dx_buf = dw = dw_slab = dw_sum = db = None
    if need_dx:
        if sum_dx:
            dx = torch.zeros((N, H), dtype=sdt, device=x.device)
        elif rows is None:
            dx = torch.empty_like(x)
        else:  # each piece's dX goes through a piece-sized buffer into its rows of x
            dx, dx_buf = torch.zeros_like(x), torch.empty((most, H), dtype=x.dtype, device=x.device)
    if need_dw:
        if weight.dtype == sdt:  # the sum is the gradient (a forced split plan's tail: its rows of dw_out)
            dw = torch.empty(weight.shape, dtype=sdt, device=weight.device) if dw_out is None else dw_out
        elif len(slabs) > 1 or dw_out is not None:
            dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if dw_out is None else dw_out
            dw_slab = torch.empty((slabs[0].stop, H), dtype=sdt, device=weight.device)
        else:
            dw_sum = HalfHeadGradSum.allocate(weight, dw_rows)
    if need_db:
        db = torch.zeros((V,), dtype=sdt, device=x.device)
    # one piece of gathered rows over several slabs (the vocab plan's usual case, the split plan's tail): gathered
    # once, not once per slab
    gather_once = rows is not None and isinstance(pieces, list) and len(pieces) == 1
    x_c = None
    assert chunk_dlogits is None or x.element_size() == 2, "2-byte dlogits need a half hidden"
    if N > 0:
        stride = probs_row_stride(slabs[0].stop) if chunk_dlogits is not None else slabs[0].stop
        buf = torch.empty((most * stride,), dtype=sdt if chunk_dlogits is None else x.dtype, device=x.device)
        logits = None
        for sv in slabs:
            gemm = Gemm(weight[sv], triton_dw=rows_impl == "triton")
            cols = sv.stop - sv.start
            # (columns of the slab's dlogits, the fp32 sum of their dW rows)
            sums = []
            if need_dw:
                summed = cols if dw_rows is None else dw_rows  # (dw_rows: one slab, the split plan's chunks)
                sums = dw_sum.parts() if dw_sum is not None else [
                    (slice(0, summed), dw[sv][:summed] if dw_slab is None else dw_slab[:summed])]
            for i, sl in enumerate(pieces):
                m = sl.stop - sl.start
                if x_c is None or not gather_once:
                    x_c = gather_rows(x, rows, sl, x_buf)
                if live is not None:
                    x_c.masked_fill_(~live[sl, None], 0)  # (x_c is x_buf's: x itself is never written)
                if chunk_dlogits is not None:
                    dl = buf[: m * stride].view(m, stride)[:, :cols]
                    chunk_dlogits(sl, sv, x_c, dl)
                else:
                    logits = buf[: m * cols].view(m, cols)
                    gemm.logits(x_c, logits)
                    dl = dlogits_view(logits, x.dtype if gemm.half else sdt)
                    row_fn(sl, sv, logits, dl)
                if need_dx:
                    if sum_dx:
                        gemm.dx_accumulate(dx[sl], dl)
                    elif rows is None:
                        gemm.dx(dl, dx[sl])
                    else:
                        gemm.dx(dl, dx_buf[:m])
                        dx.index_copy_(0, rows[sl], dx_buf[:m])
                for cols_d, acc in sums:
                    (gemm.dw_accumulate if i else gemm.dw_write)(acc, dl[:, cols_d], x_c)
                if need_db:
                    db[sv] += dl.sum(dim=0, dtype=sdt)
            if dw_slab is not None:
                dw[sv].copy_(dw_slab[:cols])
        del buf, logits, dl, x_c
    elif need_dw:  # no rows: no piece wrote it
        for _, acc in (dw_sum.parts() if dw_sum is not None else [(None, dw)]):
            acc.zero_()
    del x_buf, dx_buf
    if dw_sum is not None:
        dw = dw_sum.finish(rows_impl) if cast_dw else dw_sum
    if dx is not None and not fp32_dx:
        dx = _cast(dx, x)
    if dx is not None and sum_dx and rows is not None:  # the fp32 sum was over the gathered rows
        dx = torch.zeros((x.shape[0], H), dtype=dx.dtype, device=x.device).index_copy_(0, rows, dx)
    return dx, dw, _cast(db, bias)


def split_pipeline(x, weight, bias, row_fn: RowGradFn, tail_row_fn: RowGradFn, need_dx: bool, need_db: bool,
                   pieces: int | list[slice], rows_impl: str, plan: GradPlan, rows: torch.Tensor | None = None,
                   live: torch.Tensor | None = None, tail_rows: Callable[[], torch.Tensor | None] | None = None,
                   chunk_dlogits: ChunkDlogitsFn | None = None, tail_dlogits: ChunkDlogitsFn | None = None):
    """The split plan (plan.py) for a half head's dX, dW (and db): `grad_pipeline` over the token pieces gives dX,
    db and the dW rows [0, plan.dw_rows), cast in place; then the tail pass casts the other dW rows into the same
    gradient, from vocabulary slabs of all rows whose dlogits `tail_row_fn(rows, cols, logits, dl)` forms (cols: a
    slice of the whole vocabulary) from what the pieces' row_fn left behind (each row's lse and token gradient).
    rows, live: as in grad_pipeline (both passes gather their pieces); tail_rows, asked for after the chunks: the
    tail's rows instead of `rows` (those of a chunk pass that ran ahead of the count, known by then); chunk_dlogits:
    the token pieces' dlogits instead of row_fn's (grad_pipeline); tail_dlogits: the tail's instead of
    tail_row_fn's (cols, as tail_row_fn's, of the whole vocabulary: `slab_dlogits_gemm`). Returns (dX, dW, db) as
    grad_pipeline does, dW always cast."""
    dx, dw, db = grad_pipeline(x, weight, bias, row_fn, need_dx, True, need_db, pieces, rows_impl, cast_dw=True,
                               dw_rows=plan.dw_rows, rows=rows, live=live,
                               chunk_dlogits=chunk_dlogits)  # (cast before the tail's rows)
    v0 = plan.dw_rows
    if v0 < weight.shape[0]:
        def tail_slab(sl, sv, logits, dl):  # sv counts from v0
            tail_row_fn(sl, slice(v0 + sv.start, v0 + sv.stop), logits, dl)

        def tail_chunk(sl, sv, x_c, dl):
            tail_dlogits(sl, slice(v0 + sv.start, v0 + sv.stop), x_c, dl)

        grad_pipeline(x, weight[v0:], None, tail_slab, False, True, False, plan.tail.rows, rows_impl,
                      slab_cols=plan.tail.cols, dw_out=dw[v0:], rows=rows if tail_rows is None else tail_rows(),
                      chunk_dlogits=None if tail_dlogits is None else tail_chunk)
    return dx, dw, db


def _cast(grad, like):
    return grad if grad is None or grad.dtype == like.dtype else grad.to(like.dtype)


def slab_dlogits(rows_impl: str, bias, tgt, lse, ent, g_lp, g_ent, tf: LogitTransform) -> RowGradFn:
    """The row function of a pass whose rows' lse (and H) and upstream gradients are known: dlogits of any rows and
    any vocabulary slab (the one-hot term only on rows whose target lies in the slab). ent, g_ent may be None."""
    def row_fn(sl, sv, logits, dl):
        dlogits_rows(rows_impl, logits, None if bias is None else bias[sv],
                     tgt[sl] if sv.start == 0 else tgt[sl] - sv.start, lse[sl], None if ent is None else ent[sl],
                     g_lp[sl], None if g_ent is None else g_ent[sl], tf, dl)
    return row_fn


def slab_dlogits_gemm(weight, bias, tgt, lse, ent, g_lp, g_ent, tf: LogitTransform) -> ChunkDlogitsFn:
    """`slab_dlogits` through the Triton GEMM (`LseGemm.run_dlogits`): the dlogits of any rows and vocabulary slab
    straight from their hidden states, without fp32 logits (a GEMM per slab of the head, its rows a view of it).
    lse, g_lp (ent, g_ent) are read at the first call: a split plan's chunks fill them before its tail runs."""
    with_ent = g_ent is not None
    stats, gemms = [], {}

    def chunk_fn(sl, sv, x_c, dl):
        if not stats:  # [2 or 4, n] fp32, unit stride along the rows, as the epilogue reads them
            stats.append(torch.stack([lse, g_lp] + ([ent, g_ent] if with_ent else [])).to(torch.float32))
        key = (sv.start, sv.stop)
        if key not in gemms:
            gemms[key] = LseGemm(weight[sv], None if bias is None else bias[sv], tf, with_ent, 0, dlogits=True)
        gemms[key].run_dlogits(x_c, tgt[sl] if sv.start == 0 else tgt[sl] - sv.start, stats[0][:, sl], dl)
    return chunk_fn


def logprobs_backward(x, weight, bias, tgt, lse, ent, g_lp, g_ent, tf: LogitTransform, rows_impl: str,
                      need_dx: bool, need_dw: bool, need_db: bool, shard=None, cast_dw: bool = True,
                      rows: torch.Tensor | None = None):
    """Gradients of Σ g_lp·ℓ + g_ent·H w.r.t. x, weight, bias by recomputing the logits, in the plan that fits.

    cast_dw=False: dW may come back as its fp32 sum (see `grad_pipeline`). rows: None (tgt, lse, ... are per row
    of x), or the positions [n] in x of the rows they are for: the passes gather those rows piece by piece, and dX
    comes back for every row of x, 0 at the others.

    shard: a vocabulary-parallel head (lse and H are the whole vocabulary's): this rank's dW/db rows, and dX summed
    over the group in fp32.
    """
    sdt = stats_dtype(x)
    g_lp = g_lp.to(sdt).contiguous()
    g_ent = None if g_ent is None else g_ent.to(sdt).contiguous()
    tgt = tgt if shard is None else shard.local_targets(tgt)
    fp32_dx = shard is not None
    x_all, gather = x, rows
    if shard is not None and rows is not None:  # the group sums dX of the gathered rows only: one copy of them
        x, gather = x.index_select(0, rows), None
    # where the log-prob pass took the Triton GEMM, every piece and slab takes it too, its epilogue writing dlogits
    triton_chunks = shard is None and use_lse_gemm(x, weight, rows_impl)
    plan = plan_for(x, weight, need_dx, need_dw, fp32_dx, lse_known=True, n=tgt.shape[0], probs=triton_chunks,
                    rows_impl=rows_impl)

    row_fn = slab_dlogits(rows_impl, bias, tgt, lse, ent, g_lp, g_ent, tf)
    chunk_fn = slab_dlogits_gemm(weight, bias, tgt, lse, ent, g_lp, g_ent, tf) if triton_chunks else None
    if plan.kind == "split":
        dx, dw, db = split_pipeline(x, weight, bias, row_fn, row_fn, need_dx, need_db, plan.rows, rows_impl, plan,
                                    gather, chunk_dlogits=chunk_fn, tail_dlogits=chunk_fn)
    else:
        dx, dw, db = grad_pipeline(x, weight, bias, row_fn, need_dx, need_dw, need_db, plan.rows, rows_impl,
                                   plan.cols if plan.kind == "vocab" else None, fp32_dx, cast_dw, rows=gather,
                                   chunk_dlogits=chunk_fn)
    if shard is not None and need_dx:
        dx = _cast(shard.sum_partial_dx(dx), x)
        if rows is not None:
            dx = torch.zeros_like(x_all).index_copy_(0, rows, dx)
    return dx, dw, db
