"""autograd.Function for the fused loss: every gradient is computed in the forward (for grad_output = 1) and the
backward only scales it, so no logits or log-probs are kept between forward and backward. The fp32 dW sum of a half
LM head (`linear_logprobs.dw_sum.HalfHeadGradSum`: half of it in the gradient's own bytes) is held until the
backward, which scales and casts it in place in one pass (4·V·H bytes held between forward and backward, the
gradient's 2·V·H included, instead of the cast's 2·V·H; the peak is unchanged, as a cast in the forward would write
the same bytes). Under a memory budget (LAMBDA_KERNELS_MEMORY_BUDGET, set by default) it is cast in the forward; only
with "none" is it held."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..linear_logprobs.dw_sum import HalfHeadGradSum, scale_unless_one
from .launch import fused_loss_forward
from .objectives import metric_names


@dataclass(frozen=True)
class FusedLossParams:
    """Inputs autograd does not track: the objective (kernel or reference, holding ObjectiveParams), β, the logits'
    temperature and softcap (`LogitTransform`), entropy metric on/off, the row backend, the real (unmasked)
    tokens (`PendingTokens`: their positions in the flattened batch on the device, each row's count from the id
    check's host read, waited for inside the pass) and the entropy bonus."""

    objective: Any
    beta: float
    transform: Any  # linear_logprobs.logit_transform.LogitTransform
    with_entropy: bool
    rows_impl: str  # "triton" | "torch"
    shard: Any = None  # vocab_parallel.VocabShard of a vocabulary-parallel head
    tokens: Any = None
    bonus: Any = None  # entropy_bonus.EntropyBonus, or None (no entropy term in the loss)


def _run(hidden, weight, bias, ids, mask_f, adv, old, ref, pw, scales, params: FusedLossParams, needs):
    return fused_loss_forward(hidden, weight, bias, ids, mask_f, adv, old, ref, pw, scales, params.objective,
                              beta=params.beta, tf=params.transform, with_entropy=params.with_entropy,
                              rows_impl=params.rows_impl, need_dx=needs[0], need_dw=needs[1], need_db=needs[2],
                              shard=params.shard, tokens=params.tokens, bonus=params.bonus)


class FusedGRPOLambdaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, mask_f, adv, old, ref, pw, scales, params: FusedLossParams):
        needs = tuple(ctx.needs_input_grad[:3])
        loss, metrics, (dx, dw, db) = _run(hidden, weight, bias, ids, mask_f, adv, old, ref, pw, scales, params,
                                           needs)
        values = torch.stack([metrics[k] for k in metric_names(params.objective.params, params.with_entropy)])
        ctx.mark_non_differentiable(values)
        # an uncast half-head dW sum is neither input nor output: kept on ctx as it is (its `finish` frees `rest`)
        ctx.dw_sum = dw if isinstance(dw, HalfHeadGradSum) else None
        ctx.save_for_backward(dx, None if ctx.dw_sum else dw, db)
        ctx.rows_impl = params.rows_impl
        return loss, values

    @staticmethod
    @once_differentiable  # the gradients were computed in the forward: there is no graph through them
    def backward(ctx, grad_loss, _grad_metrics):
        # Gradients already in their input's dtype are scaled in place (they are ours, and memory is the point; no
        # pass at all when grad_loss is 1: `scale_unless_one`), so a second backward through a retained graph fails
        # autograd's version check instead of silently scaling twice. A half head's fp32 dW sum is scaled and cast
        # in place into its gradient (`finish`), which raises on a second backward (its fp32 values are gone).
        dx, dw, db = ctx.saved_tensors
        grads = [None if g is None else scale_unless_one(ctx.rows_impl, g, grad_loss) for g in (dx, dw, db)]
        if ctx.dw_sum is not None:  # (dw is None then)
            grads[1] = ctx.dw_sum.finish(ctx.rows_impl, grad_loss)
        return (*grads, None, None, None, None, None, None, None, None)


@torch.compiler.disable
def fused_grpo_lambda_apply(hidden, weight, bias, ids, mask_f, adv, old, ref, pw, scales, params: FusedLossParams):
    """(loss, metrics dict); gradients flow to hidden, weight and bias only (the other inputs are constants)."""
    old = None if old is None else old.detach()
    ref = None if ref is None else ref.detach()
    pw = None if pw is None else pw.detach()
    adv = adv.detach()
    tracked = [hidden, weight] + ([bias] if bias is not None else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        loss, values = FusedGRPOLambdaFunction.apply(hidden, weight, bias, ids, mask_f, adv, old, ref, pw, scales,
                                                     params)
        metrics = dict(zip(metric_names(params.objective.params, params.with_entropy), values.unbind(0)))
        return loss, metrics
    loss, metrics, _ = _run(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), ids, mask_f,
                            adv, old, ref, pw, scales, params, (False, False, False))
    return loss, metrics
