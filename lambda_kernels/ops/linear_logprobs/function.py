"""autograd.Function for linear_logprobs: the forward keeps only lse (and H); the backward recomputes each chunk.
With a mask, only the rows of the unmasked tokens are computed (the others are 0 and get no gradient)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..real_tokens import PendingRows, scatter_real
from .launch import logprobs_backward, logprobs_forward
from .logit_transform import LogitTransform


@dataclass(frozen=True)
class LinearLogprobsParams:
    """Non-tensor options: the logits' temperature and softcap, whether H is returned, and the row backend."""

    transform: LogitTransform
    return_entropy: bool
    rows_impl: str  # "triton" | "torch"
    shard: Any = None  # vocab_parallel.VocabShard of a vocabulary-parallel head


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tgt, rows: PendingRows, params: LinearLogprobsParams):
        # rows: which rows of x are computed (tgt holds a target per entry of rows.positions, or per row of x); the
        # outputs are per computed row
        lp, lse, ent = logprobs_forward(x, weight, bias, tgt, params.transform, params.return_entropy,
                                        params.rows_impl, params.shard, rows)
        ctx.save_for_backward(x, weight, bias, tgt[: rows.count()], rows.rows(), lse, ent)
        ctx.params = params
        ctx.set_materialize_grads(False)
        if params.return_entropy and rows.rows() is None:  # (with rows, the caller's H is a scatter of it: a copy)
            ent = ent.clone()  # the caller's own H: editing it in place must not change what the backward reads
        return (lp, ent) if params.return_entropy else lp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        x, weight, bias, tgt, rows, lse, ent = ctx.saved_tensors
        params = ctx.params
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if g_lp is None and g_ent is None or not (need_dx or need_dw or need_db):
            return None, None, None, None, None, None
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        # (with rows, the passes gather them piece by piece and dX comes back for every row of x)
        dx, dw, db = logprobs_backward(x, weight, bias, tgt, lse, ent, g_lp, g_ent, params.transform,
                                       params.rows_impl, need_dx, need_dw, need_db and bias is not None,
                                       params.shard, rows=rows)
        return dx, dw, db, None, None, None


@torch.compiler.disable
def linear_logprobs_apply(hidden, weight, bias, targets, params: LinearLogprobsParams, rows: PendingRows):
    """(ℓ, H or None) with the shape of `targets`; autograd only when a gradient can flow (same forward values).

    rows: the tokens to compute (`PendingRows`: all of them, or the positions of some in the flattened targets,
    whose number the host learns inside the pass); the others get ℓ = H = 0 and no gradient, and their hidden states
    and targets reach no result.
    """
    H = hidden.shape[-1]
    x = hidden.reshape(-1, H)
    tgt = targets.reshape(-1)
    if rows.positions is not None:  # a target per entry: the real tokens' first, then in-bounds filler
        tgt = tgt.index_select(0, rows.positions[: tgt.shape[0]])
    tgt = tgt.contiguous()  # the kernels index it as a plain array (a strided 1-d targets reshapes to a view)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        out = LinearLogprobsFunction.apply(x, weight, bias, tgt, rows, params)
        lp, ent = out if params.return_entropy else (out, None)
    else:
        lp, _, ent = logprobs_forward(x.detach(), weight.detach(), None if bias is None else bias.detach(), tgt,
                                      params.transform, params.return_entropy, params.rows_impl, params.shard,
                                      rows)
    index = rows.rows()
    if index is not None:
        lp = scatter_real(lp, index, x.shape[0])
        ent = None if ent is None else scatter_real(ent, index, x.shape[0])
    lp = lp.reshape(targets.shape)
    return lp, (None if ent is None else ent.reshape(targets.shape))
