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
