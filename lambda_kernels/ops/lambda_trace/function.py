"""autograd.Function for the λ-trace: forward causal scan, backward reverse scan."""
import torch

from ..._core.params import TraceParams
from .launch import trace_backward, trace_forward


class LambdaTraceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, params: TraceParams):
        ctx.save_for_backward(mask)
        ctx.params = params
        ctx.x_dtype = x.dtype
        ctx.set_materialize_grads(False)
        return trace_forward(x, mask, params)

    @staticmethod
    def backward(ctx, grad_z):
        (mask,) = ctx.saved_tensors
        if grad_z is None:
            return None, None, None
        grad_x = trace_backward(grad_z.to(torch.float32), mask, ctx.params, out_dtype=ctx.x_dtype)
        return grad_x, None, None


@torch.compiler.disable  # kernels launched by hand: a graph break for torch.compile, not a trace through them
def lambda_trace_apply(x: torch.Tensor, mask: torch.Tensor, params: TraceParams) -> torch.Tensor:
    return LambdaTraceFunction.apply(x, mask, params)
