"""The memory budget and the two gradient plans (token chunks, vocabulary slabs): which plan runs, what it holds,
and that the vocab plan's values and gradients match the oracles as the token plan's do."""
import warnings

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels.ops.linear_logprobs import gemm as gemm_mod
from lambda_kernels.ops.linear_logprobs import launch, lse_gemm, plan

from ._helpers import IMPLS, logits_gemm_shapes, poisoned_outputs, record_calls
from ._lm_head import assert_fp32_matches_oracle, assert_matches, assert_no_worse_than_naive, grads_of, make_batch, \
    make_inputs, naive_half_logprobs, oracle, perturbed_old, reference_run, upstream

GiB = 1 << 30
# (N, V, H) of the issue's shapes, N = the real tokens of B·T with ~30% padding
SHAPES = {"qwen2.5-1.5b": (5734, 151936, 1536), "qwen2.5-7b": (5734, 152064, 3584),
          "llama3.1-8b": (11469, 128256, 4096), "1.5b-65k-row": (65536, 151936, 1536)}


def _plan(N, V, H, half=True, dw=True, dx=True):
    return plan.grad_plan(N, V, H, dw_accumulator=dw and half, dx_accumulator=dx and half)


def _workspace(p, N, V, H, half=True, dw=True, dx=True):
    return p.workspace_bytes(N, V, H, dw and half, dx and half)


def _split_phases(p, N, V, H):
    """(bytes while a split plan's chunks run, bytes while its tail runs) for a half head with dX: the chunk, the
    fp32 dW rows beyond the gradient's bytes and the chunk's gathered rows and dX; then the tail's slab, dW slab
    and gathered rows."""
    chunks = 4 * p.max_rows * V + 4 * (p.dw_rows - plan.split_rows(V)) * H + 4 * p.max_rows * H
    return chunks, p.tail.workspace_bytes(N, V - p.dw_rows, H, True, False)


# ------------------------------------------------------------------------------------------------ plan choice
def test_without_memory_budget_the_token_plan_runs(monkeypatch):
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "none")
    for N, V, H in SHAPES.values():
        p = _plan(N, V, H)
        assert p.kind == "tokens" and p.cols == V
        assert 4 * p.rows * V <= GiB  # only the logits chunk is bounded; the fp32 dW accumulator comes on top


def test_default_budget_keeps_the_issue_shapes_under_1_gib(monkeypatch):
    """By default the whole workspace stays within 960 MiB (1 GiB less a margin for what the plans do not count):
    a trained bf16 head at the issue's shapes takes a split plan (on-policy plans for all B·T rows, as it queues
    its first chunk before it counts the real ones); a frozen or fp32 head, or a small one, the token plan."""
    monkeypatch.delenv(plan.MEMORY_BUDGET_ENV, raising=False)
    assert plan.memory_budget_bytes() == plan.DEFAULT_MEMORY_BUDGET == 960 << 20
    for N, V, H in list(SHAPES.values()) + [(8192, 151936, 1536), (8192, 152064, 3584), (16384, 128256, 4096)]:
        p = _plan(N, V, H)
        assert p.kind == "split" and plan.split_rows(V) <= p.dw_rows < V, (N, V, H, p)
        assert max(_split_phases(p, N, V, H)) <= 960 << 20
        assert _plan(N, V, H, dw=False).kind == _plan(N, V, H, half=False).kind == "tokens"
    N, V, H = 2048, 32000, 2048  # a small head: its 2·V·H sum and a full chunk fit, so nothing changes
    assert _plan(N, V, H) == plan._token_plan(N, V, GiB - (64 << 20))


def test_token_plan_when_the_accumulator_fits_or_is_not_needed(monkeypatch):
    N, V, H = SHAPES["qwen2.5-7b"]
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "4G")
    p = _plan(N, V, H)
    assert p.kind == "tokens" and _workspace(p, N, V, H) <= 4 * GiB
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "1G")
    for kwargs in [dict(half=False), dict(dw=False)]:  # fp32 head: the accumulator is the grad; frozen head: none
        p = _plan(N, V, H, **kwargs)
        assert p.kind == "tokens" and _workspace(p, N, V, H, **kwargs) <= GiB


@pytest.mark.parametrize("dtype, need_dx, per_row", [(torch.float32, True, 8), (torch.float32, False, 4),
                                                     (torch.float16, True, 4), (torch.float16, False, 2)])
def test_token_chunks_count_their_gather_buffers_in_the_hiddens_dtype(dtype, need_dx, per_row, monkeypatch):
    """A token chunk's gathered rows (and their dX) take the hidden's element size per value: an fp32 hidden's
    chunks are cut shorter than a half one's under the same budget, so that logits + buffers fit it."""
    N, V, H = 4096, 3000, 1024
    x = torch.empty((N, H), dtype=dtype, device="meta")
    w = torch.empty((V, H), dtype=dtype, device="meta")
    budget = 4 * 256 * V + per_row * 256 * H  # exactly 256 rows' logits and buffers
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, str(budget))
    need_dw = dtype == torch.float32  # (an fp32 head has no separate dW sum; a frozen half head neither)
    p = launch.plan_for(x, w, need_dx, need_dw)
    assert p.kind == "tokens" and p.max_rows == 256, p
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, str(budget - 1))  # one byte less: the next size down
    assert launch.plan_for(x, w, need_dx, need_dw).max_rows < 256


def test_small_budgets_pick_a_sane_plan(monkeypatch):
    # no accumulator (fp32 or frozen head): short token chunks, within the budget
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, str(4 * 128 * 10))
    p = _plan(50, 300, 40, half=False)
    assert (p.kind, p.rows, p.max_rows) == ("tokens", 4, 4)  # ⌊5120 B / (4 B · 300)⌋ rows
    N, V, H = SHAPES["qwen2.5-7b"]
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "64M")
    p = _plan(N, V, H, dw=False)
    assert p.kind == "tokens" and p.rows >= 100 and _workspace(p, N, V, H, dw=False) <= 64 << 20
    # a bf16 head under a tight but feasible budget: thin slabs over pieces of rows, within it
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "59759")
    p = _plan(255, 14940, 16)
    assert p.kind == "vocab" and p.cols == 128 and p.rows < 255 and _workspace(p, 255, 14940, 16) <= 59759
    # Llama-3.1-8B's head and a 65,536-token row under 1 GiB: the vocab plan's fp32 dX sum alone (4·N·H) is 1 GiB,
    # but token chunks hold their gathered rows and dX per chunk only, so a split plan fits, without a warning
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "1G")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = _plan(65536, 128256, 4096)
    assert p.kind == "split" and max(_split_phases(p, 65536, 128256, 4096)) <= GiB
    # budgets no plan can meet: a warning, and all rows against wide slabs
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "1")
    with pytest.warns(RuntimeWarning, match="cannot hold the fp32 gradient sums"):
        p = _plan(500, 300, 40)
    assert p.kind == "vocab" and (p.rows, p.cols) == (500, 300)
    with pytest.warns(RuntimeWarning):
        p = _plan(0, 300, 40)
    assert p.rows >= 1 and p.cols >= 1


def test_vocab_plan_slabs_respect_the_logits_budget(monkeypatch):
    N, V, H = SHAPES["qwen2.5-7b"]
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "1G")
    monkeypatch.setenv(plan.BUDGET_ENV, "64M")
    p = _plan(N, V, H)
    assert p.kind == "vocab" and 4 * p.rows * p.cols <= 64 << 20


def test_forced_plans(monkeypatch):
    N, V, H = SHAPES["qwen2.5-7b"]
    monkeypatch.setenv(plan.PLAN_ENV, "vocab")
    p = _plan(N, V, H)
    assert p.kind == "vocab" and 4 * p.rows * p.cols <= GiB  # no memory budget: slabs within the logits budget
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "1G")
    monkeypatch.setenv(plan.PLAN_ENV, "tokens")
    p = _plan(N, V, H)
    assert p.kind == "tokens" and p.rows >= 1024  # the accumulator is accepted; the chunk is the forward pass's
    monkeypatch.setenv(plan.PLAN_ENV, "slabs")
    with pytest.raises(RuntimeError, match="LAMBDA_KERNELS_GRAD_PLAN must be one of auto, tokens, vocab"):
        _plan(N, V, H)


def test_budget_strings(monkeypatch):
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "512M")
    assert plan.memory_budget_bytes() == 512 << 20
    monkeypatch.setenv(plan.BUDGET_ENV, "1G")
    assert plan.forward_budget_bytes() == 512 << 20  # the memory budget caps the forward chunk too
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "half a gig")
    with pytest.raises(RuntimeError, match='LAMBDA_KERNELS_MEMORY_BUDGET must be a byte count .* or "none"; got'):
        plan.memory_budget_bytes()
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "None")
    assert plan.memory_budget_bytes() is None
    monkeypatch.delenv(plan.MEMORY_BUDGET_ENV)
    assert plan.memory_budget_bytes() == plan.DEFAULT_MEMORY_BUDGET


@pytest.mark.parametrize("total, cap, size", [(10, 100, 10), (300, 128, 100), (1000, 300, 256), (5734, 26000, 5734),
                                              (152064, 26000, 25344), (0, 5, 1)])
def test_split_size(total, cap, size):
    assert plan.split_size(total, cap) == size


@pytest.mark.parametrize("total, cap, sizes", [(0, 7, []), (5, 7, [5]), (7, 7, [7]), (8, 7, [3, 5]),
                                               (40, 7, [3, 7, 7, 7, 7, 7, 2]), (1000, 1766, [1000]),
                                               (1664, 1766, [1664]), (1700, 1766, [512, 1188]),
                                               (5734, 1766, [512, 1408, 1408, 1408, 998]),
                                               (8192, 1766, [512, 1536, 1536, 1536, 1536, 1536])])
def test_log_prob_pieces(total, cap, sizes):
    """One piece when it fits piece_cap(cap); else a first piece of first_piece_rows(cap) rows (so it does not depend
    on the total) and the rest balanced: consecutive, covering [0, total)."""
    got = plan.log_prob_pieces(total, cap)
    assert [sl.stop - sl.start for sl in got] == sizes
    assert [sl.start for sl in got] == [sum(sizes[:i]) for i in range(len(sizes))]
    full = plan.piece_cap(cap)
    assert plan.first_piece_rows(cap) == max(1, min(plan.FIRST_PIECE_ROWS, full // 2))
    if total > full:
        rest = total - plan.first_piece_rows(cap)
        assert sizes[0] == plan.first_piece_rows(cap) and len(sizes) == 1 + -(-rest // full)


# ------------------------------------------------------------------------------------ the vocab plan's numbers
@pytest.fixture
def vocab_plan(monkeypatch):
    """Force the vocab plan with slabs of `cols` vocabulary rows over pieces of `rows` rows (fp32 operands)."""
    def set_plan(rows, cols, N):
        budget = 4 * rows * cols if rows < N else 4 * N * cols
        monkeypatch.setenv(plan.PLAN_ENV, "vocab")
        monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, str(budget))
        monkeypatch.setattr(plan, "MIN_SLAB_COLS", cols)
    return set_plan


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows, cols", [(37, 130), (9, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_vocab_plan_linear_logprobs_matches_fp64_oracle(impl, rows, cols, bias, device, vocab_plan):
    N, H, V = 37, 40, 300
    vocab_plan(rows, cols, N)
    x, w, b, t = make_inputs(N, H, V, device=device, bias=bias)
    t[:3] = torch.tensor([0, V - 1, cols])  # targets at both ends and at a slab boundary
    p = launch.plan_for(x, w, True, True)
    assert p.kind == "vocab" and p.rows <= rows and p.cols <= cols < V  # sizes are balanced, never above
    lp, ent = lk.linear_logprobs(x, w, t, bias=b, temperature=0.7, return_entropy=True, impl=impl)
    assert_fp32_matches_oracle(lp, ent, x, w, b, t, 0.7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row_pieces", [False, True])
def test_vocab_plan_half_relative_oracle_and_no_full_accumulator(impl, row_pieces, device, monkeypatch):
    """fp16 head and hidden: slab-sized fp32 accumulators only, errors no worse than PyTorch in fp16. Budgets
    (fp32 dX sum and gathered rows + slab accumulator + logits): slabs of 128 over all rows, or over pieces of ≤ 16
    rows. cuBLAS's fp32 logits: under the same budget the Triton GEMM's 2-byte token chunks fit a split plan."""
    N, H, V = 40, 40, 300
    budget = 6 * N * H + 4 * 128 * H + 4 * 128 * (16 if row_pieces else N)
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, str(budget))
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "cublas")
    x, w, b, t = make_inputs(N, H, V, dtype=torch.float16, device=device)
    # the first piece of each slab writes its dW, the others add to it
    written, added = (record_calls(monkeypatch, gemm_mod.Gemm, method, lambda self, acc, d, x_c: tuple(acc.shape))
                      for method in ("dw_write", "dw_accumulate"))
    lp, ent = lk.linear_logprobs(x, w, t, bias=b, temperature=0.8, return_entropy=True, impl=impl)
    g_lp, g_ent = upstream(N, device=device)
    got = grads_of(lp, ent, g_lp, g_ent, (x, w, b))
    assert len(written) == 3 and all(rows <= 128 and cols == H for rows, cols in written + added)  # 3 slabs
    assert len(added) == (3 * 2 if row_pieces else 0)  # 40 rows in 3 pieces of ≤ 16: two additions per slab
    assert all(g.dtype == torch.float16 for g in got)
    lp_ref, ent_ref, leaves = oracle(x, w, b, t, 0.8)
    want = grads_of(lp_ref, ent_ref, g_lp.double(), g_ent.double(), leaves)
    _, _, naive = naive_half_logprobs(x, w, b, t, 0.8, g_lp, g_ent)
    assert_no_worse_than_naive(list(zip(got, naive, want)))


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_plan_never_exceeds_its_pieces(impl, device, vocab_plan, monkeypatch):
    """Forward chunks and backward slabs: no logits GEMM writes more than the budget allows."""
    N, H, V = 37, 40, 300
    vocab_plan(9, 64, N)
    seen = logits_gemm_shapes(monkeypatch)
    x, w, b, t = make_inputs(N, H, V, device=device)
    lk.linear_logprobs(x, w, t, bias=b, impl=impl).sum().backward()
    budget = plan.memory_budget_bytes()
    assert seen and all(4 * r * c <= budget for r, c in seen)
    assert sum(c for r, c in seen if c < V) == V * -(-N // 9)  # every slab of every piece of rows, once


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_plan_keeps_logprobs_bit_identical_and_fp64(impl, device, vocab_plan):
    vocab_plan(37, 130, 37)
    x, w, b, t = make_inputs(37, 40, 300, device=device)
    lp = lk.linear_logprobs(x, w, t, bias=b, impl=impl)
    with torch.no_grad():
        assert torch.equal(lk.linear_logprobs(x, w, t, bias=b, impl=impl), lp.detach())
    x64, w64, b64 = (v.detach().double().requires_grad_() for v in (x, w, b))
    lp64 = lk.linear_logprobs(x64, w64, t, bias=b64, impl=impl)
    got = torch.autograd.grad(lp64.sum(), (x64, w64, b64))
    lp_r, _, leaves = oracle(x, w, b, t, 1.0)
    want = torch.autograd.grad(lp_r.sum(), leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------- the fused loss
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("trace", [None, "both"])
@pytest.mark.parametrize("on_policy", [True, False])
def test_fused_loss_under_the_vocab_plan_matches_reference(impl, trace, on_policy, device, vocab_plan):
    hidden, weight, b, ids, mask, adv = make_batch(V=300, device=device, seed=11)
    vocab_plan(8, 100, 3 * 17)
    old = None if on_policy else perturbed_old(hidden, weight, b, ids, 0.9)
    with torch.no_grad():
        ref = lk.reference.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double()).float() - 0.05
    kw = dict(old_logprobs=old, ref_logprobs=ref, temperature=0.9, trace=trace, lam=0.9, beta=0.04,
              adv_clamp_min=-0.1 if trace else None, loss_type="dapo", return_entropy=True)
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, b, ids, mask, adv, **kw))
    assert (metrics["ratio_mean"] == 1) == on_policy


# ------------------------------------------------------------------------------------------- the split plan
@pytest.fixture
def split_plan(monkeypatch):
    """Force the split plan: token chunks of ≤ `rows` rows summing dW for the vocabulary rows [0, ≥ dw_rows), then
    the tail pass over the others. The budgets count fp32 logits chunks: cuBLAS's (the Triton GEMM's split plans:
    test_probs_chunks.py, test_dlogits_gemm.py)."""
    def set_plan(rows, V, H, dw_rows):
        monkeypatch.setenv(lse_gemm.GEMM_ENV, "cublas")
        monkeypatch.setenv(plan.PLAN_ENV, "split")
        monkeypatch.setenv(plan.BUDGET_ENV, str(4 * rows * V))
        monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, str(4 * rows * V + 4 * (dw_rows - plan.split_rows(V)) * H))
    return set_plan


def _dw_sums_and_tail(monkeypatch):
    """(fp32 dW sums the GEMMs write: [rows, H] shapes; logits GEMM shapes)."""
    sums = record_calls(monkeypatch, gemm_mod.Gemm, "dw_write", lambda self, acc, d, x_c: tuple(acc.shape))
    return sums, logits_gemm_shapes(monkeypatch)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [True, False])
def test_split_plan_linear_logprobs_half_no_worse_than_naive(impl, bias, device, split_plan, monkeypatch):
    """fp16: the chunks sum dW for rows [0, 200) (half in the gradient's bytes), the tail pass gives rows [200, 300)
    in slabs; entropy gradients too; errors no worse than PyTorch in fp16."""
    N, H, V = 40, 40, 300
    split_plan(16, V, H, 200)
    x, w, b, t = make_inputs(N, H, V, dtype=torch.float16, device=device, bias=bias)
    t[:3] = torch.tensor([0, V - 1, 200])  # targets at both ends and at the split
    p = launch.plan_for(x, w, True, True)
    assert p.kind == "split" and p.dw_rows == 200 and p.tail == plan.GradPlan("vocab", 20, 100)  # 2 row pieces
    sums, logits = _dw_sums_and_tail(monkeypatch)
    lp, ent = lk.linear_logprobs(x, w, t, bias=b, temperature=0.8, return_entropy=True, impl=impl)
    g_lp, g_ent = upstream(N, device=device)
    leaves = (x, w, b) if bias else (x, w)
    got = torch.autograd.grad([lp, ent], leaves, [g_lp, g_ent])
    half = plan.split_rows(V)
    assert sums == [(half, H), (200 - half, H), (100, H)]  # the chunks' two sums, the tail's slab
    assert [shape for shape in logits if shape[1] < V] == [(20, 100), (20, 100)]
    assert all(g.dtype == torch.float16 for g in got)
    lp_ref, ent_ref, ref_leaves = oracle(x, w, b, t, 0.8)
    want = torch.autograd.grad([lp_ref, ent_ref], [v for v in ref_leaves if v is not None],
                               [g_lp.double(), g_ent.double()])
    _, _, naive = naive_half_logprobs(x, w, b if bias else torch.zeros(V, dtype=x.dtype, device=device), t, 0.8,
                                      g_lp, g_ent)
    assert_no_worse_than_naive(list(zip(got, naive, want)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("policy", ["on", "off", "off_two_passes"])
def test_fused_loss_under_the_split_plan(impl, policy, device, split_plan, monkeypatch):
    """fp16 head: the same loss and metrics as the token plan, dX and db bit-identical (the same chunks), dW within
    an fp16 rounding of it, and every output written (NaN-poisoned); on-policy and one-pass off-policy keep one pass
    over the chunks (the tail reads the lse and token gradients they leave), a sequence longer than a chunk takes
    two passes (`logprobs_backward`)."""
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "cublas")  # (both runs: the same chunks, bit for bit)
    hidden, weight, b, ids, mask, adv = make_batch(V=300, dtype=torch.float16, device=device, seed=11)
    old = None if policy == "on" else perturbed_old(hidden, weight, b, ids, 0.9)
    with torch.no_grad():
        ref = lk.reference.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double()).float() - 0.05
    kw = dict(old_logprobs=old, ref_logprobs=ref, temperature=0.9, trace="both", lam=0.9, beta=0.04,
              adv_clamp_min=-0.1, loss_type="dapo", return_entropy=True)
    rows = 8 if policy == "off_two_passes" else 16  # a row has up to 17 real tokens
    monkeypatch.setenv(plan.BUDGET_ENV, str(4 * rows * 300))
    loss_t, metrics_t = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
    grads_t = torch.autograd.grad(loss_t, (hidden, weight, b))
    split_plan(rows, 300, 40, 200)
    sums, logits = _dw_sums_and_tail(monkeypatch)
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    half = plan.split_rows(300)
    assert sums[:2] == [(half, 40), (200 - half, 40)]
    assert sum(r * c for r, c in logits if c < 300) == int(mask.sum()) * 100  # the tail: every real row, once
    passes = sum(c == 300 for r, c in logits) * rows
    assert (passes >= 2 * int(mask.sum())) == (policy == "off_two_passes")  # two passes over the chunks, or one
    assert torch.equal(loss, loss_t) and all(torch.equal(metrics[k], metrics_t[k]) for k in metrics)
    if policy != "off_two_passes":  # (two passes recompute the chunks as the backward of linear_logprobs)
        assert torch.equal(grads[0], grads_t[0]) and torch.equal(grads[2], grads_t[2])
    for g, g_t in zip(grads, grads_t):
        assert g.dtype == torch.float16 and torch.isfinite(g).all()
        torch.testing.assert_close(g.float(), g_t.float(), rtol=2e-3, atol=2e-3 * g_t.abs().max().item())
    loss_r, _, grads_r = reference_run(hidden, weight, b, ids, mask, adv, **kw)
    for g, e in zip(grads, grads_r):
        assert (g.double() - e).abs().max() <= 2e-3 * e.abs().max()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_one_gib_budget_picks_the_fastest_modelled_plan(shape, monkeypatch):
    """Under 1 GiB the planner takes the plan `modelled_seconds` rates fastest among all that fit: here checked
    against a brute force over token chunks in 128-row steps (each with the dW rows the rest of the budget holds)
    and the vocab plan. At the issue's shapes that is a split plan (run 3 measured the vocab plan at 1.18–1.31× the
    floor). A backward that already has the log-sum-exp never takes a split plan."""
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "1G")
    N, V, H = SHAPES[shape]
    p = _plan(N, V, H)
    assert p.kind == "split" and plan.split_rows(V) <= p.dw_rows < V and p.rows >= plan.TOKEN_PLAN_MIN_ROWS
    assert p.dw_rows % plan.DW_ROWS_ALIGN == 0 and (V - p.dw_rows) % 8 == 0  # (cuBLAS's sm_90 kernels: see plan.py)

    def reserve(rows):  # a chunk's rows gathered out of the padding and their dX
        return 4 * rows * H

    assert max(_split_phases(p, N, V, H)) <= GiB
    assert plan.piece_cap(plan.forward_budget_bytes() // (4 * V)) * V * 4 <= GiB  # the log-prob pass's chunks too
    monkeypatch.setenv(plan.PLAN_ENV, "vocab")
    others = [_plan(N, V, H)]
    for rows in range(512, plan.piece_cap(GiB // (4 * V + 4 * H)) + 1, 128):
        chunk = plan._token_plan(N, V, rows * 4 * V)
        dw_rows = plan.aligned_dw_rows(V, plan.split_rows(V) + (GiB - reserve(chunk.max_rows) - 4 * chunk.max_rows * V)
                                       // (4 * H))
        others.append(chunk if dw_rows == V else plan._split_plan(N, V, H, chunk, dw_rows, GiB, GiB))
    def held(q):  # a split plan's two phases; a token plan's chunk, dW rows and gather buffers; the vocab plan's
        if q.kind == "split":
            return max(_split_phases(q, N, V, H))
        return _workspace(q, N, V, H) + (q.kind == "tokens") * reserve(q.max_rows)

    fits = [q for q in others if held(q) <= GiB]
    assert len(fits) > 5 and plan.modelled_seconds(p, N, V, H) <= min(plan.modelled_seconds(q, N, V, H) for q in fits)
    assert plan.modelled_seconds(p, N, V, H) < 0.91 * plan.modelled_seconds(others[0], N, V, H)  # vs the vocab plan
    monkeypatch.setenv(plan.PLAN_ENV, "auto")
    assert plan.grad_plan(N, V, H, dw_accumulator=True, dx_accumulator=True, lse_known=True).kind != "split"


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_after_a_log_prob_pass_plans_with_its_lse(impl, device, monkeypatch):
    """`linear_logprobs`' backward (and the fused loss's two passes) has every lse already: it tells the planner,
    which then rates the vocab plan without a log-prob pass of its own."""
    seen = record_calls(monkeypatch, launch, "grad_plan", lambda *a, **kw: kw["lse_known"])
    x, w, b, t = make_inputs(20, 16, 50, dtype=torch.float16, device=device)
    lk.linear_logprobs(x, w, t, bias=b, impl=impl).sum().backward()
    assert seen == [True]


def test_cost_model_reproduces_run_3():
    """`modelled_seconds` against run 3 on an H100 (benchmarks/RESULTS.md), within 7%: the token plan's 15.9 /
    35.6 ms of kernels at 1.5B / 7B; the vocab plan's medians less the token plan's host time (~20.1 / 42.3 ms)."""
    cases = [("qwen2.5-1.5b", "tokens", 1536, None, 15.9), ("qwen2.5-7b", "tokens", 1536, None, 35.6),
             ("qwen2.5-1.5b", "vocab", 5734, 20480, 20.1), ("qwen2.5-7b", "vocab", 5734, 25344, 42.3)]
    for shape, kind, rows, cols, measured_ms in cases:
        N, V, H = SHAPES[shape]
        p = plan.GradPlan(kind, rows, V if cols is None else cols)
        assert abs(plan.modelled_seconds(p, N, V, H) * 1e3 / measured_ms - 1) < 0.07, (shape, kind)


def test_long_row_backward_with_lse_splits_where_the_vocab_plan_does_not_fit(monkeypatch):
    """A backward after a log-prob pass prefers the vocab plan, but at 65,536 tokens of H4096 its fp32 dX sum and
    gathered rows (6·N·H = 1.5 GiB) exceed the default budget: a split plan fits instead, without a warning."""
    monkeypatch.delenv(plan.MEMORY_BUDGET_ENV, raising=False)
    N, V, H = 65536, 128256, 4096
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = plan.grad_plan(N, V, H, dw_accumulator=True, dx_accumulator=True, lse_known=True)
    assert p.kind == "split" and max(_split_phases(p, N, V, H)) <= plan.DEFAULT_MEMORY_BUDGET
    N, V, H = SHAPES["qwen2.5-7b"]  # where the vocab plan fits, it stays the choice
    assert plan.grad_plan(N, V, H, dw_accumulator=True, dx_accumulator=True, lse_known=True).kind == "vocab"


@pytest.mark.parametrize("rows, gathers", [(None, 1), (8, 3 * 4)])  # one piece: once; 4 pieces × 3 slabs
def test_vocab_plan_gathers_a_single_piece_once(rows, gathers, device, vocab_plan, monkeypatch):
    """Masked rows gathered for the GEMMs: one piece of all rows is gathered once for all the vocabulary slabs (not
    once per slab); pieces of fewer rows are gathered per slab, so that no buffer holds more than a piece."""
    N, H, V = 37, 40, 300
    x, w, b, t = make_inputs(N, H, V, device=device)
    mask = torch.arange(N, device=device) % 4 != 0  # 27 real rows
    n = int(mask.sum())
    vocab_plan(rows or n, 100, n)
    lp = lk.linear_logprobs(x, w, t, bias=b, mask=mask)
    seen = record_calls(monkeypatch, launch, "gather_rows", lambda x_, rows_, sl, buf: sl.stop - sl.start)
    lp.sum().backward()
    assert len(seen) == gathers and sum(seen) == n * (1 if rows is None else 3)
    assert (x.grad[~mask] == 0).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("budget", [None, "2G", "1536M", "256M"])  # None: the default
def test_every_plan_without_a_warning_fits_its_budget(budget, monkeypatch):
    """Over shapes from tiny to a 262,144-token row and every kind of pass (dW and/or dX, the lse known or not):
    a plan returned without a warning holds at most the budget by the planner's own accounting, both phases of a
    split plan and the gathered rows of frozen hidden states included; a budget that does not bind changes
    nothing."""
    if budget is None:
        monkeypatch.delenv(plan.MEMORY_BUDGET_ENV, raising=False)
    else:
        monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, budget)
    memory = plan.memory_budget_bytes()
    shapes = [(7, 123, 16), (1600, 152064, 1536), (5734, 152064, 3584), (16384, 128256, 4096),
              (65536, 151936, 1536), (131072, 152064, 8192), (262144, 151936, 3584)]
    for N, V, H in shapes:
        for dw, dx, lse_known in [(True, True, False), (True, True, True), (True, False, True), (False, True, False)]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                p = plan.grad_plan(N, V, H, dw_accumulator=dw, dx_accumulator=dx, lse_known=lse_known)
            assert p.rows >= 1 and p.cols >= 1
            if caught:
                continue
            if p.kind == "tokens" and not dw:
                held = 4 * p.max_rows * V + plan._token_reserve(p.max_rows, H, 4 if dx else 2)
            else:
                held = plan._held_bytes(p, N, V, H, dx, 4 if dx else 2)
            assert held <= memory, (N, V, H, dw, dx, lse_known, p)
            if p.kind == "vocab":  # what grad_pipeline allocates: slab logits, dW slab, gathered rows, fp32 dX sum
                assert held >= 4 * p.rows * p.cols + dw * 4 * p.cols * H + 2 * N * H + dx * 4 * N * H
            monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "none")
            free = plan.grad_plan(N, V, H, dw_accumulator=dw, dx_accumulator=dx, lse_known=lse_known)
            monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, str(memory))
            free_held = 4 * free.max_rows * V + (plan.rest_bytes(V, H) if dw else 0) \
                + plan._token_reserve(free.max_rows, H, 4 if dx else 2)
            if free_held <= memory:  # the budget does not bind: the plan without one
                assert p == free, (N, V, H, dw, dx, p, free)
    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "none")
    assert all(plan.grad_plan(N, V, H, dw_accumulator=True, dx_accumulator=True).kind == "tokens"
               for N, V, H in shapes)
