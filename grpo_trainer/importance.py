"""TRL's vLLM importance-sampling correction for our trainer: the weights w ≥ 0 of each token's policy term
(`vllm_importance_weights`; the drop-in gets TRL's own), which the fused loss takes as `policy_weights`."""
from __future__ import annotations

import math
from typing import Optional

import torch


def vllm_importance_weights(old_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor, *,
                            mode: str, clip_min: Optional[float], clip_max: Optional[float]):
    """TRL's vLLM importance-sampling weights (GRPOTrainer, TRL 1.16) → (weights, metrics with TRL's names).

    The ratio of the trainer's log-probs ℓ_old over the sampler's ℓ_q, exp(m·(ℓ_old − ℓ_q)) per token, or the
    exponential of its sum over the sequence ([B, 1]) for the sequence_* modes; a NaN sampler log-prob counts as no
    difference (ratio 1). *_truncate clips it to [clip_min, clip_max], *_mask sets it to 0 outside that range (None:
    unbounded on that side). Padding gets 1 in the token modes (the loss never reads it)."""
    mask = mask.to(torch.float32)
    diff = torch.nan_to_num((old_logprobs.float() - sampling_logprobs.float()) * mask, nan=0.0)
    sequence_level = mode in ("sequence_truncate", "sequence_mask")
    ratio = torch.exp(diff.sum(dim=-1, keepdim=True) if sequence_level else diff)
    if mode in ("token_truncate", "sequence_truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    elif mode in ("token_mask", "sequence_mask"):
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    else:
        raise ValueError(f"unknown vllm_importance_sampling_mode {mode!r}")

    real = mask.bool()
    delta = (old_logprobs.float() - sampling_logprobs.float()).abs()
    delta = delta[real & ~torch.isnan(delta)]
    flat = ratio.flatten() if sequence_level else ratio[real]

    def stat(t, fn):
        return fn(t) if t.numel() else t.new_zeros(())

    metrics = {"sampling/sampling_logp_difference/mean": stat(delta, torch.mean),
               "sampling/sampling_logp_difference/max": stat(delta, torch.max),
               "sampling/importance_sampling_ratio/min": stat(flat, torch.min),
               "sampling/importance_sampling_ratio/mean": stat(flat, torch.mean),
               "sampling/importance_sampling_ratio/max": stat(flat, torch.max)}
    return ratio, metrics

