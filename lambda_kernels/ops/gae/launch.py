"""Allocation, grid and launch of the GAE kernel."""
from __future__ import annotations

import torch

from ..._core.tuning import scan_config
from ..lambda_trace.launch import kernel_mask
from .kernels import gae_kernel


def gae_forward(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns), fp32 [B, T] each."""
    rewards, values = rewards.contiguous(), values.contiguous()
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if B == 0 or T == 0:
        return adv, ret
    block, warps = scan_config(T)
    gae_kernel[(B,)](rewards, values, kernel_mask(mask), adv, ret, T, gamma, gamma * lam, BLOCK_T=block,
                     num_warps=warps)
    return adv, ret
