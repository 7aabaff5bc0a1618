"""autograd.Function for linear_logprobs: the forward keeps only lse (and H); the backward recomputes each chunk."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .launch import logprobs_backward, logprobs_forward


@dataclass(frozen=True)
class LinearLogprobsParams:
    """Non-tensor options: 1/temperature (fp32 in kernels), whether H is returned, and the row backend."""

    inv_temperature: float
    return_entropy: bool
    rows_impl: str  # "triton" | "torch"
    shard: Any = None  # vocab_parallel.VocabShard of a vocabulary-parallel head


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tgt, params: LinearLogprobsParams):
        lp, lse, ent = logprobs_forward(x, weight, bias, tgt, params.inv_temperature, params.return_entropy,
                                        params.rows_impl, params.shard)
        ctx.save_for_backward(x, weight, bias, tgt, lse, ent)
        ctx.params = params
        ctx.set_materialize_grads(False)
        return (lp, ent) if params.return_entropy else lp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        x, weight, bias, tgt, lse, ent = ctx.saved_tensors
        params = ctx.params
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if g_lp is None and g_ent is None or not (need_dx or need_dw or need_db):
            return None, None, None, None, None
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        dx, dw, db = logprobs_backward(x, weight, bias, tgt, lse, ent, g_lp, g_ent, params.inv_temperature,
                                       params.rows_impl, need_dx, need_dw, need_db and bias is not None,
                                       params.shard)
        return dx, dw, db, None, None


@torch.compiler.disable
def linear_logprobs_apply(hidden, weight, bias, targets, params: LinearLogprobsParams):
    """(ℓ, H or None) with the shape of `targets`; autograd only when a gradient can flow (same forward values)."""
    H = hidden.shape[-1]
    x = hidden.reshape(-1, H)
    tgt = targets.reshape(-1).contiguous()
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        out = LinearLogprobsFunction.apply(x, weight, bias, tgt, params)
        lp, ent = out if params.return_entropy else (out, None)
    else:
        lp, _, ent = logprobs_forward(x.detach(), weight.detach(), None if bias is None else bias.detach(), tgt,
                                      params.inv_temperature, params.return_entropy, params.rows_impl, params.shard)
    lp = lp.reshape(targets.shape)
    return lp, (None if ent is None else ent.reshape(targets.shape))
