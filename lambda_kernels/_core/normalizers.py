"""Token weights n_{i,t} = m_{i,t} · s_i of the loss aggregation (`loss_type`), as one scale s_i per row.

Kernels take the per-row scale so that the batch-wide denominators (Σm) are reduced once in torch, on device,
with no host sync. The reference computes the same normalisers independently, from their definitions.
"""
from __future__ import annotations

import torch

LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo", "luspo")


def row_scales(mask: torch.Tensor, loss_type: str, max_completion_length, num_items_in_batch) -> torch.Tensor:
    """`mask` [B, T] fp32 → s [B] fp32 such that the loss is Σ_{i,t} m_{i,t} · s_i · L_{i,t}."""
    B, T = mask.shape
    if loss_type == "dapo":
        if num_items_in_batch is None:
            denom = mask.sum()
        else:
            denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device)
        return (1.0 / denom.clamp(min=1e-12 if num_items_in_batch is not None else 1.0)).expand(B).contiguous()
    if loss_type == "bnpo":
        return (1.0 / mask.sum().clamp(min=1.0)).expand(B).contiguous()
    if loss_type == "grpo":
        return 1.0 / (B * mask.sum(dim=1).clamp(min=1.0))
    if loss_type == "dr_grpo":
        length = T if max_completion_length is None else max_completion_length
        return torch.full((B,), 1.0 / max(B * length, 1), dtype=torch.float32, device=mask.device)  # (B = 0)
    if loss_type == "luspo":
        return torch.full((B,), 1.0 / max(B, 1), dtype=torch.float32, device=mask.device)
    raise ValueError(f"unknown loss_type {loss_type!r}")
