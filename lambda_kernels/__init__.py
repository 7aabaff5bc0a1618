"""lambda-kernels: fused Triton kernels for GRPO-λ credit assignment in RL fine-tuning of LLMs."""
from .functional import (
    fused_grpo_lambda_loss,
    gae,
    group_advantages,
    grpo_lambda_loss,
    lambda_trace,
    linear_logprobs,
)
from .nn import FusedGRPOLambdaLoss, GRPOLambdaLoss
from .policy_losses import CISPO, SAPO, VESPO, Clip

__version__ = "0.1.0"

__all__ = [
    "group_advantages",
    "lambda_trace",
    "gae",
    "grpo_lambda_loss",
    "GRPOLambdaLoss",
    "linear_logprobs",
    "fused_grpo_lambda_loss",
    "FusedGRPOLambdaLoss",
    "Clip",
    "CISPO",
    "SAPO",
    "VESPO",
]
