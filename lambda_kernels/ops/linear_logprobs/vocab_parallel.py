"""Vocabulary-parallel LM heads (tensor parallelism): each rank holds a contiguous block of the head's rows.

Per rank the usual pipeline runs on its shard (targets shifted by the shard's first id, so that only the owning
rank sees a target), then one all_gather of [3, N] (z_t or 0, lse_r, H_r) turns shard statistics into the whole
vocabulary's:

    lse   = log Σ_r exp(lse_r)
    z_t   = Σ_r [target in shard r] · (ℓ_r + lse_r)
    H     = Σ_r w_r · (H_r − log w_r),   w_r = exp(lse_r − lse)

(p_v = w_r·p_v^(r) on shard r. Every term of H is ≥ 0, so nothing cancels at large logits or low temperature, and a
shard whose logits are all −inf, w_r = 0, drops out.)
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
        sizes = torch.stack(sizes).tolist()  # one host sync, not one per rank
        rank = dist.get_rank(group)
        return cls(group, sum(sizes[:rank]), local_size, sum(sizes))

    def local_targets(self, tgt: torch.Tensor) -> torch.Tensor:
        """Targets as rows of this shard (outside [0, size) for the other ranks' ids)."""
        return tgt - self.start

    def combine(self, lp_r, lse_r, ent_r, tgt):
        """(ℓ, lse, H) over the whole vocabulary from this shard's (ℓ_r, lse_r, H_r) and the global targets."""
        zero = torch.zeros((), dtype=lp_r.dtype, device=lp_r.device)
        in_shard = (tgt >= self.start) & (tgt < self.start + self.size)
        # the owner's target logit; −inf when its whole shard is −inf for the row (ℓ_r + lse_r would be NaN)
        owned = torch.where(torch.isfinite(lse_r), lp_r + lse_r, lse_r)
        stats = [torch.where(in_shard, owned, zero), lse_r] + ([] if ent_r is None else [ent_r])
        gathered = self._gather(torch.stack(stats))  # [ranks, 2 or 3, N]: one collective
        z_t = gathered[:, 0].sum(dim=0)  # one rank holds the value, the others 0: exact
        lse_all = gathered[:, 1]
        lse = torch.logsumexp(lse_all, dim=0)
        lp = (z_t - lse).clamp(max=0.0)
        ent = None
        if ent_r is not None:
            log_w = lse_all - lse
            w = torch.exp(log_w)
            terms = torch.where(w > 0, w * (gathered[:, 2] - log_w), zero)
            ent = terms.sum(dim=0).clamp(min=0.0, max=math.log(self.vocab_size))
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
