"""linear_logprobs queues its first chunk before it waits for the token-id check's one device→host read, so on a
GPU the first GEMM runs while the host waits, with the same chunks (and values) as if it had waited first."""
import pytest
import torch

import lambda_kernels as lk
from lambda_kernels.ops import real_tokens
from lambda_kernels.ops.linear_logprobs import launch, lse_gemm, plan

from ._helpers import record_calls, set_chunk_rows
from ._lm_head import make_inputs

H, V = 24, 123
GEMMS = ("cublas", "triton")  # the log-prob pass's two GEMMs (the Triton one: the per-tile kernel on CPU)


@pytest.fixture
def order(monkeypatch):
    """What the pass does, in order: ("chunk", rows) for each chunk's gathered or sliced rows going to a GEMM, and
    "read" when the host waits for the check's read."""
    events = []
    for module in (launch, lse_gemm):
        record_calls(monkeypatch, module, "gather_rows",
                     lambda x, rows, sl, buf: events.append(("chunk", sl.stop - sl.start)))
    record_calls(monkeypatch, real_tokens.HostRead, "values", lambda self: events.append("read"))
    return events


def chunk_cap(gemm: str) -> int:
    """Rows per chunk (the `gemm` fixture's budget): 7 for cuBLAS; BLOCK_M for the Triton GEMM, whose pieces hold at
    least that many rows (its budget counts 12 bytes per row and tile column, not a row of logits)."""
    return 7 if gemm == "cublas" else lse_gemm.tile_config()[0]


def first_rows(gemm: str) -> int:
    """Rows of the first chunk of a pass of more than one chunk (half a chunk at these small budgets)."""
    return plan.first_piece_rows(chunk_cap(gemm))


def inputs(N, device, seed=0):
    return make_inputs(N, H, V, dtype=torch.float16, device=device, seed=seed)


@pytest.fixture(params=GEMMS)
def gemm(request, monkeypatch):
    monkeypatch.setenv(lse_gemm.GEMM_ENV, request.param)
    set_chunk_rows(monkeypatch, 7 if request.param == "cublas" else 1)  # a budget below BLOCK_M rows for Triton
    return request.param


@pytest.mark.parametrize("grad", [False, True])
def test_unmasked_first_chunk_before_the_read(gemm, grad, order, device):
    cap, first = chunk_cap(gemm), first_rows(gemm)
    for N in (3 * cap + 2, cap):  # several chunks; one
        x, w, b, t = inputs(N, device)
        with torch.set_grad_enabled(grad):
            lk.linear_logprobs(x, w, t, bias=b)
        head = first if N > cap else N
        assert order[:2] == [("chunk", head), "read"] and order.count("read") == 1
        assert sum(rows for kind, rows in order[2:]) == N - head
        order.clear()


@pytest.mark.parametrize("grad", [False, True])
def test_masked_first_chunk_before_the_read(gemm, grad, order, device):
    """At least two chunks' rows in all and more real ones than a chunk: the first chunk (full) goes first, and the
    values are bit-identical to a call on just the real rows (which waits before its first chunk, same chunks)."""
    cap, first = chunk_cap(gemm), first_rows(gemm)
    N = 4 * cap
    x, w, b, t = inputs(N, device, seed=1)
    mask = torch.arange(N, device=device) % 3 != 0  # 2/3 real: more than one chunk
    t = torch.where(mask, t, torch.full_like(t, -100))
    with torch.set_grad_enabled(grad):
        lp = lk.linear_logprobs(x, w, t, bias=b, mask=mask)
    assert order[:2] == [("chunk", first), "read"] and order.count("read") == 1
    assert sum(rows for kind, rows in order[2:]) == int(mask.sum()) - first
    order.clear()
    with torch.no_grad():
        lp_real = lk.linear_logprobs(x[mask], w, t[mask], bias=b)
    assert order[:2] == [("chunk", first), "read"]
    assert torch.equal(lp.detach()[mask], lp_real) and (lp[~mask] == 0).all()


@pytest.mark.parametrize("n_real", [2, "cap"])
def test_real_tokens_of_one_chunk_redo_the_first(gemm, n_real, order, device):
    """Real tokens that fit one chunk (fewer than the first chunk's rows, or more): the speculative first chunk is
    redone as that one chunk (as a call on just them has it), so nothing depends on the speculation but time."""
    cap, first = chunk_cap(gemm), first_rows(gemm)
    N = 2 * cap
    x, w, b, t = inputs(N, device, seed=2)
    mask = torch.zeros(N, dtype=torch.bool, device=device)
    mask[torch.tensor([1, cap + 3]) if n_real == 2 else torch.arange(1, N, 2)[:cap]] = True
    n = int(mask.sum())
    lp = lk.linear_logprobs(x, w, t, bias=b, mask=mask)
    assert order == [("chunk", first), "read", ("chunk", n)]
    with torch.no_grad():
        lp_real = lk.linear_logprobs(x[mask], w, t[mask], bias=b)
    assert torch.equal(lp.detach()[mask], lp_real) and (lp[~mask] == 0).all()
    lp.sum().backward()
    assert (x.grad[~mask] == 0).all() and x.grad[mask].abs().sum() > 0


def test_first_chunk_of_first_piece_rows(order, monkeypatch, device):
    """With room for more than twice FIRST_PIECE_ROWS in a chunk, the first of several chunks has FIRST_PIECE_ROWS
    rows and the rest are balanced (pieces of fp32 logits rows: cuBLAS's; the Triton GEMM's pieces are bounded by
    its partial statistics, test_lse_gemm.py)."""
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "cublas")
    set_chunk_rows(monkeypatch, 7)
    monkeypatch.setattr(plan, "FIRST_PIECE_ROWS", 2)
    x, w, b, t = inputs(16, device, seed=5)
    mask = torch.arange(16, device=device) != 3  # 15 real
    with torch.no_grad():
        lp = lk.linear_logprobs(x, w, t, bias=b, mask=mask)
        assert order == [("chunk", 2), "read", ("chunk", 7), ("chunk", 6)]
        assert torch.equal(lp[mask], lk.linear_logprobs(x[mask], w, t[mask], bias=b))
        order.clear()
        lk.linear_logprobs(x[:13], w, t[:13], bias=b, mask=mask[:13])  # 13 < 2·7 rows in all: the read first
        assert order == ["read", ("chunk", 2), ("chunk", 5), ("chunk", 5)]


@pytest.mark.parametrize("masked", [False, True])
def test_outputs_can_be_modified_in_place(masked, device):
    """Every row computed: the log-probs are a whole tensor, not a view of a larger buffer (autograd forbids in-place
    changes to views made inside a custom Function). The entropy is saved for the backward, so it stays read-only."""
    x, w, b, t = inputs(9, device, seed=7)
    mask = torch.ones(9, dtype=torch.bool, device=device) if masked else None
    lp = lk.linear_logprobs(x, w, t, bias=b, mask=mask)
    lp.masked_fill_(t == t[0], 0.0)
    lp.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[t != t[0]] != 0).any()


def test_masked_under_two_chunks_reads_first(gemm, order, device):
    """Fewer than two chunks' rows in all: the real ones may fit one chunk, so the pass waits for their number."""
    cap = chunk_cap(gemm)
    x, w, b, t = inputs(2 * cap - 1, device, seed=3)
    mask = torch.arange(x.shape[0], device=device) % 2 == 0
    lk.linear_logprobs(x, w, t, bias=b, mask=mask)
    assert order[0] == "read" and sum(rows for kind, rows in order[1:]) == int(mask.sum())


@pytest.mark.parametrize("masked", [False, True])
def test_bad_id_raises_after_the_first_chunk(gemm, masked, order, device):
    cap, first = chunk_cap(gemm), first_rows(gemm)
    x, w, b, t = inputs(4 * cap, device, seed=4)
    real = torch.arange(x.shape[0], device=device) % 3 != 0
    t[cap + int(not real[cap])] = V  # a real token's id, past the first chunk
    mask = real if masked else None
    with pytest.raises(ValueError, match=r"`targets` must hold token ids in \[0, V\) = \[0, 123\).*, max 123\."):
        lk.linear_logprobs(x, w, t, bias=b, mask=mask)
    assert order == [("chunk", first), "read"]  # nothing after the check


def test_positions_filler_is_in_bounds():
    real = torch.tensor([False, True, True, False, False, True, False])
    positions, n_real = real_tokens.real_token_positions(real)
    assert positions[:3].tolist() == [1, 2, 5] and n_real.item() == 3
    assert positions.shape == (8,) and ((positions >= 0) & (positions < 7)).all()


def test_host_read_values(device):
    values = torch.tensor([-3, 7, 2**40], dtype=torch.int64, device=device)
    read = real_tokens.HostRead(values)
    values.zero_()  # queued after the copy: the host still sees the values it had when the read was queued
    assert read.values() == [-3, 7, 2**40]


@pytest.mark.gpu
def test_host_read_does_not_wait_for_the_gpu():
    """The read is queued behind the GPU's work, not waited for: its copy is still pending while the GPU sleeps."""
    values = torch.tensor([5, -1], device="cuda")
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU clock cycles ahead of the copy
    read = real_tokens.HostRead(values)
    assert not read._event.query()
    assert read.values() == [5, -1]


@pytest.mark.parametrize("masked", [False, True])
def test_strided_targets(masked, device):
    """A strided 1-d targets (reshape keeps it a view) reaches the kernels as a plain array."""
    x, w, b, t = inputs(2 * 13, device, seed=8)
    mask = (torch.arange(13, device=device) % 4 != 0) if masked else None
    with torch.no_grad():
        lp = lk.linear_logprobs(x[::2], w, t[::2], bias=b, mask=mask)
        want = lk.linear_logprobs(x[::2].contiguous(), w, t[::2].contiguous(), bias=b, mask=mask)
    assert torch.equal(lp, want)


def test_triton_gemm_masked_equals_real_rows_call_at_any_budget(order, monkeypatch, device):
    """The Triton GEMM's pieces count a gathered row whether it gathers or not, so a masked call and a call on just
    the real rows cut the same pieces (several here) and agree bit for bit."""
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "triton")
    monkeypatch.setenv(plan.BUDGET_ENV, str(3000))  # a few dozen rows of partial statistics and gathered states
    x, w, b, t = inputs(400, device, seed=9)  # 320 real rows: 3 pieces or more with BLOCK_M 128 on a GPU too
    mask = torch.arange(400, device=device) % 5 != 0
    with torch.no_grad():
        lp = lk.linear_logprobs(x, w, t, bias=b, mask=mask)
        masked_pieces = [event for event in order if event != "read"]
        order.clear()
        lp_real = lk.linear_logprobs(x[mask], w, t[mask], bias=b)
    assert len(masked_pieces) > 2 and [event for event in order if event != "read"] == masked_pieces
    assert torch.equal(lp[mask], lp_real)


def test_triton_gemm_masked_pass_speculates_at_the_default_budget(order, monkeypatch, device):
    """The Triton GEMM's budget holds many rows, but its pieces stop at MAX_PIECE_ROWS, so a masked pass of twice
    that many rows still queues its first piece before the read."""
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "triton")
    monkeypatch.setattr(lse_gemm, "MAX_PIECE_ROWS", 2 * lse_gemm.tile_config()[0])
    cap = lse_gemm.MAX_PIECE_ROWS
    x, w, b, t = inputs(2 * cap + 8, device, seed=10)
    mask = torch.arange(x.shape[0], device=device) % 5 != 0
    with torch.no_grad():
        lp = lk.linear_logprobs(x, w, t, bias=b, mask=mask)
        assert order[:2] == [("chunk", plan.first_piece_rows(cap)), "read"]
        assert max(rows for kind, rows in order[2:]) <= cap
        assert torch.equal(lp[mask], lk.linear_logprobs(x[mask], w, t[mask], bias=b))


@pytest.mark.parametrize("masked", [False, True])
def test_triton_gemm_hidden_strided_along_h(masked, monkeypatch, device):
    """hidden with stride ≠ 1 along H (a transposed view) on the Triton GEMM, whose kernels need unit stride: each
    piece is made contiguous (cuBLAS takes strides itself)."""
    monkeypatch.setenv(lse_gemm.GEMM_ENV, "triton")
    set_chunk_rows(monkeypatch, 1)  # pieces of BLOCK_M rows
    x, w, b, t = inputs(3 * chunk_cap("triton") + 1, device, seed=11)
    x_strided = x.detach().t().contiguous().t()
    assert x_strided.stride(1) != 1
    mask = (torch.arange(x.shape[0], device=device) % 4 != 0) if masked else None
    with torch.no_grad():
        lp = lk.linear_logprobs(x_strided, w, t, bias=b, mask=mask)
        want = lk.linear_logprobs(x.detach(), w, t, bias=b, mask=mask)
    assert torch.equal(lp, want)
