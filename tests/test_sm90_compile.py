"""Every Triton kernel compiles for an H100 (sm_90) through the library's own launchers, on this CPU-only machine:
no compile errors, no register spills, shared memory within the SM's 227 KiB, and the accesses the kernels were
shaped for (16-byte loads in the LM-head row kernels; tensor-core wgmma with cp.async pipelining in the LSE GEMM).

The interpreter cannot see any of this; `tests/sm90_compile.py` runs in a subprocess with TRITON_INTERPRET=0 and a
fake sm_90 driver (compile only, nothing runs)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMEM_LIMIT = 227 * 1024
ROW_KERNELS = {"logprob_rows_kernel", "dlogits_rows_kernel", "onpolicy_rows_kernel"}


def library_kernels() -> set:
    names = set()
    for path in (ROOT / "lambda_kernels" / "ops").rglob("*.py"):
        names |= set(re.findall(r"@triton\.jit[^\n]*\ndef (\w+_kernel)\(", path.read_text()))
    return names


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sm90_compile.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles(report):
    assert report["errors"] == {}
    compiled = {k["name"] for k in report["kernels"]}
    assert len(library_kernels()) >= 15
    assert compiled == library_kernels(), library_kernels() ^ compiled
    for k in report["kernels"]:
        assert k["ptxas_rc"] == 0, k
        assert k["spill_bytes"] == 0, k
        assert k["shared"] <= SMEM_LIMIT, k


def test_row_kernels_move_16_byte_vectors(report):
    rows = [k for k in report["kernels"] if k["name"] in ROW_KERNELS]
    assert {k["name"] for k in rows} == ROW_KERNELS
    assert all(k["vector_loads"] for k in rows)
    assert all(k["vector_stores"] for k in rows if k["name"] != "logprob_rows_kernel")  # dlogits stores


def test_lse_gemm_uses_tensor_cores_and_pipelined_loads(report):
    (tiles,) = [k for k in report["kernels"] if k["name"] == "lse_gemm_tiles_kernel"]
    assert tiles["wgmma"] and tiles["cp_async"]
    assert tiles["constants"]["BLOCK_M"] == 128 and tiles["num_stages"] == 4  # the default config
