"""When the dW sums of a half head take the Triton GEMM with the TMA-reduction epilogue (`dw_gemm_kernels.py`).

Environment variables read on every call:

    LAMBDA_KERNELS_DW_GEMM          "cublas" (default): torch.addmm into the fp32 sum
                                    "triton_tma": `dw_gemm_kernel` for the Triton row backend wherever TMA can load
                                    the operands and store the sum (a Hopper-or-newer NVIDIA GPU, triton ≥ 3.6,
                                    16-byte aligned rows) and a block's shared memory holds the tiles
                                    (`config_fits`: not an sm_120 SM's ~100 KB); cuBLAS elsewhere, and always for
                                    impl="torch"
    LAMBDA_KERNELS_DW_GEMM_CONFIG   "BLOCK_V,BLOCK_H,BLOCK_K,num_warps,num_stages,epilogue_pieces"

It was meant to remove the part of each chunk's dW time that run 6 measured beyond its matmul (the fp32 sum's read
and write: ~1 ms per 7B chunk measured; ~0.6 ms per 1.5B chunk by the same bytes at the copy rate). Run 7 measured
it slower than cuBLAS on an H100 (benchmarks/RESULTS.md: 0.8–1.1 ms a step at the default's plans; the 1.5B step's
dW 5.64 ms against cuBLAS's 5.44 in run 5), so it stays opt-in. Every dW GEMM of a half head goes
through `Gemm.dw_write` / `Gemm.dw_accumulate`, hence here: the token and split plans' chunks (both halves of
`HalfHeadGradSum`), the vocab plan's and the split tail's slabs.
"""
from __future__ import annotations

import os

import torch

from ..._core.runtime import env_choice, interpreter_enabled
from .dw_gemm_kernels import dw_gemm_kernel
from . import lse_gemm

DW_GEMM_ENV = "LAMBDA_KERNELS_DW_GEMM"
DW_CONFIG_ENV = "LAMBDA_KERNELS_DW_GEMM_CONFIG"
DW_GEMM_CHOICES = ("cublas", "triton_tma")
# (BLOCK_V, BLOCK_H, BLOCK_K, num_warps, num_stages, epilogue_pieces): the LSE GEMM's measured tile (128×256, 8 warps,
# 64-deep bf16 stages) with 3 stages (144 KiB) and the epilogue in two [128, 128] fp32 pieces through one 64-KiB
# staging buffer: 213,016 bytes of shared memory compiled for sm_90 (triton 3.6 and 3.7; with 3 stages a whole-tile
# staging buffer would not fit), 154 registers, no spills; run 7 timed it on an H100, slower than cuBLAS. With 2
# stages, or 32-deep ones, a whole-tile epilogue (one piece, no wait between halves) fits (DW_SMEM_SLACK), also
# spill-free: the bench provider ours_on_dw_tma_whole times 128,256,32,8,4,1 (not yet run).
GPU_DW_CONFIG = (128, 256, 64, 8, 3, 2)
INTERPRETER_DW_CONFIG = (32, 64, 32, 4, 1, 2)  # several tiles each way on the tests' small shapes
# shared memory beyond the pipeline's and the staging buffer's (`config_smem`): barriers, 24–40 bytes compiled for
# sm_90 at the default and the whole-tile configurations (128,256,64,8,2,1 and 128,256,32,8,4,1: 229,392 and 229,408
# bytes, within an H100's 232,448)
DW_SMEM_SLACK = 1024


def dw_gemm() -> str:
    return env_choice(DW_GEMM_ENV, DW_GEMM_CHOICES, "cublas")


def dw_config() -> tuple[int, int, int, int, int, int]:
    """The tile configuration: DW_CONFIG_ENV where set, else the GPU's or the interpreter's default."""
    raw = os.environ.get(DW_CONFIG_ENV, "").strip()
    if not raw:
        return INTERPRETER_DW_CONFIG if interpreter_enabled() else GPU_DW_CONFIG
    try:
        values = tuple(int(v) for v in raw.split(","))
    except ValueError:
        values = ()
    if (len(values) != 6 or any(v <= 0 for v in values) or any(v < 16 or v & (v - 1) for v in values[:3])
            or values[5] not in (1, 2)):
        raise RuntimeError(f"{DW_CONFIG_ENV} must be six positive integers BLOCK_V,BLOCK_H,BLOCK_K,num_warps,"
                           f"num_stages,epilogue_pieces (blocks powers of two ≥ 16, tl.dot's minimum; epilogue_pieces "
                           f"1 or 2), e.g. 128,256,64,8,3,2; got {raw!r}.")
    return values


def config_smem(config: tuple) -> int:
    """Shared memory of one program of a tile configuration (2-byte operands): the pipeline's Dᵀ and X tiles, the
    epilogue's fp32 staging buffer and DW_SMEM_SLACK (213,016 bytes compiled for the default, 214,016 by this
    count)."""
    block_v, block_h, block_k, _, stages, pieces = config
    return stages * (block_v + block_h) * block_k * 2 + block_v * block_h // pieces * 4 + DW_SMEM_SLACK


def config_fits(device: torch.device) -> bool:
    """Whether one program of the tile configuration fits a block's shared memory on this GPU (an H100's 227 KB
    hold the default; an sm_120 SM's ~100 KB do not: cuBLAS there). The interpreter has no such limit."""
    return interpreter_enabled() or config_smem(dw_config()) <= lse_gemm.block_smem_limit(device)


def takes(weight: torch.Tensor, rows_impl: str) -> bool:
    """Whether a gradient pass of the `rows_impl` row backend over this [V, H] head takes the Triton dW GEMM, for
    the planner (`plan.grad_plan(triton_dw=)`): chosen, Triton rows, a 2-byte head TMA can load (hence H-long rows
    of the hidden states too) on a GPU where the tiles fit. Each GEMM still checks its own operands (`serves`)."""
    return (rows_impl == "triton" and dw_gemm() == "triton_tma" and weight.dtype in (torch.float16, torch.bfloat16)
            and lse_gemm.tma_serves(weight) and config_fits(weight.device))


def serves(acc: torch.Tensor, d: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether acc [V, H] fp32 (+)= dᵀ·x takes the Triton GEMM: chosen, 2-byte operands of one dtype, TMA can
    load d [M, V] and x [M, H] and store acc (unit strides along V and H, 16-byte aligned starts and rows: a
    column slice of d starting at a multiple of 8, as `plan.split_rows`), and the tiles fit the GPU."""
    return (dw_gemm() == "triton_tma" and d.dtype == x.dtype and d.dtype in (torch.float16, torch.bfloat16)
            and acc.dtype == torch.float32 and tuple(acc.shape) == (d.shape[1], x.shape[1])
            and d.shape[0] == x.shape[0] and lse_gemm.tma_serves(d, x, acc) and config_fits(acc.device))


def _programs(device: torch.device) -> int:
    """One program per SM: a program's ~208 KiB of shared memory leave no room for a second."""
    if interpreter_enabled():
        return lse_gemm.INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def run(acc: torch.Tensor, d: torch.Tensor, x: torch.Tensor, accumulate: bool) -> None:
    """acc += dᵀ·x (accumulate) or acc = dᵀ·x, for operands `serves` accepts."""
    M, H = x.shape
    V = d.shape[1]
    if M == 0:
        if not accumulate:
            acc.zero_()
        return
    block_v, block_h, block_k, warps, stages, pieces = dw_config()
    descriptor = lse_gemm._tma_descriptor_class()
    programs = _programs(x.device)
    dw_gemm_kernel[(programs,)](
        descriptor.from_tensor(d, [block_k, block_v]), descriptor.from_tensor(x, [block_k, block_h]),
        descriptor.from_tensor(acc, [block_v, block_h // pieces]), M, V, H, ACCUMULATE=accumulate,
        REDUCE=not interpreter_enabled(), UPCAST=interpreter_enabled(), BLOCK_V=block_v, BLOCK_H=block_h,
        BLOCK_K=block_k, EPILOGUE_PIECES=pieces, NUM_PROGRAMS=programs, num_warps=warps, num_stages=stages)
