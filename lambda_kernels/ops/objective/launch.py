"""Allocation, grid and launch of the objective kernels, plus the on-policy per-token gradient."""
from __future__ import annotations

import torch

from ..._core.params import ObjectiveParams
from ..._core.tuning import scan_config
from ..lambda_trace.launch import scratch_for, trace_backward
from .kernels import N_STATS, STAT_HIGH, STAT_KL, STAT_LOSS, STAT_LOW, STAT_RATIO, STAT_REGION, objective_bwd_kernel, \
    objective_fwd_kernel

METRIC_COLUMNS = {"clip_ratio/low_mean": STAT_LOW, "clip_ratio/high_mean": STAT_HIGH,
                  "clip_ratio/region_mean": STAT_REGION, "ratio_mean": STAT_RATIO}


def _placeholder(device) -> torch.Tensor:
    return torch.empty((1,), dtype=torch.float32, device=device)


def objective_forward(lp, old, adv, mask_f, ref, scales, params: ObjectiveParams, need_grad: bool):
    """(loss 0-d fp32, metrics {name: 0-d fp32}, coef [B, T] fp32 or None).

    lp/old/ref [B, T] (old None = on-policy; ref may be None when beta = 0), adv [B] or [B, T], mask_f fp32 [B, T],
    scales [B] fp32 from `row_scales`. `coef` is what `objective_backward` scans.
    """
    lp = lp.contiguous()
    B, T = lp.shape
    device = lp.device
    stats = torch.zeros((B, N_STATS), dtype=torch.float32, device=device)
    coef = torch.empty((B, T), dtype=torch.float32, device=device) if need_grad else None
    has_kl = params.beta > 0
    if B > 0 and T > 0:
        block, warps = scan_config(T)
        objective_fwd_kernel[(B,)](
            lp, lp if old is None else old.contiguous(), adv.contiguous(), mask_f.contiguous(),
            ref.contiguous() if has_kl else lp, scales, coef if need_grad else _placeholder(device), stats,
            scratch_for(params.trace, B, T, device), T, params.trace.a, params.trace.log2a,
            0.0 if params.adv_clamp_min is None else params.adv_clamp_min,
            1.0 - params.epsilon_low, 1.0 + params.epsilon_high, params.beta,
            STYLE=params.trace.style, ON_POLICY=old is None, ADV_PER_TOKEN=adv.dim() == 2,
            HAS_CLAMP=params.adv_clamp_min is not None, HAS_KL=has_kl, NEED_GRAD=need_grad,
            BLOCK_T=block, num_warps=warps)
    totals = stats.sum(dim=0)
    count = mask_f.sum().clamp(min=1.0)
    metrics = {name: totals[col] / count for name, col in METRIC_COLUMNS.items()}
    if has_kl:
        metrics["kl"] = totals[STAT_KL] / count
    return totals[STAT_LOSS], metrics, coef


def objective_backward(grad_out, coef, lp, ref, mask_f, scales, params: ObjectiveParams, out_dtype) -> torch.Tensor:
    """∂loss/∂ℓ [B, T] in `out_dtype`, scaled by the 0-d `grad_out`, KL term included."""
    B, T = coef.shape
    grad = torch.empty((B, T), dtype=out_dtype, device=coef.device)
    if B == 0 or T == 0:
        return grad
    has_kl = params.beta > 0
    block, warps = scan_config(T)
    objective_bwd_kernel[(B,)](
        coef, lp.contiguous(), ref.contiguous() if has_kl else lp, mask_f.contiguous(), scales,
        grad_out.reshape(1).to(torch.float32), grad, scratch_for(params.trace, B, T, coef.device), T,
        params.trace.a, params.trace.log2a, params.beta,
        STYLE=params.trace.style, HAS_KL=has_kl, BLOCK_T=block, num_warps=warps)
    return grad


def onpolicy_token_grad(adv, mask_f, scales, params: ObjectiveParams) -> torch.Tensor:
    """On-policy ∂loss/∂ℓ [B, T] fp32 without the KL term: −m_j·Σ_{t≥j} w(t, j)·n_t·Â_t (grpo_lambda.md §5).

    With ℓ_old = ℓ the traced ratio is 1 everywhere, which no clip range with ε ≥ 0 clips, so the coefficient of
    every token is −n_t·Â_t and the gradient is one reverse scan; it does not depend on the log-probs.
    """
    a = adv.to(torch.float32)
    a = a.unsqueeze(1) if a.dim() == 1 else a
    if params.adv_clamp_min is not None:
        a = a.clamp(min=params.adv_clamp_min)
    coef = torch.where(mask_f != 0, -mask_f * scales.unsqueeze(1) * a, torch.zeros((), device=a.device))
    return trace_backward(coef, mask_f, params.trace)
