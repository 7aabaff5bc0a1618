"""The backward through the Triton GEMM (LAMBDA_KERNELS_LOGPROBS_GEMM=triton or triton_tma): where a backward knows
every row's lse (after a log-prob pass: `linear_logprobs`' own backward, the fused loss's second pass, a split plan's
tail), its token chunks and vocabulary slabs take the GEMM with the DLOGITS epilogue, which writes dlogits in the
head's dtype straight from the fp32 accumulator: no fp32 logits in memory. Checked against its formula on the
epilogue alone (fp32 output), and end to end against the fp64 oracle on the token, split and vocab plans, masked
rows, softcap and the entropy's gradient.

The interpreter runs it on fp16 (bf16 dots are wrong there)."""
import pytest
import torch

import lambda_kernels as lk
from lambda_kernels.ops.linear_logprobs import launch, lse_gemm, plan
from lambda_kernels.ops.linear_logprobs.logit_transform import LogitTransform

from ._helpers import record_calls, set_chunk_rows
from ._lm_head import grads_of, make_batch, make_inputs, oracle, perturbed_old, reference_run, upstream

# The interpreter evaluates both sides of tl.where on numpy arrays: 0·(−inf) on the discarded side warns there.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")


@pytest.fixture(params=["triton", "triton_tma"])
def dlogits_chunks(request, monkeypatch):
    """Opt in to a Triton GEMM; (rows, vocabulary columns, address of the first head row) of every piece whose
    dlogits its epilogue wrote."""
    monkeypatch.setenv(lse_gemm.GEMM_ENV, request.param)
    return record_calls(monkeypatch, lse_gemm.LseGemm, "run_dlogits",
                        lambda self, xs, *a: (xs.shape[0], self.weight.shape[0], self.weight.data_ptr()))


@pytest.mark.parametrize("config", ["32,64,32,2,4,1", "64,64,32,2,1,1"])  # the tile at once; by quarters
@pytest.mark.parametrize("V", [280, 319])  # a last tile with ranges wholly past V, or one column short
@pytest.mark.parametrize("softcap, with_ent", [(None, False), (None, True), (0.5, True)])
def test_epilogue_matches_the_formula(config, V, softcap, with_ent, device, dlogits_chunks, monkeypatch):
    """The epilogue alone into an fp32 buffer (so every term shows): dlogits = (g·(onehot − p) − g_H·p·(log p + H))
    ·∂z/∂x, against the same formula in fp64 from fp64 logits, with a −inf bias range (banned tokens: 0, not NaN),
    targets on range edges and a padding id (−100: no one-hot)."""
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, config)
    M, H, T = 70, 32, 0.7
    x, w, b, t = make_inputs(M, H, V, dtype=torch.float16, device=device)
    with torch.no_grad():
        b = b.detach().clone()
        b[16:32] = float("-inf")
    t = torch.where((t >= 16) & (t < 32), t + 16, t)
    t[:4] = torch.tensor([0, 63, 64, V - 1])
    t[4] = -100
    z = x.detach().double() @ w.detach().double().t() + b.double()
    dy = torch.full_like(z, 1 / T)
    if softcap is not None:
        th = torch.tanh(z / softcap)
        z, dy = softcap * th, (1 - th * th) / T
    lse = torch.logsumexp(z / T, dim=1)
    logp = z / T - lse[:, None]
    p = logp.exp()
    ent = -(p * logp.nan_to_num(neginf=0.0)).sum(1)
    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(M, generator=g, dtype=torch.float64), torch.randn(M, generator=g, dtype=torch.float64)
    onehot = torch.zeros_like(z)
    onehot.scatter_(1, t.clamp(min=0)[:, None], 1.0)
    onehot[4] = 0.0  # the padding id
    want = g_lp[:, None].to(z.device) * (onehot - p)
    if with_ent:
        want -= torch.where(p > 0, g_ent[:, None].to(z.device) * p * (logp + ent[:, None]), 0.0)
    want *= dy
    stats = torch.stack([lse, g_lp.to(device), ent, g_ent.to(device)][: 4 if with_ent else 2]).float()
    gemm = lse_gemm.LseGemm(w.detach(), b, LogitTransform(1 / T, softcap), with_ent, 0, dlogits=True)
    dl = torch.full((M, V), float("nan"), device=device)
    gemm.run_dlogits(x.detach(), t, stats, dl)
    assert dlogits_chunks == [(M, V, w.data_ptr())]
    torch.testing.assert_close(dl.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
    assert (dl[:, 16:32] == 0).all()


@pytest.mark.parametrize("grad_plan, rows", [("tokens", 16), ("split", 16), ("vocab", 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_linear_logprobs_backward_matches_oracle(grad_plan, rows, masked, device, dlogits_chunks, monkeypatch):
    """`linear_logprobs`' backward in several token chunks, a split plan's chunks and its tail over vocabulary slabs,
    or the vocab plan's slabs, with bias, temperature, the entropy's gradient and (masked) NaN padding rows: the
    gradients of the fp64 oracle within half-precision rounding, and every piece was the Triton GEMM's."""
    N, H, V = 70, 40, 300
    x, w, b, t = make_inputs(N, H, V, dtype=torch.float16, device=device)
    mask = torch.arange(N, device=device) % 4 != 1 if masked else None
    row_bytes = launch.probs_row_bytes(V, with_stats=False)  # (2-byte dlogits rows)
    set_chunk_rows(monkeypatch, rows, V, row_bytes)
    monkeypatch.setenv(plan.PLAN_ENV, grad_plan)
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "none" if grad_plan != "split" else str(rows * row_bytes))
    xs = x.detach().clone()
    if masked:
        xs[~mask] = float("nan")
        t = torch.where(mask, t, torch.full_like(t, -100))
    xs.requires_grad_()
    lp, ent = lk.linear_logprobs(xs, w, t, bias=b, temperature=0.8, return_entropy=True, mask=mask)
    g_lp, g_ent = upstream(N, device=device)
    got = grads_of(lp, ent, g_lp, g_ent, (xs, w, b))
    real = slice(None) if mask is None else mask
    lp_ref, ent_ref, leaves = oracle(x, w, b, torch.where(t < 0, 0, t), 0.8, mask=mask)
    want = grads_of(lp_ref, ent_ref, g_lp.double(), g_ent.double(), leaves)
    n_real = N if mask is None else int(mask.sum())
    chunks = [m for m, cols, _ in dlogits_chunks if cols == V]  # (token chunks: the whole vocabulary)
    slab_rows = {}  # rows through each vocabulary slab (first head row, columns)
    for m, cols, ptr in dlogits_chunks:
        if cols < V:
            first = (ptr - w.data_ptr()) // (H * w.element_size())
            slab_rows[first, cols] = slab_rows.get((first, cols), 0) + m
    assert sum(chunks) == (0 if grad_plan == "vocab" else n_real)
    assert grad_plan == "vocab" or len(chunks) == -(-n_real // rows)
    if grad_plan != "tokens":  # slabs one after the other up to V (from 0: the vocab plan; the tail: from V_t > 0),
        spans = sorted(slab_rows)  # each over every real row
        assert len(spans) > 1 and (spans[0][0] == 0) == (grad_plan == "vocab") and sum(spans[-1]) == V
        assert all(sum(a) == b[0] for a, b in zip(spans, spans[1:])) and set(slab_rows.values()) == {n_real}
    for name, a, e in zip(["hidden", "weight", "bias"], got, want):
        a, e = (a[real], e[real]) if name == "hidden" else (a, e)
        torch.testing.assert_close(a.double(), e, rtol=2e-3, atol=2e-3 * e.abs().max().item(), msg=name)
    if masked:
        assert (got[0][~mask] == 0).all()


def test_fused_two_pass_path_takes_it(device, dlogits_chunks, monkeypatch):
    """Off-policy with a sequence longer than a chunk: a log-prob pass, then the backward, whose chunks are the
    Triton GEMM's dlogits (the first pass too, so the old log-probs' ratios see the same ℓ as linear_logprobs)."""
    hidden, weight, b, ids, mask, adv = make_batch(B=4, dtype=torch.float16, device=device, seed=41)
    monkeypatch.setenv(plan.BUDGET_ENV, str(8 * 2 * 128))  # 8-row chunks: every sequence is longer
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "none")
    old = perturbed_old(hidden, weight, b, ids, 1.0, scale=0.3)
    kw = dict(old_logprobs=old, trace="both", lam=0.95, adv_clamp_min=-0.1, entropy_coef=0.01, return_entropy=True)
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert sum(m for m, _, _ in dlogits_chunks) == int(mask.sum()) and len(dlogits_chunks) > 1
    loss_r, _, grads_r = reference_run(hidden, weight, b, ids, mask, adv, **kw)
    torch.testing.assert_close(loss.double(), loss_r, rtol=1e-4, atol=1e-5)
    for name, a, e in zip(["hidden", "weight", "bias"], grads, grads_r):
        torch.testing.assert_close(a.double(), e, rtol=2e-3, atol=2e-3 * e.abs().max().item(), msg=name)


def test_cublas_keeps_its_backward(device, dlogits_chunks, monkeypatch):
    """By default (cuBLAS), an fp32 head, or PyTorch rows: the backward makes fp32 logits as before."""
    x, w, b, t = make_inputs(20, 40, 100, dtype=torch.float16, device=device)
    x32, w32 = (q.detach().float().requires_grad_() for q in (x, w))
    lk.linear_logprobs(x32, w32, t).sum().backward()  # fp32 head
    lk.linear_logprobs(x, w, t, impl="torch").sum().backward()  # PyTorch rows
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "cublas")
    lk.linear_logprobs(x, w, t).sum().backward()
    assert dlogits_chunks == []
