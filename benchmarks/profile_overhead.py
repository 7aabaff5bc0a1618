"""Where the host time of one small call goes (eager mode): validation, autograd, launches.

Prints per-call wall time with many calls in flight (a CPU-bound call shows its host cost) for each layer of the
λ-trace and objective stacks, then torch.profiler's top host ops. GPU only: `python -m benchmarks.profile_overhead`.
"""
import time

import torch

import lambda_kernels as lk
from lambda_kernels._core.params import TraceParams
from lambda_kernels.ops.lambda_trace.launch import trace_forward

from .bench_scans import make_inputs
from .harness import LOSS_OPTIONS


def per_call_us(fn, n=300):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    inp = make_inputs(64, 4096, "cuda")
    x = inp["x"].clone().requires_grad_()
    lp = inp["lp"].clone().requires_grad_()
    ones = torch.ones_like(x)
    params = TraceParams(a=0.99, style=2)
    out = torch.empty_like(x)
    cases = {
        "torch copy_ (one launch)": lambda: out.copy_(inp["x"]),
        "trace_forward launch only": lambda: trace_forward(inp["x"], inp["mask"], params),
        "lambda_trace fwd (no grad)": lambda: lk.lambda_trace(inp["x"], inp["mask"], lam=0.99, impl="triton"),
        "lambda_trace fwd (grad)": lambda: lk.lambda_trace(x, inp["mask"], lam=0.99, impl="triton"),
        "lambda_trace fwd+bwd": lambda: torch.autograd.grad(lk.lambda_trace(x, inp["mask"], lam=0.99, impl="triton"),
                                                            x, ones),
        "objective fwd+bwd": lambda: torch.autograd.grad(
            lk.grpo_lambda_loss(lp, inp["old"], inp["adv"], inp["mask"], ref_logprobs=inp["ref"], impl="triton",
                                **LOSS_OPTIONS)[0], lp),
    }
    for name, fn in cases.items():
        print(f"{name:32s} {per_call_us(fn):9.1f} us/call", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            cases["objective fwd+bwd"]()
            cases["lambda_trace fwd+bwd"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
