import lambda_kernels
from lambda_kernels import reference


def test_public_names_are_pinned():
    assert sorted(lambda_kernels.__all__) == sorted([
        "group_advantages", "lambda_trace", "gae", "grpo_lambda_loss", "GRPOLambdaLoss",
        "linear_logprobs", "fused_grpo_lambda_loss", "FusedGRPOLambdaLoss", "Clip", "CISPO", "SAPO", "VESPO",
    ])
    for name in lambda_kernels.__all__:
        assert getattr(lambda_kernels, name).__doc__, f"{name} needs a docstring"


def test_every_function_has_a_reference_with_the_same_signature():
    import inspect

    for name in ["group_advantages", "lambda_trace", "gae", "grpo_lambda_loss", "linear_logprobs",
                 "fused_grpo_lambda_loss"]:
        ours = inspect.signature(getattr(lambda_kernels, name)).parameters
        ref = inspect.signature(getattr(reference, name)).parameters
        assert [p for p in ours if p != "impl"] == list(ref), name


def test_importing_does_not_import_triton():
    """`import lambda_kernels` must not import triton: TRITON_INTERPRET may still be set after it."""
    import subprocess
    import sys

    code = "import sys, lambda_kernels; sys.exit(1 if 'triton' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_tests_past_the_gpu_checks_deadline_are_skipped_with_a_reason():
    """benchmarks/gpu_check.py sets LK_TEST_DEADLINE so that the test stage ends on its own within its budget
    (tests/conftest.py): tests that would start after it are skipped, and -rs names them for the check's summary."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LK_TEST_DEADLINE": "0", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                          "tests/test_advantages.py"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300).stdout
    assert " passed" not in out and " skipped" in out
    assert "not run: the GPU check's time budget was spent" in out


def test_failures_are_logged_as_they_happen(tmp_path, monkeypatch):
    """With LK_TEST_FAILURE_LOG (benchmarks/gpu_check.py) each failure's traceback is appended as it happens, by the
    xdist controller alone, so that a test stage stopped at its timeout still says what failed and why; the check
    reads the names back when pytest's own summary is missing."""
    import os
    from types import SimpleNamespace

    interpreter = os.environ["TRITON_INTERPRET"]

    from benchmarks.gpu_check import failed_tests

    from . import conftest

    assert os.environ["TRITON_INTERPRET"] == interpreter  # importing the check changed no setting of this session

    log = tmp_path / "failures.log"
    monkeypatch.setattr(conftest, "FAILURE_LOG", str(log))
    monkeypatch.setattr(conftest, "_IS_XDIST_WORKER", conftest._IS_XDIST_WORKER)  # (restored after the test)
    report = SimpleNamespace(failed=True, nodeid="tests/test_x.py::test_y[a-b]", when="call",
                             longreprtext="E   assert 1 == 2")
    conftest.pytest_configure(SimpleNamespace(workerinput={}))  # a worker: its controller writes instead
    conftest.pytest_runtest_logreport(report)
    assert not log.exists()
    conftest.pytest_configure(SimpleNamespace())
    conftest.pytest_runtest_logreport(report)
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, nodeid="tests/test_x.py::test_z", when="call",
                                                      longreprtext=""))
    text = log.read_text()
    assert text.startswith("=== tests/test_x.py::test_y[a-b] (call)\nE   assert 1 == 2") and "test_z" not in text
    assert failed_tests("1 passed", text) == ["FAILED tests/test_x.py::test_y[a-b] (call)"]
    summary = "FAILED tests/test_x.py::test_y[a-b] - AssertionError\n1 failed"
    assert failed_tests(summary, text) == ["FAILED tests/test_x.py::test_y[a-b] - AssertionError"]


def test_gpu_check_fails_on_a_failed_test_only():
    """A test stage stopped at its timeout without a failure is no failure of the check (its summary says what did
    not run); a failure, stopped or not, is."""
    from benchmarks.gpu_check import exit_code

    assert [exit_code(dict(rc=rc, failures=[])) for rc in (0, 5, 124, 1)] == [0, 0, 0, 1]
    assert exit_code(dict(rc=124, failures=["FAILED tests/test_x.py::test_y (call)"])) == 1


def test_gpu_check_report_shows_the_clocks_drift(tmp_path, monkeypatch):
    """The written report: the run's ceiling, the fused-loss rows and targets, and the matmul rate measured again
    after each shape's cases (the ratios keep dividing by the first)."""
    from benchmarks import gpu_check

    (tmp_path / "benchmarks").mkdir()
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    row = dict(shape="qwen2.5-7b", provider="ours_on", ms=38.0, peak_extra_gib=0.9, floor_ms=36.0, over_floor=1.06,
               over_floor_valid=1.4, check_rel_err=2e-3, plan="split plan", matmul_after_TFLOPs=731.4)
    results = dict(env=dict(device="H100", torch="2.11", triton="3.6", python="3.12"),
                   ceilings=dict(bf16_matmul_TFLOPs=745.2, copy_TBps=2.9), total_s=300.0,
                   tests=dict(summary="3 passed", failures=[]), fused_loss=[row], stages={"fused_loss": "ok"})
    gpu_check.write_results(results)
    text = (tmp_path / "benchmarks" / "RESULTS.md").read_text()
    assert "bf16 matmul 745 TFLOP/s" in text and "| qwen2.5-7b | ours_on | 38.00 |" in text
    assert "measured again after each shape's cases: qwen2.5-7b 731 TFLOP/s." in text
    assert "| on-policy fwd+bwd | qwen2.5-7b | ours_on | 1.06 | ≤ 1.10 |" in text
