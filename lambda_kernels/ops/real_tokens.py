"""The real (unmasked) tokens of a batch, found on the device: the LM-head ops compute only their rows.

The number of real tokens comes from the argument check's one host sync, so nothing here syncs.
"""
from __future__ import annotations

import torch


def real_token_positions(flat_mask: torch.Tensor) -> torch.Tensor:
    """[N + 1] int64 whose first n_real entries are the positions of the entries ≠ 0 of flat_mask [N], in order (the
    rest is unspecified), without knowing n_real: each real token goes to slot (its rank among the real ones),
    padding to the spare slot N. So it can be queued before the host sync that reads n_real."""
    real = flat_mask != 0
    slot = torch.where(real, torch.cumsum(real, dim=0) - 1, real.numel())
    index = torch.empty((real.numel() + 1,), dtype=torch.int64, device=flat_mask.device)
    return index.scatter_(0, slot, torch.arange(real.numel(), device=flat_mask.device))


def real_token_index(flat_mask: torch.Tensor, n_real: int) -> torch.Tensor:
    """Positions of the n_real entries ≠ 0 of flat_mask, in order, without a host sync (n_real is known)."""
    return real_token_positions(flat_mask)[:n_real]


def scatter_real(values: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """[total] with values at `index` and 0 elsewhere; differentiable w.r.t. values (the gradient is gathered)."""
    return torch.zeros((total,), dtype=values.dtype, device=values.device).index_copy(0, index, values)
