"""The opt-in Triton GEMM with a log-sum-exp epilogue for the log-prob pass (LAMBDA_KERNELS_LOGPROBS_GEMM=triton):
values against the fp64 oracle, gradients through it, bit-identity of the grad and no-grad paths, where it applies.

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


@pytest.fixture
def triton_gemm(monkeypatch):
    """Opt in, and count the calls that really took the Triton GEMM."""
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "triton")
    return record_calls(monkeypatch, launch, "lse_gemm_logprobs", lambda x, *args: x.shape[0])


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
    assert len(triton_gemm) == 2  # grad-path forward and the no-grad call; the backward recomputes with cuBLAS


def test_rows_in_pieces_under_a_small_budget(device, triton_gemm, monkeypatch):
    N, H, V = 70, 40, 300
    x, w, b, t = make_inputs(N, H, V, dtype=torch.float16, device=device)
    with torch.no_grad():
        whole = lk.linear_logprobs(x, w, t, bias=b)
        monkeypatch.setenv(plan.BUDGET_ENV, str(12 * 5 * 32))  # partials of 32 rows × 5 tile columns per piece
        pieces = lk.linear_logprobs(x, w, t, bias=b)
    torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=0)  # the interpreter's dots may round per block
    assert len(triton_gemm) == 2


def test_masked_rows_gathered_per_piece(device, triton_gemm, monkeypatch):
    """mask=: only the real rows go through the Triton GEMM, piece by piece (NaN padding rows are never read), with
    the values of a call on just those rows and grad/no-grad bit-identity."""
    N, H, V = 100, 32, 160
    x, w, b, t = make_inputs(N, H, V, dtype=torch.float16, device=device)
    mask = torch.arange(N, device=device) % 3 != 1
    poisoned = x.detach().clone()
    poisoned[~mask] = float("nan")
    t = torch.where(mask, t, torch.full_like(t, -100))
    monkeypatch.setenv(plan.BUDGET_ENV, "1024")  # pieces of BLOCK_M rows (the floor): 67 real rows in 3 pieces
    pieces = []  # the grid of every tiles-kernel launch

    class Spy:
        def __getitem__(self, grid, kernel=lse_gemm.lse_gemm_tiles_kernel):
            pieces.append(grid)
            return kernel[grid]
    monkeypatch.setattr(lse_gemm, "lse_gemm_tiles_kernel", Spy())
    with torch.no_grad():
        lp, ent = lk.linear_logprobs(poisoned, w, t, bias=b, return_entropy=True, mask=mask)
        lp_real, ent_real = lk.linear_logprobs(x.detach()[mask], w, t[mask], bias=b, return_entropy=True)
    lp_grad = lk.linear_logprobs(poisoned.requires_grad_(), w, t, bias=b, mask=mask)
    assert len(triton_gemm) == 3 and len(pieces) == 3 * 3
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
    with pytest.raises(RuntimeError, match="LAMBDA_KERNELS_LOGPROBS_GEMM must be one of cublas, triton"):
        lse_gemm.logprobs_gemm()
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, "128,100,64,8,8,4")
    with pytest.raises(RuntimeError, match="LAMBDA_KERNELS_LSE_GEMM_CONFIG must be six positive integers"):
        lse_gemm.tile_config()
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, "128,8,64,8,8,4")  # below tl.dot's 16
    with pytest.raises(RuntimeError, match="powers of two ≥ 16"):
        lse_gemm.tile_config()
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, "64,64,32,4,4,2")
    assert lse_gemm.tile_config() == (64, 64, 32, 4, 4, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("V", [151936, 128256])
def test_gpu_bf16_matches_cublas_path(V, monkeypatch):
    """bf16 on CUDA: the Triton GEMM's log-probs and entropy against the cuBLAS path's and the fp32 reference."""
    N, H = 1000, 1536
    x, w, _, t = make_inputs(N, H, V, dtype=torch.bfloat16, device="cuda", bias=False)
    t[:3] = torch.tensor([0, V - 1, 12345], device="cuda")
    with torch.no_grad():
        lp_c, ent_c = lk.linear_logprobs(x, w, t, temperature=0.9, return_entropy=True)
        monkeypatch.setenv(lse_gemm.GEMM_ENV, "triton")
        lp_t, ent_t = lk.linear_logprobs(x, w, t, temperature=0.9, return_entropy=True)
        lp_r, ent_r = R.linear_logprobs(x.float(), w.float(), t, temperature=0.9, return_entropy=True)
    for got, cub, ref in [(lp_t, lp_c, lp_r), (ent_t, ent_c, ent_r)]:
        err, err_c = (got - ref).abs().max().item(), (cub - ref).abs().max().item()
        assert err <= 1.5 * err_c + 1e-4, (err, err_c)
