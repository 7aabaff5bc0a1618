"""The fused loss's one-pass chunks through the probability-emitting Triton GEMM (LAMBDA_KERNELS_LOGPROBS_GEMM=triton
or triton_tma): the epilogue stores e^(z − m)·2¹⁴ in fp16 and each range's max, `probs_dlogits_kernel` turns them
into dlogits once the row's lse is known. Checked against the fp64 oracle and against the cuBLAS chunks' own error,
on every chunk path (token plan, split plan, the on-policy pass that runs ahead of the count, off-policy chunks of
whole sequences), with bit-identity to the log-prob pass: on-policy ratios of old log-probs from `linear_logprobs`
are exactly 1.

The interpreter runs it on fp16 (bf16 dots are wrong there); bf16 on GPU is in the `gpu`-marked case."""
import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R
from lambda_kernels.ops.fused_loss import launch as fused_launch
from lambda_kernels.ops.linear_logprobs import launch, lse_gemm, plan

from ._helpers import poisoned_outputs, record_calls, set_chunk_rows
from ._lm_head import assert_loss_no_worse_than_naive, bf16_oracle_case, make_batch, perturbed_old, \
    reference_run

# The interpreter evaluates both sides of tl.where on numpy arrays: 0·(−inf) on the discarded side warns there.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")

V = 123


@pytest.fixture(params=["triton", "triton_tma"])
def probs_chunks(request, monkeypatch):
    """Opt in to a Triton GEMM; the rows of every chunk whose dlogits came from emitted probabilities."""
    monkeypatch.setenv(lse_gemm.GEMM_ENV, request.param)
    return record_calls(monkeypatch, fused_launch, "probs_dlogits", lambda gemm, u, dl, *a, **k: dl.shape[0])


def _kwargs(on_policy, hidden, weight, b, ids, kl_corrected=False):
    old = None if on_policy else perturbed_old(hidden, weight, b, ids, 0.8, scale=0.3)
    with torch.no_grad():
        ref = R.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double(), temperature=0.8).float() - 0.05
    return dict(old_logprobs=old, ref_logprobs=ref, temperature=0.8, trace="both", lam=0.9, beta=0.04,
                adv_clamp_min=-0.1, epsilon_high=0.28, return_entropy=True, kl_bias_correction=kl_corrected)


def _errors(got, want):
    """Largest absolute error of loss and of each gradient against the fp64 oracle."""
    (loss, grads), (loss_r, _, grads_r) = got, want
    return [abs(loss.item() - loss_r.item())] + [(a.double() - e).abs().max().item() for a, e in zip(grads, grads_r)]


def _run(hidden, weight, b, ids, mask, adv, **kw):
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, **kw)
    return loss, metrics, torch.autograd.grad(loss, (hidden, weight, b))


# (plan, rows per chunk, memory budget): token chunks of several sequences (off-policy: one pass); chunks shorter
# than B·T, which the on-policy pass queues ahead of the count of real tokens; the split plan (its tail pass over
# vocabulary slabs takes the Triton GEMM's dlogits epilogue with the lse the chunks left)
CHUNK_PATHS = [("tokens", 40, "none"), ("tokens", 20, "none"), ("split", 20, "split")]


@pytest.mark.parametrize("on_policy", [True, False])
@pytest.mark.parametrize("grad_plan, rows, budget", CHUNK_PATHS)
@pytest.mark.parametrize("kl_corrected", [False, True])
def test_matches_oracle_as_closely_as_cublas_chunks(on_policy, grad_plan, rows, budget, kl_corrected, device,
                                                    probs_chunks, monkeypatch):
    hidden, weight, b, ids, mask, adv = make_batch(B=5, dtype=torch.float16, device=device, seed=21)
    kw = _kwargs(on_policy, hidden, weight, b, ids, kl_corrected)
    want = reference_run(hidden, weight, b, ids, mask, adv, **kw)
    set_chunk_rows(monkeypatch, rows, V, launch.probs_row_bytes(V))
    monkeypatch.setenv(plan.PLAN_ENV, grad_plan)
    # split: a budget of one chunk leaves the chunks the dW rows the gradient's own bytes hold, the tail the rest
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, str(rows * launch.probs_row_bytes(V)) if budget == "split" else budget)
    splits = record_calls(monkeypatch, fused_launch, "split_pipeline", lambda *a, **k: 1)
    tails = record_calls(monkeypatch, lse_gemm.LseGemm, "run_dlogits", lambda self, xs, *a: self.weight.shape[0])
    loss, metrics, grads = _run(hidden, weight, b, ids, mask, adv, **kw)
    assert bool(splits) == (grad_plan == "split")
    assert bool(tails) == (grad_plan == "split") and all(cols < V for cols in tails)  # (slabs of the tail only)
    n_real = int(mask.sum())
    assert probs_chunks and sum(probs_chunks) >= n_real and max(probs_chunks) <= rows
    assert len(probs_chunks) > 1  # several chunks
    taken, tails_taken = len(probs_chunks), len(tails)
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "cublas")
    loss_c, metrics_c, grads_c = _run(hidden, weight, b, ids, mask, adv, **kw)
    assert (len(probs_chunks), len(tails)) == (taken, tails_taken)  # cuBLAS chunks emit nothing, their tail neither
    errors, errors_c = _errors((loss, grads), want), _errors((loss_c, grads_c), want)
    scales = [abs(want[0].item())] + [e.abs().max().item() for e in want[2]]
    for name, err, err_c, scale in zip(["loss", "hidden", "weight", "bias"], errors, errors_c, scales):
        # fp16 gradients: both round to half precision; the probabilities' fp16 step adds at most about as much
        assert err <= 1.5 * err_c + 2e-3 * scale, (name, err, err_c, scale)
    for k in metrics:  # (ℓ from the same GEMM sums: the metrics agree to summation order)
        torch.testing.assert_close(metrics[k], metrics_c[k], rtol=1e-4, atol=1e-5, msg=k)


def test_old_logprobs_from_linear_logprobs_give_ratios_of_exactly_one(device, probs_chunks, monkeypatch):
    """The promise that kept the Triton log-prob GEMM opt-in: off-policy chunks compute ℓ with the very GEMM and
    merge of the log-prob pass, so old log-probs taken with `linear_logprobs` under no_grad give ratios of exactly
    1, and the loss of the on-policy call bit for bit."""
    hidden, weight, b, ids, mask, adv = make_batch(B=5, dtype=torch.float16, device=device, seed=22)
    set_chunk_rows(monkeypatch, 40, V, launch.probs_row_bytes(V))
    with torch.no_grad():
        old = lk.linear_logprobs(hidden, weight, ids, bias=b, temperature=0.8, mask=mask)
    kw = dict(temperature=0.8, trace="both", lam=0.9, adv_clamp_min=-0.1)
    loss_off, metrics_off, grads_off = _run(hidden, weight, b, ids, mask, adv, old_logprobs=old, **kw)
    loss_on, _, grads_on = _run(hidden, weight, b, ids, mask, adv, **kw)
    assert len(probs_chunks) >= 2  # both calls took the emitted probabilities
    assert metrics_off["ratio_mean"].item() == 1.0 and metrics_off["clip_ratio/region_mean"].item() == 0.0
    assert torch.equal(loss_off, loss_on)
    for a, e in zip(grads_off, grads_on):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3 * e.abs().max().item())


@pytest.mark.parametrize("kl_corrected", [False, True])
def test_filler_rows_of_a_pass_run_ahead_with_a_strong_kl(kl_corrected, device, probs_chunks, monkeypatch):
    """On-policy, the first chunk is queued before the count of real tokens: 30 real tokens, a 40-row chunk of a
    85-row batch, so 10 filler rows (padding: NaN hidden states, id −100) reach the GEMM and the finishing kernel
    with zero inputs. With β = 0.5 and ℓ_ref 0.5 below ℓ the KL term is a large part of every gradient: the values
    match the oracle and the filler rows add nothing."""
    hidden, weight, b, ids, mask, adv = make_batch(B=5, dtype=torch.float16, device=device, seed=27)
    mask = torch.zeros_like(mask)
    mask[:, :6] = 1
    dirty = hidden.detach().clone()
    dirty[mask == 0] = float("nan")
    dirty.requires_grad_()
    ids = torch.where(mask != 0, ids, torch.full_like(ids, -100))
    with torch.no_grad():
        ref = R.linear_logprobs(hidden.double(), weight.double(), ids.clamp(min=0), bias=b.double()).float() - 0.5
    kw = dict(ref_logprobs=ref, beta=0.5, trace="both", lam=0.9, kl_bias_correction=kl_corrected)
    set_chunk_rows(monkeypatch, 40, V, launch.probs_row_bytes(V))
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "none")
    loss, _, grads = _run(dirty, weight, b, ids, mask, adv, **kw)
    assert probs_chunks == [40]  # one chunk, run ahead of the count: 30 real rows and 10 filler
    want = reference_run(hidden, weight, b, ids.clamp(min=0), mask, adv, **kw)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads) and (grads[0][mask == 0] == 0).all()
    for name, a, e in zip(["loss", "hidden", "weight", "bias"], (loss,) + grads, (want[0],) + tuple(want[2])):
        assert (a.double() - e).abs().max().item() <= 3e-3 * e.abs().max().item() + 1e-6, name
    weak = reference_run(hidden, weight, b, ids.clamp(min=0), mask, adv, **{**kw, "beta": 0.0})
    assert (weak[2][1] - want[2][1]).abs().max() > 0.05 * want[2][1].abs().max()  # the KL term is no rounding error


@pytest.mark.parametrize("config", ["32,64,32,2,4,1", "64,64,32,2,1,1"])  # a range per tile; four per tile
@pytest.mark.parametrize("vocab", [280, 319])  # the last tile [256, 320): two ranges past V, or one column short
def test_ranges_and_a_banned_range(config, vocab, device, probs_chunks, monkeypatch):
    """Probabilities per range of columns (the quarter of a tile, or the whole tile), a range of −inf bias (banned
    tokens: u = 0, its max −3e38) and ranges wholly past V: against the oracle."""
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, config)
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "none")
    set_chunk_rows(monkeypatch, 24, vocab, launch.probs_row_bytes(vocab))
    hidden, weight, b, ids, mask, adv = make_batch(B=3, V=vocab, dtype=torch.float16, device=device, seed=23)
    with torch.no_grad():
        b[16:32] = float("-inf")
    ids = torch.where((ids >= 16) & (ids < 32), ids + 16, ids)
    kw = dict(trace="recent", lam=0.95, return_entropy=True)
    loss, metrics, grads = _run(hidden, weight, b, ids, mask, adv, **kw)
    assert sum(probs_chunks) >= int(mask.sum())
    want = reference_run(hidden, weight, b, ids, mask, adv, **kw)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    for name, a, e in zip(["loss", "hidden", "weight", "bias"], (loss,) + grads, (want[0],) + tuple(want[2])):
        scale = e.abs().max().item()
        assert (a.double() - e).abs().max().item() <= 3e-3 * scale + 1e-6, name
    assert (grads[2][16:32] == 0).all()  # banned tokens get no gradient
    torch.testing.assert_close(metrics["entropy"].double(), want[1]["entropy"].double(), rtol=1e-4, atol=1e-5)


def test_every_buffer_written_under_nan_poison(device, probs_chunks, monkeypatch):
    hidden, weight, b, ids, mask, adv = make_batch(B=4, dtype=torch.float16, device=device, seed=24)
    set_chunk_rows(monkeypatch, 20, V, launch.probs_row_bytes(V))
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "none")
    clean = _run(hidden, weight, b, ids, mask, adv, return_entropy=True)
    with poisoned_outputs():
        dirty = _run(hidden, weight, b, ids, mask, adv, return_entropy=True)
    assert len(probs_chunks) >= 4
    assert torch.equal(clean[0], dirty[0]) and all(torch.equal(a, e) for a, e in zip(clean[2], dirty[2]))


@pytest.mark.parametrize("option", [{"softcap": 30.0}, {"entropy_coef": 0.01}])
def test_softcap_and_entropy_bonus_keep_cublas_chunks(option, device, probs_chunks, monkeypatch):
    """Their dlogits need each logit itself, which the emitted probabilities hold only to fp16: the row kernels."""
    hidden, weight, b, ids, mask, adv = make_batch(B=3, dtype=torch.float16, device=device, seed=25)
    set_chunk_rows(monkeypatch, 40, V, launch.probs_row_bytes(V))
    loss, _, grads = _run(hidden, weight, b, ids, mask, adv, **option)
    assert probs_chunks == [] and torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


def test_fp32_heads_and_torch_rows_keep_cublas_chunks(device, probs_chunks):
    hidden, weight, b, ids, mask, adv = make_batch(B=3, device=device, seed=26)
    _run(hidden, weight, b, ids, mask, adv)
    h16, w16, b16 = (t.detach().half().requires_grad_() for t in (hidden, weight, b))
    _run(h16, w16, b16, ids, mask, adv, impl="torch")
    assert probs_chunks == []


def test_two_byte_chunks_hold_more_rows_and_rate_faster_at_1p5b(monkeypatch):
    """At Qwen2.5-1.5B's head (V 151936, H 1536) and 5,734 real tokens, fp32 logits chunks under the default 960 MiB
    budget leave only a split plan; 2-byte chunks hold the token plan's whole fp32 dW sum beside ≥ 1024-row chunks
    (which the planner weighs against split plans of bigger chunks: with the dW traffic fully exposed, as run 6
    measured it, a 1920-row split plan rates faster), and whatever it picks holds more rows and rates faster."""
    for env in (plan.BUDGET_ENV, plan.MEMORY_BUDGET_ENV, plan.PLAN_ENV, lse_gemm.CONFIG_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv(lse_gemm.CONFIG_ENV, ",".join(map(str, lse_gemm.GPU_CONFIG)))  # the GPU's statistics
    N, Vq, Hq = 5734, 151936, 1536
    kw = dict(dw_accumulator=True, dx_accumulator=True, row_bytes=launch.probs_row_bytes(Vq))
    fp32_chunks = plan.grad_plan(N, Vq, Hq, dw_accumulator=True, dx_accumulator=True)
    probs = plan.grad_plan(N, Vq, Hq, **kw)
    assert fp32_chunks.kind == "split" and probs.max_rows >= 1.5 * fp32_chunks.max_rows, (fp32_chunks, probs)
    assert plan.modelled_seconds(probs, N, Vq, Hq) < plan.modelled_seconds(fp32_chunks, N, Vq, Hq)
    monkeypatch.setattr(plan, "DW_TRAFFIC_EXPOSED_PROBS", 0.5)  # (rated as before run 6: the token plan wins)
    tokens = plan.grad_plan(N, Vq, Hq, **kw)
    assert tokens.kind == "tokens" and tokens.rows >= 1024, tokens
    assert tokens.workspace_bytes(N, Vq, Hq, True, True) + plan._token_reserve(tokens.max_rows, Hq, 4) \
        <= plan.DEFAULT_MEMORY_BUDGET


def test_probs_row_bytes_counts_the_statistics():
    config = lse_gemm.tile_config()
    n_v = -(-V // config[1])
    ranges = n_v * config[1] // lse_gemm.range_width(config)
    assert launch.probs_row_stride(V) == 128 and launch.probs_row_bytes(V) == 2 * 128 + 12 * n_v + 4 * ranges + 4
    # a multiple of 16 elements: Triton marks only such integer arguments divisible (16-byte vector stores)
    assert launch.probs_row_stride(50257) == 50272 and launch.probs_row_stride(151936) == 151936


@pytest.mark.parametrize("kl", [None, "k3", "corrected"])
@pytest.mark.parametrize("with_stats", [False, True])
@pytest.mark.parametrize("width", [16, 64])
def test_probs_dlogits_kernel_against_its_formula(kl, with_stats, width, device):
    """The finishing kernel alone, on synthetic probabilities (fp32 output, so every term shows): p = u·2⁻¹⁴·e^(m −
    lse) per range of `width` columns, g = g0 + β·n·(1 − e^(ref − ℓ)) (k3) or β·n·(ℓ − ref) (corrected, the KL
    weighted by the ratio), dlogits = g·(onehot − p)/T; with_stats stores g. Rows of weight n = 0 get no KL term
    even where e^(ref − ℓ) overflows (the filler rows of a pass run ahead of the count)."""
    from types import SimpleNamespace

    from lambda_kernels.ops.linear_logprobs.logit_transform import LogitTransform

    g = torch.Generator().manual_seed(5)
    M, Vk, beta, temperature = 9, 150, 0.7, 0.8
    ranges = -(-Vk // width)
    u = (torch.rand(M, Vk, generator=g) * 16384).half()
    qm = torch.randn(M, ranges, generator=g) * 3
    lse = qm.max(1).values + 2.0 + torch.rand(M, generator=g)
    lp, g0 = -torch.rand(M, generator=g) * 3, torch.randn(M, generator=g)
    ref, n = lp + torch.randn(M, generator=g), torch.rand(M, generator=g) + 0.5
    n[-1], ref[-1] = 0.0, 200.0  # weight 0: e^(ref − ℓ) overflows fp32, the KL term must still be 0
    tgt = torch.randint(0, Vk, (M,), generator=g)
    tgt[0] = -100  # a filler row's padding id: no one-hot anywhere
    to = dict(device=device)
    u, qm, lse, lp, g0, ref, n, tgt = (t.to(**to) for t in (u, qm, lse, lp, g0, ref, n, tgt))
    dl = torch.full((M, Vk), float("nan"), **to)
    g_out = torch.full((M,), float("nan"), **to) if with_stats else None
    fused_launch.probs_dlogits(SimpleNamespace(qm=qm, range_width=width), u, dl, tgt, lse, lp, g0,
                               None if kl is None else n, None if kl is None else ref, beta,
                               LogitTransform(1 / temperature), kl == "corrected", g_out)
    d64 = {k: v.double() for k, v in dict(u=u, qm=qm, lse=lse, lp=lp, g0=g0, ref=ref, n=n).items()}
    kl_grad = d64["lp"] - d64["ref"] if kl == "corrected" else 1 - torch.exp(d64["ref"] - d64["lp"])
    g_want = d64["g0"] + (torch.where(d64["n"] != 0, beta * d64["n"] * kl_grad, 0.0) if kl else 0.0)
    scale = torch.exp(d64["qm"] - d64["lse"][:, None]).repeat_interleave(width, 1)[:, :Vk]
    p = d64["u"] * 2.0 ** -14 * scale
    onehot = torch.zeros(M, Vk, dtype=torch.float64, device=device)
    onehot[1:].scatter_(1, tgt[1:, None], 1.0)
    want = g_want[:, None] * (onehot - p) / temperature
    torch.testing.assert_close(dl.double(), want, rtol=1e-5, atol=1e-12)  # (fp32 e^ of arguments up to ~10)
    if with_stats:
        torch.testing.assert_close(g_out.double(), g_want, rtol=1e-5, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("on_policy", [True, False])
def test_gpu_bf16_relative_oracle(on_policy, monkeypatch):
    """bf16 on an H100 with both Triton GEMMs: no worse than PyTorch in bf16 against the fp32 oracle."""
    hidden, weight, ids, mask, adv, kw, oracle, naive = bf16_oracle_case(on_policy)
    for gemm in ("triton", "triton_tma"):
        monkeypatch.setenv(lse_gemm.GEMM_ENV, gemm)
        seen = record_calls(monkeypatch, fused_launch, "probs_dlogits", lambda *a, **k: 1)
        loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, **kw)
        assert seen, gemm
        assert_loss_no_worse_than_naive((loss, torch.autograd.grad(loss, (hidden, weight))), oracle, naive)
