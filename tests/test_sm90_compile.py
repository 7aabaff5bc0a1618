"""Every Triton kernel compiles for an H100 (sm_90) through the library's own launchers, on this CPU-only machine:
no compile errors, no register spills, shared memory within the SM's 227 KiB, and the accesses the kernels were
shaped for (16-byte loads in the LM-head row kernels; tensor-core wgmma with cp.async pipelining in the LSE GEMM, TMA
loads in its persistent variant).

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
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas")
    # the library's own knobs from a developer's shell would change what compiles: run with the defaults
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDA_KERNELS_")}
    # the repository first, then the caller's path (e.g. another triton's site-packages to compile with it)
    env.update(TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
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


def test_row_kernels_compile_at_the_gpu_tile_and_move_16_byte_vectors(report):
    rows = [k for k in report["kernels"] if k["name"] in ROW_KERNELS]
    assert {(k["name"], k["constants"]["BLOCK_V"]) for k in rows} >= {(name, 4096) for name in ROW_KERNELS}
    wide = [k for k in rows if k["constants"]["BLOCK_V"] >= 2048]  # V = 2048, 8208 (V % 16 == 0) and 5000
    assert any(k["vector_loads"] for k in wide) and not all(k["vector_loads"] for k in wide)  # 5000: no alignment
    for name in ROW_KERNELS:  # with V divisible by 16, 16-byte logits loads (and dlogits stores)
        assert any(k["vector_loads"] and (k["vector_stores"] or name == "logprob_rows_kernel")
                   for k in rows if k["name"] == name), name


def test_lse_gemm_uses_tensor_cores_and_pipelined_loads(report):
    def loop(name):  # the log-prob pass's variants of a main loop (not EMIT, not DLOGITS: tested below)
        return [k for k in report["kernels"] if k["name"] == name
                and not (k["constants"].get("EMIT") or k["constants"].get("DLOGITS"))]

    tiles, persistent = loop("lse_gemm_tiles_kernel"), loop("lse_gemm_persistent_kernel")
    # without and with a softcap (bias and entropy), and plain (the backward scenarios' forward)
    assert len(tiles) == len(persistent) == 3
    for k in tiles:  # the default configs (lse_gemm.GPU_CONFIG, GPU_CONFIG_TMA): 128×256 tiles, quarters epilogue
        assert k["wgmma"] and k["cp_async"] and not k["tma"]
        assert (k["constants"]["BLOCK_M"], k["constants"]["BLOCK_N"], k["num_stages"]) == (128, 256, 3)
        assert k["constants"]["QUARTERS"]
    for k in persistent:  # (192 KB of pipeline buffers: one program per SM)
        assert k["wgmma"] and k["tma"]
        assert k["constants"]["NUM_PROGRAMS"] == 132 and k["num_stages"] == 4 and k["constants"]["BLOCK_N"] == 256


def test_probability_emitting_epilogue_stores_16_byte_vectors(report):
    """The fused loss's chunks through the Triton GEMMs (LAMBDA_KERNELS_LOGPROBS_GEMM): both main loops with EMIT
    store the fp16 probabilities in 16-byte vectors within the SM's shared memory (spill-free, as every kernel above);
    the kernel that turns them into dlogits loads and stores 16-byte vectors, in its on-policy KL, split-plan and
    off-policy variants."""
    emitting = [k for k in report["kernels"] if k["constants"].get("EMIT")]
    assert {k["name"] for k in emitting} == {"lse_gemm_tiles_kernel", "lse_gemm_persistent_kernel"}
    assert {(k["name"], k["constants"]["HAS_BIAS"]) for k in emitting} >= {("lse_gemm_persistent_kernel", False),
                                                                           ("lse_gemm_persistent_kernel", True)}
    assert all(k["vector_stores"] and k["wgmma"] and k["shared"] <= 227 * 1024 for k in emitting)
    finishing = [k for k in report["kernels"] if k["name"] == "probs_dlogits_kernel"]
    assert all(k["vector_loads"] and k["vector_stores"] for k in finishing)
    variants = {(k["constants"].get("HAS_KL"), k["constants"].get("WITH_STATS")) for k in finishing}
    assert {(True, False), (False, False), (True, True)} <= variants


def test_dlogits_epilogue_compiles_in_both_main_loops(report):
    """The backward's chunks (DLOGITS): both main loops, with and without the entropy's gradient and a softcap,
    store dlogits in 16-byte vectors (spill-free, as every kernel above)."""
    dlogits = [k for k in report["kernels"] if k["constants"].get("DLOGITS")]
    variants = {(k["name"], bool(k["constants"].get("WITH_ENT")), bool(k["constants"].get("SOFTCAP")))
                for k in dlogits}
    for name in ("lse_gemm_tiles_kernel", "lse_gemm_persistent_kernel"):
        assert {(name, True, False), (name, True, True), (name, False, False)} <= variants, variants
    assert all(k["vector_stores"] and k["wgmma"] and k["shared"] <= 227 * 1024 for k in dlogits)


def test_dw_gemm_adds_its_tiles_by_tma_reductions(report):
    """The opt-in dW GEMM (`dw_gemm`, the default tiles): TMA loads into wgmma, and a first piece that writes its sums
    by TMA stores and later pieces that add by TMA reductions, one program per SM within the shared memory (the
    epilogue's two fp32 halves through one staging buffer), spill-free as every kernel above."""
    dw = [k for k in report["kernels"] if k["name"] == "dw_gemm_kernel"]
    assert {k["constants"]["ACCUMULATE"] for k in dw} == {True, False}
    for k in dw:
        assert k["wgmma"] and k["tma"] and k["tma_reduce"] == k["constants"]["ACCUMULATE"]
        tile = (k["constants"]["BLOCK_V"], k["constants"]["BLOCK_H"], k["constants"]["EPILOGUE_PIECES"])
        assert tile == (128, 256, 2)
        assert k["constants"]["NUM_PROGRAMS"] == 132 and k["shared"] <= 227 * 1024


def test_split_plan_row_kernel_variant_compiles(report):
    """The on-policy row kernel that also stores lse and the token gradient (the split plan's chunks), spill-free
    (checked for every kernel above)."""
    assert any(k["name"] == "onpolicy_rows_kernel" and k["constants"].get("WITH_STATS") for k in report["kernels"])


def test_ratio_weighted_kl_variants_compile(report):
    """kl_bias_correction: the on-policy row kernel's KL term, and the objective kernels on- and off-policy."""
    corrected = {(k["name"], k["constants"].get("ON_POLICY")) for k in report["kernels"]
                 if k["constants"].get("KL_CORRECTED")}
    assert {name for name, _ in corrected} == {"onpolicy_rows_kernel", "probs_dlogits_kernel", "objective_fwd_kernel",
                                               "objective_bwd_kernel"}
    assert {("objective_bwd_kernel", True), ("objective_bwd_kernel", False)} <= corrected


def test_scale_kernel_compiles_both_ways(report):
    """The scale-and-cast of a half head's dW sum and the in-place grad_output scaling that skips scale 1."""
    skips = {bool(k["constants"].get("SKIP_ONE")) for k in report["kernels"] if k["name"] == "scale_cast_kernel"}
    assert skips == {False, True}


def test_softcap_variants_compile(report):
    """Final-logit soft-capping (the exp-based tanh and its derivative): every row kernel at the GPU tile, the split
    plan's row kernel, and both LSE GEMM main loops (spill-free, as every kernel above)."""
    capped = {(k["name"], k["constants"].get("BLOCK_V")) for k in report["kernels"] if k["constants"].get("SOFTCAP")}
    assert {(name, 4096) for name in ROW_KERNELS} <= capped
    assert {"lse_gemm_tiles_kernel", "lse_gemm_persistent_kernel"} <= {name for name, _ in capped}
    assert any(k["name"] == "onpolicy_rows_kernel" and k["constants"].get("WITH_STATS")
               for k in report["kernels"] if k["constants"].get("SOFTCAP"))


def test_dual_clip_and_policy_weights_variants_compile(report):
    assert any(k["name"] == "objective_fwd_kernel" and k["constants"].get("HAS_DUAL") for k in report["kernels"])
    assert any(k["name"] == "objective_fwd_kernel" and k["constants"].get("HAS_W") for k in report["kernels"])
