"""Vocabulary-parallel LM heads (tensor parallelism): each rank holds a contiguous block of the head's rows.

Per rank the usual pipeline runs on its shard (targets shifted by the shard's first id, so that only the owning
rank sees a target), then three collectives over the group turn shard statistics into the whole vocabulary's:

    lse   = log Σ_r exp(lse_r)                                   all_gather of lse_r [N]
    z_t   = Σ_r [target in shard r] · (ℓ_r + lse_r)               all_reduce of [N]
    H     = lse − Σ_r exp(lse_r − lse) · (lse_r − H_r)            all_gather of H_r [N] (with entropy)

(E_p[z] over the vocabulary is the mixture of the shards' E_{p_r}[z] = lse_r − H_r with weights exp(lse_r − lse).)
The backward needs the global lse and H only: each rank forms its shard's dlogits (no one-hot outside it), its
dW/db rows locally, and a partial dX in fp32 that one all_reduce sums.
Collectives are the same on every rank and in the same order, so every rank gets bit-identical ℓ, H and loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows [start, start + size) of a head of `vocab_size` rows, sharded over `group`."""

    group: Any
    start: int
    size: int
    vocab_size: int

    @classmethod
    def of(cls, group, local_size: int, device) -> "VocabShard":
        """The shard of this rank from every rank's row count (one all_gather; shards may differ in size)."""
        import torch.distributed as dist

        sizes = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor(local_size, dtype=torch.int64, device=device), group=group)
        sizes = [int(s) for s in sizes]
        rank = dist.get_rank(group)
        return cls(group, sum(sizes[:rank]), local_size, sum(sizes))

    def local_targets(self, tgt: torch.Tensor) -> torch.Tensor:
        """Targets as rows of this shard (outside [0, size) for the other ranks' ids)."""
        return tgt - self.start

    def combine(self, lp_r, lse_r, ent_r, tgt):
        """(ℓ, lse, H) over the whole vocabulary from this shard's (ℓ_r, lse_r, H_r) and the global targets."""
        import torch.distributed as dist

        in_shard = (tgt >= self.start) & (tgt < self.start + self.size)
        z_t = torch.where(in_shard, lp_r + lse_r, torch.zeros((), dtype=lp_r.dtype, device=lp_r.device))
        dist.all_reduce(z_t, group=self.group)
        lse_all = self._gather(lse_r)
        lse = torch.logsumexp(lse_all, dim=0)
        lp = (z_t - lse).clamp(max=0.0)
        ent = None
        if ent_r is not None:
            weights = torch.exp(lse_all - lse)
            mean_z = (weights * (lse_all - self._gather(ent_r))).sum(dim=0)
            ent = (lse - mean_z).clamp(min=0.0, max=math.log(self.vocab_size))
        return lp, lse, ent

    def sum_partial_dx(self, dx_partial: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(dx_partial, group=self.group)
        return dx_partial

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(values) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, values.contiguous(), group=self.group)
        return torch.stack(parts)
