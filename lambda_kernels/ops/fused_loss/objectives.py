"""The token objective seen by the fused loss: the same maths through the core kernels or through the reference.

Three questions the fused passes ask of it:
  onpolicy_grad  ∂loss/∂ℓ [B, T] when ℓ_old = ℓ, without the KL term (it does not depend on ℓ; grpo_lambda.md §5)
  rows_grad      ∂loss/∂ℓ of a block of rows from their ℓ alone (rows do not interact; the normalisers are given)
  evaluate       loss, metrics (and optionally ∂loss/∂ℓ) of the whole batch
"""
from __future__ import annotations

import torch

from ... import reference
from ..._core.params import SEQUENCE_STYLE, TRACE_CODES, ObjectiveParams


def metric_names(params: ObjectiveParams, with_entropy: bool) -> tuple[str, ...]:
    from ..objective.launch import policy_metric_names

    return policy_metric_names(params.policy) + (("kl",) if params.beta > 0 else ()) + \
        (("entropy",) if with_entropy else ())


class KernelObjective:
    """The token objective through the core kernels (`ops/objective`)."""

    def __init__(self, params: ObjectiveParams, num_items_in_batch=None):
        self.params = params
        self.num_items_in_batch = num_items_in_batch

    def onpolicy_grad(self, adv, mask_f, scales, weights=None):
        from ..objective.launch import onpolicy_token_grad

        return onpolicy_token_grad(adv, mask_f, scales, self.params, weights)

    def rows_grad(self, lp, old, adv, mask_f, ref, scales, weights=None):
        from ..objective.launch import objective_rows_grad

        return objective_rows_grad(lp, old, adv, mask_f, ref, scales, self.params, weights)

    def evaluate(self, lp, old, adv, mask_f, ref, need_grad: bool, weights=None):
        from ..objective.launch import metric_views, objective_backward, objective_forward

        loss, values, saved = objective_forward(lp, old, adv, mask_f, ref, self.params, need_grad,
                                                self.num_items_in_batch, weights)
        metrics = metric_views(values, self.params.policy)
        grad = None
        if need_grad:
            one = torch.ones((), dtype=torch.float32, device=lp.device)
            grad = objective_backward(one, saved, lp, old, ref, self.params, torch.float32)
        return loss, metrics, grad


class ReferenceObjective:
    """The token objective through `lambda_kernels.reference` and autograd (the `impl="torch"` path)."""

    def __init__(self, params: ObjectiveParams, num_items_in_batch=None):
        self.params = params
        sequence_level = params.trace.style == SEQUENCE_STYLE
        style = None if sequence_level else {code: name for name, code in TRACE_CODES.items()}[params.trace.style]
        self.options = dict(trace=style, importance_sampling_level="sequence" if sequence_level else "token",
                            lam=params.trace.a, gamma=1.0, adv_clamp_min=params.adv_clamp_min,
                            epsilon_low=params.epsilon_low, epsilon_high=params.epsilon_high, beta=params.beta,
                            loss_type=params.loss_type, max_completion_length=params.max_completion_length,
                            num_items_in_batch=num_items_in_batch, kl_bias_correction=params.kl_bias_correction,
                            dual_clip=params.dual_clip, policy_loss=params.policy)

    def onpolicy_grad(self, adv, mask_f, scales, weights=None):
        lp = torch.zeros(mask_f.shape, dtype=torch.float32, device=mask_f.device, requires_grad=True)
        with torch.enable_grad():
            loss, _ = reference.grpo_lambda_loss(lp, None, adv, mask_f, policy_weights=weights,
                                                 **{**self.options, "beta": 0.0})
            return torch.autograd.grad(loss, lp)[0]

    def rows_grad(self, lp, old, adv, mask_f, ref, scales, weights=None):
        # dr_grpo with max_completion_length = T weighs every token 1/(b·T): undo that, apply the batch's scales
        b, T = lp.shape
        leaf = lp.detach().requires_grad_(True)
        options = {**self.options, "loss_type": "dr_grpo", "max_completion_length": T, "num_items_in_batch": None}
        with torch.enable_grad():
            loss, _ = reference.grpo_lambda_loss(leaf, old, adv, mask_f, ref_logprobs=ref, policy_weights=weights,
                                                 **options)
            grad = torch.autograd.grad(loss, leaf)[0]
        return grad * (scales.to(grad.dtype) * (b * T)).unsqueeze(1)

    def evaluate(self, lp, old, adv, mask_f, ref, need_grad: bool, weights=None):
        leaf = lp.detach().requires_grad_(need_grad)
        with torch.enable_grad():
            loss, metrics = reference.grpo_lambda_loss(leaf, old, adv, mask_f, ref_logprobs=ref,
                                                       policy_weights=weights, **self.options)
            grad = torch.autograd.grad(loss, leaf)[0] if need_grad else None
        return loss.detach(), metrics, grad
