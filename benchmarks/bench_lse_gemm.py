"""The log-prob pass (no grad, bf16) through cuBLAS + the row kernel against the two Triton GEMMs with a log-sum-exp
epilogue (LAMBDA_KERNELS_LOGPROBS_GEMM=triton: one program per tile; triton_tma: persistent, TMA loads) over tile
configurations, and cuBLAS over logits budgets (its chunk rows), with and without the completion mask: the data for
choosing their configs, the chunk policy, and whether a Triton GEMM becomes the default path. Floor = 2·N·H·V with
N = B·T (padding included) at the card's matmul rate, for both columns.

    PYTHONPATH=. python -m benchmarks.bench_lse_gemm          # GPU; ~2 minutes (one compile per config)
    pytest benchmarks/bench_lse_gemm.py                       # the same as a benchmark case; interpreter runs on CPU
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import triton

import lambda_kernels as lk
from lambda_kernels import reference as R

from .bench_fused_loss import SHAPES, make_inputs
from lambda_kernels.ops.linear_logprobs import lse_gemm
from lambda_kernels.ops.linear_logprobs.lse_gemm import CONFIG_ENV, GEMM_ENV
from lambda_kernels.ops.linear_logprobs.plan import BUDGET_ENV, MEMORY_BUDGET_ENV

from .harness import ceilings, do_bench, scoped_env

# Per GEMM, its configs, most informative first (a time budget may cut the list). Triton: (BLOCK_M, BLOCK_N, BLOCK_K,
# GROUP_M, num_warps, num_stages), the default, then the 128×256 tile (the best of the per-tile kernel in an earlier
# run), then tiles of 4 warps that fit two programs per SM (one's epilogue beside the other's main loop), then the
# rest. cuBLAS: the logits budget (None: the default 1G), which sets its chunk rows, hence which cuBLAS kernel runs
# (an earlier profile at 1.5B: 611 TFLOP/s on 1664-row chunks, 696 on the 1536-row last one).
CONFIGS = {
    "cublas": [None, "768M", "512M", "256M"],
    "triton_tma": [(128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 3), (256, 128, 64, 8, 8, 3),
                   (128, 256, 64, 8, 8, 4), (128, 128, 64, 8, 8, 5), (128, 128, 128, 8, 8, 3)],
    "triton": [(128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 3), (64, 128, 64, 8, 4, 4)],
}
BENCH_SHAPES = ("qwen2.5-1.5b", "qwen2.5-7b")


def _cases():
    """(gemm, config) in the order they are measured: the first config of every GEMM, then the second of each, …"""
    for rank in range(max(len(c) for c in CONFIGS.values())):
        for gemm, configs in CONFIGS.items():
            if rank < len(configs):
                yield gemm, configs[rank]


def _case_env(gemm: str, config) -> dict:
    """The library's knobs for one case (the others unset: defaults; a memory budget would cap the logits')."""
    if gemm == "cublas":
        return {GEMM_ENV: "cublas", CONFIG_ENV: None, BUDGET_ENV: config, MEMORY_BUDGET_ENV: None}
    return {GEMM_ENV: gemm, CONFIG_ENV: ",".join(map(str, config)), BUDGET_ENV: None, MEMORY_BUDGET_ENV: None}


def _shape_inputs(shape: str, device: str) -> dict:
    _, B, T, H, V = next(s for s in SHAPES if s[0] == shape)
    # bf16 on a GPU; fp16 for the interpreter's dry run (its bf16 arithmetic is wrong)
    inp = make_inputs(B, T, H, V, device, dtype=torch.bfloat16 if device == "cuda" else torch.float16)
    h, w, ids = inp["hidden"].detach().reshape(-1, H), inp["weight"].detach(), inp["ids"].reshape(-1)
    with torch.no_grad():
        lp_ref = R.linear_logprobs(h[:1024].float(), w.float(), ids[:1024])
    floor_ms = 2 * h.shape[0] * H * V / (ceilings()["bf16_matmul_TFLOPs"] * 1e12) * 1e3
    return dict(h=h, w=w, ids=ids, mask=inp["mask"].reshape(-1), lp_ref=lp_ref, floor_ms=floor_ms)


def _measure(row: dict, d: dict) -> dict:
    """row + rel_err (first 1024 rows against fp32), ms and ms_masked (medians) and their ratios to the floor."""
    h, w, ids, mask = d["h"], d["w"], d["ids"], d["mask"]
    if row["provider"] == "triton_tma" and not lse_gemm.tma_serves(h, w):  # it would time the per-tile kernel
        raise RuntimeError(f"TMA cannot serve here ({h.device}, triton {triton.__version__}): the per-tile kernel "
                           "would run under this label")
    with torch.no_grad():
        lp = lk.linear_logprobs(h[:1024], w, ids[:1024])
        row["rel_err"] = ((lp - d["lp_ref"]).norm() / d["lp_ref"].norm()).item()
        row["ms"] = do_bench(lambda: lk.linear_logprobs(h, w, ids), warmup=25, rep=200)
        row["ms_masked"] = do_bench(lambda: lk.linear_logprobs(h, w, ids, mask=mask), warmup=25, rep=200)
    row["over_floor"] = row["ms"] / d["floor_ms"]
    row["masked_over_floor"] = row["ms_masked"] / d["floor_ms"]
    return row


def main(shapes=BENCH_SHAPES, time_budget_s: float | None = None, device: str = "cuda") -> list[dict]:
    """Every (GEMM, config) case at every shape, cases outer: one compile each; a case starts only if the longest one
    so far still fits the time budget (so the sweep ends within it and later gpu_check stages keep their time); a case
    that fails (e.g. does not compile) is not retried at the other shapes.
    device="cpu": the interpreter's dry run of this plumbing (tests only; its times mean nothing)."""
    t_start = time.perf_counter()
    inputs = {shape: _shape_inputs(shape, device) for shape in shapes}
    rows = []
    longest = 0.0
    for gemm, config in _cases():
        skip = None
        case_start = time.perf_counter()
        if time_budget_s is not None and case_start - t_start + longest > time_budget_s:
            skip = "not run: time budget spent"
        for shape, d in inputs.items():
            row = dict(shape=shape, provider=gemm, config=config, floor_ms=d["floor_ms"])
            if skip is None:
                try:
                    with scoped_env(_case_env(gemm, config)):
                        row = _measure(row, d)
                except Exception as e:  # a config that does not compile (shared memory, registers) is a finding;
                    skip = f"{type(e).__name__}: {e}"[:160]  # the other shapes would only repeat it
            rows.append(row if skip is None else {**row, "error": skip})
            print(format_row(rows[-1]), flush=True)
        longest = max(longest, time.perf_counter() - case_start)
    return rows


def _config_text(r: dict) -> str:
    if r["provider"] == "cublas":
        return f"logits budget {r['config'] or '1G (default)'}"
    return ", ".join(map(str, r["config"]))


def format_row(r: dict) -> str:
    name = f"{r['provider']} {_config_text(r)}"
    if "error" in r:
        return f"{r['shape']:12s} {name:44s} {r['error']}"
    return (f"{r['shape']:12s} {name:44s} {r['ms']:8.2f} ms ×{r['over_floor']:.2f}  masked {r['ms_masked']:8.2f} ms "
            f"×{r['masked_over_floor']:.2f} of 2·N·H·V  rel err {r['rel_err']:.1e}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| shape | GEMM | config (Triton: BM, BN, BK, GROUP_M, warps, stages) | ms | × floor | masked ms | "
             "masked × floor | rel err |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        config = _config_text(r)
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['provider']} | {config} | | | | | {r['error']} |")
        else:
            lines.append(f"| {r['shape']} | {r['provider']} | {config} | {r['ms']:.2f} | {r['over_floor']:.2f} | "
                         f"{r['ms_masked']:.2f} | {r['masked_over_floor']:.2f} | {r['rel_err']:.1e} |")
    return "\n".join(lines)


@pytest.mark.gpu
def test_lse_gemm_configs(benchmark):
    rows = main()
    benchmark.extra_info["rows"] = rows
    for gemm in CONFIGS:
        assert any("ms" in r for r in rows if r["provider"] == gemm), (gemm, rows)
    assert all(r["rel_err"] < 1e-2 for r in rows if "rel_err" in r), rows
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.parametrize("gemm", ["triton", "triton_tma"])
def test_smoke_interpreter(gemm, benchmark, monkeypatch):
    """CPU: each Triton LSE GEMM runs in the interpreter on fp16, masked and not, and agrees with the cuBLAS path."""
    if torch.cuda.is_available():
        pytest.skip("GPU present: the real case runs instead")
    inp = make_inputs(2, 40, 32, 200, "cpu", dtype=torch.float16)
    h, w, ids, mask = inp["hidden"].detach(), inp["weight"].detach(), inp["ids"], inp["mask"]
    with torch.no_grad():
        monkeypatch.setenv(GEMM_ENV, "cublas")
        want = lk.linear_logprobs(h, w, ids), lk.linear_logprobs(h, w, ids, mask=mask)
        monkeypatch.setenv(GEMM_ENV, gemm)
        got = benchmark.pedantic(lambda: (lk.linear_logprobs(h, w, ids), lk.linear_logprobs(h, w, ids, mask=mask)),
                                 rounds=1, iterations=1)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
    assert (got[1][~mask] == 0).all() and not torch.equal(got[0], got[1])


def test_main_dry_run_in_the_interpreter(monkeypatch):
    """CPU: the sweep's plumbing (cases, environment, masked and unmasked calls, budget cut, table) on tiny shapes,
    so that a GPU run does not fail on it; do_bench and the ceilings are stand-ins."""
    if torch.cuda.is_available():
        pytest.skip("GPU present: the real case runs instead")
    import benchmarks.bench_lse_gemm as bench

    monkeypatch.setattr(bench, "SHAPES", [("tiny-a", 2, 24, 32, 200), ("tiny-b", 2, 16, 48, 130)])
    monkeypatch.setattr(bench, "CONFIGS", {"cublas": [None, "8K"],
                                           "triton_tma": [(32, 64, 32, 2, 4, 1), (32, 32, 32, 2, 4, 1)],
                                           "triton": [(32, 64, 32, 2, 4, 1)]})
    from lambda_kernels.ops.linear_logprobs.gemm import Gemm

    chunks, logits = [], Gemm.logits  # [rows, V] of every cuBLAS logits chunk
    monkeypatch.setattr(Gemm, "logits", lambda self, x, out: (chunks.append(tuple(out.shape)), logits(self, x, out))[1])
    monkeypatch.setattr(bench, "ceilings", lambda: {"bf16_matmul_TFLOPs": 1.0})
    monkeypatch.setattr(bench, "do_bench", lambda fn, **kw: (fn(), 2.0)[1])
    monkeypatch.setenv(GEMM_ENV, "cublas")
    rows = bench.main(shapes=("tiny-a", "tiny-b"), device="cpu")
    assert [(r["provider"], r["config"], r["shape"]) for r in rows] == [
        (gemm, config, shape) for gemm, config in [("cublas", None), ("triton_tma", (32, 64, 32, 2, 4, 1)),
                                                     ("triton", (32, 64, 32, 2, 4, 1)), ("cublas", "8K"),
                                                     ("triton_tma", (32, 32, 32, 2, 4, 1))]
        for shape in ("tiny-a", "tiny-b")]
    assert max(rows for rows, _ in chunks) == 2 * 24 and min(rows for rows, _ in chunks) <= 8192 // (4 * 200)
    assert all(r["rel_err"] < 1e-3 and r["ms"] == r["ms_masked"] == 2.0 for r in rows), rows
    assert os.environ[GEMM_ENV] == "cublas" and CONFIG_ENV not in os.environ and BUDGET_ENV not in os.environ
    table = bench.markdown_table(rows)
    assert table.count("\n") == 1 + len(rows) and "triton_tma | 32, 64, 32, 2, 4, 1" in table
    assert "cublas | logits budget 1G (default) |" in table and "cublas | logits budget 8K |" in table
    monkeypatch.setattr(bench, "CONFIGS", {"triton_tma": [(32, 64, 32, 2, 4, 1)], "triton": [(32, 8, 32, 2, 4, 1)]})
    measured, measure = [], bench._measure
    monkeypatch.setattr(bench, "_measure", lambda row, d: (measured.append(row["provider"]), measure(row, d))[1])
    bad = bench.main(shapes=("tiny-a", "tiny-b"), device="cpu")  # BLOCK_N 8: refused by the config check
    assert [bool(r.get("error")) for r in bad] == [False] * 2 + [True] * 2 and bad[2]["error"] == bad[3]["error"]
    assert bad[2]["error"].startswith("RuntimeError: LAMBDA_KERNELS_LSE_GEMM_CONFIG")
    assert measured.count("triton") == 1  # the failed case was not retried at the second shape
    monkeypatch.setattr(lse_gemm, "tma_serves", lambda *operands: False)
    assert "TMA cannot serve here" in bench.main(shapes=("tiny-a",), device="cpu")[0]["error"]
    cut = bench.main(shapes=("tiny-a",), time_budget_s=0.0, device="cpu")
    assert all(r["error"] == "not run: time budget spent" for r in cut) and "not run" in bench.markdown_table(cut)
    monkeypatch.setattr(bench, "CONFIGS", {"cublas": [None, "8K"]})
    clock = iter(range(0, 1000, 10))  # each reading 10 s later: every case "takes" 10 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    cut = bench.main(shapes=("tiny-a",), time_budget_s=35.0, device="cpu")  # case 2 would end past 35 s
    assert ["error" in r for r in cut] == [False, True]


if __name__ == "__main__":
    print(markdown_table(main()))
