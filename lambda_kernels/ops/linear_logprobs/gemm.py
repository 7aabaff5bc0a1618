"""The LM-head GEMMs with fp32 output or accumulation from bf16/fp16 operands, on whatever this torch build offers."""
from __future__ import annotations

import torch

from . import dw_gemm

_CUDA_CAPS: dict[str, dict[str, bool]] = {}


def cuda_gemm_caps(device) -> dict[str, bool]:
    """Which fp32-output half-precision GEMM forms this CUDA build supports, probed once per device on tiny inputs.

    mm_out:    torch.mm(a, b, out_dtype=float32, out=buf)            (writes the logits chunk in place)
    mm:        torch.mm(a, b, out_dtype=float32)                     (torch >= 2.11 on CUDA)
    addmm_acc: torch.addmm(acc, a, b, out_dtype=float32, out=acc)    (dW accumulated in place, fp32)
    """
    key = str(device)
    if key not in _CUDA_CAPS:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(64, 48, device=device, generator=g).to(torch.bfloat16)
        b = torch.randn(48, 32, device=device, generator=g).to(torch.bfloat16)
        want = a.float() @ b.float()
        caps = {}
        for name, fn in [
            ("mm_out", lambda: torch.mm(a, b, out_dtype=torch.float32,
                                        out=torch.empty(64, 32, device=device))),
            ("mm", lambda: torch.mm(a, b, out_dtype=torch.float32)),
            ("addmm_acc", lambda: (lambda acc: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc) - want)(
                torch.ones(64, 32, device=device))),
        ]:
            try:
                got = fn()
                ref = torch.ones_like(want) if name == "addmm_acc" else want
                caps[name] = got.dtype == torch.float32 and bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-3))
            except (RuntimeError, TypeError):
                caps[name] = False
        _CUDA_CAPS[key] = caps
    return _CUDA_CAPS[key]


class Gemm:
    """The LM-head GEMMs of one call (or one vocabulary slab), with fp32 output/accumulation wherever it matters.

    native: fp32/fp64 anywhere, and bf16/fp16 on CUDA (fp32-output GEMMs from half inputs, see `cuda_gemm_caps`).
    upcast: bf16/fp16 on CPU (the interpreter and the torch fallback), where half-input/fp32-output GEMMs do not
    exist: operands are upcast to fp32 (the weight once per call).
    """

    SLAB_BYTES = 64 << 20  # temporaries of the fallbacks for CUDA builds without the fused forms

    def __init__(self, weight: torch.Tensor, triton_dw: bool = False):
        """triton_dw: the dW GEMMs may take the Triton GEMM (`dw_gemm`, opt-in), for callers whose row kernels are
        Triton's (impl="torch" stays PyTorch throughout)."""
        self.triton_dw = triton_dw
        self.dtype = weight.dtype
        self.half = weight.dtype not in (torch.float32, torch.float64)
        self.native = not self.half or weight.is_cuda
        self.weight = weight if self.native else weight.to(torch.float32)
        self.caps = cuda_gemm_caps(weight.device) if self.half and self.native else {}

    def _slabs(self, n_rows: int, row_bytes: int):
        step = max(1, self.SLAB_BYTES // max(row_bytes, 1))
        for v0 in range(0, n_rows, step):
            yield slice(v0, min(v0 + step, n_rows))

    def logits(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out [m, V] fp32 ← x·Wᵀ."""
        w = self.weight
        if not self.half:
            torch.mm(x.to(out.dtype), w.t().to(out.dtype), out=out)
        elif not self.native:
            torch.mm(x.to(torch.float32), w.t(), out=out)
        elif self.caps["mm_out"]:
            torch.mm(x, w.t(), out_dtype=torch.float32, out=out)
        elif self.caps["mm"]:
            for sl in self._slabs(w.shape[0], 4 * x.shape[0]):
                out[:, sl].copy_(torch.mm(x, w[sl].t(), out_dtype=torch.float32))
        else:  # exact but slow: fp32 GEMM per vocabulary slab
            xf = x.to(torch.float32)
            for sl in self._slabs(w.shape[0], 4 * (x.shape[0] + w.shape[1])):
                torch.mm(xf, w[sl].to(torch.float32).t(), out=out[:, sl])

    def dx(self, d: torch.Tensor, out: torch.Tensor) -> None:
        """out [m, H] (hidden's dtype) ← D·W (one GEMM over V, fp32 accumulation inside it)."""
        if self.native:
            if out.dtype == d.dtype == self.weight.dtype:
                torch.mm(d, self.weight, out=out)
            else:
                out.copy_(torch.mm(d.to(self.weight.dtype), self.weight))
        else:
            out.copy_(torch.mm(d.to(torch.float32), self.weight))

    def dx_accumulate(self, acc: torch.Tensor, d: torch.Tensor) -> None:
        """acc [m, H] fp32 (fp64 for fp64) += D·W: dX summed over vocabulary slabs (the vocab plan)."""
        w = self.weight
        if not self.half:
            acc.addmm_(d.to(acc.dtype), w.to(acc.dtype))
        elif not self.native:
            acc.addmm_(d.to(torch.float32), w)
        elif self.caps["addmm_acc"]:
            torch.addmm(acc, d, w, out_dtype=torch.float32, out=acc)
        else:  # fp32-output GEMM per slab of rows, then add (bounded temporary)
            for sl in self._slabs(acc.shape[0], 4 * (acc.shape[1] + (0 if self.caps["mm"] else d.shape[1]))):
                if self.caps["mm"]:
                    acc[sl].add_(torch.mm(d[sl], w, out_dtype=torch.float32))
                else:
                    acc[sl].addmm_(d[sl].to(torch.float32), w.to(torch.float32))

    def _dw_operands(self, acc: torch.Tensor, d: torch.Tensor, x: torch.Tensor):
        """(Dᵀ, x, extra kwargs) for a GEMM into acc: half operands with an fp32 output on CUDA, else upcast."""
        if self.half and self.native:
            return d.t(), x, {"out_dtype": torch.float32}
        return d.t().to(acc.dtype), x.to(acc.dtype), {}

    def dw_write(self, acc: torch.Tensor, d: torch.Tensor, x: torch.Tensor) -> None:
        """acc [V, H] fp32 (fp64 for fp64) ← Dᵀ·x: the first piece of a dW sum, which then needs no zero fill (a
        4·V·H-byte write saved)."""
        if self.triton_dw and dw_gemm.serves(acc, d, x):  # (opt-in: LAMBDA_KERNELS_DW_GEMM=triton_tma)
            dw_gemm.run(acc, d, x, accumulate=False)
            return
        if self.half and self.native and not self.caps["mm_out"]:
            self.dw_accumulate(acc.zero_(), d, x)
            return
        a, b, kw = self._dw_operands(acc, d, x)
        torch.mm(a, b, out=acc, **kw)

    def dw_accumulate(self, acc: torch.Tensor, d: torch.Tensor, x: torch.Tensor) -> None:
        """acc [V, H] fp32 (fp64 for fp64) += Dᵀ·x."""
        if self.triton_dw and dw_gemm.serves(acc, d, x):
            dw_gemm.run(acc, d, x, accumulate=True)
            return
        if not (self.half and self.native) or self.caps["addmm_acc"]:
            a, b, kw = self._dw_operands(acc, d, x)
            torch.addmm(acc, a, b, out=acc, **kw)
        else:  # fp32-output GEMM per vocabulary slab, then add (bounded temporary)
            for sl in self._slabs(acc.shape[0], 4 * acc.shape[1]):
                if self.caps["mm"]:
                    acc[sl].add_(torch.mm(d[:, sl].t(), x, out_dtype=torch.float32))
                else:
                    acc[sl].addmm_(d[:, sl].t().to(torch.float32), x.to(torch.float32))
