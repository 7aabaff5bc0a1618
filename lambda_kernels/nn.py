"""nn.Module wrappers that hold the hyper-parameters and call `lambda_kernels.functional`."""
from __future__ import annotations

import torch

from . import functional as F


class GRPOLambdaLoss(torch.nn.Module):
    """GRPO-λ (or plain GRPO with trace=None) objective on per-token log-probs; see `grpo_lambda_loss`.

    Example:
        >>> loss_fn = GRPOLambdaLoss(trace="both", lam=0.99, adv_clamp_min=-0.1, beta=0.001)
        >>> loss, metrics = loss_fn(logprobs, None, advantages, mask, ref_logprobs=ref)
    """

    def __init__(self, *, trace: str | None = "both", lam: float = 0.99, gamma: float = 1.0,
                 adv_clamp_min: float | None = None, epsilon_low: float = 0.2, epsilon_high: float | None = None,
                 beta: float = 0.0, loss_type: str = "dapo", max_completion_length: int | None = None,
                 impl: str = "auto"):
        super().__init__()
        self.options = dict(trace=trace, lam=lam, gamma=gamma, adv_clamp_min=adv_clamp_min, epsilon_low=epsilon_low,
                            epsilon_high=epsilon_high, beta=beta, loss_type=loss_type,
                            max_completion_length=max_completion_length, impl=impl)

    def forward(self, logprobs, old_logprobs, advantages, mask, ref_logprobs=None, num_items_in_batch=None):
        return F.grpo_lambda_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                                  num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
