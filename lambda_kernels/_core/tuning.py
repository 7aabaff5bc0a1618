"""Launch configurations: fixed by default, chosen from bucketed sizes (never autotuned under the interpreter)."""
from __future__ import annotations

import os

import triton

from .runtime import interpreter_enabled

# Largest block of a one-program-per-row scan on GPU; LAMBDA_KERNELS_SCAN_BLOCK (a power of two) overrides it,
# which is how the benchmarks sweep it.
DEFAULT_SCAN_BLOCK = 2048


def scan_config(T: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for a one-program-per-row scan over T steps.

    Large blocks keep the serial loop over a row short on GPU (each block costs a few dependent memory round
    trips); in the interpreter the cost grows with padded elements, so blocks stay small there.
    """
    if interpreter_enabled():
        cap = 256
    else:
        cap = int(os.environ.get("LAMBDA_KERNELS_SCAN_BLOCK", DEFAULT_SCAN_BLOCK))
    block = min(max(triton.next_power_of_2(max(T, 1)), 16), cap)
    return block, (4 if block <= 512 else 8 if block <= 2048 else 16)


# Below this many rows, a row longer than one block is split over a (chunks, B) grid (two launches) instead of one
# program per row walking its blocks in series: few long rows would leave most SMs idle. LAMBDA_KERNELS_CHUNKED_SCAN
# = "0" / "1" forces either path (tests cover both).
CHUNKED_SCAN_MAX_ROWS = 32
MAX_GRID_Y = 65535


def use_chunked_scan(B: int, T: int, block: int) -> bool:
    if T <= block or B > MAX_GRID_Y:  # (the chunked grid is (chunks, B): B on CUDA's grid y, at most 65535)
        return False
    forced = os.environ.get("LAMBDA_KERNELS_CHUNKED_SCAN", "")
    if forced in ("0", "1"):
        return forced == "1"
    return B < CHUNKED_SCAN_MAX_ROWS
