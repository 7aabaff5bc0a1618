"""autograd.Function for the GRPO-λ objective: the forward kernel saves ∂loss/∂z, the backward kernel scans it."""
from __future__ import annotations

import torch

from ..._core.params import ObjectiveParams
from .launch import metric_views, objective_backward, objective_forward


class GRPOLambdaObjectiveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp, old, adv, mask, ref, weights, num_items_in_batch, params: ObjectiveParams):
        need_grad = ctx.needs_input_grad[0]
        loss, values, saved = objective_forward(lp, old, adv, mask, ref, params, need_grad, num_items_in_batch,
                                                weights)
        # the metrics leave as the one buffer, split outside: views of it made in here would be outputs that
        # could not be edited in place (an all_reduce of a metric, say)
        ctx.mark_non_differentiable(values)
        # the metrics get no gradient: don't let autograd fill zero tensors for them on every backward
        ctx.set_materialize_grads(False)
        if need_grad:  # (ℓ_old only where the backward reads it: the ratio-weighted KL, off-policy)
            ctx.save_for_backward(lp, old if params.beta > 0 and params.kl_bias_correction else None, ref, *saved)
        ctx.params = params
        ctx.lp_dtype = lp.dtype
        return loss, values

    @staticmethod
    def backward(ctx, grad_loss, _grad_values):
        lp, old, ref, *saved = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 8
        grad_lp = objective_backward(grad_loss, saved, lp, old, ref, ctx.params, ctx.lp_dtype)
        return grad_lp, None, None, None, None, None, None, None


@torch.compiler.disable  # kernels launched by hand: a graph break for torch.compile, not a trace through them
def grpo_lambda_objective(lp, old, adv, mask, ref, params: ObjectiveParams, num_items_in_batch=None, weights=None):
    """(loss, metrics) through the kernels; no gradient flows to old, adv, ref, weights (constants of the loss)."""
    old = None if old is None else old.detach()
    ref = None if ref is None else ref.detach()
    weights = None if weights is None else weights.detach()
    loss, values = GRPOLambdaObjectiveFunction.apply(lp, old, adv.detach(), mask, ref, weights, num_items_in_batch,
                                                     params)
    metrics = {name: v for name, v in metric_views(values, params.policy).items() if name != "kl" or params.beta > 0}
    return loss, metrics
