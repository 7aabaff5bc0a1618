"""How a call cuts its work into pieces that fit the memory budgets: token chunks, or vocabulary slabs.

Two budgets, read from the environment on every call ("1G", "256M", "65536"):

    LAMBDA_KERNELS_LOGITS_BUDGET   bytes of one fp32 logits chunk (default 1 GiB)
    LAMBDA_KERNELS_MEMORY_BUDGET   bytes of all the workspace of a call: logits chunks *and* fp32 accumulators
                                   (default 960 MiB: 1 GiB less 64 MiB for what the plans do not count, per-token
                                   vectors and the allocator's rounding; "none": no cap beyond the logits budget,
                                   which lets a half head's token plan hold its 2·V·H-byte dW sum, the fastest)
    LAMBDA_KERNELS_GRAD_PLAN       "auto" (default), or "tokens" / "vocab" / "split" to force a plan

A token chunk holds 4·V bytes per row of fp32 logits, or, for the fused loss's chunks through the Triton GEMM that
emits 2-byte probabilities (`grad_plan(row_bytes=)`, `launch.probs_row_bytes`), about half that: both budgets
count those bytes, so the same budget holds about twice the rows.

Workspace counts the logits buffers, the fp32 dX/dW sums beyond the gradients returned (a half head's token-plan
dW sum keeps half of itself in its gradient's bytes: `dw_sum`) and the buffers of rows gathered out of the padding
with their dX (`_token_reserve`, at the hidden's element size; `_slab_rows_bytes`, at a half hidden's: an fp32/fp64
hidden takes the vocab plan only when forced, or under a budget below one row of logits); besides them a call holds
per-token vectors and the fp32 bias gradient sum (4·V bytes). fp64 logits take twice the bytes, and the PyTorch row
fallback (`impl="torch"`) a few chunk-sized temporaries more.

Gradient plans (the forward-only log-prob pass is always token chunks):

    tokens  chunks of M rows, logits [M, V] each; dX of a chunk is one GEMM over V; dW += Dᵀ·X_c across chunks in
            fp32, which for a bf16/fp16 head is a 4·V·H sum, half of it in the gradient's own bytes, so 2·V·H bytes
            beside the chunk (1.0 GiB at H3584, V152064; `dw_sum`). On-policy this is one pass: 6·N·H·V FLOPs.
    vocab   the log-sum-exp of every row first (the forward pass), then slabs of C vocabulary rows, logits [N, C]
            for all rows (or [M, C] pieces): dW of a slab is complete after its rows, so the fp32 accumulator is one
            slab (4·C·H); dX is summed over slabs in fp32 (4·N·H for a bf16/fp16 hidden, and up to 2·N·H for
            the rows gathered out of the padding). 8·N·H·V FLOPs.
    split   the token plan, but its chunks sum dW only for the vocabulary rows [0, V_t): the first half of them in
            the gradient's own bytes, the rest in 4·(V_t − V/2)·H bytes beside the chunk; then a tail pass, the
            vocab plan over rows [V_t, V) without dX, from the lse and token gradients the chunks left behind.
            (8·V − 2·V_t)·N·H FLOPs, one pass for dX and the on-policy loss: between the two others where the
            log-sum-exp is not yet known (the fused loss's one-pass paths); a backward that has it (after a log-prob
            pass) does the vocab plan's slabs alone, 6·N·H·V, so split is its choice only where the vocab plan's fp32
            dX sum does not fit (a long row of a wide hidden). Auto picks it for half heads only (an fp32 head's dW
            sum is its gradient: nothing to split); forced, an fp32 head's chunks write rows [0, V_t) of its
            gradient and the tail the rest, so that the tests run every row function of the tail on fp32 heads.

Why three: dW = Σ_rows dlogitsᵀ·x needs every row's log-sum-exp before any row's dlogits, and the log-sum-exp needs
the whole vocabulary. Summing a vocabulary row's dW over rows in fp32 therefore costs either fp32 room for it across
the chunks (tokens) or a second pass over its logits (vocab); split does the first for as many rows as the budget
holds and the second for the others. Without a memory budget ("none") the token plan runs. With one, the plan that
`modelled_seconds` rates fastest: a model of an H100's GEMM rate, copy bandwidth and dW-sum traffic that reproduces
run 3's kernel times of both measured plans within 7% (benchmarks/RESULTS.md), not a sweep.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

from ..._core.runtime import env_choice

BUDGET_ENV = "LAMBDA_KERNELS_LOGITS_BUDGET"
MEMORY_BUDGET_ENV = "LAMBDA_KERNELS_MEMORY_BUDGET"
DEFAULT_BUDGET = 1 << 30  # 1 GiB of fp32 logits per chunk
# All the workspace of a call, by default: the issue's "≤ 1 GiB extra", less what the plans' accounting leaves out
DEFAULT_MEMORY_BUDGET = (1 << 30) - (64 << 20)
NO_MEMORY_BUDGET = ("none", "unbounded")
PLAN_ENV = "LAMBDA_KERNELS_GRAD_PLAN"
PLAN_CHOICES = ("auto", "tokens", "vocab", "split")
# Token chunks under a memory budget have at least this many rows: thinner GEMMs lose tensor-core efficiency, which
# `modelled_seconds` does not know.
TOKEN_PLAN_MIN_ROWS = 512
# The rates plans are rated by (`modelled_seconds`; only their ratios matter): an H100's bf16 matmul rate and copy
# bandwidth (benchmarks/RESULTS.md, run 3), and the share of a chunk's fp32 dW read+write that its GEMM does not
# hide: 0.4–0.7 in run 3's profiles of the cuBLAS chunks at 1.5B and 7B (the model then reproduced their kernel
# times within 7%). Chunks of 2-byte probabilities from the Triton GEMM (`GradPlan.row_bytes`) take their own
# constant: cuBLAS's accumulating dW GEMM reads its fp32 tile after the main loop, and in run 6's 7B profile its
# two halves took the sum of their matmul and traffic times (1.48 + 0.73 ms per 1280-row chunk); planned with 1
# instead of 0.5, run 6 measured 3% (7B) and 7% (8B) less time, from fewer, bigger chunks (the on-policy 1.5B
# plans, for all 8192 rows, are the same under both; with fewer rows the choice between the token plan and a split
# plan may move).
MATMUL_RATE = 703e12
COPY_RATE = 3.0e12
DW_TRAFFIC_EXPOSED = 0.5
DW_TRAFFIC_EXPOSED_PROBS = 1.0
# dW sums through the Triton GEMM (`dw_gemm`, opt-in, either kind of chunk; `grad_plan(triton_dw=)`): its TMA
# reductions run beside the next tiles' main loops, its epilogue does not. Half is a guess (a quarter halved the 7B
# chunks to 1024 rows); run 7 found the plans it picks at 7B and 8B (1408 / 1664-row chunks) slower than the
# default's (benchmarks/RESULTS.md), and the GEMM itself slower than cuBLAS's, so it was not fit further.
DW_TRAFFIC_EXPOSED_TRITON = 0.5
MIN_SLAB_COLS = 128  # narrower slabs make GEMMs too thin; the vocab plan then cuts rows as well
# A log-prob pass's first piece when it has several (`log_prob_pieces`): its GEMM runs while the host waits for the
# id check, so it must outlast that wait (512 rows: ~0.3 / 0.8 ms at H1536 / H3584, V152k on an H100), and it is
# redone when the real tokens turn out to fit one piece, so it should be cheap.
FIRST_PIECE_ROWS = 512
SPLIT_ALIGN = 8  # `split_rows` a multiple of 8: the dlogits columns from there start 16-byte aligned for cuBLAS
# A budget's split point V_t a multiple of 128: the chunks' dW rows [split_rows, V_t) and the tail's slabs then have
# widths whose rows are 16-byte multiples, which cuBLAS's sm_90 kernels need (an H100 ran V_t = 150282 on an sm_80
# CUTLASS kernel for both, 2026-11-27)
DW_ROWS_ALIGN = 128


def _parse_bytes(name: str, raw: str, alternative: str = "") -> int:
    match = re.fullmatch(r"(\d+)\s*([kKmMgG]?)(i?[bB])?", raw)
    if match is None:
        raise RuntimeError(f"{name} must be a byte count such as 1073741824, 512M or 1G{alternative}; got {raw!r}.")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(match.group(1)) * scale


def logits_budget_bytes() -> int:
    """Bytes of fp32 logits one chunk may hold: env LAMBDA_KERNELS_LOGITS_BUDGET, else 1 GiB."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    return _parse_bytes(BUDGET_ENV, raw) if raw else DEFAULT_BUDGET


def memory_budget_bytes() -> int | None:
    """Bytes of workspace (logits and accumulators) a call may hold: env LAMBDA_KERNELS_MEMORY_BUDGET, else
    DEFAULT_MEMORY_BUDGET; None for "none" (no cap beyond the logits budget)."""
    raw = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if raw.lower() in NO_MEMORY_BUDGET:
        return None
    return _parse_bytes(MEMORY_BUDGET_ENV, raw, ' or "none"') if raw else DEFAULT_MEMORY_BUDGET


def forward_budget_bytes() -> int:
    """The logits chunk of a forward (log-prob) pass: the logits budget, capped by the memory budget."""
    memory = memory_budget_bytes()
    logits = logits_budget_bytes()
    return logits if memory is None else min(logits, memory)


def split_rows(V: int) -> int:
    """Vocabulary rows of a half head whose fp32 dW sums fit in its [V, H] gradient's own bytes: ⌊V/2⌋, aligned
    down to SPLIT_ALIGN."""
    return V // 2 // SPLIT_ALIGN * SPLIT_ALIGN


def rest_bytes(V: int, H: int) -> int:
    """Workspace of a half head's token-plan dW sum beside its gradient: the fp32 rows [split, V) (`dw_sum`)."""
    return 4 * (V - split_rows(V)) * H


def piece_cap(cap: int) -> int:
    """The most rows (or columns) a piece of ≤ `cap` holds: at least 1, a multiple of 128 once ≥ 256 (cuBLAS tiles)."""
    cap = max(1, cap)
    return cap // 128 * 128 if cap >= 256 else cap


def split_size(total: int, cap: int) -> int:
    """Size of the equal parts that cut `total` into as few pieces of ≤ `cap` as possible.

    Multiples of 128 once the cap is ≥ 256 (cuBLAS tiles); balanced, so the last piece is not a sliver.
    """
    cap = piece_cap(cap)
    if total <= cap:
        return max(total, 1)
    n_parts = -(-total // cap)
    size = -(-total // n_parts)
    if cap >= 256:
        size = -(-size // 128) * 128
    return min(cap, size)


def pieces(total: int, size: int) -> list[slice]:
    """[0, total) cut into consecutive slices of `size` (the last may be shorter)."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def first_piece_rows(cap: int) -> int:
    """Rows of a log-prob pass's first piece when it has more than one: FIRST_PIECE_ROWS, or half the cap if that is
    smaller (so the rest is never a sliver: it holds more than half a cap)."""
    return max(1, min(FIRST_PIECE_ROWS, piece_cap(cap) // 2))


def log_prob_pieces(total: int, cap: int) -> list[slice]:
    """[0, total) in pieces of ≤ `cap` rows (`piece_cap`): one when it fits, else a first piece of
    `first_piece_rows(cap)` rows and the rest balanced (`split_size`); that rest holds more than half a cap, so the
    short first piece leaves no sliver behind it.

    The first piece is the same for every total above the cap, so a pass that learns its number of rows late (the
    real tokens of a batch, counted on the device) can queue that piece's GEMM before the host knows the number.
    """
    cap = piece_cap(cap)
    if total <= cap:
        return [slice(0, total)] if total else []
    first = first_piece_rows(cap)
    rest = total - first
    return [slice(0, first)] + [slice(first + sl.start, first + sl.stop) for sl in pieces(rest, split_size(rest, cap))]


def chunk_rows(N: int, V: int, budget: int | None = None, row_bytes: int | None = None) -> int:
    """Rows per logits chunk [rows, V] of a gradient pass within `budget` bytes (default `forward_budget_bytes()`),
    balanced over N; row_bytes: what a chunk holds per row (default 4·V, fp32 logits). (A log-prob pass cuts its
    chunks with `log_prob_pieces`.)"""
    budget = forward_budget_bytes() if budget is None else budget
    return split_size(N, budget // (row_bytes or 4 * max(V, 1)))


@dataclass(frozen=True)
class GradPlan:
    """kind "tokens": chunks of `rows` rows over the whole vocabulary (cols = V); "vocab": slabs of `cols`
    vocabulary rows, each over the rows in pieces of `rows` (rows = N when a slab of all rows fits); "split":
    token chunks as "tokens" summing dW for the vocabulary rows [0, dw_rows) only, then `tail` (a vocab plan over
    the rows [dw_rows, V), without dX).

    max_rows: the most rows a chunk may hold (`rows` is that, balanced over N); chunks cut along sequences use it.
    row_bytes: what a token chunk holds per row (0: 4·cols of fp32 logits; the fused loss's chunks through the
    probability-emitting Triton GEMM hold 2-byte probabilities and per-range statistics instead, `lse_gemm`).
    """

    kind: str
    rows: int
    cols: int
    max_rows: int = 0
    dw_rows: int = 0
    tail: "GradPlan | None" = None
    row_bytes: int = 0

    def chunk_bytes(self) -> int:
        """Bytes of a token chunk's logits (or probabilities) buffer at its largest."""
        return max(self.rows, self.max_rows) * (self.row_bytes or 4 * self.cols)

    def split_phase_bytes(self, N: int, V: int, H: int) -> tuple[int, int]:
        """A split plan's workspace while its chunks run (logits, fp32 dW rows beyond the gradient's bytes) and
        then while its tail runs (the chunks' sums are cast before it)."""
        chunks = self.chunk_bytes() + 4 * (self.dw_rows - split_rows(V)) * H
        return chunks, self.tail.workspace_bytes(N, V - self.dw_rows, H, True, False)

    def workspace_bytes(self, N: int, V: int, H: int, dw_accumulator: bool, dx_accumulator: bool) -> int:
        """Bytes this plan holds at once besides the gradients it returns (outputs and per-row stats aside): logits,
        fp32 sums, and the rows a vocabulary pass gathers out of the padding (a token chunk's gather buffers are
        `_token_reserve`'s)."""
        # (chunks cut along whole sequences may hold up to max_rows rows)
        logits = self.chunk_bytes()
        if self.kind == "tokens":
            return logits + (rest_bytes(V, H) if dw_accumulator else 0)
        if self.kind == "split":
            return max(self.split_phase_bytes(N, V, H))
        return logits + (4 * self.cols * H if dw_accumulator else 0) + _slab_rows_bytes(N, H, dw_accumulator,
                                                                                        dx_accumulator)


def plan_choice() -> str:
    """LAMBDA_KERNELS_GRAD_PLAN: "auto" (default: by the budgets), "tokens", "vocab" or "split" (forced, e.g. to
    compare or test)."""
    return env_choice(PLAN_ENV, PLAN_CHOICES, "auto")


def grad_plan(N: int, V: int, H: int, *, dw_accumulator: bool, dx_accumulator: bool,
              dx_sum_in_tokens: bool = False, lse_known: bool = False, gathered: int | None = None,
              dw_forced: bool = False, row_bytes: int | None = None, triton_dw: bool = False) -> GradPlan:
    """The plan of a gradient pass over N rows, a [V, H] head.

    dw_accumulator: dW is needed and the head is bf16/fp16 (its fp32 sum is not the gradient tensor itself);
    dx_accumulator: the same for dX and the hidden states (only the vocab plan sums dX across pieces);
    dx_sum_in_tokens: the token plan keeps dX in fp32 too (a vocabulary-parallel head sums it over ranks, from one
    gathered copy of the rows; no split plan then); lse_known: the caller has every row's log-sum-exp already (a
    backward after a log-prob pass), so the vocab plan needs no log-prob pass of its own and the split plan, which
    recomputes more logits, wins only where the vocab plan's fp32 dX sum does not fit (long rows); gathered: the
    bytes per row and hidden unit of a token chunk's gather buffers (`_token_reserve`; default: a half hidden's);
    row_bytes: what a token chunk holds per row (default 4·V: fp32 logits; the vocab plan's slabs are sized for
    those, also where the Triton GEMM writes 2-byte dlogits into them); triton_dw: the dW sums take the Triton dW
    GEMM (`dw_gemm.takes`), which the cost model rates by its own constant.
    Auto: the token plan without a memory budget, where a budget leaves no fp32 sum to hold (an fp32 or frozen
    head), or where it fits the budget with the logits budget's chunks; else the fastest by `modelled_seconds` of the
    plans that fit (token chunks of ≥ TOKEN_PLAN_MIN_ROWS rows, or the logits budget's if it allows fewer).
    """
    memory = memory_budget_bytes()
    logits = logits_budget_bytes()
    acc = (rest_bytes(V, H) if dw_accumulator else 0) + (6 * N * H if dx_sum_in_tokens else 0)
    if gathered is None:
        gathered = 4 if dx_accumulator else 2
    row = row_bytes or 4 * max(V, 1)
    choice = plan_choice()
    # a forced split plan splits an fp32 head's dW too (tests run its row functions on fp32 heads); auto: a half's
    split_dw = dw_accumulator or (choice == "split" and dw_forced)
    if choice == "split" and (not split_dw or dx_sum_in_tokens):
        choice = "tokens"  # no dW to split (or dX summed across ranks, which the split plan does not do)
    if choice == "tokens" or choice == "auto" and memory is None:
        return _token_plan(N, V, max(forward_budget_bytes() if choice == "tokens" else logits, row), row)
    if choice == "auto":  # a budget that does not bind changes nothing: the plan without one, where it fits
        free = _token_plan(N, V, max(logits, row), row)
        if free.chunk_bytes() + acc + _token_reserve(free.max_rows, H, gathered) <= memory:
            return free
        if acc == 0 and memory >= row:  # no fp32 sum (an fp32 or frozen head): shorter chunks within the budget
            return _token_plan(N, V, max(min(logits, memory // (row + _token_reserve(1, H, gathered)) * row),
                                         row), row)
    if choice == "auto" and dx_sum_in_tokens and memory - acc >= row * min(N, TOKEN_PLAN_MIN_ROWS):
        return _token_plan(N, V, min(logits, memory - acc), row)  # (no split plan for an fp32 dX sum)
    if choice == "vocab" or dx_sum_in_tokens or not split_dw:
        return _vocab_plan(N, V, H, memory, logits, dw_accumulator, dx_accumulator)
    if choice == "split":  # forced (tests, comparisons): the forward pass's chunks, V_t as the budget allows, a tail
        chunk = _token_plan(N, V, max(forward_budget_bytes(), row), row)
        room = 0 if memory is None else memory - chunk.chunk_bytes()
        return _split_plan(N, V, H, chunk, min(V - 1, split_rows(V) + max(room, 0) // (4 * H)), memory, logits)
    fitting = [p for p in _budget_candidates(N, V, H, memory, logits, dx_accumulator, gathered, row)
               if _held_bytes(p, N, V, H, dx_accumulator, gathered) <= memory]
    if not fitting:  # only a thin vocab plan can get close: it warns
        return _vocab_plan(N, V, H, memory, logits, dw_accumulator, dx_accumulator)
    return min(fitting, key=lambda p: modelled_seconds(p, N, V, H, lse_known, triton_dw))


def _held_bytes(p: GradPlan, N: int, V: int, H: int, dx_accumulator: bool, gathered: int) -> int:
    """The most a half head's plan p holds at once: its workspace, plus a token chunk's gather buffers while the
    chunks run (a split plan's tail runs after them, with its own gathered rows)."""
    if p.kind == "vocab":
        return p.workspace_bytes(N, V, H, True, dx_accumulator)
    reserve = _token_reserve(p.max_rows, H, gathered)
    if p.kind == "tokens":
        return p.workspace_bytes(N, V, H, True, dx_accumulator) + reserve
    chunks, tail = p.split_phase_bytes(N, V, H)
    return max(chunks + reserve, tail)


def _token_reserve(rows: int, H: int, gathered: int) -> int:
    """What a token chunk of `rows` rows holds besides the plan's workspace: its rows gathered out of the padding,
    and with dX their dX before the scatter back (`launch.grad_pipeline`'s piece buffers, in the hidden's dtype;
    the vocab plan counts its own), `gathered` bytes per row and hidden unit: the hidden's element size, twice that
    with dX (`launch.plan_for`)."""
    return gathered * rows * H


def _budget_candidates(N: int, V: int, H: int, memory: int, logits: int, dx_accumulator: bool,
                       gathered: int, row: int) -> list[GradPlan]:
    """Plans a half head with a dW sum may take under a memory budget: the vocab plan; token chunks of every size
    from TOKEN_PLAN_MIN_ROWS up (128-row steps, or ~24 sizes when that is too many), each with the dW rows
    [0, V_t) the rest of the budget holds, which is the token plan where V_t reaches V and a split plan below."""
    candidates = [_vocab_plan(N, V, H, memory, logits, True, dx_accumulator, warn=False)]
    held = row + _token_reserve(1, H, gathered)  # bytes per row of a chunk
    cap = min(piece_cap(logits // row), piece_cap(memory // held))
    low = min(N, TOKEN_PLAN_MIN_ROWS, piece_cap(logits // row))  # (a logits budget for thinner chunks: as asked)
    if cap < max(low, 1):
        return candidates
    step = 128 if (cap - low) // 128 <= 24 else -(-(cap - low) // 24)
    sizes = set(range(piece_cap(max(low, 128)), cap + 1, step)) | {cap, piece_cap((memory - rest_bytes(V, H)) // held)}
    for rows in sorted(r for r in sizes if max(low, 1) <= r <= cap):
        chunk = _token_plan(N, V, rows * row, row)
        room = memory - _token_reserve(chunk.max_rows, H, gathered) - chunk.chunk_bytes()
        dw_rows = aligned_dw_rows(V, split_rows(V) + room // (4 * H)) if room >= 0 else -1
        if dw_rows == V:
            candidates.append(chunk)
        elif dw_rows >= 0:  # (with lse known the vocab plan does less of the same work where it fits)
            candidates.append(_split_plan(N, V, H, chunk, dw_rows, memory, logits))
    return candidates


def aligned_dw_rows(V: int, dw_rows: int) -> int:
    """The split point a budget's `dw_rows` of fp32 dW rows gives: V where they all fit (the token plan), else
    dw_rows down to a multiple of DW_ROWS_ALIGN, and never below `split_rows(V)` (the rows the gradient's own bytes
    hold, which cost nothing)."""
    if dw_rows >= V:
        return V
    return max(split_rows(V), dw_rows // DW_ROWS_ALIGN * DW_ROWS_ALIGN)


def _token_plan(N: int, V: int, chunk: int, row: int | None = None) -> GradPlan:
    """Token chunks of `row` bytes a row (default 4·V, fp32 logits) within `chunk` bytes."""
    row = row or 4 * max(V, 1)
    # (max_rows: chunks along whole sequences never need more than N rows)
    return GradPlan("tokens", chunk_rows(N, V, chunk, row), V, max_rows=min(chunk // row, max(N, 1)),
                    row_bytes=0 if row == 4 * max(V, 1) else row)


def _split_plan(N: int, V: int, H: int, chunk: GradPlan, dw_rows: int, memory, logits: int) -> GradPlan:
    # (a tail that does not fit, the vocab plan's fallback, makes the plan fail the caller's fit check)
    tail = _vocab_plan(N, V - dw_rows, H, memory, logits, True, False, warn=False)
    return GradPlan("split", chunk.rows, V, max_rows=chunk.max_rows, dw_rows=dw_rows, tail=tail,
                    row_bytes=chunk.row_bytes)


def modelled_seconds(p: GradPlan, N: int, V: int, H: int, lse_known: bool = False, triton_dw: bool = False) -> float:
    """Time of a gradient pass with dX and a half head's dW under plan p by a model of an H100 (MATMUL_RATE,
    COPY_RATE, `dw_traffic_exposed`): GEMM FLOPs, the logits' bytes through the row kernels (GEMM write 4, reads and
    the 2-byte dlogits write: 14 per logit of a one-pass chunk, 10 per logit of a slab or of a chunk with lse_known,
    6 for a chunk of 2-byte probabilities, `GradPlan.row_bytes`, 2 for one of dlogits, with lse_known, whose GEMM
    is taken to run at cuBLAS's rate;
    a log-prob pass before the slabs costs 8, unless lse_known), each extra piece's fp32 dW read+write, fp32 dX sums
    per slab, and the casts. Run 3 measured 15.9 / 35.6 ms of kernels for the token plan at 1.5B / 7B (model 16.9 /
    34.0), and ~20.1 / 42.3 ms for the vocab plan (its medians less the host time of the token plan's rows; model
    21.0 / 42.0). Slabs (the vocab plan, a split plan's tail) through the Triton GEMM's DLOGITS epilogue are still
    rated as cuBLAS slabs, 10 bytes a logit at MATMUL_RATE: run 6's 7B trace has their GEMM at 731 TFLOP/s with 2
    bytes a logit (a 19392-column tail slab: 2.42 ms of kernels, modelled 2.95; a 1280-row chunk 6.46, modelled
    6.92); not re-fit without a run to check the plans that would change.
    triton_dw: the dW sums take the Triton GEMM (`dw_gemm.takes`), whose traffic is rated by its own constant; the
    vocab plan's fp32 dX sums stay cuBLAS's."""
    F, B = MATMUL_RATE, COPY_RATE
    exposed = dw_traffic_exposed(bool(p.row_bytes), triton_dw)
    exposed_dx = dw_traffic_exposed(bool(p.row_bytes), False)

    def extra_pieces(rows: int) -> int:
        return max(-(-N // max(rows, 1)) - 1, 0)

    if p.kind == "vocab":
        slabs = -(-V // max(p.cols, 1))
        log_prob_pass = 0.0 if lse_known else 2 * N * H * V / F + 8 * N * V / B
        return (log_prob_pass + 6 * N * H * V / F + 10 * N * V / B + slabs * 8 * N * H * exposed_dx / B
                + extra_pieces(p.rows) * 8 * V * H * exposed / B + 6 * V * H / B)
    vt = p.dw_rows if p.kind == "split" else V
    # (a backward's chunks read the logits once, for dlogits; chunks of 2-byte probabilities from the Triton GEMM
    # write them, read them and write dlogits over them: 6; with lse known it writes the dlogits alone: 2)
    per_logit = (2 if lse_known else 6) if p.row_bytes else 10 if lse_known else 14
    t = (4 * N * H * V + 2 * N * H * vt) / F + per_logit * N * V / B \
        + extra_pieces(p.rows) * 8 * vt * H * exposed / B + 6 * vt * H / B
    if p.kind == "split":
        rest = V - vt
        t += 4 * N * H * rest / F + 10 * N * rest / B + extra_pieces(p.tail.rows) * 8 * rest * H * exposed / B \
            + 6 * rest * H / B
    return t


def dw_traffic_exposed(probs_chunks: bool, triton_dw: bool = False) -> float:
    """The share of an fp32 sum's read and write per piece that the plans are rated with: the Triton dW GEMM's
    (`triton_dw`), else that of cuBLAS after chunks of 2-byte probabilities (`probs_chunks`) or fp32 logits."""
    if triton_dw:
        return DW_TRAFFIC_EXPOSED_TRITON
    return DW_TRAFFIC_EXPOSED_PROBS if probs_chunks else DW_TRAFFIC_EXPOSED


def _slab_rows_bytes(N: int, H: int, dw_accumulator: bool, dx_accumulator: bool) -> int:
    """What a vocab plan holds per row of a half hidden besides logits and dW: the pieces' rows gathered out of the
    padding (≤ 2·N·H) and, with dX, its fp32 sum over slabs (4·N·H). (An fp32 hidden's are left to the margin.)"""
    if dx_accumulator:
        return 6 * N * H
    return 2 * N * H if dw_accumulator else 0


def _vocab_plan(N: int, V: int, H: int, memory: int | None, logits: int, dw_accumulator: bool,
                dx_accumulator: bool, warn: bool = True) -> GradPlan:
    N = max(N, 1)
    logits_room = logits // 4  # fp32 elements of one logits slab
    room = logits_room if memory is None else max(memory - _slab_rows_bytes(N, H, dw_accumulator, dx_accumulator),
                                                  0) // 4
    acc_cols = H if dw_accumulator and memory is not None else 0  # slab accumulator elements per vocabulary row
    cols_all_rows = min(room // (N + acc_cols), logits_room // N)
    if cols_all_rows >= min(V, MIN_SLAB_COLS):
        return GradPlan("vocab", N, split_size(V, cols_all_rows))
    cols = min(V, MIN_SLAB_COLS)
    rows_cap = min((room - cols * acc_cols) // cols, logits_room // cols)
    if rows_cap >= 1:  # thin slabs, and the rows in pieces
        return GradPlan("vocab", split_size(N, rows_cap), cols)
    # No plan meets the budget (the fp32 dX sum, or one thin slab's accumulator, is over it on its own): say so, and
    # take the efficient plan, all rows against slabs as wide as the logits budget allows.
    if warn:
        warnings.warn(f"{MEMORY_BUDGET_ENV}={memory} bytes cannot hold the fp32 gradient sums of this call (N={N}, "
                      f"V={V}, H={H}); running over it with vocabulary slabs of all rows. Raise the budget to remove "
                      "this.",
                      RuntimeWarning, stacklevel=4)
    return GradPlan("vocab", N, split_size(V, max(logits_room // N, min(V, MIN_SLAB_COLS))))
