"""The fp32 dW sum of a bf16/fp16 LM head in the token plan, half of it kept in the gradient tensor's own storage.

The token plan sums dW = Σ_chunks Dᵀ·X_c in fp32 (a half-precision sum drifts), and the result is cast to the
head's dtype. Held naively that is an fp32 [V, H] sum (4·V·H bytes) and, at the cast, the [V, H] gradient beside it
(2·V·H more). Here the gradient tensor is allocated first and its 2·V·H bytes hold the fp32 sums of the vocabulary
rows [0, split) (split ≈ V/2) while the chunks run; only rows [split, V) get a buffer of their own (`rest`; the
split plan's chunks sum rows [split, V_t) only, and its tail pass writes the gradient rows [V_t, V) later). The
cast then runs in place: the half-precision values of rows [0, split) are written over the first half of their own
fp32 bytes, after which `rest` is cast into the second half. Workspace beside the gradient: 2·V·H bytes throughout,
the cast included (it was 2·V·H during the chunks and 4·V·H at the cast).

The in-place cast walks the flat fp32 sum in blocks [a, b) with b ≤ 2a: a block's half-precision output covers
bytes [2a, 2b) and its fp32 input bytes [4a, 4b), disjoint, so one launch per block needs no barrier, and the
output lands on fp32 values of earlier blocks only (stream order: already read). The first block, whose output
would overlap its own input, goes through a small temporary.
"""
from __future__ import annotations

import torch
import triton

from .kernels import scale_cast_kernel
from .plan import split_rows

SCALE_CAST_BLOCK = 4096
FIRST_BLOCK = 1 << 20  # elements of the in-place cast's first block (through a 2-MiB temporary)
TORCH_BLOCK = 1 << 22  # the PyTorch path's blocks also bound its fp32 temporary (16 MiB)


def scale_cast(rows_impl: str, src: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """(src · scale) in `dtype`, into `out` (same shape; may share src's storage if their bytes are disjoint) or a
    new tensor. src contiguous fp32, scale a 0-d or 1-element fp32 tensor (read on the device: no host sync)."""
    assert src.is_contiguous() and src.dtype == torch.float32, (src.dtype, src.stride())
    if out is None:
        out = torch.empty(src.shape, dtype=dtype, device=src.device)
    if rows_impl == "torch":
        return out.copy_(src * scale.to(device=src.device, dtype=torch.float32))
    _launch_scale(src, scale, out, skip_one=False)
    return out


def scale_unless_one(rows_impl: str, grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale in place (a 0-d or 1-element tensor, read on the device): a gradient computed for
    grad_output = 1 scaled by the real one. The Triton kernel skips the pass where scale is 1 (`loss.backward()`),
    which a multiply would not: 4 bytes per bf16 weight, ~0.7 ms for a 7B head on an H100."""
    if rows_impl == "torch" or grad.dtype == torch.float64 or not grad.is_contiguous():
        return grad.mul_(scale.to(grad.dtype))
    _launch_scale(grad, scale, grad, skip_one=True)
    # an in-place write as autograd sees it (a mul_ would count too): a saved tensor used again fails its check
    torch.autograd.graph.increment_version(grad)
    return grad


def _launch_scale(src: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor, skip_one: bool) -> None:
    n = src.numel()
    if n:
        scale = scale.to(device=src.device, dtype=torch.float32).reshape(1)
        scale_cast_kernel[(triton.cdiv(n, SCALE_CAST_BLOCK),)](src, scale, dst, n, SKIP_ONE=skip_one,
                                                               BLOCK=SCALE_CAST_BLOCK, num_warps=8)


class HalfHeadGradSum:
    """fp32 dW sum of a [V, H] half-precision head: rows [0, split) in `grad`'s bytes, rows [split, rows) in `rest`
    (rows = V, or fewer for the split plan, whose tail pass writes the gradient rows [rows, V) after `finish`).

    `parts()` gives the (vocabulary rows, fp32 sum) pairs the dW GEMMs write; `finish(scale)` turns the sums into
    the gradient rows [0, rows) (scaled, e.g. by grad_output) and returns `grad`. It runs once: afterwards the fp32
    sums are gone and the object holds no tensor (autograd can then take the gradient over without a copy).
    """

    def __init__(self, grad: torch.Tensor, rest: torch.Tensor):
        self.grad, self.rest = grad, rest
        self.split = split_rows(grad.shape[0])
        self.rows = self.split + rest.shape[0]
        self.finished = False

    @classmethod
    def allocate(cls, weight: torch.Tensor, rows: int | None = None) -> "HalfHeadGradSum":
        """The gradient of `weight` and the sums of its vocabulary rows [0, rows) (default all), rows ≥ split."""
        assert weight.element_size() == 2, weight.dtype  # the layout puts two fp32 rows in one row pair's bytes
        V, H = weight.shape
        rows = V if rows is None else rows
        assert split_rows(V) <= rows <= V, (rows, V)
        grad = torch.empty((V, H), dtype=weight.dtype, device=weight.device)
        rest = torch.empty((rows - split_rows(V), H), dtype=torch.float32, device=weight.device)
        return cls(grad, rest)

    def _low(self) -> torch.Tensor:
        """The fp32 sums of rows [0, split), a view of grad's first 4·split·H bytes."""
        H = self.grad.shape[1]
        return self.grad.view(-1)[: 2 * self.split * H].view(torch.float32).view(self.split, H)

    def parts(self) -> list[tuple[slice, torch.Tensor]]:
        parts = [(slice(0, self.split), self._low())] if self.split else []
        return parts + ([(slice(self.split, self.rows), self.rest)] if self.rows > self.split else [])

    def finish(self, rows_impl: str, scale: torch.Tensor | None = None) -> torch.Tensor:
        """grad[:rows] ← (the fp32 sums · scale) in the head's dtype, in place (see the module docstring); drops
        `rest` and `grad`, which it returns."""
        if self.finished:
            raise RuntimeError("this dW sum was already cast into its gradient (a second backward through the fused "
                               "loss's graph is not supported: call it again instead of retain_graph=True)")
        self.finished = True
        scale = torch.ones((), dtype=torch.float32, device=self.grad.device) if scale is None else scale
        H = self.grad.shape[1]
        n = self.split * H
        low, out = self._low().view(-1), self.grad.view(-1)
        first = min(n, FIRST_BLOCK)
        if first:  # its output overlaps its own input: through a temporary
            out[:first].copy_(scale_cast(rows_impl, low[:first], scale, self.grad.dtype))
        # the PyTorch path's temporaries are a block's size; a Triton launch needs none
        cap = TORCH_BLOCK if rows_impl == "torch" else max(n, self.rest.numel())
        a = first
        while a < n:
            b = min(n, 2 * a, a + cap)
            scale_cast(rows_impl, low[a:b], scale, self.grad.dtype, out=out[a:b])
            a = b
        rest = self.rest.view(-1)  # onto bytes the blocks above have read, in blocks of `cap`
        for a in range(0, rest.numel(), max(cap, 1)):
            b = min(rest.numel(), a + cap)
            scale_cast(rows_impl, rest[a:b], scale, self.grad.dtype, out=out[n + a: n + b])
        grad, self.grad, self.rest = self.grad, None, None  # no reference left here: the caller owns the gradient
        return grad
