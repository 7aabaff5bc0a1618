import os

# Must precede the first `import triton` anywhere in the process (see environment.md): on a machine without CUDA
# the kernels run in Triton's interpreter. On a GPU machine run with TRITON_INTERPRET=0 to test compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("LK_TEST_GPU") == "1" else "1")

import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ["TRITON_INTERPRET"] not in ("", "0")


# benchmarks/gpu_check.py runs the tests on a lent GPU within a time budget: with LK_TEST_DEADLINE (seconds since
# the epoch) set, the most telling tests run first and those that would start after the deadline are skipped, so
# that pytest ends on its own and reports what ran (a killed run reports nothing)
DEADLINE = float(os.environ.get("LK_TEST_DEADLINE", "inf"))
DEADLINE_REASON = "not run: the GPU check's time budget was spent"
# files whose kernels the CPU cannot check (compiled code paths, bf16; the opt-in dW GEMM's first: its TMA
# reductions run nowhere else), then the other kernel tests; the CPU-only sm_90 compile check last
FIRST_FILES = ("test_dw_gemm.py", "test_fused_loss.py", "test_linear_logprobs.py", "test_softcap.py",
               "test_grad_plans.py", "test_lse_gemm.py", "test_dual_clip.py", "test_kl_bias_correction.py",
               "test_sequence_level.py", "test_policy_losses.py", "test_objective.py")
LAST_FILES = ("test_sm90_compile.py",)


def _priority(item) -> int:
    name = item.path.name
    if "gpu" in item.keywords:
        return 0
    if name in FIRST_FILES:
        return 1
    return 3 if name in LAST_FILES else 2


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")
    for item in items:
        if "gpu" in item.keywords and (not HAS_CUDA or INTERPRET):
            item.add_marker(skip_gpu)
    if DEADLINE != float("inf"):
        items.sort(key=_priority)  # (stable: each file's own order is kept)


# and with LK_TEST_FAILURE_LOG set, each failure's traceback is appended to that file as it happens, so that a run
# killed at its time limit still says what failed and why (written by the xdist controller alone)
FAILURE_LOG = os.environ.get("LK_TEST_FAILURE_LOG")
_IS_XDIST_WORKER = False


def pytest_configure(config):
    global _IS_XDIST_WORKER
    _IS_XDIST_WORKER = hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    if FAILURE_LOG and report.failed and not _IS_XDIST_WORKER:
        with open(FAILURE_LOG, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-2500:]}\n\n")


def pytest_runtest_setup(item):
    if time.time() > DEADLINE:
        pytest.skip(DEADLINE_REASON)


@pytest.fixture
def device():
    """Where kernel tests run: CUDA when compiled Triton is available, else CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA and not INTERPRET else "cpu")
