"""Tile configurations of the Triton log-sum-exp GEMM (LAMBDA_KERNELS_LOGPROBS_GEMM=triton) against the cuBLAS
log-prob pass, no-grad, bf16, at one shape: the data for choosing its default config and whether it becomes the
default path.

    PYTHONPATH=. python -m benchmarks.bench_lse_gemm          # GPU; ~1 minute (one compile per config)
    pytest benchmarks/bench_lse_gemm.py                       # the same as a benchmark case; an interpreter smoke on CPU
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R

from .bench_fused_loss import SHAPES, make_inputs, provider_env
from lambda_kernels.ops.linear_logprobs.lse_gemm import CONFIG_ENV

from .harness import ceilings, do_bench

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
CONFIGS = [(128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
           (128, 64, 64, 8, 4, 4), (256, 128, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3)]



def _with_config(config):
    if config is None:
        os.environ.pop(CONFIG_ENV, None)
    else:
        os.environ[CONFIG_ENV] = ",".join(map(str, config))


def main(shape: str = "qwen2.5-7b", time_budget_s: float | None = None) -> list[dict]:
    _, B, T, H, V = next(s for s in SHAPES if s[0] == shape)
    inp = make_inputs(B, T, H, V, "cuda")
    h = inp["hidden"].detach().reshape(-1, H)
    w, ids = inp["weight"].detach(), inp["ids"].reshape(-1)
    floor_ms = 2 * h.shape[0] * H * V / (ceilings()["bf16_matmul_TFLOPs"] * 1e12) * 1e3
    with torch.no_grad():
        lp_ref = R.linear_logprobs(h[:1024].float(), w.float(), ids[:1024])
    t_start = time.perf_counter()
    rows = []
    for provider, config in [("ours_logprobs", None)] + [("ours_logprobs_triton", c) for c in CONFIGS]:
        row = dict(shape=shape, provider=provider, config=config)
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            rows.append({**row, "error": "not run: time budget spent"})
            continue
        try:
            _with_config(config)
            with provider_env(provider), torch.no_grad():
                lp = lk.linear_logprobs(h[:1024], w, ids[:1024])
                rel = ((lp - lp_ref).norm() / lp_ref.norm()).item()
                ms = do_bench(lambda: lk.linear_logprobs(h, w, ids), warmup=25, rep=200)
            rows.append({**row, "ms": ms, "floor_ms": floor_ms, "over_floor": ms / floor_ms, "rel_err": rel})
        except Exception as e:  # a config that does not compile (shared memory, registers) is a finding
            rows.append({**row, "error": f"{type(e).__name__}: {e}"[:160]})
        finally:
            _with_config(None)
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(r: dict) -> str:
    name = f"{r['provider']} {r['config'] or ''}"
    if "error" in r:
        return f"{r['shape']:12s} {name:44s} {r['error']}"
    return f"{r['shape']:12s} {name:44s} {r['ms']:8.2f} ms  ×{r['over_floor']:.2f} of 2·N·H·V  rel err {r['rel_err']:.1e}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| shape | provider | tile config (BM, BN, BK, GROUP_M, warps, stages) | ms | × floor | rel err |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        config = "" if r["config"] is None else ", ".join(map(str, r["config"]))
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['provider']} | {config} | | | {r['error']} |")
        else:
            lines.append(f"| {r['shape']} | {r['provider']} | {config} | {r['ms']:.2f} | {r['over_floor']:.2f} | "
                         f"{r['rel_err']:.1e} |")
    return "\n".join(lines)


@pytest.mark.gpu
def test_lse_gemm_configs(benchmark):
    rows = main()
    benchmark.extra_info["rows"] = rows
    assert any("ms" in r for r in rows if r["provider"] == "ours_logprobs_triton"), rows
    assert all(r["rel_err"] < 1e-2 for r in rows if "rel_err" in r), rows
    benchmark.pedantic(lambda: None, rounds=1)


def test_smoke_interpreter(benchmark, monkeypatch):
    """CPU: the Triton LSE GEMM runs in the interpreter on fp16 and agrees with the cuBLAS-path twin."""
    if torch.cuda.is_available():
        pytest.skip("GPU present: the real case runs instead")
    inp = make_inputs(1, 40, 32, 200, "cpu", dtype=torch.float16)
    h, w, ids = inp["hidden"].detach()[0], inp["weight"].detach(), inp["ids"][0]
    with torch.no_grad():
        with provider_env("ours_logprobs"):
            want = lk.linear_logprobs(h, w, ids)
        with provider_env("ours_logprobs_triton"):
            got = benchmark.pedantic(lambda: lk.linear_logprobs(h, w, ids), rounds=1, iterations=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


if __name__ == "__main__":
    print(markdown_table(main()))
