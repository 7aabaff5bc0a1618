"""Plain-PyTorch oracles for every public op: same signatures (minus `impl`), obviously correct, O(T) memory.

They are what the tests compare the kernels with, what the benchmarks time as "torch", and the `impl="torch"`
fallback on machines without Triton. They compute in float64 when given float64, otherwise in float32.
"""
from .advantages import group_advantages
from .gae import gae
from .linear_logprobs import fused_grpo_lambda_loss, linear_logprobs
from .objective import grpo_lambda_loss
from .trace import lambda_trace, trace_weight_matrix

__all__ = ["group_advantages", "lambda_trace", "trace_weight_matrix", "gae", "grpo_lambda_loss", "linear_logprobs",
           "fused_grpo_lambda_loss"]
