"""How a call cuts its work into pieces that fit the memory budgets: token chunks, or vocabulary slabs.

Two budgets, read from the environment on every call ("1G", "256M", "65536"):

    LAMBDA_KERNELS_LOGITS_BUDGET   bytes of one fp32 logits chunk (default 1 GiB)
    LAMBDA_KERNELS_MEMORY_BUDGET   bytes of all the workspace of a call: logits chunks *and* fp32 accumulators
                                   (default: unset, no cap beyond the logits budget)
    LAMBDA_KERNELS_GRAD_PLAN       "auto" (default), or "tokens" / "vocab" to force a plan

Workspace counts the logits buffers and the fp32 dX/dW sums beyond the gradients returned (a half head's token-plan
dW sum keeps half of itself in its gradient's bytes: `dw_sum`); besides them a call holds per-token vectors and the
fp32 bias gradient sum (4·V bytes). fp64 inputs take twice the bytes, and the PyTorch row fallback (`impl="torch"`)
a few chunk-sized temporaries more.

Gradient plans (the forward-only log-prob pass is always token chunks):

    tokens  chunks of M rows, logits [M, V] each; dX of a chunk is one GEMM over V; dW += Dᵀ·X_c across chunks in
            fp32, which for a bf16/fp16 head is a 4·V·H sum, half of it in the gradient's own bytes, so 2·V·H bytes
            beside the chunk (1.0 GiB at H3584, V152064; `dw_sum`). On-policy this is one pass: 6·N·H·V FLOPs.
    vocab   the log-sum-exp of every row first (the forward pass), then slabs of C vocabulary rows, logits [N, C]
            for all rows (or [M, C] pieces): dW of a slab is complete after its rows, so the fp32 accumulator is one
            slab (4·C·H); dX is summed over slabs in fp32 (4·N·H for a bf16/fp16 hidden). 8·N·H·V FLOPs.

Why both: dW = Σ_rows dlogitsᵀ·x needs every row's log-sum-exp before any row's dlogits, and the log-sum-exp needs
the whole vocabulary. Summing dW over rows in fp32 therefore costs either an fp32 accumulator of the whole head
(tokens) or a second pass over the logits (vocab); no order of the work avoids both. Without a memory budget the
faster token plan runs; with one, the token plan runs when its accumulator and a chunk of at least
TOKEN_PLAN_MIN_ROWS rows fit, the vocab plan otherwise.
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
PLAN_ENV = "LAMBDA_KERNELS_GRAD_PLAN"
PLAN_CHOICES = ("auto", "tokens", "vocab")
# Below this many rows per chunk the vocab plan is faster. Each token-plan chunk reads and writes the fp32 dW sum
# (8·V·H bytes) where the vocab plan spends a second logits GEMM (2·m·H·V FLOPs): break-even at
# m = 4·(matmul rate / bandwidth)·(exposed share of that traffic) ≈ 4·(703 TFLOP/s / 3.0 TB/s)·(0.4–0.7) ≈ 380–660
# rows on an H100 (the shares seen in run 3's profiles at 1.5B and 7B; benchmarks/RESULTS.md). A model, not a sweep.
TOKEN_PLAN_MIN_ROWS = 768
MIN_SLAB_COLS = 128  # narrower slabs make GEMMs too thin; the vocab plan then cuts rows as well
# A log-prob pass's first piece when it has several (`log_prob_pieces`): its GEMM runs while the host waits for the
# id check, so it must outlast that wait (512 rows: ~0.3 / 0.8 ms at H1536 / H3584, V152k on an H100), and it is
# redone when the real tokens turn out to fit one piece, so it should be cheap.
FIRST_PIECE_ROWS = 512
SPLIT_ALIGN = 8  # `split_rows` a multiple of 8: the dlogits columns from there start 16-byte aligned for cuBLAS


def _parse_bytes(name: str, raw: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kKmMgG]?)(i?[bB])?", raw)
    if match is None:
        raise RuntimeError(f"{name} must be a byte count such as 1073741824, 512M or 1G; got {raw!r}.")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(match.group(1)) * scale


def logits_budget_bytes() -> int:
    """Bytes of fp32 logits one chunk may hold: env LAMBDA_KERNELS_LOGITS_BUDGET, else 1 GiB."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    return _parse_bytes(BUDGET_ENV, raw) if raw else DEFAULT_BUDGET


def memory_budget_bytes() -> int | None:
    """Bytes of workspace (logits and accumulators) a call may hold: env LAMBDA_KERNELS_MEMORY_BUDGET, else None."""
    raw = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    return _parse_bytes(MEMORY_BUDGET_ENV, raw) if raw else None


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


def chunk_rows(N: int, V: int, budget: int | None = None) -> int:
    """Rows per fp32 logits chunk [rows, V] of a gradient pass within `budget` bytes (default
    `forward_budget_bytes()`), balanced over N. (A log-prob pass cuts its chunks with `log_prob_pieces`.)"""
    budget = forward_budget_bytes() if budget is None else budget
    return split_size(N, budget // (4 * max(V, 1)))


@dataclass(frozen=True)
class GradPlan:
    """kind "tokens": chunks of `rows` rows over the whole vocabulary (cols = V); "vocab": slabs of `cols`
    vocabulary rows, each over the rows in pieces of `rows` (rows = N when a slab of all rows fits).

    max_rows: the most rows a chunk may hold (`rows` is that, balanced over N); chunks cut along sequences use it.
    """

    kind: str
    rows: int
    cols: int
    max_rows: int = 0

    def workspace_bytes(self, N: int, V: int, H: int, dw_accumulator: bool, dx_accumulator: bool) -> int:
        """fp32 bytes this plan holds at once besides the gradients it returns (outputs and per-row stats aside)."""
        logits = 4 * self.rows * self.cols
        if self.kind == "tokens":
            return logits + (rest_bytes(V, H) if dw_accumulator else 0)
        return logits + (4 * self.cols * H if dw_accumulator else 0) + (4 * N * H if dx_accumulator else 0)


def plan_choice() -> str:
    """LAMBDA_KERNELS_GRAD_PLAN: "auto" (default: by the budgets), "tokens" or "vocab" (forced, e.g. to compare)."""
    return env_choice(PLAN_ENV, PLAN_CHOICES, "auto")


def grad_plan(N: int, V: int, H: int, *, dw_accumulator: bool, dx_accumulator: bool,
              dx_sum_in_tokens: bool = False) -> GradPlan:
    """The plan of a gradient pass over N rows, a [V, H] head.

    dw_accumulator: dW is needed and the head is bf16/fp16 (its fp32 sum is not the gradient tensor itself);
    dx_accumulator: the same for dX and the hidden states (only the vocab plan sums dX across pieces);
    dx_sum_in_tokens: the token plan keeps dX in fp32 too (a vocabulary-parallel head sums it over ranks).
    Auto: the token plan unless a memory budget is set that cannot hold its accumulator beside a chunk of
    TOKEN_PLAN_MIN_ROWS rows (without an accumulator, any chunk of one row or more will do).
    """
    memory = memory_budget_bytes()
    logits = logits_budget_bytes()
    acc = (rest_bytes(V, H) if dw_accumulator else 0) + (4 * N * H if dx_sum_in_tokens else 0)
    row = 4 * max(V, 1)
    choice = plan_choice()
    if choice == "auto":
        fits = memory is None or memory - acc >= row * (1 if acc == 0 else min(N, TOKEN_PLAN_MIN_ROWS))
        choice = "tokens" if fits else "vocab"
        chunk = logits if memory is None else min(logits, memory - acc)
    else:  # forced: the accumulator is accepted, the chunk is the forward pass's
        chunk = forward_budget_bytes()
    if choice == "tokens":
        chunk = max(chunk, row)
        return GradPlan("tokens", chunk_rows(N, V, chunk), V, max_rows=chunk // row)
    return _vocab_plan(N, V, H, memory, logits, dw_accumulator, dx_accumulator)


def _vocab_plan(N: int, V: int, H: int, memory: int | None, logits: int, dw_accumulator: bool,
                dx_accumulator: bool) -> GradPlan:
    N = max(N, 1)
    logits_room = logits // 4  # fp32 elements of one logits slab
    room = logits_room if memory is None else max(memory - (4 * N * H if dx_accumulator else 0), 0) // 4
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
    warnings.warn(f"{MEMORY_BUDGET_ENV}={memory} bytes cannot hold the fp32 gradient sums of this call (N={N}, V={V}, "
                  f"H={H}); running over it with vocabulary slabs of all rows. Raise the budget to remove this.",
                  RuntimeWarning, stacklevel=4)
    return GradPlan("vocab", N, split_size(V, max(logits_room // N, min(V, MIN_SLAB_COLS))))
