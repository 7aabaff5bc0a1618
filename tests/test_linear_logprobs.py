"""linear_logprobs: log-probs, entropy and every gradient against the full-logits oracle, chunking, bad input."""
import math

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R
from lambda_kernels.ops.linear_logprobs import plan

from ._helpers import IMPLS, logits_gemm_shapes, poisoned_outputs, set_chunk_rows
from ._lm_head import assert_fp32_matches_oracle, assert_no_worse_than_naive, grads_of, make_inputs, \
    naive_half_logprobs, oracle, upstream



@pytest.fixture
def small_budget(monkeypatch):
    """Chunks of 7 rows at V = 123, so every test crosses chunk boundaries."""
    def set_rows(V, rows=7):
        set_chunk_rows(monkeypatch, rows, V)
    return set_rows


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N, H, V", [(37, 40, 123), (64, 24, 257), (19, 72, 1000)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_fp64_oracle(impl, N, H, V, temperature, bias, device, small_budget):
    small_budget(V)
    x, w, b, t = make_inputs(N, H, V, device=device, bias=bias)
    lp, ent = lk.linear_logprobs(x, w, t, bias=b, temperature=temperature, return_entropy=True, impl=impl)
    assert_fp32_matches_oracle(lp, ent, x, w, b, t, temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16])
def test_half_relative_oracle(impl, dtype, device, small_budget):
    """Error vs fp64 no worse than plain PyTorch's in the same dtype (+ a small floor)."""
    N, H, V = 40, 40, 123
    small_budget(V)
    x, w, b, t = make_inputs(N, H, V, dtype=dtype, device=device)
    lp, ent = lk.linear_logprobs(x, w, t, bias=b, temperature=0.8, return_entropy=True, impl=impl)
    g_lp, g_ent = upstream(N, device=device)
    got = grads_of(lp, ent, g_lp, g_ent, (x, w, b))
    lp_ref, ent_ref, leaves = oracle(x, w, b, t, 0.8)
    want = grads_of(lp_ref, ent_ref, g_lp.double(), g_ent.double(), leaves)
    lp_n, ent_n, naive = naive_half_logprobs(x, w, b, t, 0.8, g_lp, g_ent)
    assert_no_worse_than_naive([(lp, lp_n, lp_ref), (ent, ent_n, ent_ref)] + list(zip(got, naive, want)))


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_and_no_grad_logprobs_bit_identical(impl, device, small_budget):
    small_budget(123)
    x, w, b, t = make_inputs(50, 40, 123, device=device)
    lp_grad, ent_grad = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True, impl=impl)
    assert lp_grad.requires_grad
    with torch.no_grad():
        lp_ng, ent_ng = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True, impl=impl)
        lp_ng2 = lk.linear_logprobs(x, w, t, bias=b, impl=impl)
    assert torch.equal(lp_grad.detach(), lp_ng) and torch.equal(lp_ng, lp_ng2)
    assert torch.equal(ent_grad.detach(), ent_ng)
    assert torch.equal(torch.exp(lp_grad.detach() - lp_ng), torch.ones_like(lp_ng))  # on-policy ratio exactly 1


def test_triton_and_torch_rows_agree_and_chunking_is_invisible(device, monkeypatch):
    x, w, b, t = make_inputs(61, 40, 123, device=device)
    outs = []
    for impl, rows in [("triton", 61), ("triton", 5), ("torch", 9), ("triton", 1)]:
        set_chunk_rows(monkeypatch, rows)
        lp, ent = lk.linear_logprobs(x, w, t, bias=b, temperature=1.3, return_entropy=True, impl=impl)
        outs.append((lp, ent, grads_of(lp, ent, *upstream(61, device=device), (x, w, b))))
    for lp, ent, gr in outs[1:]:
        torch.testing.assert_close(lp, outs[0][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(ent, outs[0][1], rtol=0, atol=1e-5)
        for a, e in zip(gr, outs[0][2]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bounds_logprob_nonpositive_entropy_in_range(impl, device):
    """Peaked rows (target logit far above the rest) must not give ℓ > 0; flat rows must not give H > log V."""
    N, H, V = 16, 16, 123
    _, w, b, _ = make_inputs(N, H, V, device=device, bias=False)
    t = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:N].to(device)
    x = 3 * torch.eye(N, H, device=device)
    with torch.no_grad():
        w2 = w.detach().clone()
        w2[t] = x * 10  # target logit 90, every other logit of the row ≈ 0
        flat_x = torch.zeros(N, H, device=device)
        lp, ent = lk.linear_logprobs(x, w2, t, return_entropy=True, impl=impl)
        lp_f, ent_f = lk.linear_logprobs(flat_x, w2, t, return_entropy=True, impl=impl)
    assert (lp <= 0).all() and (lp_f <= 0).all()
    assert (ent >= 0).all() and (ent <= math.log(V)).all()
    assert (ent_f <= math.log(V)).all() and (ent_f >= 0).all()
    torch.testing.assert_close(ent_f, torch.full_like(ent_f, math.log(V)), rtol=0, atol=1e-5)
    torch.testing.assert_close(lp_f, torch.full_like(lp_f, -math.log(V)), rtol=0, atol=1e-5)
    assert (lp > -1e-3).all()


@pytest.mark.parametrize("V", [129920, 1001])
def test_vocab_not_multiple_of_tile(V, device):
    """verl's bug: log-probs > 0 when V is not a multiple of the tile (V = 129920 = 63.4 tiles of 2048)."""
    x, w, b, t = make_inputs(3, 8, V, device=device, scale=4.0)
    t[0] = V - 1
    with torch.no_grad():
        lp, ent = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True)
        lp_ref, ent_ref = R.linear_logprobs(x.double(), w.double(), t, bias=b.double(), return_entropy=True)
    assert (lp <= 0).all() and (ent <= math.log(V)).all()
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=3e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=3e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_int32_targets_and_frozen_inputs(impl, device):
    x, w, b, t = make_inputs(30, 24, 123, device=device)
    x3, t3 = x.detach().reshape(2, 3, 5, 24).requires_grad_(), t.reshape(2, 3, 5).to(torch.int32)
    w_frozen = w.detach()
    lp = lk.linear_logprobs(x3, w_frozen, t3, impl=impl)
    assert lp.shape == (2, 3, 5)
    (gx,) = torch.autograd.grad(lp.sum(), x3)
    x64, w64 = x3.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    lp_ref = R.linear_logprobs(x64, w64, t3)  # one fp64 forward serves the values and both gradients
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-5)
    # weight only (LM head trained, trunk frozen)
    lp2 = lk.linear_logprobs(x3.detach(), w, t3, impl=impl)
    (gw,) = torch.autograd.grad(lp2.sum(), w)
    gx_ref, gw_ref = torch.autograd.grad(lp_ref.sum(), (x64, w64))
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_of_confident_rows_keeps_its_relative_precision(impl, device):
    """A low temperature makes rows nearly one-hot: H ~ 1e-6..1e-2 beside tempered logits ~ 1e2. Forming
    log p = z − lse would cost an ulp of the logits (~1e-5 absolute, ~10% of a 1e-4 entropy); both row backends stay
    within 1e-3 relative of fp64, plus two ulps of 1 (log s, s = 1 + Σ of the other tokens' e^(z − m), is fp32)."""
    x, w, b, t = make_inputs(24, 16, 64, device=device, seed=4)
    with torch.no_grad():
        _, ent = lk.linear_logprobs(x, w, t, bias=b, temperature=0.05, return_entropy=True, impl=impl)
        _, ent64 = R.linear_logprobs(x.double(), w.double(), t, bias=b.double(), temperature=0.05,
                                     return_entropy=True)
    confident = ent64 < 1e-2
    assert confident.sum() >= 4, "the inputs should give some confident rows"
    torch.testing.assert_close(ent.double()[confident], ent64[confident], rtol=1e-3, atol=2.5e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_only_and_tied_weight(impl, device):
    """Loss on the entropy alone (ℓ unused), with the head tied to the input embedding."""
    V, H, N = 123, 40, 20
    g = torch.Generator().manual_seed(3)
    emb = torch.nn.Embedding(V, H).to(device)
    inp = torch.randint(0, V, (N,), generator=g).to(device)
    tgt = torch.randint(0, V, (N,), generator=g).to(device)
    proj = torch.randn(H, H, generator=g).to(device) / math.sqrt(H)

    h = torch.tanh(emb(inp) @ proj)
    lp, ent = lk.linear_logprobs(h, emb.weight, tgt, return_entropy=True, impl=impl)
    loss = (ent * torch.linspace(0.5, 1.5, N, device=device)).sum() + 0.1 * lp.sum()
    (g_emb,) = torch.autograd.grad(loss, emb.weight)
    w64 = emb.weight.detach().double().requires_grad_()
    h64 = torch.tanh(torch.nn.functional.embedding(inp, w64) @ proj.double())
    lp_r, ent_r = R.linear_logprobs(h64, w64, tgt, return_entropy=True)
    loss_r = (ent_r * torch.linspace(0.5, 1.5, N, device=device, dtype=torch.float64)).sum() + 0.1 * lp_r.sum()
    (g_ref,) = torch.autograd.grad(loss_r, w64)
    torch.testing.assert_close(loss.double(), loss_r, rtol=0, atol=1e-4)
    torch.testing.assert_close(g_emb.double(), g_ref, rtol=1e-4, atol=1e-5)
    # entropy alone: g_lp is None inside backward
    x, w, b, t = make_inputs(N, H, V, device=device)
    _, ent = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True, impl=impl)
    got = torch.autograd.grad(ent.sum(), (x, w, b))
    _, ent64, leaves = oracle(x, w, b, t, 1.0)
    want = torch.autograd.grad(ent64.sum(), leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_fully_written_under_nan_poison(impl, device, small_budget):
    small_budget(123)
    x, w, b, t = make_inputs(33, 40, 123, device=device)
    with poisoned_outputs():
        lp, ent = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True, impl=impl)
        grads = grads_of(lp, ent, *upstream(33, device=device), (x, w, b))
    for v in (lp, ent) + tuple(grads):
        assert torch.isfinite(v).all()


def test_empty_input(device):
    x, w, b, t = make_inputs(0, 8, 50, device=device)
    lp = lk.linear_logprobs(x, w, t, bias=b)
    assert lp.shape == (0,)
    gx, gw = torch.autograd.grad(lp.sum(), (x, w), allow_unused=True)
    assert gw is None or (gw == 0).all()


def test_chunk_rows_budget_and_grid_limits(monkeypatch):
    assert plan.chunk_rows(8192, 152064) * 152064 * 4 <= 1 << 30
    assert plan.chunk_rows(8192, 152064) % 128 == 0
    assert plan.chunk_rows(65536, 129920) <= 65535  # grid x is one row per program
    assert plan.chunk_rows(10, 123) == 10
    monkeypatch.setenv(plan.BUDGET_ENV, "256M")
    assert plan.logits_budget_bytes() == 256 << 20
    assert plan.chunk_rows(100000, 152064) * 152064 * 4 <= 256 << 20
    monkeypatch.setenv(plan.BUDGET_ENV, "1G")
    assert plan.logits_budget_bytes() == 1 << 30
    monkeypatch.setenv(plan.BUDGET_ENV, "lots")
    with pytest.raises(RuntimeError, match="LAMBDA_KERNELS_LOGITS_BUDGET"):
        plan.logits_budget_bytes()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs():
    x, w, b, t = make_inputs(4, 8, 20)
    op = "linear_logprobs: "
    with pytest.raises(ValueError, match=r"linear_logprobs: `weight` must have shape \[V, H\] with H = 8 "
                                         r"\(hidden's last dim\); got \[20, 7\]"):
        lk.linear_logprobs(x, w[:, :7], t)
    with pytest.raises(TypeError,
                       match=op + "`targets` must be an int64 or int32 tensor of token ids; got torch.float32"):
        lk.linear_logprobs(x, w, t.float())
    with pytest.raises(ValueError, match=r"`targets` must have shape \[4\].*shift targets by one"):
        lk.linear_logprobs(x, w, t[:3])
    with pytest.raises(ValueError, match=r"`targets` must hold token ids in \[0, V\) = \[0, 20\); got min -100, max"):
        lk.linear_logprobs(x, w, torch.tensor([0, 1, -100, 3]))
    with pytest.raises(ValueError, match=r"got min 0, max 20"):
        lk.linear_logprobs(x, w, torch.tensor([0, 1, 20, 3]))
    for bad_t in [0.0, -1.0, float("nan"), float("inf"), True, "1"]:
        with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
            lk.linear_logprobs(x, w, t, temperature=bad_t)
    with pytest.raises(TypeError,
                       match=r"`weight` must have the dtype of `hidden` \(torch.float32\); got torch.float16"):
        lk.linear_logprobs(x, w.half(), t)
    with pytest.raises(ValueError, match=r"`bias` must have shape \[20\]"):
        lk.linear_logprobs(x, w, t, bias=b[:5])
    with pytest.raises(TypeError, match="`hidden` must be a floating tensor"):
        lk.linear_logprobs(t, w, t)
    with pytest.raises(ValueError, match="`impl` must be one of"):
        lk.linear_logprobs(x, w, t, impl="cuda")


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("V", [151936, 129920])
def test_gpu_bf16_large_vocab_relative_oracle(V):
    dev = "cuda"
    N, H = 64, 256
    x, w, b, t = make_inputs(N, H, V, dtype=torch.bfloat16, device=dev, bias=False)
    t[:4] = torch.tensor([0, V - 1, V - 2, 12345], device=dev)
    lp, ent = lk.linear_logprobs(x, w, t, temperature=0.9, return_entropy=True)
    g_lp, g_ent = upstream(N, device=dev)
    got = grads_of(lp, ent, g_lp, g_ent, (x, w))
    x32, w32 = (v.detach().float().requires_grad_() for v in (x, w))
    lp_r, ent_r = R.linear_logprobs(x32, w32, t, temperature=0.9, return_entropy=True)
    want = grads_of(lp_r, ent_r, g_lp, g_ent, (x32, w32))
    xn, wn = (v.detach().clone().requires_grad_() for v in (x, w))
    lsm = torch.log_softmax((xn @ wn.t()).float() / 0.9, -1)
    lp_n, ent_n = lsm.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(lsm.exp() * lsm).sum(-1)
    naive = grads_of(lp_n, ent_n, g_lp, g_ent, (xn, wn))
    assert (lp <= 0).all() and (ent >= 0).all() and (ent <= math.log(V)).all()
    for a, n, e in [(lp, lp_n, lp_r), (ent, ent_n, ent_r)] + list(zip(got, naive, want)):
        err = (a.float() - e).abs().max().item()
        err_naive = (n.float() - e).abs().max().item()
        assert err <= 1.05 * err_naive + 1e-3 * e.abs().max().item() + 1e-6, (err, err_naive)


@pytest.mark.gpu
def test_gpu_dw_accumulates_in_fp32_across_chunks(monkeypatch):
    """Many chunks, bf16 weight: dW must match an fp32 oracle far better than bf16 accumulation would."""
    dev = "cuda"
    N, H, V = 4096, 128, 4096
    monkeypatch.setenv(plan.BUDGET_ENV, str(4 * V * 128))  # 32 chunks
    x, w, b, t = make_inputs(N, H, V, dtype=torch.bfloat16, device=dev, bias=False)
    lp = lk.linear_logprobs(x, w, t)
    (gw,) = torch.autograd.grad(lp.sum(), w)
    x32, w32 = x.detach().float(), w.detach().float().requires_grad_()
    (gw_ref,) = torch.autograd.grad(R.linear_logprobs(x32, w32, t).sum(), w32)
    rel = ((gw.float() - gw_ref).norm() / gw_ref.norm()).item()
    assert rel < 8e-3, rel


@pytest.mark.parametrize("impl", IMPLS)
def test_never_more_than_one_chunk_of_logits(impl, device, monkeypatch):
    """Every logits GEMM writes at most `budget` bytes: 37 rows at 7 rows per chunk = 6 chunks, forward and backward."""
    set_chunk_rows(monkeypatch, 7)
    seen = logits_gemm_shapes(monkeypatch)
    x, w, b, t = make_inputs(37, 40, 123, device=device)
    lp = lk.linear_logprobs(x, w, t, bias=b, impl=impl)
    lp.sum().backward()
    assert len(seen) == 12 and all(rows <= 7 and v == 123 for rows, v in seen)


def test_fp64_inputs_give_fp64_and_match(device):
    x, w, b, t = make_inputs(20, 24, 123, dtype=torch.float64, device=device)
    lp, ent = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True, temperature=0.9)
    assert lp.dtype == torch.float64
    lp_r, ent_r = R.linear_logprobs(x, w, t, bias=b, return_entropy=True, temperature=0.9)
    torch.testing.assert_close(lp, lp_r, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ent_r, rtol=0, atol=1e-12)
    got = torch.autograd.grad(lp.sum() + ent.sum(), (x, w, b))
    want = torch.autograd.grad(lp_r.sum() + ent_r.sum(), (x, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_logits_give_finite_entropy_and_gradients(impl, device):
    """A −inf bias (banned tokens): p = 0 there, so p·log p and its gradient are 0, not NaN (every path)."""
    N, H, V = 12, 16, 150
    x, w, _, t = make_inputs(N, H, V, device=device, bias=False)
    b = torch.zeros(V, device=device)
    b[40:90] = float("-inf")
    b.requires_grad_()
    t = t % 40
    lp, ent = lk.linear_logprobs(x, w, t, bias=b, return_entropy=True, impl=impl)
    g_lp, g_ent = upstream(N, device=device)
    got = grads_of(lp, ent, g_lp, g_ent, (x, w))
    lp_ref, ent_ref, (x64, w64, _) = oracle(x, w, b, t, 1.0)
    want = grads_of(lp_ref, ent_ref, g_lp.double(), g_ent.double(), (x64, w64))
    assert torch.isfinite(ent_ref).all() and all(torch.isfinite(e).all() for e in want)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=2e-5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)
