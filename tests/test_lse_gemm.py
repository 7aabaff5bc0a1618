"""The Triton GEMMs with a log-sum-exp epilogue for the log-prob pass (LAMBDA_KERNELS_LOGPROBS_GEMM=triton,
one program per tile, and triton_tma, persistent with TMA loads): values against the fp64 oracle, gradients through
them, bit-identity of the grad and no-grad paths, where they apply.

The interpreter runs it on fp16 (bf16 dots are wrong there); bf16 on GPU is in the `gpu`-marked case."""
import math

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R
from lambda_kernels.ops.linear_logprobs import launch, lse_gemm, plan

from ._helpers import poisoned_outputs, record_calls
from ._lm_head import assert_matches, grads_of, make_batch, make_inputs, oracle, perturbed_old, reference_run, \
    upstream


# The interpreter evaluates both sides of tl.where on numpy arrays: 0·(−inf) on the discarded side (the epilogue's
# entropy term at −inf logits) warns there, and never reaches a result.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")

MAIN_LOOPS = {"triton": "lse_gemm_tiles_kernel", "triton_tma": "lse_gemm_persistent_kernel"}


class KernelSpy:
    """Stands in for a Triton kernel: records the grid of every launch, then launches the real kernel."""

    def __init__(self, kernel, grids: list):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    """The grids of every launch of each main-loop kernel, by kernel name."""
    grids = {name: [] for name in MAIN_LOOPS.values()}
    for name in grids:
        monkeypatch.setattr(lse_gemm, name, KernelSpy(getattr(lse_gemm, name), grids[name]))
    return grids


@pytest.fixture(params=sorted(MAIN_LOOPS))
def triton_gemm(request, monkeypatch, launches):
    """Opt in to each Triton GEMM, and count the calls that really took it (rows per call); every launch of its
    pieces must be of the chosen main loop (the test shapes all have TMA-aligned rows)."""
    monkeypatch.setenv(lse_gemm.GEMM_ENV, request.param)
    calls = record_calls(monkeypatch, launch, "lse_gemm_pass", lambda x, *args: x.shape[0])
    yield calls
    other = next(name for gemm, name in MAIN_LOOPS.items() if gemm != request.param)
    assert launches[other] == [], f"{request.param} launched {other}"
    assert bool(launches[MAIN_LOOPS[request.param]]) == bool(calls)


@pytest.mark.parametrize("N, H, V", [(37, 40, 300), (20, 64, 50), (65, 24, 129)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_match_fp64_oracle(N, H, V, bias, temperature, device, triton_gemm):
    x, w, b, t = make_inputs(N, H, V, dtype=torch.float16, device=device, bias=bias)
    t[:4] = torch.tensor([0, V - 1, min(63, V - 1), min(64, V - 1)])  # tile edges (BLOCK_N 64 in the interpreter)
    with torch.no_grad():
        lp, ent = lk.linear_logprobs(x, w, t, bias=b, temperature=temperature, return_entropy=True)
    assert triton_gemm == [N]
    lp_ref, ent_ref, _ = oracle(x, w, b, t, temperature)
    # fp16 operands, fp32 accumulation in both: the difference is summation order only
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=2e-5)
    assert (lp <= 0).all() and (ent >= 0).all() and (ent <= math.log(V)).all()


@pytest.mark.parametrize("with_ent", [True, False])
def test_merge_of_many_tile_columns(with_ent, device):
    """The merge over more tile columns than one block of them (a 152k vocabulary has ~600), against fp64; each row
    merged bit-identically whichever rows share its program (the log-prob pass and the loss's chunks cut rows
    differently)."""
    from lambda_kernels.ops.linear_logprobs.lse_gemm_kernels import lse_gemm_merge_kernel

    n_v, M = 2 * lse_gemm.MERGE_BLOCK_V + 22, lse_gemm.MERGE_BLOCK_M + 13
    g = torch.Generator().manual_seed(5)
    m_i = torch.randn((n_v, M), generator=g, dtype=torch.float64) * 8
    m_i[n_v // 3, :5] = -3.0e38  # ranges of −inf logits: the tiles store a finite −3e38 and s = t = 0
    s_i = torch.rand((n_v, M), generator=g, dtype=torch.float64) * 50 + 1
    s_i[n_v // 3, :5] = 0
    t_i = s_i * torch.rand((n_v, M), generator=g, dtype=torch.float64) * 3  # Σ e^(z−m)(z−m) of the tile's columns
    t_i[n_v // 3, :5] = 0
    zt = torch.randn((M,), generator=g, dtype=torch.float64) * 8
    part = torch.stack([m_i, s_i, t_i]).to(torch.float32)

    def merge(rows: slice):
        n = rows.stop - rows.start
        sub = part[:, :, rows].contiguous().to(device)
        lp, lse, ent = (torch.full((n,), float("nan"), device=device) for _ in range(3))
        lse_gemm_merge_kernel[(-(-n // lse_gemm.MERGE_BLOCK_M),)](
            sub, zt[rows].to(torch.float32).to(device), lp, lse, ent, n, n_v, sub.stride(0), sub.stride(1),
            math.log(1e5), WITH_ENT=with_ent, BLOCK_M=lse_gemm.MERGE_BLOCK_M, BLOCK_V=lse_gemm.MERGE_BLOCK_V)
        return lp.cpu(), lse.cpu(), ent.cpu()

    lp, lse, ent = merge(slice(0, M))
    part64 = part.double()
    top = part64[0].max(0).values
    w = torch.exp(part64[0] - top)
    big_s = (w * part64[1]).sum(0)
    lse_ref = top + big_s.log()
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lp.double(), (zt - lse_ref).clamp(max=0), rtol=1e-6, atol=1e-5)
    if with_ent:
        big_t = (w * (part64[2] + (part64[0] - top) * part64[1])).sum(0)
        torch.testing.assert_close(ent.double(), (big_s.log() - big_t / big_s).clamp(0, math.log(1e5)),
                                   rtol=1e-5, atol=1e-5)
    else:
        assert ent.isnan().all()  # not written
    for rows in (slice(7, M), slice(M - 3, M)):  # the same rows in other programs, at other lanes
        for got, whole in zip(merge(rows), (lp, lse, ent)):
            assert torch.equal(got.nan_to_num(0.5), whole[rows].nan_to_num(0.5))


@pytest.mark.parametrize("config, parts", [("32,64,32,2,1,1", 1), ("64,64,32,2,1,1", 4)])
@pytest.mark.parametrize("V", [280, 319])  # the last tile [256, 320): 24 columns (two quarters past V), or one short
@pytest.mark.parametrize("bias_and_entropy", [True, False])
@pytest.mark.parametrize("softcap", [None, 0.5])  # (0.5: most of these logits are well past the cap)
def test_epilogue_whole_and_by_quarters(config, parts, V, bias_and_entropy, softcap, device, triton_gemm, monkeypatch):
    """A tile with more than 64 accumulator values per thread reduces its four column quarters one after the other
    and merges them: the same statistics as a whole tile, against the oracle, with targets on the ranges' edges,
    a −inf bias range (−c with a softcap), ranges wholly past V and one column past V."""
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, config)
    block_m, block_n, _, _, warps, _ = lse_gemm.tile_config()
    assert lse_gemm.quarter_epilogue(block_m, block_n, warps) == (parts == 4)
    N, H = 70, 32
    x, w, b, t = make_inputs(N, H, V, dtype=torch.float16, device=device)
    width = block_n // 4
    banned = slice(width, 2 * width)  # the second quarter of the first tile: all its logits −inf
    b = b.detach().clone()
    b[banned] = float("-inf")
    b = b if bias_and_entropy else None
    t[:6] = torch.tensor([0, width - 1, 2 * width, block_n - 1, block_n, V - 1])  # first/last columns of ranges
    t[6:] = torch.where((t[6:] >= banned.start) & (t[6:] < banned.stop), t[6:] + width, t[6:])  # not banned
    with torch.no_grad():
        got = lk.linear_logprobs(x, w, t, bias=b, temperature=0.7, return_entropy=bias_and_entropy, softcap=softcap)
    assert triton_gemm == [N]
    lp_ref, ent_ref, _ = oracle(x, w, b, t, 0.7, softcap=softcap)
    lp, ent = got if bias_and_entropy else (got, None)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-5)
    if bias_and_entropy:
        torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("config", ["32,64,32,2,1,1", "64,64,32,2,1,1"])
def test_lone_targets_on_range_edges(config, device, triton_gemm, monkeypatch):
    """A column range whose rows hold a single target, on its first or last column: the epilogue's skip of ranges
    without targets must still pick it up."""
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, config)
    block_m, block_n, _, _, warps, _ = lse_gemm.tile_config()
    width = block_n // (4 if lse_gemm.quarter_epilogue(block_m, block_n, warps) else 1)
    N, H, V = block_m, 32, 300
    x, w, b, t = make_inputs(N, H, V, dtype=torch.float16, device=device)
    t = 4 * block_n + t % (V - 4 * block_n)  # every other target past the first four tiles
    t[:4] = torch.tensor([width - 1, width, 3 * width - 1, 3 * width])  # each alone in its range, on an edge
    with torch.no_grad():
        lp = lk.linear_logprobs(x, w, t, bias=b)
    assert triton_gemm == [N]
    torch.testing.assert_close(lp.double(), oracle(x, w, b, t, 1.0)[0], rtol=0, atol=2e-5)


def test_grad_path_is_bit_identical_and_gradients_match(device, triton_gemm):
    N, H, V = 37, 40, 300
    x, w, b, t = make_inputs(N, H, V, dtype=torch.float16, device=device)
    lp, ent = lk.linear_logprobs(x, w, t, bias=b, temperature=0.8, return_entropy=True)
    with torch.no_grad():
        lp_ng, ent_ng = lk.linear_logprobs(x, w, t, bias=b, temperature=0.8, return_entropy=True)
    assert torch.equal(lp.detach(), lp_ng) and torch.equal(ent.detach(), ent_ng)
    g_lp, g_ent = upstream(N, device=device)
    got = grads_of(lp, ent, g_lp, g_ent, (x, w, b))
    lp_ref, ent_ref, leaves = oracle(x, w, b, t, 0.8)
    want = grads_of(lp_ref, ent_ref, g_lp.double(), g_ent.double(), leaves)
    for name, a, e in zip(["hidden", "weight", "bias"], got, want):  # fp16 grads: half-precision rounding
        torch.testing.assert_close(a.double(), e, rtol=2e-3, atol=2e-3 * e.abs().max().item(), msg=name)
    assert len(triton_gemm) == 2  # grad-path forward and the no-grad call (the backward: test_dlogits_gemm.py)


def test_rows_in_pieces_under_a_small_budget(device, triton_gemm, monkeypatch):
    N, H, V = 70, 40, 300
    x, w, b, t = make_inputs(N, H, V, dtype=torch.float16, device=device)
    with torch.no_grad():
        whole = lk.linear_logprobs(x, w, t, bias=b)
        monkeypatch.setenv(plan.BUDGET_ENV, str(12 * 5 * 32))  # partials of 32 rows × 5 tile columns per piece
        pieces = lk.linear_logprobs(x, w, t, bias=b)
    torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=0)  # the interpreter's dots may round per block
    assert len(triton_gemm) == 2


def test_masked_rows_gathered_per_piece(device, triton_gemm, launches, monkeypatch):
    """mask=: only the real rows go through the Triton GEMM, piece by piece (NaN padding rows reach no result), with
    the values of a call on just those rows and grad/no-grad bit-identity."""
    N, H, V = 100, 32, 160
    x, w, b, t = make_inputs(N, H, V, dtype=torch.float16, device=device)
    mask = torch.arange(N, device=device) % 3 != 1
    poisoned = x.detach().clone()
    poisoned[~mask] = float("nan")
    t = torch.where(mask, t, torch.full_like(t, -100))
    monkeypatch.setenv(plan.BUDGET_ENV, "1024")  # pieces of BLOCK_M rows (the floor): 67 real rows in 3 pieces
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, ",".join(map(str, lse_gemm.INTERPRETER_CONFIG)))  # 32 rows, on a GPU too
    with torch.no_grad():
        lp, ent = lk.linear_logprobs(poisoned, w, t, bias=b, return_entropy=True, mask=mask)
        lp_real, ent_real = lk.linear_logprobs(x.detach()[mask], w, t[mask], bias=b, return_entropy=True)
    lp_grad = lk.linear_logprobs(poisoned.requires_grad_(), w, t, bias=b, mask=mask)
    pieces = [grid for grids in launches.values() for grid in grids]
    assert len(triton_gemm) == 3 and len(pieces) == 3 * 3  # 3 pieces in each call
    assert torch.equal(lp[mask], lp_real) and torch.equal(ent[mask], ent_real) and torch.equal(lp_grad.detach(), lp)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    (gx,) = torch.autograd.grad(lp_grad.sum(), poisoned)
    assert torch.isfinite(gx).all() and (gx[~mask] == 0).all()


def test_minus_inf_bias_columns(device, triton_gemm):
    """A −inf bias (banned tokens): a whole tile of −inf logits must not give NaN."""
    N, H, V = 16, 32, 200
    x, w, _, t = make_inputs(N, H, V, dtype=torch.float16, device=device, bias=False)
    b = torch.zeros(V, dtype=torch.float16, device=device)
    b[64:128] = float("-inf")
    t = t % 64
    with torch.no_grad():
        lp, ent = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True)
        lp_ref, ent_ref = R.linear_logprobs(x.double(), w.double(), t, bias=b.double(), return_entropy=True)
    assert triton_gemm == [N]  # the −inf tile went through the Triton GEMM, not cuBLAS
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=2e-5)


def test_outputs_fully_written_under_nan_poison(device, triton_gemm):
    x, w, b, t = make_inputs(33, 40, 300, dtype=torch.float16, device=device)
    with poisoned_outputs(), torch.no_grad():
        lp, ent = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and triton_gemm


def test_only_half_heads_with_triton_rows_take_it(device, triton_gemm):
    x, w, b, t = make_inputs(20, 40, 100, device=device)
    with torch.no_grad():
        lk.linear_logprobs(x, w, t)  # fp32 head: cuBLAS
        lk.linear_logprobs(x.half(), w.half(), t, impl="torch")  # PyTorch rows
        w_strided = w.half().t().contiguous().t()  # [V, H] with stride 1 along V
        lk.linear_logprobs(x.half(), w_strided, t)
    assert triton_gemm == []


@pytest.mark.parametrize("why", ["rows of 40 bytes", "a triton older than 3.6"])
def test_tma_falls_back_to_the_tiles_kernel(why, device, launches, monkeypatch):
    """triton_tma where TMA cannot load the operands: the one-program-per-tile kernel, the same values."""
    H = 20 if why.startswith("rows") else 32  # fp16 rows of 40 bytes are not a multiple of 16
    x, w, b, t = make_inputs(30, H, 200, dtype=torch.float16, device=device)
    if why.startswith("a triton"):
        monkeypatch.setattr(lse_gemm.triton, "__version__", "3.5.1")
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "triton_tma")
    with torch.no_grad():
        lp, ent = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True)
        monkeypatch.setenv(lse_gemm.GEMM_ENV, "triton")
        want = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True)
    assert launches["lse_gemm_persistent_kernel"] == [] and len(launches["lse_gemm_tiles_kernel"]) == 2
    assert torch.equal(lp, want[0]) and torch.equal(ent, want[1])


def test_tma_needs_triton_3_6(monkeypatch):
    for version, ok in [("3.5.1", False), ("3.6.0", True), ("3.7.1+git4f3a", True), ("4.0.0rc1", True)]:
        monkeypatch.setattr(lse_gemm.triton, "__version__", version)
        assert (lse_gemm._tma_descriptor_class() is not None) == ok, version


def test_persistent_programs_share_the_tiles(device, launches, monkeypatch):
    """More tiles than programs (each walks several, in the grouped order) and fewer (the spare ones exit): every
    row's statistics are still written once, against the fp64 oracle."""
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "triton_tma")
    for N, V in [(97, 700), (10, 60)]:  # 4 × 11 tiles over 3 programs; one tile
        x, w, b, t = make_inputs(N, 32, V, dtype=torch.float16, device=device)
        with poisoned_outputs(), torch.no_grad():
            lp, ent = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True)
        lp_ref, ent_ref, _ = oracle(x, w, b, t, 1.0)
        torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-5)
        torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=2e-5)
    programs = lse_gemm.persistent_programs(device, lse_gemm.tile_config(tma=True), 2)
    assert launches["lse_gemm_persistent_kernel"] == [(programs,)] * 2


def test_two_programs_per_sm_only_where_two_fit():
    assert lse_gemm.programs_per_sm((128, 128, 64, 8, 4, 3), 2) == 2  # 96 KB of buffers, 128 threads
    assert lse_gemm.programs_per_sm((128, 128, 64, 8, 4, 4), 2) == 1  # 128 KB of buffers
    assert lse_gemm.programs_per_sm((128, 128, 64, 8, 8, 2), 2) == 1  # 256 threads × 255 registers: the whole file
    assert lse_gemm.programs_per_sm((64, 128, 64, 8, 4, 4), 2) == 2


def test_off_policy_fused_loss_through_it(device, triton_gemm, monkeypatch):
    """The two-pass fused loss (a sequence longer than a chunk) takes its log-probs from the Triton GEMM."""
    monkeypatch.setenv(plan.BUDGET_ENV, str(4 * 123 * 5))
    hidden, weight, b, ids, mask, adv = make_batch(B=4, dtype=torch.float16, device=device, seed=13)
    old = perturbed_old(hidden, weight, b, ids, 1.0, scale=0.3)
    kw = dict(old_logprobs=old, trace="both", lam=0.9, beta=0.0)
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert triton_gemm
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, b, ids, mask, adv, **kw), atol_loss=2e-5,
                   rtol_grad=3e-3)


def test_bad_settings(monkeypatch):
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "cutlass")
    with pytest.raises(RuntimeError, match="LAMBDA_KERNELS_LOGPROBS_GEMM must be one of cublas, triton, triton_tma"):
        lse_gemm.logprobs_gemm()
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, "128,100,64,8,8,4")
    with pytest.raises(RuntimeError, match="LAMBDA_KERNELS_LSE_GEMM_CONFIG must be six positive integers"):
        lse_gemm.tile_config()
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, "128,8,64,8,8,4")  # below tl.dot's 16
    with pytest.raises(RuntimeError, match="powers of two ≥ 16"):
        lse_gemm.tile_config()
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, "64,64,32,4,4,2")
    assert lse_gemm.tile_config() == (64, 64, 32, 4, 4, 2) == lse_gemm.tile_config(tma=True)  # both main loops


def test_gpu_default_configs(monkeypatch):
    """The compiled defaults (H100 sweep): one tile shape for both main loops, so that a pass falling back from TMA
    keeps its partials; the per-tile kernel's pipeline within an A100's 164 KB of shared memory per block, the
    persistent one's within Hopper's 227 KB; one persistent program per SM."""
    monkeypatch.setattr(lse_gemm, "interpreter_enabled", lambda: False)
    tiles, tma = lse_gemm.tile_config(), lse_gemm.tile_config(tma=True)
    assert (tiles, tma) == (lse_gemm.GPU_CONFIG, lse_gemm.GPU_CONFIG_TMA) and tiles[:2] == tma[:2]

    def smem(cfg):
        return cfg[5] * (cfg[0] + cfg[1]) * cfg[2] * 2 + lse_gemm.SMEM_SLACK

    assert smem(tiles) <= 164 * 1024 and smem(tma) <= 227 * 1024
    assert lse_gemm.programs_per_sm(tma, 2) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", sorted(MAIN_LOOPS))
@pytest.mark.parametrize("V", [151936, 128256])
def test_gpu_bf16_matches_cublas_path(V, gemm, launches, monkeypatch):
    """bf16 on CUDA: each Triton GEMM's log-probs and entropy against the cuBLAS path's and the fp32 reference."""
    N, H = 1000, 1536
    x, w, _, t = make_inputs(N, H, V, dtype=torch.bfloat16, device="cuda", bias=False)
    t[:3] = torch.tensor([0, V - 1, 12345], device="cuda")
    with torch.no_grad():
        lp_c, ent_c = lk.linear_logprobs(x, w, t, temperature=0.9, return_entropy=True)
        monkeypatch.setenv(lse_gemm.GEMM_ENV, gemm)
        lp_t, ent_t = lk.linear_logprobs(x, w, t, temperature=0.9, return_entropy=True)
        lp_r, ent_r = R.linear_logprobs(x.float(), w.float(), t, temperature=0.9, return_entropy=True)
    for got, cub, ref in [(lp_t, lp_c, lp_r), (ent_t, ent_c, ent_r)]:
        err, err_c = (got - ref).abs().max().item(), (cub - ref).abs().max().item()
        assert err <= 1.5 * err_c + 1e-4, (err, err_c)
    assert launches[MAIN_LOOPS[gemm]], f"{gemm} did not run its own main loop on this GPU"


def test_auto_is_tma_on_a_hopper_head_only(device):
    """"auto" takes TMA for a CUDA head TMA can load (a Hopper GPU), never on the CPU (the interpreter's TMA is for
    the tests that ask for it), and not for rows TMA cannot load."""
    w = torch.zeros((64, 32), dtype=torch.float16, device=device)
    hopper = device.type == "cuda" and lse_gemm.tma_serves(w)
    assert lse_gemm.auto_takes_tma(w) == hopper
    assert not lse_gemm.auto_takes_tma(torch.zeros((64, 36), dtype=torch.float16, device=device)[:, :33])
    assert not lse_gemm.auto_takes_tma(w.cpu())


@pytest.mark.parametrize("optin, fits", [(232448, True), (101376, False)])  # an H100's 227 KB; sm_120's 99 KB
def test_auto_needs_the_tiles_to_fit_shared_memory(optin, fits, monkeypatch):
    """The default persistent tiles need ~196 KB of shared memory for one program: "auto" takes them only on a GPU
    whose blocks may have that much (a consumer Blackwell SM has ~100 KB: cuBLAS there)."""
    from types import SimpleNamespace

    monkeypatch.delenv(lse_gemm.CONFIG_ENV, raising=False)
    monkeypatch.setattr(lse_gemm, "interpreter_enabled", lambda: False)  # (the GPU's tiles, not the interpreter's)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(shared_memory_per_block_optin=optin))
    assert lse_gemm.tma_config_fits(torch.device("cuda"), 2) == fits


@pytest.mark.parametrize("tma", [True, False])
def test_auto_takes_the_tma_gemm_only_where_tma_serves(tma, device, launches, monkeypatch):
    """LAMBDA_KERNELS_LOGPROBS_GEMM=auto, the default: the persistent TMA GEMM where TMA can load the head (here
    stood in for on the CPU, where auto takes cuBLAS), else cuBLAS, never the slower per-tile kernel; the fused
    loss's chunks choose alike (their emitted probabilities with TMA), so ℓ stays bit-identical between the two."""
    from lambda_kernels.ops.fused_loss import launch as fused_launch

    monkeypatch.delenv(lse_gemm.GEMM_ENV, raising=False)
    assert lse_gemm.logprobs_gemm() == "auto"
    monkeypatch.setattr(lse_gemm, "auto_takes_tma", lambda weight: tma)
    probs = record_calls(monkeypatch, fused_launch, "probs_dlogits", lambda *a, **k: 1)
    hidden, weight, b, ids, mask, adv = make_batch(B=3, dtype=torch.float16, device=device, seed=31)
    with torch.no_grad():
        lp = lk.linear_logprobs(hidden, weight, ids, bias=b, mask=mask)
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, old_logprobs=lp)
    assert bool(launches["lse_gemm_persistent_kernel"]) == tma and bool(probs) == tma
    assert launches["lse_gemm_tiles_kernel"] == []
    assert metrics["ratio_mean"].item() == 1.0  # old log-probs from the same GEMM as the chunks' ℓ
    assert torch.isfinite(loss)
    lp_ref, _, _ = oracle(hidden.detach().reshape(-1, hidden.shape[-1]), weight, b, ids.reshape(-1), 1.0)
    real = mask.reshape(-1) != 0
    torch.testing.assert_close(lp.reshape(-1)[real].double(), lp_ref[real], rtol=0, atol=2e-5)
