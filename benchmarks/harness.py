"""Shared benchmark machinery: the card's ceilings, GPU timing (eager and CUDA-graph replay).

Times are medians of `triton.testing.do_bench` (CUDA events, L2 flushed between repetitions). Eager times include
any gap the CPU leaves between launches; graph-replay times remove launch overhead and show what the kernels cost.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch


def _set_env(values: dict) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def scoped_env(values: dict):
    """Environment variables set (value None: unset) inside the block, restored after (the library reads its knobs
    on every call, so a benchmark case switches paths this way)."""
    before = {k: os.environ.get(k) for k in values}
    try:
        _set_env(values)
        yield
    finally:
        _set_env(before)


def do_bench(fn, *, warmup=25, rep=100) -> float:
    from triton.testing import do_bench as _do_bench

    return float(_do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_bench(fn, *, rep=100) -> float | None:
    """Median ms of fn replayed from a CUDA graph, or None when fn cannot be captured."""
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except Exception:  # capture is an optional view; a failure is reported as n/a
        return None


# The ceilings' warm-up and repetitions (ms) are those of the script that measured the anchors
# (../shared/tools/anchors_gpu.py), so that our ratios and theirs divide by rates measured alike.
def _copy_tbps() -> float:
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=200)
    return 2 * n / (ms * 1e-3) / 1e12


def matmul_tflops() -> float:
    """The bf16 matmul rate on 8192³ now (TFLOP/s). `ceilings` keeps the run's first measurement, which every ratio
    divides by; measured again later in a run, it shows how far the card's clocks have drifted since."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ b, warmup=50, rep=300)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


@functools.lru_cache(maxsize=None)
def ceilings() -> dict:
    """Copy bandwidth (TB/s, bytes read + written) and bf16 matmul rate (TFLOP/s on 8192³), measured once (each
    measurement's buffers are freed when its function returns)."""
    copy_tbps = _copy_tbps()
    tflops = matmul_tflops()
    torch.cuda.empty_cache()
    return {"copy_TBps": copy_tbps, "bf16_matmul_TFLOPs": tflops}


# the GRPO-λ options every benchmark of ours runs with (the paper's: trace both, λ 0.99, clamp −0.1; β 0.04 k3 KL)
LOSS_OPTIONS = {"trace": "both", "lam": 0.99, "adv_clamp_min": -0.1, "beta": 0.04, "loss_type": "dapo"}


@functools.lru_cache(maxsize=None)
def copy_ms(shape: tuple, dtype: torch.dtype = torch.float32) -> float:
    """Time to copy a tensor of `shape` once on this card (the byte floor unit of the scan targets), measured once
    per shape so that every provider's "× floor" divides by the same number."""
    t = torch.randn(shape, device="cuda").to(dtype)
    out = torch.empty_like(t)
    return do_bench(lambda: out.copy_(t))
