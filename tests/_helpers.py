"""Shared test utilities: NaN poisoning of kernel outputs, seeded inputs, call recorders, chunk budgets."""
import contextlib
import math

import torch

IMPLS = ("triton", "torch")  # the two row backends every LM-head test runs
LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo", "luspo")


@contextlib.contextmanager
def poisoned_outputs():
    """Every floating torch.empty/empty_like made inside the block starts as NaN, so an unwritten element shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def random_mask(B, T, *, p_hole=0.2, seed=0, right_pad=True):
    """A mask with random holes and right padding of random length (row 0 keeps its full length)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) > p_hole
    if right_pad and T > 1:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        m &= torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return m


def record_calls(monkeypatch, owner, name, record) -> list:
    """Wrap `owner.name` so that every call first appends `record(*args, **kwargs)` to the returned list."""
    seen, original = [], getattr(owner, name)

    def spy(*args, **kwargs):
        seen.append(record(*args, **kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return seen


def logits_gemm_shapes(monkeypatch) -> list:
    """The [rows, vocabulary columns] of every logits GEMM from now on (one per chunk, slab and pass)."""
    from lambda_kernels.ops.linear_logprobs.gemm import Gemm

    return record_calls(monkeypatch, Gemm, "logits", lambda self, x, out: tuple(out.shape))


def set_chunk_rows(monkeypatch, rows: int, V: int = 123, row_bytes: int | None = None) -> None:
    """A logits budget of exactly `rows` rows of a chunk: fp32 rows of V logits, or `row_bytes` a row (the Triton
    GEMM's 2-byte chunks: `launch.probs_row_bytes`)."""
    from lambda_kernels.ops.linear_logprobs.plan import BUDGET_ENV

    monkeypatch.setenv(BUDGET_ENV, str((row_bytes or 4 * V) * rows))


# (plan, rows per chunk) for the fused loss's paths at the test shapes (B·T ≈ 68 rows, V = 123): "tokens" with chunks
# of 40 rows runs off-policy in one pass (chunks of whole sequences), with 5 rows in two passes; "split": the chunks'
# dW for the vocabulary rows [0, 56) and a tail pass for the rest (fp32 heads too); "vocab": two passes over
# vocabulary slabs
PLANS = [("tokens", 40), ("tokens", 5), ("split", 8), ("vocab", 8)]


def force_plan(monkeypatch, plan: str, rows: int, V: int = 123) -> None:
    """Chunks of `rows` rows and the gradient plan `plan` (split under a memory budget of one chunk of logits, which
    leaves the chunks the dW rows a half head's gradient holds, ⌊V/2⌋ aligned down, and the tail the rest; the
    others without a budget)."""
    from lambda_kernels.ops.linear_logprobs.plan import MEMORY_BUDGET_ENV, PLAN_ENV

    set_chunk_rows(monkeypatch, rows, V)
    monkeypatch.setenv(PLAN_ENV, plan)
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "none" if plan != "split" else str(4 * V * rows))


def assert_module_is_function(module_cls, fn, options: dict, args: tuple, **call_kw) -> None:
    """`module_cls(**options)(*args, **call_kw)` gives the very loss of `fn(*args, **options, **call_kw)`: the
    nn.Module holds the options and passes them on."""
    got, _ = module_cls(**options)(*args, **call_kw)
    want, _ = fn(*args, **options, **call_kw)
    assert torch.equal(got, want)
