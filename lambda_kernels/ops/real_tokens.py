"""The real (unmasked) tokens of a batch, found on the device: the LM-head ops compute only their rows.

Nothing here syncs: the positions are queued before the argument check's one host sync, which reads their number.
"""
from __future__ import annotations

import torch


def real_token_positions(real: torch.Tensor) -> torch.Tensor:
    """[N + 1] int64 whose first n_real entries are the positions of the True entries of real [N] bool, in order
    (the rest is unspecified), without knowing n_real: each real token goes to slot (its rank among the real ones),
    padding to the spare slot N."""
    slot = torch.where(real, torch.cumsum(real, dim=0) - 1, real.numel())
    index = torch.empty((real.numel() + 1,), dtype=torch.int64, device=real.device)
    return index.scatter_(0, slot, torch.arange(real.numel(), device=real.device))


def gather_rows(x: torch.Tensor, rows, sl: slice, buf: torch.Tensor | None) -> torch.Tensor:
    """The rows `sl` of a pass over x: x[sl], or with `rows` (positions in x) those rows gathered into the first
    rows of buf, a piece-sized buffer (so a pass over the real tokens never holds an [n, H] copy of x)."""
    if rows is None:
        return x[sl]
    return torch.index_select(x, 0, rows[sl], out=buf[: sl.stop - sl.start])


def scatter_real(values: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """[total] with values at `index` and 0 elsewhere; differentiable w.r.t. values (the gradient is gathered)."""
    return torch.zeros((total,), dtype=values.dtype, device=values.device).index_copy(0, index, values)
