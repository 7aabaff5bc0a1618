"""The off-policy fused loss in one pass: chunks of whole sequences, the objective on each chunk's rows alone.

Checked against the fp64 reference like the other paths, and by counting logits GEMMs: one per chunk (one pass)
when every sequence fits a chunk, twice the chunks (two passes) otherwise."""
import pytest
import torch

import lambda_kernels as lk
from lambda_kernels.ops.fused_loss.launch import whole_sequence_pieces
from lambda_kernels.ops.real_tokens import real_token_positions
from lambda_kernels.ops.linear_logprobs import gemm as gemm_mod

from ._helpers import IMPLS, LOSS_TYPES, poisoned_outputs, record_calls, set_chunk_rows
from ._lm_head import assert_matches, make_batch, perturbed_old, reference_run



def test_whole_sequence_pieces_packs_consecutive_rows():
    counts = [5, 0, 7, 3, 9]
    pieces = whole_sequence_pieces(counts, 10)
    assert pieces == [(slice(0, 2), slice(0, 5)), (slice(2, 4), slice(5, 15)), (slice(4, 5), slice(15, 24))]
    assert whole_sequence_pieces(counts, 8) is None  # the 9-token row fits no chunk: two passes
    assert whole_sequence_pieces(counts, 100) == [(slice(0, 5), slice(0, 24))]
    assert whole_sequence_pieces([0, 0, 0], 2) == []


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_real_token_positions_are_nonzero_without_a_sync(density, device):
    flat = (torch.rand(257, generator=torch.Generator().manual_seed(3)) < density).float().to(device)
    want = flat.nonzero().squeeze(1)
    positions, n_real = real_token_positions(flat != 0)
    assert torch.equal(positions[:want.numel()], want) and n_real.item() == want.numel()


@pytest.fixture
def logits_gemms(monkeypatch):
    """The rows of every logits GEMM of a call (one per chunk and pass)."""
    return record_calls(monkeypatch, gemm_mod.Gemm, "logits", lambda self, x, out: out.shape[0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("trace", [None, "recent", "both"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("rows", [17, 40, 5])
def test_matches_reference_in_one_pass_or_two(impl, trace, loss_type, rows, device, logits_gemms, monkeypatch):
    """rows 17 (= T): about one sequence per chunk; 40: several; 5 < the longest sequence: the two-pass fallback."""
    set_chunk_rows(monkeypatch, rows)
    seed = LOSS_TYPES.index(loss_type) + 7 * [None, "recent", "both"].index(trace)
    hidden, weight, b, ids, mask, adv = make_batch(B=5, device=device, seed=seed)
    old = perturbed_old(hidden, weight, b, ids, 0.8, scale=0.3)
    with torch.no_grad():
        ref = lk.reference.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double()).float() - 0.05
    kw = dict(old_logprobs=old, ref_logprobs=ref, temperature=0.8, trace=trace, lam=0.9, beta=0.04,
              adv_clamp_min=-0.1 if trace else None, epsilon_high=0.28, loss_type=loss_type,
              max_completion_length=20 if loss_type == "dr_grpo" else None, return_entropy=True)
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, b, ids, mask, adv, **kw))
    pieces = whole_sequence_pieces((mask != 0).sum(1).tolist(), rows)
    n_real = int(mask.sum())
    assert (pieces is None) == (rows < int(mask.sum(1).max()))
    if pieces is not None:
        assert len(logits_gemms) == len(pieces) and sum(logits_gemms) == n_real  # one pass over every real token
    else:
        assert sum(logits_gemms) == 2 * n_real  # log-prob pass, then gradient pass
    assert metrics["clip_ratio/region_mean"] > 0  # some tokens are clipped: the per-chunk objective saw real ratios


@pytest.mark.parametrize("impl", IMPLS)
def test_per_token_advantages_num_items_no_bias(impl, device, logits_gemms, monkeypatch):
    set_chunk_rows(monkeypatch, 40)
    hidden, weight, _, ids, mask, adv = make_batch(B=4, device=device, bias=False, per_token_adv=True, seed=9)
    old = perturbed_old(hidden, weight, None, ids, 1.0, scale=0.4)
    kw = dict(old_logprobs=old, trace="both", lam=0.99, num_items_in_batch=torch.tensor(60.0), loss_type="dapo")
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, impl=impl, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, None, ids, mask, adv, **kw))
    assert sum(logits_gemms) == int(mask.sum())


@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_fully_written_under_nan_poison(impl, device, logits_gemms, monkeypatch):
    set_chunk_rows(monkeypatch, 40)
    hidden, weight, b, ids, mask, adv = make_batch(B=4, device=device, seed=2)
    old = perturbed_old(hidden, weight, b, ids, 1.0)
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, old_logprobs=old,
                                                  impl=impl, return_entropy=True)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert sum(logits_gemms) == int(mask.sum())
    for v in (loss, *metrics.values(), *grads):
        assert torch.isfinite(v).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_same_weights_as_old_policy_gives_ratio_one(impl, device, monkeypatch):
    """old_logprobs from linear_logprobs under no_grad (the first step of a multi-iteration update): ratios 1 to
    fp32 rounding (the one-pass chunks hold whole sequences of real tokens, the log-prob pass fixed-size chunks of
    all tokens: a GEMM library may sum in another order for another shape)."""
    set_chunk_rows(monkeypatch, 40)
    hidden, weight, b, ids, mask, adv = make_batch(B=4, device=device, seed=4)
    with torch.no_grad():
        old = lk.linear_logprobs(hidden, weight, ids, bias=b, impl=impl)
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, old_logprobs=old, impl=impl)
    on_loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl)
    torch.testing.assert_close(metrics["ratio_mean"].cpu(), torch.ones(()), rtol=0, atol=1e-6)
    assert metrics["clip_ratio/region_mean"] == 0
    torch.testing.assert_close(loss, on_loss, rtol=1e-5, atol=1e-6)
