"""Allocation, grid and launch of the GAE kernels."""
from __future__ import annotations

import torch

from ..._core.tuning import scan_config, use_chunked_scan
from ..lambda_trace.launch import kernel_mask
from .kernels import gae_chunk_apply_kernel, gae_chunk_local_kernel, gae_kernel


@torch.compiler.disable  # kernels launched by hand: a graph break for torch.compile, not a trace through them
def gae_forward(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns), fp32 [B, T] each."""
    rewards, values = rewards.contiguous(), values.contiguous()
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if B == 0 or T == 0:
        return adv, ret
    block, warps = scan_config(T)
    mask_k = kernel_mask(mask)
    if use_chunked_scan(B, T, block):
        n_chunks = -(-T // block)
        summary = torch.empty((B, n_chunks, 5), dtype=torch.float32, device=rewards.device)
        gae_chunk_local_kernel[(n_chunks, B)](rewards, values, mask_k, summary, T, n_chunks, gamma, gamma * lam,
                                              BLOCK_T=block, num_warps=warps)
        gae_chunk_apply_kernel[(n_chunks, B)](rewards, values, mask_k, summary, adv, ret, T, n_chunks, gamma,
                                              gamma * lam, BLOCK_T=block, num_warps=warps)
        return adv, ret
    gae_kernel[(B,)](rewards, values, mask_k, adv, ret, T, gamma, gamma * lam, BLOCK_T=block, num_warps=warps)
    return adv, ret
