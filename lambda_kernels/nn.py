"""nn.Module wrappers that hold the hyper-parameters and call `lambda_kernels.functional`."""
from __future__ import annotations

import torch

from . import functional as F


class _OptionsModule(torch.nn.Module):
    """Holds the keyword options passed to the functional call on every forward."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class GRPOLambdaLoss(_OptionsModule):
    """GRPO-λ (or plain GRPO with trace=None) objective on per-token log-probs; see `grpo_lambda_loss`.

    Example:
        >>> loss_fn = GRPOLambdaLoss(trace="both", lam=0.99, adv_clamp_min=-0.1, beta=0.001)
        >>> loss, metrics = loss_fn(logprobs, None, advantages, mask, ref_logprobs=ref)
    """

    def __init__(self, *, trace: str | None = "both", lam: float = 0.99, gamma: float = 1.0,
                 adv_clamp_min: float | None = None, epsilon_low: float = 0.2, epsilon_high: float | None = None,
                 beta: float = 0.0, loss_type: str = "dapo", max_completion_length: int | None = None,
                 kl_bias_correction: bool = False, dual_clip: float | None = None,
                 importance_sampling_level: str = "token", policy_loss="clip", impl: str = "auto"):
        super().__init__(trace=trace, lam=lam, gamma=gamma, adv_clamp_min=adv_clamp_min, epsilon_low=epsilon_low,
                         epsilon_high=epsilon_high, beta=beta, loss_type=loss_type,
                         max_completion_length=max_completion_length, kl_bias_correction=kl_bias_correction,
                         dual_clip=dual_clip, importance_sampling_level=importance_sampling_level,
                         policy_loss=policy_loss, impl=impl)

    def forward(self, logprobs, old_logprobs, advantages, mask, ref_logprobs=None, num_items_in_batch=None,
                policy_weights=None):
        return F.grpo_lambda_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                                  num_items_in_batch=num_items_in_batch, policy_weights=policy_weights,
                                  **self.options)


class FusedGRPOLambdaLoss(_OptionsModule):
    """GRPO-λ loss straight from the last hidden states and the LM head; see `fused_grpo_lambda_loss`.

    The module holds the hyper-parameters only; the LM head is passed at call time (so a head tied to the
    embeddings, or gathered by FSDP/ZeRO-3 around the call, is used as is).

    Example:
        >>> loss_fn = FusedGRPOLambdaLoss(trace="both", lam=0.99, adv_clamp_min=-0.1, beta=0.001)
        >>> h = model.model(input_ids).last_hidden_state[:, P - 1:-1]      # aligned with completion_ids
        >>> loss, metrics = loss_fn(h, model.lm_head.weight, completion_ids, completion_mask, advantages,
        ...                         ref_logprobs=ref)
    """

    def __init__(self, *, trace: str | None = "both", lam: float = 0.99, gamma: float = 1.0,
                 adv_clamp_min: float | None = None, epsilon_low: float = 0.2, epsilon_high: float | None = None,
                 beta: float = 0.0, loss_type: str = "dapo", max_completion_length: int | None = None,
                 temperature: float = 1.0, return_entropy: bool = False, kl_bias_correction: bool = False,
                 dual_clip: float | None = None, importance_sampling_level: str = "token", policy_loss="clip",
                 impl: str = "auto", process_group=None, softcap: float | None = None,
                 entropy_coef: float = 0.0):
        super().__init__(trace=trace, lam=lam, gamma=gamma, adv_clamp_min=adv_clamp_min, epsilon_low=epsilon_low,
                         epsilon_high=epsilon_high, beta=beta, loss_type=loss_type,
                         max_completion_length=max_completion_length, temperature=temperature,
                         return_entropy=return_entropy, kl_bias_correction=kl_bias_correction,
                         dual_clip=dual_clip, importance_sampling_level=importance_sampling_level,
                         policy_loss=policy_loss, impl=impl, process_group=process_group, softcap=softcap,
                         entropy_coef=entropy_coef)

    def forward(self, hidden, weight, completion_ids, completion_mask, advantages, old_logprobs=None,
                ref_logprobs=None, bias=None, num_items_in_batch=None, policy_weights=None, entropy_weights=None):
        return F.fused_grpo_lambda_loss(hidden, weight, completion_ids, completion_mask, advantages,
                                        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, bias=bias,
                                        num_items_in_batch=num_items_in_batch, policy_weights=policy_weights,
                                        entropy_weights=entropy_weights, **self.options)
