"""The real (unmasked) tokens of a batch, found on the device: the LM-head ops compute only their rows.

Nothing here syncs on its own: the positions are queued before the argument check's one device→host read, which
brings their number; `HostRead` lets a caller queue more work (a log-prob pass its first GEMM) before waiting for it.
"""
from __future__ import annotations

from typing import Callable

import torch


def real_token_positions(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, n_real) of real [N] bool: n_real, the number of its True entries, a 0-d int64 device tensor;
    positions, [N + 1] int64 whose first n_real entries are the positions of the True entries in order, found
    without the host knowing n_real: each real token goes to slot (its rank among the real ones), padding to the
    spare slot N.
    Every entry after the real ones holds one padding position (0 when there is no padding), all in bounds, so a
    gather over any prefix reads only x's rows, and a pass that runs ahead of n_real over those filler rows computes
    rows of padding, whose loss weight is 0 (the fused loss's on-policy pass relies on it)."""
    N = real.numel()
    rank = torch.cumsum(real, dim=0)  # (its last entry is n_real: no reduction of its own)
    n_real = rank[-1] if N else torch.zeros((), dtype=torch.int64, device=real.device)
    slot = torch.where(real, rank - 1, N)
    index = torch.zeros((N + 1,), dtype=torch.int64, device=real.device)
    index.scatter_(0, slot, torch.arange(N, device=real.device))
    return torch.where(torch.arange(N + 1, device=real.device) < n_real, index, index[N]), n_real


class HostRead:
    """The values of a small integer tensor for the host, copied now and waited for at `values()`.

    On CUDA the copy goes to pinned memory without blocking and an event marks its end, so the host can queue more
    kernels behind it before it waits; waiting on that event does not wait for them.
    """

    def __init__(self, values: torch.Tensor):
        self._event = None
        if values.is_cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(values.device))
        else:  # nothing runs ahead of the host: the values as they are now
            self._host = values.clone()

    @torch.compiler.disable  # an event wait: nothing for a graph
    def values(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class PendingRows:
    """The rows a log-prob pass computes, known to the device at once and to the host only after the argument
    check's one device→host read, so that the pass queues its first chunk before the host waits for that read.

    total: the rows of the pass's input (N); positions: the [N + 1] of `real_token_positions` (the computed rows'
    positions first, then in-bounds filler; or just the computed rows' positions when the count is already known),
    or None when every row is computed; check(): waits for the read, raises on a bad token id, and returns the
    number of rows computed, n.
    """

    def __init__(self, total: int, positions: torch.Tensor | None, check: Callable[[], int]):
        self.total = total
        self.positions = positions
        self._check = check
        self._count: int | None = None

    def count(self) -> int:
        """n, after the check (which runs once)."""
        if self._count is None:
            self._count = self._check()
        return self._count

    def rows(self) -> torch.Tensor | None:
        """The positions [n] of the computed rows in order, or None when they are all N rows."""
        n = self.count()
        return None if self.positions is None or n == self.total else self.positions[:n]


class PendingTokens(PendingRows):
    """The `PendingRows` of a [R, C] batch, whose check also brings each row's count of real tokens.

    n_device: the number of real tokens as a 0-d device tensor, for work queued before the host knows it."""

    def __init__(self, total: int, positions: torch.Tensor, finish: Callable[[], list], n_device: torch.Tensor):
        self._finish = finish
        self._counts: list | None = None
        self.n_device = n_device
        super().__init__(total, positions, lambda: sum(self.row_counts()))

    def live(self) -> torch.Tensor:
        """[total] bool, on the device: which entries of `positions` are real tokens (the first n), queued now."""
        return torch.arange(self.total, device=self.n_device.device) < self.n_device

    def row_counts(self) -> list:
        """Each row's count of real tokens, after the check (which runs once)."""
        if self._counts is None:
            self._counts = list(self._finish())
        return self._counts


def gather_rows(x: torch.Tensor, rows, sl: slice, buf: torch.Tensor | None) -> torch.Tensor:
    """The rows `sl` of a pass over x: x[sl], or with `rows` (positions in x) those rows gathered into the first
    rows of buf, a piece-sized buffer (so a pass over the real tokens never holds an [n, H] copy of x)."""
    if rows is None:
        return x[sl]
    return torch.index_select(x, 0, rows[sl], out=buf[: sl.stop - sl.start])


def scatter_real(values: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """[total] with values at `index` and 0 elsewhere; differentiable w.r.t. values (the gradient is gathered)."""
    return torch.zeros((total,), dtype=values.dtype, device=values.device).index_copy(0, index, values)


@torch.compiler.disable  # a pinned copy and a CUDA event: nothing for a graph
def queue_token_check(op: str, name: str, ids: torch.Tensor, V: int, real=None, hint: str = ""):
    """Token ids in [0, V) where `real` (bool [R, C], mask ≠ 0) is True, checked with one device→host read, queued:
    the device reduces the ids (and counts each row's real tokens) and starts copying the results to the host; the
    function returned waits for that read, raises on an id outside [0, V) and returns the counts (None without
    `real`). A caller can queue kernels in between that read ids only through masked loads or compares, so the GPU
    is not idle while the host waits."""
    if ids.numel() == 0:
        counts = None if real is None else [0] * real.shape[0]
        return lambda: counts
    vals = ids if real is None else torch.where(real, ids, torch.zeros((), dtype=ids.dtype, device=ids.device))
    stats = torch.stack(list(torch.aminmax(vals))).to(torch.int64)
    if real is not None:
        stats = torch.cat([stats, real.sum(dim=1)])
    read = HostRead(stats)

    def finish() -> list[int] | None:
        lo, hi, *counts = read.values()
        if lo < 0 or hi >= V:
            where = "" if real is None else " at unmasked positions"
            raise ValueError(f"{op}: `{name}` must hold token ids in [0, V) = [0, {V}){where}; got min {lo}, max "
                             f"{hi}. Replace padding/ignore ids (e.g. -100) by a valid id"
                             + (f", {hint}" if hint else "") + "; masked positions are not checked.")
        return None if real is None else counts

    return finish
