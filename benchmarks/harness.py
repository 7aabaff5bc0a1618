"""Shared benchmark machinery: the card's ceilings, GPU timing (eager and CUDA-graph replay).

Times are medians of `triton.testing.do_bench` (CUDA events, L2 flushed between repetitions). Eager times include
any gap the CPU leaves between launches; graph-replay times remove launch overhead and show what the kernels cost.
"""
from __future__ import annotations

import functools

import torch


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


@functools.lru_cache(maxsize=None)
def ceilings() -> dict:
    """Copy bandwidth (TB/s, bytes read + written) and bf16 matmul rate (TFLOP/s on 8192³), measured once."""
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100)
    copy_tbps = 2 * n / (ms * 1e-3) / 1e12
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ b, warmup=25, rep=100)
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_TBps": copy_tbps, "bf16_matmul_TFLOPs": tflops}


def copy_ms(t: torch.Tensor) -> float:
    """Time to copy `t` once on this card (the byte floor unit of the scan targets)."""
    out = torch.empty_like(t)
    return do_bench(lambda: out.copy_(t))


def sync_call(fn):
    """Wrap fn so pytest-benchmark's wall-clock timer sees finished GPU work."""
    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run
