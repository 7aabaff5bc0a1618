"""Launch configurations: fixed by default, chosen from bucketed sizes (never autotuned under the interpreter)."""
from __future__ import annotations

import triton

from .runtime import interpreter_enabled


def scan_config(T: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for a one-program-per-row scan over T steps.

    Large blocks keep the serial loop over a row short on GPU; in the interpreter the cost grows with padded
    elements, so blocks stay small there.
    """
    cap = 256 if interpreter_enabled() else 2048
    block = min(max(triton.next_power_of_2(max(T, 1)), 16), cap)
    return block, (4 if block <= 512 else 8)
