"""The fused GRPO-λ loss from hidden states: rows of the masked tokens only, one pass on-policy, two off-policy.

On-policy (old_logprobs None) in the token plan (`linear_logprobs/plan.py`), per chunk: logits →
`onpolicy_rows_kernel` (ℓ, H, dlogits in place) → dX, dW GEMMs: 6·N·H·V FLOPs, every gradient ready at the end of
the forward. Off-policy, or under a memory budget that only the vocab plan meets: pass 1 computes ℓ for all tokens
(`logprobs_forward`), the objective gives ∂loss/∂ℓ [B, T], pass 2 recomputes the logits and turns them into dlogits
(`logprobs_backward`, either plan): 8·N·H·V FLOPs.

Padding costs nothing: tokens with mask 0 carry zero weight in the loss and zero gradient, so their rows are dropped
before the GEMMs (one host sync to count them) and their grad_hidden rows are zero.
"""
from __future__ import annotations

import torch

from ... import reference
from ..._core.params import TRACE_CODES, ObjectiveParams
from ..linear_logprobs import chunked_torch
from ..linear_logprobs.launch import grad_pipeline, logprobs_backward, logprobs_forward, plan_for, row_config, \
    stats_dtype
from .kernels import onpolicy_rows_kernel

OBJECTIVE_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio_mean")


def metric_names(beta: float, with_entropy: bool) -> tuple[str, ...]:
    return OBJECTIVE_METRICS + (("kl",) if beta > 0 else ()) + (("entropy",) if with_entropy else ())


class KernelObjective:
    """The token objective through the core kernels (`ops/objective`)."""

    def __init__(self, params: ObjectiveParams, num_items_in_batch=None):
        self.params = params
        self.num_items_in_batch = num_items_in_batch

    def onpolicy_grad(self, adv, mask_f, scales):
        from ..objective.launch import onpolicy_token_grad

        return onpolicy_token_grad(adv, mask_f, scales, self.params)

    def evaluate(self, lp, old, adv, mask_f, ref, need_grad: bool):
        from ..objective.launch import objective_backward, objective_forward

        loss, metrics, saved = objective_forward(lp, old, adv, mask_f, ref, self.params, need_grad,
                                                 self.num_items_in_batch)
        grad = None
        if need_grad:
            one = torch.ones((), dtype=torch.float32, device=lp.device)
            grad = objective_backward(one, saved, lp, ref, self.params, torch.float32)
        return loss, metrics, grad


class ReferenceObjective:
    """The token objective through `lambda_kernels.reference` and autograd (the `impl="torch"` path)."""

    def __init__(self, params: ObjectiveParams, num_items_in_batch=None):
        style = {code: name for name, code in TRACE_CODES.items()}[params.trace.style]
        self.options = dict(trace=style, lam=params.trace.a, gamma=1.0, adv_clamp_min=params.adv_clamp_min,
                            epsilon_low=params.epsilon_low, epsilon_high=params.epsilon_high, beta=params.beta,
                            loss_type=params.loss_type, max_completion_length=params.max_completion_length,
                            num_items_in_batch=num_items_in_batch)

    def onpolicy_grad(self, adv, mask_f, scales):
        lp = torch.zeros(mask_f.shape, dtype=torch.float32, device=mask_f.device, requires_grad=True)
        with torch.enable_grad():
            loss, _ = reference.grpo_lambda_loss(lp, None, adv, mask_f, **{**self.options, "beta": 0.0})
            return torch.autograd.grad(loss, lp)[0]

    def evaluate(self, lp, old, adv, mask_f, ref, need_grad: bool):
        leaf = lp.detach().requires_grad_(need_grad)
        with torch.enable_grad():
            loss, metrics = reference.grpo_lambda_loss(leaf, old, adv, mask_f, ref_logprobs=ref, **self.options)
            grad = torch.autograd.grad(loss, leaf)[0] if need_grad else None
        return loss.detach(), metrics, grad


def onpolicy_rows(rows_impl: str, logits, bias, tgt, g0, n, ref, beta: float, inv_t: float, lp, ent, dl) -> None:
    """ℓ (H) of a chunk and its dlogits for the token gradient g0 + β·n·(1 − exp(ref − ℓ)), written into dl."""
    if rows_impl == "torch" or logits.dtype == torch.float64:
        chunked_torch.onpolicy_rows(logits, bias, tgt, g0, n, ref, beta, inv_t, lp, ent, dl)
        return
    M, V = logits.shape
    block, warps = row_config(V)
    has_kl = ref is not None
    onpolicy_rows_kernel[(M,)](
        logits, logits if bias is None else bias, tgt, g0, n if has_kl else g0, ref if has_kl else g0, lp,
        lp if ent is None else ent, dl, logits.stride(0), dl.stride(0), V, inv_t, beta,
        HAS_BIAS=bias is not None, HAS_KL=has_kl, WITH_ENT=ent is not None, BLOCK_V=block, num_warps=warps)


def fused_loss_forward(hidden, weight, bias, ids, mask_f, adv, old, ref, scales, objective, *, beta: float,
                       inv_t: float, with_entropy: bool, rows_impl: str, need_dx: bool, need_dw: bool,
                       need_db: bool):
    """(loss 0-d fp32, metrics {name: 0-d fp32}, (dX [B, T, H], dW, db) for grad_output = 1, None where not needed).

    hidden [B, T, H] aligned with ids [B, T]; mask_f fp32 [B, T]; scales [B] fp32 (`row_scales`), n = mask·scale.
    """
    B, T, H = hidden.shape
    device = hidden.device
    sdt = stats_dtype(hidden)
    flat_mask = mask_f.reshape(-1)
    valid = (flat_mask != 0).nonzero().squeeze(1)  # one host sync: the number of real tokens
    all_valid = valid.numel() == B * T
    x = hidden.reshape(B * T, H)
    tgt = ids.reshape(-1)
    if not all_valid:
        x, tgt = x.index_select(0, valid), tgt.index_select(0, valid)
    x = x.contiguous()
    tgt = tgt.contiguous()
    Nv = x.shape[0]
    need_grad = need_dx or need_dw or need_db
    has_kl = beta > 0

    plan = plan_for(x, weight, need_dx, need_dw) if need_grad else None
    if old is None and need_grad and plan.kind == "tokens":  # on-policy: one pass, gradients formed with the logits
        g0 = objective.onpolicy_grad(adv, mask_f, scales).to(sdt).reshape(-1)
        g0 = (g0 if all_valid else g0.index_select(0, valid)).contiguous()
        n_v = ref_v = None
        if has_kl:
            n_v = (mask_f * scales.unsqueeze(1)).reshape(-1).to(sdt)
            ref_v = ref.reshape(-1).to(sdt)
            if not all_valid:
                n_v, ref_v = n_v.index_select(0, valid), ref_v.index_select(0, valid)
            n_v, ref_v = n_v.contiguous(), ref_v.contiguous()
        lp_v = torch.empty((Nv,), dtype=sdt, device=device)
        ent_v = torch.empty((Nv,), dtype=sdt, device=device) if with_entropy else None

        def row_fn(sl, logits, dl):
            onpolicy_rows(rows_impl, logits, bias, tgt[sl], g0[sl], None if n_v is None else n_v[sl],
                          None if ref_v is None else ref_v[sl], beta, inv_t, lp_v[sl],
                          None if ent_v is None else ent_v[sl], dl)

        dx_v, dw, db = grad_pipeline(x, weight, bias, row_fn, need_dx, need_dw, need_db, plan.rows)
        lp_full = _scatter_logprobs(lp_v, valid, all_valid, ref, (B, T), sdt, device)
        loss, metrics, _ = objective.evaluate(lp_full, None, adv, mask_f, ref, need_grad=False)
    else:  # off-policy, the vocab plan, or no gradient: log-probs of every token first
        lp_v, lse_v, ent_v = logprobs_forward(x, weight, bias, tgt, inv_t, with_entropy, rows_impl)
        lp_full = _scatter_logprobs(lp_v, valid, all_valid, ref, (B, T), sdt, device)
        loss, metrics, g = objective.evaluate(lp_full, old, adv, mask_f, ref, need_grad)
        dx_v = dw = db = None
        if need_grad:
            g_v = g.reshape(-1)
            g_v = g_v if all_valid else g_v.index_select(0, valid)
            dx_v, dw, db = logprobs_backward(x, weight, bias, tgt, lse_v, None, g_v, None, inv_t, rows_impl,
                                             need_dx, need_dw, need_db)

    metrics = dict(metrics)
    if with_entropy:
        m_v = flat_mask if all_valid else flat_mask.index_select(0, valid)
        metrics["entropy"] = ((m_v.to(sdt) * ent_v).sum() / flat_mask.sum().clamp(min=1.0)).to(torch.float32)
    dx = None
    if need_dx:
        if all_valid:
            dx = dx_v.reshape(B, T, H)
        else:
            dx = torch.zeros((B * T, H), dtype=hidden.dtype, device=device).index_copy_(0, valid, dx_v)
            dx = dx.reshape(B, T, H)
    loss = loss.to(torch.float32) if loss.dtype != torch.float64 else loss
    return loss, {k: metrics[k].detach().to(torch.float32) for k in metric_names(beta, with_entropy)}, (dx, dw, db)


def _scatter_logprobs(lp_v, valid, all_valid, ref, shape, dtype, device):
    """[B, T] log-probs: the computed ones at real tokens; at padding ℓ_ref (KL exactly 0 there) or 0."""
    if all_valid:
        return lp_v.reshape(shape)
    full = ref.to(dtype).reshape(-1).clone() if ref is not None else torch.zeros(
        (shape[0] * shape[1],), dtype=dtype, device=device)
    full.index_copy_(0, valid, lp_v)
    return full.reshape(shape)
