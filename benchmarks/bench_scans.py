"""λ-trace, GAE and the GRPO-λ objective: our kernels against what users would write instead.

Providers: `lambda_kernels` (the Triton kernels), `torch_loop` (the reference: a Python loop over T, which is what
verl's GAE does) and, for the trace, `torch_dense` (the O(T²) weight matrix and one matmul). Each GPU case checks
correctness against an independent implementation first, then records the median time (eager and replayed from a
CUDA graph) and the time over its byte floor:
  trace / GAE: one copy of the same fp32 [B, T] tensor (target: fwd+bwd ≤ 5×);
  objective:   reading lp, old, ref, mask, adv once and writing the gradient once at the measured copy bandwidth
               (target: fwd+bwd ≤ 3×).
Run `pytest benchmarks/bench_scans.py` (GPU cases skip on CPU; the smoke case runs in the interpreter), or
`python -m benchmarks.bench_scans` for the table.
"""
from __future__ import annotations

import time

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R

from .harness import LOSS_OPTIONS, ceilings, copy_ms, do_bench, graph_bench

SHAPES = [(64, 4096), (8, 32768)]
LOOP_MAX_T = 4096  # the Python-loop providers take seconds beyond this; they are timed at T = 4096 only
OPS = ["trace_fwd", "trace_fwdbwd", "gae_fwd", "objective_fwd", "objective_fwdbwd"]


def make_inputs(B: int, T: int, device, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    lp = -torch.rand(B, T, device=device, generator=g) * 2
    lengths = torch.randint(T // 2, T + 1, (B,), device=device, generator=g)
    mask = torch.arange(T, device=device).unsqueeze(0) < lengths.unsqueeze(1)  # right padding
    return dict(
        x=torch.randn(B, T, device=device, generator=g),
        mask=mask,
        rewards=torch.randn(B, T, device=device, generator=g),
        values=torch.randn(B, T, device=device, generator=g),
        lp=lp,
        old=lp + 0.05 * torch.randn(B, T, device=device, generator=g),
        ref=lp + 0.05 * torch.randn(B, T, device=device, generator=g),
        adv=torch.randn(B, device=device, generator=g),
    )


def make_fn(op: str, provider: str, inp: dict):
    """A zero-argument callable running `op` with `provider` on `inp` (fwd, or fwd+bwd)."""
    x = inp["x"].clone().requires_grad_()
    lp = inp["lp"].clone().requires_grad_()
    if op.startswith("trace"):
        if provider == "lambda_kernels":
            fwd = lambda: lk.lambda_trace(x, inp["mask"], lam=0.99, style="both", impl="triton")  # noqa: E731
        elif provider == "torch_loop":
            fwd = lambda: R.lambda_trace(x, inp["mask"], lam=0.99, style="both")  # noqa: E731
        elif provider == "torch_dense":
            W = R.trace_weight_matrix(x.shape[1], 0.99, "both", dtype=torch.float32).to(x.device)
            fwd = lambda: (x * inp["mask"]) @ W.T  # noqa: E731
        else:
            raise KeyError(provider)
        if op == "trace_fwd":
            return lambda: fwd().detach()
        return lambda: torch.autograd.grad(fwd(), x, torch.ones_like(inp["x"]))[0]
    if op == "gae_fwd":
        if provider == "lambda_kernels":
            return lambda: lk.gae(inp["rewards"], inp["values"], inp["mask"], gamma=1.0, lam=0.95, impl="triton")
        if provider == "torch_loop":
            return lambda: R.gae(inp["rewards"], inp["values"], inp["mask"], gamma=1.0, lam=0.95)
        raise KeyError(provider)
    if op.startswith("objective"):
        if provider == "lambda_kernels":
            fwd = lambda: lk.grpo_lambda_loss(lp, inp["old"], inp["adv"], inp["mask"], ref_logprobs=inp["ref"],  # noqa: E731
                                              impl="triton", **LOSS_OPTIONS)[0]
        elif provider == "torch_loop":
            fwd = lambda: R.grpo_lambda_loss(lp, inp["old"], inp["adv"], inp["mask"], ref_logprobs=inp["ref"],  # noqa: E731
                                             **LOSS_OPTIONS)[0]
        else:
            raise KeyError(provider)
        if op == "objective_fwd":
            return lambda: fwd().detach()
        return lambda: torch.autograd.grad(fwd(), lp)[0]
    raise KeyError(op)


def providers_for(op: str, T: int) -> list[str]:
    names = ["lambda_kernels"]
    if op.startswith("trace"):
        names.append("torch_dense")
    if T <= LOOP_MAX_T:
        names.append("torch_loop")
    return names


def check_correct(op: str, inp: dict) -> float:
    """Max abs difference of our result against an independent implementation (dense matrix or the loop), relative
    to the largest magnitude of the reference (the "both" gradient reaches ~T at early tokens)."""
    ours = make_fn(op, "lambda_kernels", inp)()
    other = "torch_dense" if op.startswith("trace") else "torch_loop"
    theirs = make_fn(op, other, inp)()
    ours, theirs = (ours if isinstance(ours, tuple) else (ours,)), (theirs if isinstance(theirs, tuple) else (theirs,))
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))
               for a, b in zip(ours, theirs))


def floor_ms(op: str, inp: dict) -> float:
    if op.startswith("objective"):
        n = inp["lp"].numel()
        nbytes = n * (4 + 4 + 4 + 1) + inp["adv"].numel() * 4 + n * 4  # lp, old, ref, mask; adv; the gradient
        return nbytes / (ceilings()["copy_TBps"] * 1e12) * 1e3
    return copy_ms(tuple(inp["x"].shape))


def time_once(fn) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def run_case(op: str, provider: str, inp: dict) -> dict:
    B, T = inp["x"].shape
    fn = make_fn(op, provider, inp)
    if provider == "torch_loop":
        ms, graph_ms = time_once(fn), None  # seconds per call: one timed call is plenty
    else:
        ms, graph_ms = do_bench(fn), graph_bench(fn)
    floor = floor_ms(op, inp)
    return dict(op=op, provider=provider, B=B, T=T, ms=ms, graph_ms=graph_ms, floor_ms=floor, over_floor=ms / floor)


@pytest.mark.gpu
@pytest.mark.parametrize("B, T", SHAPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("provider", ["lambda_kernels", "torch_dense", "torch_loop"])
def test_scan_benchmarks(benchmark, op, provider, B, T):
    if provider not in providers_for(op, T):
        pytest.skip(f"{provider} not run for {op} at T={T}")
    if provider == "lambda_kernels":
        err = check_correct(op, make_inputs(min(B, 2), T, "cuda"))
        assert err < 1e-4, f"{op}: relative error {err} against the independent implementation"
    row = run_case(op, provider, make_inputs(B, T, "cuda"))  # the timings (do_bench, graph replay) are in the row
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: None, rounds=1)  # the case is timed once, by run_case, not again here


@pytest.mark.parametrize("op", OPS)
def test_smoke_interpreter(benchmark, op):
    """CPU smoke case: the benchmark code paths execute (kernels interpreted, tiny shapes); timings mean nothing."""
    if torch.cuda.is_available():
        pytest.skip("GPU present: the real cases run instead")
    inp = make_inputs(2, 32, "cpu")
    err = check_correct(op, inp)
    assert err < 1e-4
    benchmark.pedantic(make_fn(op, "lambda_kernels", inp), rounds=1, iterations=1)


def sweep_blocks(blocks=(1024, 2048, 4096, 8192), ops=("trace_fwdbwd", "gae_fwd", "objective_fwdbwd")) -> None:
    """Graph-replayed time of our kernels for each scan block size (LAMBDA_KERNELS_SCAN_BLOCK)."""
    import os

    for B, T in SHAPES:
        for op in ops:
            inp = make_inputs(B, T, "cuda")
            cells = []
            for block in blocks:
                os.environ["LAMBDA_KERNELS_SCAN_BLOCK"] = str(block)
                t = graph_bench(make_fn(op, "lambda_kernels", inp))
                cells.append(f"{block}:{'n/a' if t is None else f'{t * 1e3:.1f}us'}")
            os.environ.pop("LAMBDA_KERNELS_SCAN_BLOCK")
            print(f"sweep {op:17s} B{B:<3d} T{T:<6d} " + "  ".join(cells), flush=True)


def main() -> list[dict]:
    rows = []
    for B, T in SHAPES:
        for op in OPS:
            err = check_correct(op, make_inputs(min(B, 2), T, "cuda"))
            inp = make_inputs(B, T, "cuda")
            for provider in providers_for(op, T):
                row = run_case(op, provider, inp)
                row["rel_err"] = err if provider == "lambda_kernels" else None
                rows.append(row)
                graph = "n/a" if row["graph_ms"] is None else f"{row['graph_ms']:.4f}"
                print(f"{op:17s} {provider:15s} B{B:<3d} T{T:<6d} {row['ms']:10.4f} ms  graph {graph:>8s} ms"
                      f"  floor {row['floor_ms']:.4f} ms  ×{row['over_floor']:.1f}  err {err:.1e}", flush=True)
    return rows


if __name__ == "__main__":
    import sys

    if "--sweep-only" not in sys.argv:
        print(ceilings())
        main()
    if "--sweep" in sys.argv or "--sweep-only" in sys.argv:
        sweep_blocks()
