"""One-command GPU check: ceilings, the GPU test subset, the fused-loss benchmarks, the log-prob pass's GEMMs and their
configurations (cuBLAS chunking, the Triton log-sum-exp GEMMs), a kernel breakdown, the scan benchmarks.

    PYTHONPATH=. python benchmarks/gpu_check.py            # < 6 minutes on an H100, compile time included

Writes benchmarks/RESULTS.md and, when $OUT is set, $OUT/RESULTS.md and $OUT/results.json. Every stage is guarded:
a failure is recorded and the next stage runs. Budget knobs: GPU_CHECK_BUDGET_S (total seconds, default 330),
GPU_CHECK_TEST_TIMEOUT_S (the pytest stage, default 150), SHAPES and PROVIDERS (comma-separated shape and provider
names of the fused-loss benchmark; BREAKDOWN_SHAPES and BREAKDOWN_PROVIDERS those of the kernel breakdown),
GPU_CHECK_STAGES (comma-separated subset of tests,fused_loss,lse_gemm,breakdown,scans; default all), GPU_CHECK_TESTS
(space-separated test files or directories for the test stage, default `tests`: a rerun after a kernel change can
take the files that test it). The tests run in
6 pytest-xdist workers when xdist is installed (kernel compilation is CPU-bound), the GPU-only ones first, and stop
starting new ones 20 s before the stage's timeout (LK_TEST_DEADLINE): the summary says how many that left out.
Exit status 1 when a test failed, else 0 (a test stage stopped at its timeout without a failure included).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # (run, not imported: a test importing `failed_tests` keeps its interpreter)
    os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, before anything imports triton
    os.environ.setdefault("LK_TEST_GPU", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
T0 = time.perf_counter()
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET_S", "330"))  # < 6 minutes with start-up
TEST_TIMEOUT = float(os.environ.get("GPU_CHECK_TEST_TIMEOUT_S", "150"))
ALL_STAGES = ("tests", "fused_loss", "lse_gemm", "breakdown", "scans")  # in the order they run
STAGES = os.environ.get("GPU_CHECK_STAGES", ",".join(ALL_STAGES)).split(",")
if set(STAGES) - set(ALL_STAGES):
    sys.exit(f"GPU_CHECK_STAGES: unknown stage(s) {sorted(set(STAGES) - set(ALL_STAGES))}; choose from {ALL_STAGES}")


def elapsed() -> float:
    return time.perf_counter() - T0


def log(*a):
    print(f"[{elapsed():6.1f}s]", *a, flush=True)


def run_gpu_tests() -> dict:
    # every library test on the GPU (the `device` fixture gives CUDA, compiled Triton) plus the gpu-marked ones;
    # the trainer tests stay on the CPU, and of the objective's 96-case grid one loss type runs (the others differ
    # only in the finalize kernel's constexpr, covered by the normaliser tests)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           *os.environ.get("GPU_CHECK_TESTS", "tests").split(), "--ignore-glob=tests/test_trainer*",
           "-k", "not (test_objective and test_matches_reference) or dapo"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "6"]
    cmd += ["-rfEs"]  # failures, errors and skip reasons (how many tests the deadline left out)
    # the tests end themselves 20 s before the hard timeout, most telling first (tests/conftest.py), so that their
    # failures are reported even when not all of them fit; each failure's traceback is also logged as it happens
    # (LK_TEST_FAILURE_LOG), for a run that still has to be stopped at the timeout
    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    failure_log = out_dir / "test_failures.log"
    failure_log.unlink(missing_ok=True)
    # (the repository first, then what the caller put on the path: wheels carried to a bare machine, such as TRL's)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "0", "LK_TEST_GPU": "1", "PYTHONPATH": path,
           "LK_TEST_DEADLINE": str(time.time() + max(TEST_TIMEOUT - 20, 10)), "LK_TEST_FAILURE_LOG": str(failure_log)}
    log_path = out_dir / "tests.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=TEST_TIMEOUT)
        except subprocess.TimeoutExpired:  # Ctrl-C first: pytest then prints what ran and what failed
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = 124
    out = log_path.read_text(errors="replace")
    summary = next((line for line in reversed(out.splitlines()) if " passed" in line or " failed" in line
                    or " error" in line or "no tests ran" in line), out.strip().splitlines()[-1] if out else "")
    if rc == 124:
        summary = f"timed out after {TEST_TIMEOUT:.0f} s (stopped with Ctrl-C): {summary.strip()}"
    failures = failed_tests(out, failure_log.read_text() if failure_log.exists() else "")
    # "SKIPPED [n] file:line: reason" lines of -rs, for the deadline's reason
    left = sum(int(m.group(1)) for m in re.finditer(r"SKIPPED \[(\d+)\][^\n]*time budget was spent", out))
    summary = summary.strip() + (f" ({left} not run: the test stage's time budget was spent)" if left else "")
    return dict(rc=rc, summary=summary, failures=failures, tail=out[-12000:])


def failed_tests(out: str, failure_log: str) -> list[str]:
    """The FAILED/ERROR lines of pytest's summary in `out`; when pytest was killed before its summary, the names in
    the failure log tests/conftest.py writes as failures happen ("=== nodeid (phase)" headers)."""
    failures = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if failures:
        return failures
    return [f"FAILED {nodeid} ({when})" for nodeid, when in re.findall(r"^=== (\S+) \((\w+)\)$", failure_log, re.M)]


def run_stage(results: dict, name: str, fn, min_left: float) -> list:
    """fn()'s rows, or [] with the reason in results["stages"][name] (time budget spent, or the exception)."""
    if BUDGET - elapsed() < min_left:
        results["stages"][name] = "not run: time budget spent"
        return []
    try:
        rows = fn()
        results["stages"][name] = "ok"
        return rows
    except Exception as e:
        traceback.print_exc()
        results["stages"][name] = f"{type(e).__name__}: {e}"
        return []


def main() -> int:
    results: dict = {"stages": {}}
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to measure.")
        return 2
    import triton

    results["env"] = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                          python=sys.version.split()[0])
    log(results["env"])

    from benchmarks.harness import ceilings

    results["ceilings"] = ceilings()
    log("ceilings", results["ceilings"])

    log("running the library tests on CUDA ...")
    results["tests"] = run_gpu_tests() if "tests" in STAGES else dict(rc=5, summary="not run", failures=[], tail="")
    log("tests:", results["tests"]["summary"])
    for line in results["tests"]["failures"]:
        log("  ", line)

    def fused_loss():
        from benchmarks import bench_fused_loss

        shapes, providers = os.environ.get("SHAPES"), os.environ.get("PROVIDERS")
        return bench_fused_loss.main(time_budget_s=max(BUDGET - elapsed() - 120, 30),
                                     shapes=shapes.split(",") if shapes else None,
                                     providers=providers.split(",") if providers else None)

    def lse_gemm():
        from benchmarks import bench_lse_gemm

        return bench_lse_gemm.main(time_budget_s=max(BUDGET - elapsed() - 70, 10))  # leaves the later stages ~1 min

    def breakdown():
        from benchmarks.bench_fused_loss import kernel_breakdown

        out = os.environ.get("OUT")  # the timelines too (~30 KB each), for host gaps and per-chunk kernel times
        shapes = os.environ.get("BREAKDOWN_SHAPES", "qwen2.5-1.5b,qwen2.5-7b").split(",")
        providers = os.environ.get("BREAKDOWN_PROVIDERS", "ours_on,ours_off,ours_logprobs,ours_logprobs_masked,"
                                   "ours_logprobs_masked_tma").split(",")
        rows = [kernel_breakdown(shape, provider, trace_dir=out)
                for shape in shapes for provider in providers]
        for r in rows:
            log(r)
        return rows

    def scans():
        from benchmarks import bench_scans

        return bench_scans.main()

    # the time each later stage is left (seconds) before it starts: fused 0, LSE GEMM configs 30 (the open question
    # of the log-prob pass: it goes before the diagnostics), breakdown 40, scans 25
    for name, fn, min_left in [("fused_loss", fused_loss, 0), ("lse_gemm", lse_gemm, 30), ("breakdown", breakdown, 40),
                               ("scans", scans, 25)]:
        results[name] = run_stage(results, name, fn, min_left) if name in STAGES else []
    results["total_s"] = elapsed()
    write_results(results)
    log("done")
    return exit_code(results["tests"])


def exit_code(tests: dict) -> int:
    """0 unless a test failed: passed, none selected (5), or stopped at the stage's timeout (124) without a failure
    (the summary says what did not run)."""
    return 0 if tests["rc"] in (0, 5) or (tests["rc"] == 124 and not tests["failures"]) else 1


def write_results(results: dict) -> None:
    from benchmarks.bench_fused_loss import markdown_table

    env, ceil = results["env"], results["ceilings"]
    lines = [
        "# GPU check results",
        "",
        f"Produced on {time.strftime('%Y-%m-%d', time.gmtime())} by `PYTHONPATH=. python benchmarks/gpu_check.py` "
        f"in {results['total_s']:.0f} s on "
        f"{env['device']} (torch {env['torch']}, triton {env['triton']}, Python {env['python']}).",
        "",
        f"Ceilings measured in the same run: bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s (8192³), "
        f"copy {ceil['copy_TBps']:.2f} TB/s (bytes read + written).",
        "",
        "## GPU tests (library tests on CUDA with compiled Triton, gpu-marked ones included)",
        "",
        f"`{results['tests']['summary']}`",
        "",
    ]
    lines += [f"- {f}" for f in results["tests"]["failures"]]
    lines += [
        "",
        "## Fused GRPO-λ loss (bf16, forward + backward, median of do_bench)",
        "",
        "Floor = 6·N·H·V FLOPs (2·N·H·V for the `ours_logprobs*` rows, forward only) at the measured matmul "
        "rate, N = B·T with ~30% padding; 'unmasked' divides by the floor of the real tokens only (ours skips "
        "padded rows; `ours_logprobs` is called without the mask, `ours_logprobs_masked*` with it). "
        "Extra = peak memory above inputs and the gradients left behind. Ours: GRPO-λ (trace both); baselines: "
        "plain GRPO (same KL).",
        "",
        markdown_table(results["fused_loss"]) if results["fused_loss"] else
        f"not run: {results['stages'].get('fused_loss')}",
        "",
    ]
    after = {r["shape"]: r["matmul_after_TFLOPs"] for r in results["fused_loss"] if "matmul_after_TFLOPs" in r}
    if after:  # (the ratios divide by the run's first measurement; these show the clocks' drift under load)
        lines += ["bf16 matmul rate on 8192³ measured again after each shape's cases: "
                  + ", ".join(f"{shape} {rate:.0f}" for shape, rate in after.items()) + " TFLOP/s.", ""]
    if results["fused_loss"]:
        from benchmarks.bench_targets import markdown_table as targets_table

        lines += ["### Issue 3's targets (benchmarks/bench_targets.py: the best row within 1 GiB extra per target)", "",
                  targets_table(results["fused_loss"]), ""]
    if results.get("lse_gemm"):
        from benchmarks.bench_lse_gemm import markdown_table as lse_table

        lines += ["## Log-prob pass: cuBLAS + row kernel vs the Triton log-sum-exp GEMMs (no grad, bf16)", "",
                  "Floor = 2·N·H·V at the measured matmul rate, N = B·T (padding included) for both the calls "
                  "without a mask and those with the completion mask (~30% padding skipped).", "",
                  lse_table(results["lse_gemm"]), ""]
    if results.get("breakdown"):
        lines += ["## Where one step's GPU time goes (torch.profiler, CUDA kernels, ms)", ""]
        for r in results["breakdown"]:
            lines.append(f"- {r['shape']} {r['provider']}: {r['total_ms']:.2f} ms in kernels, GPU idle "
                         f"{r['idle_ms']:.2f} of the {r['span_ms']:.2f} ms from first kernel to last, "
                         f"{r['cuda_mallocs']} cudaMalloc; "
                         + "; ".join(f"`{k}` {v:.2f}" for k, v in r["kernels"].items()))
        lines.append("")
    if results.get("scans"):
        lines += ["## Scans and objective (benchmarks/bench_scans.py)", "", "| op | provider | B | T | ms | graph ms | "
                  "floor ms | × floor |", "|---|---|---|---|---|---|---|---|"]
        for r in results["scans"]:
            g = "n/a" if r.get("graph_ms") is None else f"{r['graph_ms']:.4f}"
            lines.append(f"| {r.get('op')} | {r.get('provider')} | {r.get('B')} | {r.get('T')} | {r.get('ms', 0):.4f} "
                         f"| {g} | {r.get('floor_ms', 0):.4f} | {r.get('over_floor', 0):.1f} |")
        lines.append("")
    lines += ["## Stages", ""] + [f"- {k}: {v}" for k, v in results["stages"].items()] + [""]
    text = "\n".join(lines)
    (ROOT / "benchmarks" / "RESULTS.md").write_text(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "RESULTS.md").write_text(text)
        (Path(out) / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
