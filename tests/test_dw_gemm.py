"""The Triton dW GEMM (`linear_logprobs.dw_gemm`, opt-in: LAMBDA_KERNELS_DW_GEMM=triton_tma): acc (+)= Dᵀ·X into
the fp32 dW sums, its tiles added by TMA reductions on a GPU (a TMA load and store in the interpreter, which has no
reductions). Checked alone against fp64 on odd shapes, on the views the plans hand it (the column halves of a chunk's
dlogits, a sum living in the gradient's bytes), and end to end under every gradient plan against cuBLAS's sums."""
import pytest
import torch

import lambda_kernels as lk
from lambda_kernels.ops.linear_logprobs import dw_gemm, lse_gemm, plan
from lambda_kernels.ops.linear_logprobs import gemm as gemm_mod
from lambda_kernels.ops.linear_logprobs.dw_sum import HalfHeadGradSum

from ._helpers import force_plan, poisoned_outputs, record_calls
from ._lm_head import make_batch, perturbed_old, reference_run


@pytest.fixture
def tma_device(device):
    """The test device where the TMA GEMM can run (the interpreter, or a Hopper-or-newer GPU whose shared memory
    holds the tiles); elsewhere cuBLAS sums dW, which the other dW tests cover."""
    if not (lse_gemm.tma_serves(torch.zeros((16, 16), dtype=torch.float16, device=device))
            and dw_gemm.config_fits(device)):
        pytest.skip("no TMA here (needs a Hopper-or-newer GPU, triton >= 3.6, or the interpreter)")
    return device


@pytest.fixture
def triton_dw(tma_device, monkeypatch):
    """Opt in; the (accumulate, sum shape) of every call of the Triton dW GEMM."""
    monkeypatch.setenv(dw_gemm.DW_GEMM_ENV, "triton_tma")
    return record_calls(monkeypatch, dw_gemm, "run", lambda acc, d, x, accumulate: (accumulate, tuple(acc.shape)))


def _operands(M, V, H, dtype, device, seed=0):
    """d [M, V] a view of a NaN-padded buffer with 16-byte rows (as the chunks' dlogits: columns past V are not
    read), x [M, H], and values for the sum [V, H]."""
    g = torch.Generator().manual_seed(seed)
    d = torch.full((M, -(-V // 16) * 16), float("nan"), dtype=dtype, device=device)[:, :V]
    d.copy_(torch.randn(M, V, generator=g))
    x = torch.randn(M, H, generator=g).to(dtype=dtype, device=device)
    return d, x, (torch.randn(V, H, generator=g) * 4).to(device)


def _assert_sum(acc, d, x, c0=None):
    """acc = c0 + dᵀ·x to fp32 summation error: the products of 2-byte operands are exact in fp32."""
    want = d.double().t() @ x.double() + (0 if c0 is None else c0.double())
    bound = d.double().abs().t() @ x.double().abs() + (0 if c0 is None else c0.double().abs())
    assert acc.dtype == torch.float32 and torch.isfinite(acc).all()
    assert ((acc.double() - want).abs() <= 1e-5 * bound + 1e-30).all()


@pytest.mark.parametrize("config", ["32,64,32,4,1,2", "16,32,16,4,1,1", "32,32,16,4,2,2"])  # halves or whole
@pytest.mark.parametrize("M,V,H", [(1, 40, 16), (31, 200, 48), (70, 129, 72)])  # M, V, H off the tiles
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # (operands upcast in the interpreter)
def test_write_and_accumulate_match_fp64(config, M, V, H, dtype, device, triton_dw, monkeypatch):
    """The first piece writes the sum over NaNs (no read of it, no zero fill); the next adds into it; nothing past
    V or H is written (a guard column and row around the sum keep their NaNs)."""
    monkeypatch.setenv(dw_gemm.DW_CONFIG_ENV, config)
    d, x, c0 = _operands(M, V, H, dtype, device)
    frame = torch.full((V + 1, H + 4), float("nan"), device=device)
    acc = frame[:V, :H]
    assert dw_gemm.serves(acc, d, x)
    dw_gemm.run(acc, d, x, accumulate=False)
    _assert_sum(acc, d, x)
    acc.copy_(c0)
    dw_gemm.run(acc, d, x, accumulate=True)
    _assert_sum(acc, d, x, c0)
    assert frame[V].isnan().all() and frame[:, H:].isnan().all()
    assert triton_dw == [(False, (V, H)), (True, (V, H))]


def test_no_rows_write_zeros_or_leave_the_sum(device, triton_dw):
    d, x, c0 = _operands(0, 40, 16, torch.float16, device)
    acc = torch.full((40, 16), float("nan"), device=device)
    dw_gemm.run(acc, d, x, accumulate=False)
    assert (acc == 0).all()
    acc.copy_(c0)
    dw_gemm.run(acc, d, x, accumulate=True)
    assert torch.equal(acc, c0)


def test_the_grad_sums_views(device, triton_dw):
    """What a chunk hands it: column slices of a padded dlogits buffer (row stride past V, the second half starting
    at `plan.split_rows`), summed into `HalfHeadGradSum`'s parts, the first of them the gradient's own bytes."""
    M, V, H = 45, 300, 40
    d, x, _ = _operands(M, V, H, torch.float16, device)
    sums = HalfHeadGradSum.allocate(torch.empty((V, H), dtype=torch.float16, device=device))
    for first in (True, False):
        for cols, acc in sums.parts():
            assert dw_gemm.serves(acc, d[:, cols], x)
            dw_gemm.run(acc, d[:, cols], x, accumulate=not first)
    full = torch.cat([acc for _, acc in sums.parts()])
    _assert_sum(full, torch.cat([d, d]), torch.cat([x, x]))


def test_what_it_does_not_serve(tma_device, monkeypatch):
    """cuBLAS unless opted in, and wherever TMA cannot take the operands: a column slice not starting on 16 bytes,
    fp32 or mixed dlogits, an fp64 sum, shapes that disagree."""
    d, x, _ = _operands(8, 64, 16, torch.float16, tma_device)
    acc = torch.zeros(64, 16, device=tma_device)
    assert dw_gemm.dw_gemm() == "cublas" and not dw_gemm.serves(acc, d, x)
    monkeypatch.setenv(dw_gemm.DW_GEMM_ENV, "triton_tma")
    assert dw_gemm.serves(acc, d, x)
    assert not dw_gemm.serves(acc[3:], d[:, 3:], x)
    assert not dw_gemm.serves(acc, d.float(), x.float())
    assert not dw_gemm.serves(acc, d, x.bfloat16())
    assert not dw_gemm.serves(acc.double(), d, x)
    assert not dw_gemm.serves(acc[:32], d, x)
    assert not dw_gemm.serves(acc, d[:4], x)


@pytest.mark.parametrize("raw", ["128,256,64,8,3", "128,256,64,8,3,4", "100,256,64,8,3,2", "a,b,c,d,e,f"])
def test_bad_config_says_what_it_wants(raw, monkeypatch):
    monkeypatch.setenv(dw_gemm.DW_CONFIG_ENV, raw)
    with pytest.raises(RuntimeError, match="BLOCK_V,BLOCK_H,BLOCK_K,num_warps,num_stages,epilogue_pieces"):
        dw_gemm.dw_config()


def test_bad_choice_says_what_it_wants(monkeypatch):
    monkeypatch.setenv(dw_gemm.DW_GEMM_ENV, "triton")
    with pytest.raises(RuntimeError, match="cublas, triton_tma"):
        dw_gemm.dw_gemm()


@pytest.mark.parametrize("impl, logits_gemm", [("triton", "cublas"), ("triton", "triton_tma"), ("torch", "cublas")])
@pytest.mark.parametrize("grad_plan, rows", [("tokens", 40), ("tokens", 5), ("split", 8), ("vocab", 8)])
@pytest.mark.parametrize("on_policy", [True, False])
def test_fused_loss_sums_dw_with_it(impl, logits_gemm, grad_plan, rows, on_policy, tma_device, monkeypatch):
    """fp16 head, every plan, the chunks' logits from cuBLAS or from the Triton GEMM (probability chunks, a tail
    from its DLOGITS epilogue): the same loss, metrics, dX and db as with cuBLAS's dW sums (bit for bit: only the dW
    GEMMs change), dW within an fp16 rounding of them and of the fp64 oracle; every dW GEMM takes it, and none with
    impl="torch". V = 136: the cuBLAS chunks' dlogits (2-byte values over fp32 logits rows) start rows on 16 bytes."""
    V, device = 136, tma_device
    force_plan(monkeypatch, grad_plan, rows, V=V)
    monkeypatch.setenv(lse_gemm.GEMM_ENV, logits_gemm)  # (the same chunks in both runs)
    hidden, weight, b, ids, mask, adv = make_batch(V=V, dtype=torch.float16, device=device, seed=5)
    old = None if on_policy else perturbed_old(hidden, weight, b, ids, 0.9)
    kw = dict(old_logprobs=old, temperature=0.9, trace="both", lam=0.9, adv_clamp_min=-0.1, impl=impl)
    loss_c, metrics_c = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, **kw)
    grads_c = torch.autograd.grad(loss_c, (hidden, weight, b))
    with monkeypatch.context() as m:
        m.setenv(dw_gemm.DW_GEMM_ENV, "triton_tma")
        calls = record_calls(m, dw_gemm, "run", lambda acc, d, x, accumulate: accumulate)
        gemms = [record_calls(m, gemm_mod.Gemm, name, lambda *a: None) for name in ("dw_write", "dw_accumulate")]
        with poisoned_outputs():
            loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, **kw)
            grads = torch.autograd.grad(loss, (hidden, weight, b))
    written, added = len(gemms[0]), len(gemms[1])
    assert written and (added or rows == 40)  # (the first piece of each sum written, the others added)
    if impl == "torch":
        assert calls == []
    else:  # every dW GEMM, none left to cuBLAS
        assert (calls.count(False), calls.count(True)) == (written, added)
    assert torch.equal(loss, loss_c) and all(torch.equal(metrics[k], metrics_c[k]) for k in metrics)
    assert torch.equal(grads[0], grads_c[0]) and torch.equal(grads[2], grads_c[2])
    assert grads[1].dtype == torch.float16 and torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1].float(), grads_c[1].float(), rtol=2e-3,
                               atol=2e-3 * grads_c[1].abs().max().item())
    _, _, grads_r = reference_run(hidden, weight, b, ids, mask, adv, **{k: v for k, v in kw.items() if k != "impl"})
    assert (grads[1].double() - grads_r[1]).abs().max() <= 2e-3 * grads_r[1].abs().max()


def test_linear_logprobs_backward_with_it(tma_device, triton_dw, monkeypatch):
    """`linear_logprobs`' own backward (its dlogits from the DLOGITS epilogue or the row kernel) with the Triton dW
    sums: against the fp64 oracle, within fp16 rounding."""
    force_plan(monkeypatch, "tokens", 8, V=136)
    hidden, weight, b, ids, mask, adv = make_batch(V=136, dtype=torch.float16, device=tma_device, seed=3)
    lp = lk.linear_logprobs(hidden, weight, ids, bias=b)
    g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(1)).to(tma_device)
    dw = torch.autograd.grad(lp, weight, g)[0]
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    lp_r = lk.reference.linear_logprobs(*leaves[:2], ids, bias=leaves[2])
    dw_r = torch.autograd.grad(lp_r, leaves[1], g.double())[0]
    assert triton_dw and triton_dw[0][0] is False
    assert (dw.double() - dw_r).abs().max() <= 2e-3 * dw_r.abs().max()


@pytest.mark.gpu
def test_bf16_at_a_chunks_size(device, triton_dw):
    """Compiled, with the TMA reductions: a 1.5B-wide chunk of 1000 rows over 4000 vocabulary rows, written then
    added twice, against fp64."""
    d, x, c0 = _operands(1000, 4000, 1536, torch.bfloat16, device)
    acc = torch.full((4000, 1536), float("nan"), device=device)
    dw_gemm.run(acc, d, x, accumulate=False)
    _assert_sum(acc, d, x)
    acc.copy_(c0)
    dw_gemm.run(acc, d, x, accumulate=True)
    dw_gemm.run(acc, d, x, accumulate=True)
    _assert_sum(acc, torch.cat([d, d]), torch.cat([x, x]), c0)


def test_plans_rate_its_traffic_with_its_own_constant(monkeypatch):
    """Where the Triton dW GEMM runs, its own share of exposed traffic rates the dW sums of every plan (either kind
    of chunk), and only theirs: the vocab plan's fp32 dX sums stay cuBLAS's."""
    assert plan.dw_traffic_exposed(True) == plan.DW_TRAFFIC_EXPOSED_PROBS
    assert plan.dw_traffic_exposed(False) == plan.DW_TRAFFIC_EXPOSED
    assert plan.dw_traffic_exposed(True, True) == plan.dw_traffic_exposed(False, True) == plan.DW_TRAFFIC_EXPOSED_TRITON
    monkeypatch.setattr(plan, "DW_TRAFFIC_EXPOSED_TRITON", 0.0)  # (its traffic all hidden: what is left is cuBLAS's)
    N, V, H = 5734, 152064, 3584
    split = plan.GradPlan("split", 2048, V, max_rows=2048, dw_rows=98304, tail=plan.GradPlan("vocab", N, 8960),
                          row_bytes=2 * V)
    assert plan.modelled_seconds(split, N, V, H, triton_dw=True) < plan.modelled_seconds(split, N, V, H)
    vocab = plan.GradPlan("vocab", 2048, 8960)  # (three pieces a slab: two passes over a dW slab each)
    dx_sums = 17 * 8 * N * H * plan.DW_TRAFFIC_EXPOSED / plan.COPY_RATE
    dw_pieces = 2 * 8 * V * H * plan.DW_TRAFFIC_EXPOSED / plan.COPY_RATE
    saved = plan.modelled_seconds(vocab, N, V, H) - plan.modelled_seconds(vocab, N, V, H, triton_dw=True)
    assert saved == pytest.approx(dw_pieces) and dx_sums > 0  # (the dX sums' term is the same in both)


@pytest.mark.parametrize("optin, fits", [(232448, True), (101376, False)])  # an H100's 227 KB; sm_120's 99 KB
def test_tiles_must_fit_the_gpus_shared_memory(optin, fits, monkeypatch):
    """The default tiles take ~213 KB of shared memory: on a GPU whose blocks cannot have that much (a consumer
    Blackwell SM), cuBLAS sums dW, both for the planner (`takes`) and per GEMM (`serves`), instead of a launch that
    fails."""
    from types import SimpleNamespace

    monkeypatch.delenv(dw_gemm.DW_CONFIG_ENV, raising=False)
    monkeypatch.setattr(dw_gemm, "interpreter_enabled", lambda: False)  # (the GPU's tiles, not the interpreter's)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(shared_memory_per_block_optin=optin))
    assert dw_gemm.config_smem(dw_gemm.GPU_DW_CONFIG) > 213016  # (compiled for sm_90: the count is an upper bound)
    for whole_tile in ((128, 256, 64, 8, 2, 1), (128, 256, 32, 8, 4, 1)):  # (229,392 and 229,408 compiled)
        assert 229408 < dw_gemm.config_smem(whole_tile) <= 232448
    assert dw_gemm.config_fits(torch.device("cuda")) == fits
    monkeypatch.setenv(dw_gemm.DW_GEMM_ENV, "triton_tma")
    monkeypatch.setattr(dw_gemm.lse_gemm, "tma_serves", lambda *operands: True)  # (a Hopper-or-newer GPU)
    w = torch.zeros((64, 32), dtype=torch.bfloat16)
    assert dw_gemm.takes(w, "triton") == fits and not dw_gemm.takes(w, "torch")
    assert dw_gemm.serves(torch.zeros(32, 32), w, w.clone()) == fits  # (acc [V, H] += dᵀ [V, M] · x [M, H])
