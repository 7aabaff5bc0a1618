"""When and how the log-prob pass uses the Triton GEMM with the log-sum-exp epilogue (`lse_gemm_kernels.py`).

Environment variables read on every call:

    LAMBDA_KERNELS_LOGPROBS_GEMM     "auto" (default): "triton_tma" for a CUDA head TMA can load (NVIDIA Hopper or
                                     newer, triton ≥ 3.6, 16-byte aligned rows, the tiles' shared memory), else
                                     "cublas" (`gemm_for`)
                                     "cublas": fp32 logits chunks from cuBLAS, then the row kernel
                                     "triton": `lse_gemm_tiles_kernel` + `lse_gemm_merge_kernel`, no logits in memory
                                     "triton_tma": `lse_gemm_persistent_kernel` (TMA loads, one or two programs per
                                     SM) + the merge; where TMA cannot serve (rows not 16-byte aligned, not an NVIDIA
                                     Hopper-or-newer GPU, triton < 3.6) the "triton" kernel instead
    LAMBDA_KERNELS_LSE_GEMM_CONFIG   "BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,num_warps,num_stages" for either main loop

It serves bf16/fp16 heads with the Triton row backend (fp32/fp64 heads keep cuBLAS: tl.dot would need tf32 or a slow
exact mode). Every log-prob pass goes through `logprobs_forward`, so the grad and no-grad log-probs stay
bit-identical whichever GEMM is chosen. The fused loss's one-pass token chunks take the same GEMM with the
probability-emitting epilogue (`LseGemm` with emit; `fused_loss.launch.uses_probs_chunks`): their ℓ comes from the
same tiles and merge, so old log-probs taken with `linear_logprobs` give on-policy ratios of exactly 1 there too,
and a chunk holds 2 bytes per logit instead of 4 (twice the rows under the same budget). A backward whose rows' lse
is known (`launch.logprobs_backward`: `linear_logprobs`' own, the fused loss's second pass, a split plan's tail, the
vocab plan's slabs) takes it with the DLOGITS epilogue (`run_dlogits`; `launch.slab_dlogits_gemm`): dlogits written
from the fp32 accumulator, softcap and the entropy's gradient included, 2 bytes a logit. Only the one-pass chunks
under a softcap or an entropy bonus keep cuBLAS logits (their dlogits need each logit itself; their softmax uses
this kernel's lse: Σp = 1 to GEMM summation-order noise).

The default on Hopper since 2026-11-27: on an H100 (benchmarks/RESULTS.md) the fused loss through it took 0.93–0.97×
the 6·N·H·V floor on-policy at the four benchmark shapes in run 7 (1.02–1.08× in run 6, whose ceiling was measured
from a shorter burst), the cuBLAS chunks 1.09–1.31× in run 6, and its log-prob pass with `mask=` 0.80–0.87× the
2·N·H·V floor with 0.02–0.03 GiB of workspace in run 7 (run 6: 0.86–0.97×; cuBLAS 0.97–1.25×, ~0.9 GiB). On the
CPU (torch's GEMM; the interpreter's TMA is for tests), on GPUs without TMA and where the tiles do not fit
(`tma_config_fits`) "auto" is cuBLAS: "triton" (one program per tile) stays slower than cuBLAS (1.21–1.26× the floor
masked, at these tiles).
"""
from __future__ import annotations

import math
import os
import re

import torch
import triton

from ..._core.runtime import env_choice, interpreter_enabled
from ..real_tokens import gather_rows
from .lse_gemm_kernels import lse_gemm_merge_kernel, lse_gemm_persistent_kernel, lse_gemm_tiles_kernel
from .plan import forward_budget_bytes, piece_cap

GEMM_ENV = "LAMBDA_KERNELS_LOGPROBS_GEMM"
CONFIG_ENV = "LAMBDA_KERNELS_LSE_GEMM_CONFIG"
GEMM_CHOICES = ("cublas", "triton", "triton_tma", "auto")
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): the fastest of bench_lse_gemm.py's sweep on an H100
# (2026-11-27, two shapes, masked and not) for each main loop: [128, 256] tiles over 8 warps (the epilogue by column
# quarters), 3 stages of 64-deep bf16 tiles (144 KB of shared memory, which an A100's 164 KB would hold; compiled
# and measured for sm_90 only) for the per-tile kernel and 4 (192 KB; Hopper only, as TMA) for the persistent one.
# The same tile shape for both, so that a pass whose rows TMA cannot load falls back to the per-tile kernel with the
# same partial statistics.
GPU_CONFIG = (128, 256, 64, 8, 8, 3)
GPU_CONFIG_TMA = (128, 256, 64, 8, 8, 4)
INTERPRETER_CONFIG = (32, 64, 32, 2, 4, 1)
# rows and tile columns of a merge program's block (`lse_gemm_merge_kernel`): 32 fp32 rows fill a 128-byte line
MERGE_BLOCK_M = 32
MERGE_BLOCK_V = 64
# Rows per piece at most, whatever the budget allows: a masked pass of twice this many rows or more can then queue its
# first piece before the host knows the count of real tokens (`launch.logprobs_forward`); 2048 rows are still
# 2048 / BLOCK_M · V / BLOCK_N tiles a launch (36–72 waves of 264 programs at V 152k with 128-row tiles), so the
# extra launches cost little.
MAX_PIECE_ROWS = 2048
EPILOGUE_REGISTERS = 64  # accumulator values per thread a whole-tile epilogue handles without spilling
INTERPRETER_PROGRAMS = 3  # persistent programs under the interpreter: several tiles per program, as on a GPU
# Hopper SM limits (H100/H200) for `programs_per_sm`; SMEM_SLACK: the epilogue's and barriers' shared memory beyond the
# pipeline buffers (~1 KB measured with tests/sm90_compile.py)
SMEM_PER_SM = 228 * 1024
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255
SMEM_SLACK = 4096
TMA_MIN_TRITON = (3, 6)  # the persistent kernel is compiled and checked (tests/sm90_compile.py) on 3.6 and 3.7


def logprobs_gemm() -> str:
    return env_choice(GEMM_ENV, GEMM_CHOICES, "auto")


def gemm_for(weight: torch.Tensor) -> str:
    """The GEMM a pass over a head weight [V, H] takes: LAMBDA_KERNELS_LOGPROBS_GEMM, with "auto" (the default)
    resolved to "triton_tma" for a CUDA head TMA can load (`tma_serves`: Hopper or newer, triton ≥ 3.6, 16-byte
    aligned rows, hence H-long rows of the hidden states too), else "cublas" (the per-tile kernel is slower than
    cuBLAS; on the CPU the interpreter's TMA is for tests, not speed). It depends on the device and the head only, so
    a log-prob pass and the fused loss's chunks over the same head choose alike."""
    choice = logprobs_gemm()
    if choice != "auto":
        return choice
    return "triton_tma" if auto_takes_tma(weight) else "cublas"


def auto_takes_tma(weight: torch.Tensor) -> bool:
    """Whether "auto" takes the persistent TMA GEMM for this head: a CUDA head that TMA can load, on a GPU whose
    shared memory holds one program of the default tiles."""
    return weight.is_cuda and tma_serves(weight) and tma_config_fits(weight.device, weight.element_size())


def tma_config_fits(device: torch.device, element_size: int) -> bool:
    """Whether one program of the persistent kernel's tile configuration fits a block's shared memory on this GPU:
    a Hopper SM's 227 KB hold the default's ~196 KB of pipeline buffers, an sm_120 SM's ~100 KB do not (forced
    there, `triton_tma` would fail to launch; "auto" takes cuBLAS)."""
    return pipeline_smem(tile_config(tma=True), element_size) <= block_smem_limit(device)


def block_smem_limit(device: torch.device) -> int:
    """The shared memory one block may have on this GPU (its opt-in limit where torch reports it)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_multiprocessor",
                                                                         SMEM_PER_SM)


def tile_config(tma: bool = False) -> tuple[int, int, int, int, int, int]:
    """The tile configuration of the per-tile main loop, or with `tma` of the persistent one: CONFIG_ENV for both
    where set."""
    raw = os.environ.get(CONFIG_ENV, "").strip()
    if not raw:
        return INTERPRETER_CONFIG if interpreter_enabled() else GPU_CONFIG_TMA if tma else GPU_CONFIG
    try:
        values = tuple(int(v) for v in raw.split(","))
    except ValueError:
        values = ()
    if len(values) != 6 or any(v <= 0 for v in values) or any(v < 16 or v & (v - 1) for v in values[:3]):
        raise RuntimeError(f"{CONFIG_ENV} must be six positive integers BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,num_warps,"
                           f"num_stages (blocks powers of two ≥ 16, tl.dot's minimum), e.g. 128,128,64,8,8,4; "
                           f"got {raw!r}.")
    return values


def quarter_epilogue(block_m: int, block_n: int, num_warps: int) -> bool:
    """Whether the epilogue reduces a tile by column quarters: when the fp32 accumulator holds more than
    EPILOGUE_REGISTERS values per thread. Compiled for sm_90 (triton 3.6, the LSE-GEMM scenarios of
    tests/sm90_compile.py, both main loops): 128×256 and 256×128 tiles over 8 warps and 128×128 over 4 (128 values)
    spill 276–400 bytes per thread with a whole-tile epilogue under bias + entropy (0–368 without), none by quarters
    (halves, tried before, spilled up to 552); 128×128 over 8 warps (64 values) spills none whole."""
    return block_m * block_n // (32 * num_warps) > EPILOGUE_REGISTERS


def use_lse_gemm(x: torch.Tensor, weight: torch.Tensor, rows_impl: str) -> bool:
    """Whether this log-prob pass takes the Triton GEMM: chosen (`gemm_for`), Triton rows, a half-precision head,
    unit stride along H (a strided head stays on cuBLAS rather than being copied)."""
    return (rows_impl == "triton" and weight.dtype in (torch.float16, torch.bfloat16) and weight.stride(1) == 1
            and gemm_for(weight) != "cublas")


def _tma_descriptor_class():
    """triton's host-side TensorDescriptor, or None for a triton older than TMA_MIN_TRITON."""
    version = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
    if version < TMA_MIN_TRITON:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor


def tma_serves(*operands: torch.Tensor) -> bool:
    """Whether TMA descriptors can load these [rows, K] operands: unit stride along K, 16-byte aligned bases and row
    strides, on a Hopper-or-newer NVIDIA GPU (or the interpreter), with triton ≥ TMA_MIN_TRITON."""
    if _tma_descriptor_class() is None:
        return False
    device = operands[0].device
    if not interpreter_enabled() and (device.type != "cuda" or torch.version.hip is not None
                                      or torch.cuda.get_device_capability(device)[0] < 9):
        return False  # ROCm reports "cuda" devices too, with its own capability numbers: no TMA there
    return all(t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
               for t in operands)


def pipeline_smem(config: tuple, element_size: int) -> int:
    """Shared memory of one program of a tile configuration: its pipeline's X and W tiles, and SMEM_SLACK."""
    block_m, block_n, block_k, _, _, stages = config
    return stages * (block_m + block_n) * block_k * element_size + SMEM_SLACK


def programs_per_sm(config: tuple, element_size: int, smem_per_sm: int = SMEM_PER_SM,
                    registers_per_sm: int = REGISTERS_PER_SM) -> int:
    """Persistent programs that fit on one SM at once: 2 when a tile's pipeline buffers take at most half the SM's
    shared memory and its warps at most half the register file at 255 registers a thread (so one program's epilogue
    can run beside the other's main loop), else 1. The limits default to Hopper's."""
    smem = pipeline_smem(config, element_size)
    regs = config[4] * 32 * MAX_REGISTERS_PER_THREAD
    return 2 if 2 * smem <= smem_per_sm and 2 * regs <= registers_per_sm else 1


def persistent_programs(device: torch.device, config: tuple, element_size: int) -> int:
    """Programs of the persistent kernel: `programs_per_sm` per SM, whatever the number of tiles (a constant of the
    compiled kernel; programs past the last tile exit at once)."""
    if interpreter_enabled():
        return INTERPRETER_PROGRAMS
    props = torch.cuda.get_device_properties(device)
    # this card's limits where torch reports them (an sm_120 SM has ~100 KB of shared memory, not Hopper's 228)
    per_sm = programs_per_sm(config, element_size, getattr(props, "shared_memory_per_multiprocessor", SMEM_PER_SM),
                             getattr(props, "regs_per_multiprocessor", REGISTERS_PER_SM))
    return props.multi_processor_count * per_sm


class LseGemm:
    """The Triton GEMM with the log-sum-exp epilogue over pieces of at most `rows` rows of a [V, H] half head, and
    the merge: `run` writes lp, lse (and ent) of a piece's rows. Its buffers (the tiles' partial statistics, 12 bytes
    per row and tile column; with `emit` each range's max, 4 bytes per row and range) are allocated once.

    emit: the epilogue also stores u = e^(z − m)·2¹⁴ (fp16) into the `u` buffer `run` is given, and the ranges'
    maxima into `qm` [rows, ranges] (`lse_gemm_kernels`): what the fused loss's chunks turn into dlogits.
    dlogits: the GEMM of a backward whose rows' lse is known: `run_dlogits` writes the dlogits themselves (with_ent:
    with the entropy's gradient); no partials are held.
    """

    def __init__(self, weight, bias, tf, with_ent: bool, rows: int, emit: bool = False, dlogits: bool = False):
        config, config_tma = tile_config(), tile_config(tma=True)
        self.block_m, self.block_n, block_k = config[:3]
        # (the same pieces, partials and, with emit, column ranges whichever main loop runs)
        assert config_tma[:2] == (self.block_m, self.block_n), (config, config_tma)
        assert range_width(config) == range_width(config_tma), (config, config_tma)
        V, device = weight.shape[0], weight.device
        self.weight, self.bias, self.tf, self.with_ent, self.emit = weight, bias, tf, with_ent, emit
        self.n_v = triton.cdiv(V, self.block_n)
        self.range_width = range_width(config)
        held = 0 if dlogits else rows  # (the dlogits epilogue reads the caller's row statistics instead)
        self.part = torch.empty((3, self.n_v, held), dtype=torch.float32, device=device)
        self.zt = torch.empty((held,), dtype=torch.float32, device=device)
        self.qm = torch.empty((rows, range_count(V, config)) if emit else (1, 1),
                              dtype=torch.float32, device=device)
        self.use_tma = gemm_for(weight) == "triton_tma"
        self.config_tma = config_tma

        def meta(cfg):  # the kernels' compile-time arguments under tile configuration cfg
            _, _, cfg_k, cfg_group, cfg_warps, cfg_stages = cfg
            return dict(HAS_BIAS=bias is not None, SOFTCAP=tf.capped, WITH_ENT=with_ent, EMIT=emit, DLOGITS=dlogits,
                        UPCAST=interpreter_enabled(), BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=cfg_k,
                        GROUP_M=cfg_group, QUARTERS=quarter_epilogue(self.block_m, self.block_n, cfg_warps),
                        num_warps=cfg_warps, num_stages=cfg_stages)

        self.meta_tiles, self.meta_tma = meta(config), meta(config_tma)
        self.even_k = weight.shape[1] % block_k == 0

    def run(self, xs: torch.Tensor, tgt, lp, lse, ent, u: torch.Tensor | None = None) -> None:
        """lp, lse (ent) [m] of the rows xs [m, H] with targets tgt [m]; with emit, u [m, V] fp16 (unit stride along
        V, row stride a multiple of 16) and qm[:m]."""
        m = xs.shape[0]
        V = self.weight.shape[0]
        part, zt, qm = self.part, self.zt, self.qm
        assert not self.meta_tiles["DLOGITS"] and (u is not None) == self.emit and m <= part.shape[2], (m, part.shape)
        if self.emit:
            self._main_loop(xs, tgt, part, zt, u, qm, part.stride(0), part.stride(1), u.stride(0), qm.stride(0))
        else:
            self._main_loop(xs, tgt, part, zt, part, part, part.stride(0), part.stride(1), 0, 0)
        lse_gemm_merge_kernel[(triton.cdiv(m, MERGE_BLOCK_M),)](
            part, zt, lp, lse, ent if self.with_ent else lse, m, self.n_v, part.stride(0), part.stride(1),
            math.log(V), WITH_ENT=self.with_ent, BLOCK_M=MERGE_BLOCK_M, BLOCK_V=MERGE_BLOCK_V, num_warps=4)

    def run_dlogits(self, xs: torch.Tensor, tgt, stats: torch.Tensor, dl: torch.Tensor) -> None:
        """dl [m, V] (2-byte, unit stride along V) ← the dlogits of the rows xs [m, H] with targets tgt [m] and row
        statistics stats [4, m] fp32 (lse, ∂/∂ℓ, H, ∂/∂H; unit stride along m; the last two read only with
        with_ent)."""
        assert self.meta_tiles["DLOGITS"] and stats.stride(1) == 1 and stats.dtype == torch.float32, stats.stride()
        self._main_loop(xs, tgt, stats, stats, dl, stats, stats.stride(0), 0, dl.stride(0), 0)

    def _main_loop(self, xs, tgt, part, zt, u, qm, stride_stat, stride_col, stride_u, stride_qm) -> None:
        """The persistent TMA main loop where asked for and TMA serves, else the per-tile one."""
        m, K = xs.shape
        V = self.weight.shape[0]
        xs = xs if xs.stride(1) == 1 else xs.contiguous()  # the kernels read rows with unit stride along K
        b = self.weight if self.bias is None else self.bias
        strides = (stride_stat, stride_col, stride_u, stride_qm)
        if self.use_tma and tma_serves(xs, self.weight):
            descriptor = _tma_descriptor_class()
            programs = persistent_programs(xs.device, self.config_tma, xs.element_size())
            tma_k = self.config_tma[2]
            lse_gemm_persistent_kernel[(programs,)](
                descriptor.from_tensor(xs, [self.block_m, tma_k]),
                descriptor.from_tensor(self.weight, [self.block_n, tma_k]), b, tgt, part, zt, u, qm, m, V, K,
                *strides, *self.tf.kernel_args(), NUM_PROGRAMS=programs, **self.meta_tma)
        else:
            lse_gemm_tiles_kernel[(triton.cdiv(m, self.block_m) * self.n_v,)](
                xs, self.weight, b, tgt, part, zt, u, qm, m, V, K, xs.stride(0), self.weight.stride(0), *strides,
                *self.tf.kernel_args(), EVEN_K=self.even_k, **self.meta_tiles)


def range_width(config: tuple) -> int:
    """Columns of the ranges whose statistics the epilogue computes one after the other: a quarter of the tile
    where it reduces by quarters (`quarter_epilogue`), else the whole tile."""
    block_m, block_n, _, _, warps, _ = config
    return block_n // 4 if quarter_epilogue(block_m, block_n, warps) else block_n


def range_count(V: int, config: tuple) -> int:
    """Column ranges of a [.., V] row (its tiles' ranges, those past V included): the columns of `qm`."""
    return triton.cdiv(V, config[1]) * config[1] // range_width(config)


def emit_row_bytes(V: int) -> int:
    """Bytes a token chunk with the probability-emitting epilogue holds per row besides u's 2·V: the tiles' partial
    statistics, the ranges' maxima and the target's logit."""
    config = tile_config()
    return 12 * triton.cdiv(V, config[1]) + 4 * range_count(V, config) + 4


def lse_gemm_pass(x, weight, bias, tgt, tf, lp, lse, ent, gathered: bool):
    """(rows per piece, run(rows slice, positions or None)) of the log-prob pass without logits in memory: run
    writes lp, lse (and ent when not None) [slice] fp32 of x's rows against weight [V, H].

    gathered: run takes the positions of the rows in x, gathered piece by piece into a piece-sized buffer. The
    tiles' partial statistics (12 bytes per row and tile column), and the gathered rows, are bounded by the forward
    budget, and a piece by MAX_PIECE_ROWS rows: the pass runs in pieces when there are many rows.
    """
    N, K = tgt.shape[0], x.shape[1]
    block_m, block_n = tile_config()[:2]
    row_bytes = 12 * triton.cdiv(weight.shape[0], block_n) + K * x.element_size()  # (a gathered row counted whether
    # gathered or not: the same pieces)
    cap = piece_cap(min(MAX_PIECE_ROWS, max(block_m, forward_budget_bytes() // row_bytes)))
    gemm = LseGemm(weight, bias, tf, ent is not None, min(cap, N))
    x_buf = torch.empty((min(cap, N), K), dtype=x.dtype, device=x.device) if gathered else None

    def run(sl: slice, positions) -> None:
        gemm.run(gather_rows(x, positions, sl, x_buf), tgt[sl], lp[sl], lse[sl], None if ent is None else ent[sl])

    return cap, run
