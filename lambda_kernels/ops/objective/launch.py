"""Allocation, grid and launch of the objective kernels, plus the on-policy per-token gradient.

A forward is two launches (the row kernel, then a one-program finalize kernel that applies the aggregation and
forms the metrics); a backward is one. No host sync anywhere.
"""
from __future__ import annotations

import torch

from ..._core.normalizers import LOSS_TYPES
from ..._core.params import SEQUENCE_STYLE, ObjectiveParams, TraceParams
from ..._core.tuning import scan_config
from ...policy_losses import CISPO, SAPO, UNSCANNED, VESPO
from ..lambda_trace.launch import kernel_mask, scratch_for, trace_backward
from .kernels import N_OUT, N_STATS, OUT_HIGH, OUT_HIGH_MAX, OUT_KL, OUT_LOW, OUT_LOW_MIN, OUT_PHI, OUT_RATIO, \
    OUT_REGION, objective_bwd_kernel, objective_finalize_kernel, objective_fwd_kernel

LOSS_CODES = {name: code for code, name in enumerate(LOSS_TYPES)}  # the finalize kernel's LOSS_TYPE
METRIC_OUTPUTS = {"clip_ratio/low_mean": OUT_LOW, "clip_ratio/high_mean": OUT_HIGH,
                  "clip_ratio/region_mean": OUT_REGION, "ratio_mean": OUT_RATIO,
                  "clip_ratio/low_min": OUT_LOW_MIN, "clip_ratio/high_max": OUT_HIGH_MAX}


def _placeholder(device) -> torch.Tensor:
    return torch.empty((1,), dtype=torch.float32, device=device)


def objective_forward(lp, old, adv, mask, ref, params: ObjectiveParams, need_grad: bool, num_items_in_batch=None,
                      weights=None):
    """(loss 0-d fp32, values [N_OUT] fp32 (the metrics: `metric_views`), saved), `saved` feeding
    `objective_backward`.

    lp/old/ref [B, T] any float (old None = on-policy; ref may be None when beta = 0), adv [B] or [B, T], mask
    [B, T] bool/int/float, num_items_in_batch None, a number or a 1-element tensor (dapo's denominator), weights
    None or [B, T] (the policy term's per-token weights).
    """
    lp = lp.contiguous()
    B, T = lp.shape
    device = lp.device
    stats = torch.empty((B, N_STATS), dtype=torch.float32, device=device)
    coef = torch.empty((B, T), dtype=torch.float32, device=device) if need_grad else None
    scales = torch.empty((B,), dtype=torch.float32, device=device)
    out = torch.zeros((N_OUT,), dtype=torch.float32, device=device)
    loss = torch.zeros((), dtype=torch.float32, device=device)
    mask_k = kernel_mask(mask)
    if B > 0:
        _launch_forward_rows(lp, old, adv, mask_k, ref, params, coef, stats, weights)
        items_is_tensor = isinstance(num_items_in_batch, torch.Tensor)
        if items_is_tensor:  # e.g. a CPU count from a trainer's gradient accumulation: read it where the kernel runs
            num_items_in_batch = num_items_in_batch.reshape(1).to(device=device, dtype=torch.float32)
        length = max(T if params.max_completion_length is None else params.max_completion_length, 1)  # (T = 0)
        objective_finalize_kernel[(1,)](
            stats, num_items_in_batch if items_is_tensor else _placeholder(device), scales, out, loss, B,
            float(num_items_in_batch) if num_items_in_batch is not None and not items_is_tensor else 1.0,
            1.0 / (B * length), LOSS_TYPE=LOSS_CODES[params.loss_type],
            NUM_ITEMS=2 if items_is_tensor else int(num_items_in_batch is not None),
            SEQ_LEVEL=sequence_level_metrics(params, adv),
            BLOCK_B=min(max(16, 1 << (B - 1).bit_length()), 1024))
    # (the loss has storage of its own: a caller may edit it in place, `loss /= accumulation`, which autograd forbids
    # on a view of a buffer the metrics also view)
    return loss, out, ((coef, scales, mask_k) if need_grad else None)


def sequence_level_metrics(params: ObjectiveParams, adv: torch.Tensor) -> bool:
    """TRL's sequence-level clip metrics (over sequences) where its clip masks are [B, 1]: the sequence level with
    one advantage per sequence; with per-token advantages [B, T] they are [B, T] there, token means as usual."""
    return params.trace.style == SEQUENCE_STYLE and adv.dim() == 1


def metric_views(out: torch.Tensor, policy) -> dict:
    """{name: 0-d view of out}, "kl" included (0 when beta = 0; callers report it only when beta > 0); the clip
    metrics of the policy term (`policy_metric_names`)."""
    metrics = {name: out[i] for name, i in METRIC_OUTPUTS.items()}
    metrics["cispo_clip_ratio"] = out[OUT_HIGH]
    metrics["vespo/phi_seq_mean"] = out[OUT_PHI]
    metrics["kl"] = out[OUT_KL]
    return {name: metrics[name] for name in policy_metric_names(policy) + ("kl",)}


def policy_metric_names(policy) -> tuple[str, ...]:
    """The metrics of the objective without "kl": TRL's clip metrics of each policy term, and the ratio's mean."""
    if isinstance(policy, CISPO):
        return ("cispo_clip_ratio", "ratio_mean")
    if isinstance(policy, SAPO):
        return ("ratio_mean",)
    if isinstance(policy, VESPO):
        return ("vespo/phi_seq_mean", "ratio_mean")
    return tuple(METRIC_OUTPUTS)


def _launch_forward_rows(lp, old, adv, mask_k, ref, params: ObjectiveParams, coef, stats, weights=None) -> None:
    """The row kernel: per-row sums into stats [B, N_STATS], and (coef not None) the clipped term's coefficients;
    weights None or [B, T], the policy term's per-token weights."""
    B, T = lp.shape
    block, warps = scan_config(T)
    objective_fwd_kernel[(B,)](
        lp, lp if old is None else old.contiguous(), adv.contiguous(), mask_k,
        ref.contiguous() if params.beta > 0 else lp, lp if weights is None else weights.contiguous(),
        _placeholder(lp.device) if coef is None else coef, stats,
        scratch_for(params.trace, B, T, lp.device), T,
        params.trace.a, params.trace.log2a, 0.0 if params.adv_clamp_min is None else params.adv_clamp_min,
        1.0 - params.epsilon_low, 1.0 + params.epsilon_high, 0.0 if params.dual_clip is None else params.dual_clip,
        params.beta, *_policy_args(params.policy), STYLE=params.trace.style, POLICY=params.policy.code,
        ON_POLICY=old is None, ADV_PER_TOKEN=adv.dim() == 2,
        HAS_CLAMP=params.adv_clamp_min is not None, HAS_DUAL=params.dual_clip is not None,
        HAS_W=weights is not None, HAS_KL=params.beta > 0,
        KL_CORRECTED=params.beta > 0 and params.kl_bias_correction, NEED_GRAD=coef is not None,
        BLOCK_T=block, num_warps=warps)


def _policy_args(policy) -> tuple[float, ...]:
    """(cispo_cap, tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg) of the forward kernel (those of the other terms:
    placeholders)."""
    cispo = (policy.max_ratio,) if isinstance(policy, CISPO) else (1.0,)
    sapo = (policy.temperature_pos, policy.temperature_neg) if isinstance(policy, SAPO) else (1.0, 1.0)
    vespo = (policy.k_pos, policy.lambda_pos, policy.k_neg, policy.lambda_neg) if isinstance(policy, VESPO) \
        else (1.0, 1.0, 1.0, 1.0)
    return cispo + sapo + vespo


def scan_params(params: ObjectiveParams) -> TraceParams:
    """The trace the backward scans the coefficients with: none for CISPO and VESPO, whose coefficients are on ℓ
    itself (their ratio, traced or the sequence's, only weighs them), the objective's trace otherwise."""
    return TraceParams(a=params.trace.a, style=0) if isinstance(params.policy, UNSCANNED) else params.trace


def objective_backward(grad_out, saved, lp, old, ref, params: ObjectiveParams, out_dtype) -> torch.Tensor:
    """∂loss/∂ℓ [B, T] in `out_dtype`, scaled by the 0-d `grad_out`, KL term included; saved = (coef, scales, mask)
    from `objective_forward` (or `objective_rows_grad`). ℓ_old (None on-policy) is read only for the ratio-weighted
    KL, so a caller may pass None wherever that KL is off."""
    coef, scales, mask_k = saved
    B, T = coef.shape
    grad = torch.empty((B, T), dtype=out_dtype, device=coef.device)
    if B == 0 or T == 0:
        return grad
    has_kl = params.beta > 0
    corrected = has_kl and params.kl_bias_correction
    on_policy = old is None
    lp = lp.contiguous()
    block, warps = scan_config(T)
    trace = scan_params(params)
    objective_bwd_kernel[(B,)](
        coef, lp, old.contiguous() if corrected and not on_policy else lp, ref.contiguous() if has_kl else lp,
        mask_k, scales, grad_out.reshape(1).to(torch.float32), grad, scratch_for(trace, B, T, coef.device), T,
        trace.a, trace.log2a, params.beta,
        STYLE=trace.style, HAS_KL=has_kl, KL_CORRECTED=corrected,
        KL_SEQ=corrected and params.trace.style == SEQUENCE_STYLE, ON_POLICY=on_policy or not corrected,
        BLOCK_T=block, num_warps=warps)  # (ON_POLICY only matters to the corrected KL: one variant otherwise)
    return grad


def objective_rows_grad(lp, old, adv, mask, ref, scales, params: ObjectiveParams, weights=None) -> torch.Tensor:
    """∂loss/∂ℓ [b, T] fp32 of some rows of a batch, given their aggregation scales (`row_scales` of the whole batch).

    Rows do not interact in the objective (the trace runs along a row, the clip and KL per token, and the
    normalisers depend only on the mask), so the gradient of a block of rows needs only those rows: this is what lets
    the fused loss form an off-policy gradient chunk by chunk. lp/old/ref/mask [b, T], adv [b] or [b, T], scales [b],
    weights None or [b, T].
    """
    b, T = lp.shape
    coef = torch.empty((b, T), dtype=torch.float32, device=lp.device)
    if b == 0 or T == 0:
        return coef
    lp = lp.contiguous()
    mask_k = kernel_mask(mask)
    stats = torch.empty((b, N_STATS), dtype=torch.float32, device=lp.device)
    _launch_forward_rows(lp, old, adv, mask_k, ref, params, coef, stats, weights)
    one = torch.ones((1,), dtype=torch.float32, device=lp.device)
    return objective_backward(one, (coef, scales.to(torch.float32).contiguous(), mask_k), lp, old, ref, params,
                              torch.float32)


def onpolicy_token_grad(adv, mask_f, scales, params: ObjectiveParams, weights=None) -> torch.Tensor:
    """On-policy ∂loss/∂ℓ [B, T] fp32 without the KL term: −m_j·Σ_{t≥j} w(t, j)·n_t·Â_t (grpo_lambda.md §5).

    `scales` [B] from `lambda_kernels._core.normalizers.row_scales` (n_t = m_t·s_i). With ℓ_old = ℓ the traced
    ratio is 1 everywhere, which no clip range with ε ≥ 0 clips, so every token's coefficient is −n_t·Â_t and the
    gradient is one reverse scan; it does not depend on the log-probs. weights (None or [B, T]): the policy term's
    per-token weights w, so the coefficient is −n_t·w_t·Â_t. SAPO's gate has slope 1 at ρ̃ = 1, so its gradient is
    the same; CISPO's is −n_j·w_j·min(1, c)·Â_j on each log-prob, unscanned (`scan_params`), and VESPO's
    −n_j·w_j·Â_j (φ(1) = 1).
    """
    a = adv.to(torch.float32)
    a = a.unsqueeze(1) if a.dim() == 1 else a
    if params.adv_clamp_min is not None:
        a = a.clamp(min=params.adv_clamp_min)
    m = mask_f
    if isinstance(params.policy, UNSCANNED):
        # CISPO's weight min(ρ̃, c) at ρ̃ = 1, VESPO's φ(1) = 1 (SAPO's gate has slope 1 there: as the clip's); their
        # coefficient is on ℓ itself, which the unscanned backward multiplies by m once (the others' m is that of
        # z = trace(m·Δ))
        if isinstance(params.policy, CISPO):
            a = a * min(1.0, params.policy.max_ratio)
        m = torch.ones((), device=a.device)
    coef = torch.where(mask_f != 0, -m * scales.unsqueeze(1) * a, torch.zeros((), device=a.device))
    if weights is not None:  # (a weight of 0, or padding's, adds exactly 0 whatever the weight tensor holds there)
        w = weights.to(torch.float32)
        coef = torch.where((mask_f != 0) & (w != 0), coef * w, torch.zeros((), device=a.device))
    return trace_backward(coef, mask_f, scan_params(params))
