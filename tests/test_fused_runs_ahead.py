"""The fused loss's on-policy pass queues its first chunk before the host waits for the token-id check's one
device→host read (`fused_loss.launch._PiecesAhead`): that chunk covers a row per entry of the real tokens'
positions, real ones first and padding after, so its padding rows must add exactly nothing whatever the padding
holds (NaN hidden states, invalid ids, an infinite ℓ_ref), whether the real tokens are fewer than a chunk or more."""
import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R
from lambda_kernels.ops import real_tokens
from lambda_kernels.ops.fused_loss import launch as fused_launch
from lambda_kernels.ops.linear_logprobs import launch, lse_gemm, plan

from ._helpers import record_calls, set_chunk_rows
from ._lm_head import assert_matches, make_batch, reference_run

CHUNK = 8  # rows per chunk; the batches below have 3·17 = 51 rows


@pytest.fixture
def order(monkeypatch):
    """("chunk", rows) for each piece of rows gathered for a GEMM, and "read" when the host waits for the check.
    Chunks of CHUNK fp32 logits rows: the cuBLAS chunks (the Triton GEMM's 2-byte chunks run ahead of the count in
    test_probs_chunks.py)."""
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "cublas")
    set_chunk_rows(monkeypatch, CHUNK)
    events = []
    record_calls(monkeypatch, launch, "gather_rows",
                 lambda x, rows, sl, buf: events.append(("chunk", sl.stop - sl.start)))
    record_calls(monkeypatch, real_tokens.HostRead, "values", lambda self: events.append("read"))
    return events


def _mask(real_tokens_wanted: int, device, B=3, T=17):
    """A mask with that many real tokens, spread over the rows (left padding in row 0, right padding elsewhere)."""
    mask = torch.zeros(B * T, dtype=torch.bool)
    mask[torch.randperm(B * T, generator=torch.Generator().manual_seed(real_tokens_wanted))[:real_tokens_wanted]] = True
    return mask.reshape(B, T).to(device)


def _dirty(hidden, ids, mask, ref):
    """The same batch with garbage at the padding: NaN states, ids out of range, ℓ_ref = +inf."""
    h = hidden.detach().clone()
    h[~mask] = float("nan")
    bad_ids = torch.where(mask, ids, torch.full_like(ids, -100))
    bad_ids[0, ~mask[0]] = 10**6
    return h.requires_grad_(), bad_ids, torch.where(mask, ref, torch.full_like(ref, float("inf")))


@pytest.mark.parametrize("n_real", [0, 3, CHUNK, 29, 51])  # none, fewer than a chunk, one, several, no padding
@pytest.mark.parametrize("memory_budget", [None, "split"])
def test_padding_in_the_first_chunk_adds_nothing(n_real, memory_budget, order, device, monkeypatch):
    if memory_budget == "split":  # the split plan: its tail pass runs over the real rows only
        monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, str(1 << 20))
        monkeypatch.setenv(plan.PLAN_ENV, "split")
    hidden, weight, b, ids, _, adv = make_batch(device=device, seed=n_real, dtype=torch.float16)
    mask = _mask(n_real, device)
    with torch.no_grad():
        ref = R.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double()).float() - 0.05
    kw = dict(ref_logprobs=ref, beta=0.04, trace="both", lam=0.9, adv_clamp_min=-0.1, return_entropy=True)
    dirty_h, dirty_ids, dirty_ref = _dirty(hidden, ids, mask, ref)
    loss, metrics = lk.fused_grpo_lambda_loss(dirty_h, weight, dirty_ids, mask, adv, bias=b, impl="triton",
                                              **dict(kw, ref_logprobs=dirty_ref))
    gh, gw, gb = torch.autograd.grad(loss, (dirty_h, weight, b))
    assert order[:2] == [("chunk", CHUNK), "read"] and order.count("read") == 1  # the first chunk went first
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all() and torch.isfinite(gb).all()
    assert (gh[~mask] == 0).all()
    expected = reference_run(hidden.float(), weight.float(), b.float(), ids, mask, adv, **kw)
    assert_matches(loss, metrics, (gh.float(), gw.float(), gb.float()), expected, atol_loss=2e-3, rtol_grad=2e-2)


def test_the_same_result_as_waiting_first(order, device, monkeypatch):
    """Running ahead changes only where the first piece ends: values equal a call that waits for the read first."""
    hidden, weight, b, ids, _, adv = make_batch(device=device, seed=7)
    mask = _mask(29, device)
    runs = []
    for ahead in (True, False):
        monkeypatch.setattr(fused_launch, "_runs_ahead", lambda rows_impl, hidden, ahead=ahead: ahead)
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl="triton", beta=0.04,
                                                  ref_logprobs=torch.full(ids.shape, -4.0, device=device))
        runs.append((loss, metrics, torch.autograd.grad(loss, (hidden, weight, b))))
        assert (order[0] == "read") != ahead
        order.clear()
    (loss_a, metrics_a, grads_a), (loss_w, metrics_w, grads_w) = runs
    torch.testing.assert_close(loss_a, loss_w, rtol=1e-6, atol=1e-7)
    for k in metrics_a:
        torch.testing.assert_close(metrics_a[k], metrics_w[k], rtol=1e-6, atol=1e-7)
    for a, w in zip(grads_a, grads_w):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)  # (other GEMM shapes: fp32 rounding)


def test_waits_first_where_it_cannot_run_ahead(order, device):
    """Off-policy, the PyTorch rows, and a batch that fits one chunk wait for the read before their first chunk."""
    hidden, weight, b, ids, mask, adv = make_batch(device=device, seed=8)
    old = torch.full(ids.shape, -4.0, device=device)
    for kw in (dict(old_logprobs=old, impl="triton"), dict(impl="torch")):
        loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, **kw)
        loss.backward()
        assert order[0] == "read" and order.count("read") == 1, kw
        order.clear()
    small = make_batch(B=1, T=CHUNK, device=device, seed=9)
    loss, _ = lk.fused_grpo_lambda_loss(*small[:2], small[3], small[4], small[5], bias=small[2], impl="triton")
    loss.backward()
    assert order[0] == "read"


def test_bad_id_raises_after_the_first_chunk(order, device):
    hidden, weight, b, ids, mask, adv = make_batch(device=device, seed=10)
    mask = torch.ones_like(mask)
    ids[2, 5] = weight.shape[0]  # a real token, past the first chunk
    with pytest.raises(ValueError, match=r"`completion_ids` must hold token ids in \[0, V\) = \[0, 123\)"):
        lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl="triton")
    assert order == [("chunk", CHUNK), "read"]  # nothing after the check


def test_positions_filler_is_padding():
    """The entries after the real tokens' positions hold a padding position (what the first chunk computes past
    them), or 0 when there is no padding."""
    real = torch.tensor([False, True, True, False, False, True, False])
    positions, _ = real_tokens.real_token_positions(real)
    assert positions[:3].tolist() == [1, 2, 5] and all(not real[p] for p in positions[3:].tolist())
    assert real_tokens.real_token_positions(torch.ones(4, dtype=torch.bool))[0].tolist() == [0, 1, 2, 3, 0]


# (the interpreter's numpy warns about the exp and the 0·inf that the where then drops)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_kl_term_of_zero_weight_is_zero_even_where_exp_overflows(impl, order, device):
    """Filler rows have KL weight n = 0 but the ℓ of whatever their padding targets give: with a very unlikely
    target (a bias of −300 at τ = 0.5: ℓ ≈ −600, exp(0 − ℓ) = inf) the KL term must still be 0, not 0·inf = NaN."""
    hidden, weight, b, ids, _, adv = make_batch(device=device, seed=12)
    mask = _mask(3, device)
    with torch.no_grad():
        b[7] = -300.0
    ids = torch.where(mask, ids % 7, torch.full_like(ids, 7))  # padding targets the unlikely token
    ref = torch.full(ids.shape, -4.0, device=device)
    kw = dict(ref_logprobs=ref, beta=0.04, temperature=0.5)
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (order[0] == "read") == (impl == "torch")  # the Triton rows ran ahead over the filler
    assert_matches(loss, _, grads, reference_run(hidden, weight, b, ids, mask, adv, **kw), atol_loss=1e-5,
                   rtol_grad=1e-4)
