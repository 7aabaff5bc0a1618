"""What the LM-head paths hold at once, measured on the CPU with a dispatch-mode tracker (tests/_memory.py): the
logits chunk (or the vocab plan's workspace) plus per-token vectors, never a [tokens × vocab] or [V, H] temporary.

fp32 operands: an fp32 head needs no separate dW accumulator, so the bounds below are the logits budgets alone (the
fp32 dX/dW sums of a bf16 head are not measured here: on the CPU a bf16 head is upcast to fp32 whole).
The Triton rows are checked (the interpreter's own numpy buffers are outside torch and not counted); the PyTorch
fallback rows hold a few chunk-sized temporaries more, bounded here too."""
import pytest
import torch

import lambda_kernels as lk
from lambda_kernels.ops.linear_logprobs import plan

from ._helpers import IMPLS
from ._memory import PeakNewBytes

B, T, H, V = 4, 50, 16, 3000
CHUNK_ROWS = 16  # the 200 tokens need 13 chunks: a stray [tokens × vocab] buffer would break every bound below
MEMORY_BUDGET = 4 * 200 * 150  # below one logits chunk, so that it is the bound that binds
FULL_LOGITS = 4 * B * T * V
# per-token vectors (ℓ, lse, gradients of ℓ, indices), 0-d results, and two chunk-sized buffers: a chunk's real
# tokens' hidden states gathered out of the padding, and their dX before it is scattered back (no [tokens, H] copy)
SLACK = 128 * B * T + 2 * 4 * CHUNK_ROWS * H + 8192
TORCH_ROWS_TEMPORARIES = 6  # chunk-sized fp32 temporaries of chunked_torch's row operations, at most


def _inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 30:] = False
    mask[3, 10:] = False
    adv = torch.randn(B, generator=g)
    noise = 0.1 * torch.randn(B, T, generator=g)
    hidden, weight, ids, mask, adv, noise = (t.to(device) for t in (hidden, weight, ids, mask, adv, noise))
    return hidden, weight, ids, mask, adv, noise


def _old_logprobs(hidden, weight, ids, noise):
    with torch.no_grad():
        return lk.linear_logprobs(hidden, weight, ids) + noise


@pytest.fixture
def budgets(monkeypatch):
    monkeypatch.setenv(plan.BUDGET_ENV, str(4 * V * CHUNK_ROWS))
    monkeypatch.delenv(plan.MEMORY_BUDGET_ENV, raising=False)

    def set_memory(nbytes, grad_plan="auto"):
        monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, str(nbytes))
        monkeypatch.setenv(plan.PLAN_ENV, grad_plan)
    return set_memory


# (row backend, softcap): the PyTorch rows compute the capped logits' tanh and its slope in chunk-sized temporaries
# (in place, in the bound); the Triton rows in registers, so a capped Triton case measures the uncapped one's buffers
# again (and costs the interpreter twice its time)
IMPL_SOFTCAP = [("triton", None), ("torch", None), ("torch", 30.0)]


def _bound(impl: str, workspace: int) -> int:
    bound = (workspace if impl == "triton" else TORCH_ROWS_TEMPORARIES * workspace) + SLACK
    assert bound < FULL_LOGITS  # the bounds mean something
    return bound


@pytest.mark.parametrize("impl, softcap", IMPL_SOFTCAP)
@pytest.mark.parametrize("with_grad", [False, True])
def test_linear_logprobs_holds_one_chunk(impl, with_grad, softcap, budgets, device):
    hidden, weight, ids, _, _, _ = _inputs(device)  # no old log-probs needed here
    x = hidden.reshape(-1, H).requires_grad_(with_grad)
    w = weight.clone().requires_grad_(with_grad)
    with PeakNewBytes() as mem:
        lp = lk.linear_logprobs(x, w, ids.reshape(-1), impl=impl, softcap=softcap)
        if with_grad:
            lp.sum().backward()
    extra = mem.peak_excluding(lp, x.grad, w.grad)
    assert extra <= _bound(impl, 4 * V * CHUNK_ROWS), extra
    assert extra >= 4 * V * plan.chunk_rows(B * T, V)  # the tracker does see a chunk (the log-prob pass's is larger)


@pytest.mark.parametrize("impl, softcap", IMPL_SOFTCAP)
@pytest.mark.parametrize("policy", ["on", "off"])
def test_fused_loss_holds_one_chunk_or_the_memory_budget(impl, policy, softcap, budgets, device):
    """Token plan: one chunk (whole sequences for one-pass off-policy). Under LAMBDA_KERNELS_MEMORY_BUDGET: the
    budget, with shorter token chunks (an fp32 head has no accumulator) or with the vocab plan (forced here, as a
    bf16 head would choose it), the log-prob pass included."""
    hidden, weight, ids, mask, adv, noise = _inputs(device)
    old = _old_logprobs(hidden, weight, ids, noise) if policy == "off" else None
    for memory_budget, grad_plan in ((None, None), (MEMORY_BUDGET, "auto"), (MEMORY_BUDGET, "vocab")):
        if memory_budget is not None:
            budgets(memory_budget, grad_plan)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with PeakNewBytes() as mem:
            loss, _ = lk.fused_grpo_lambda_loss(h, w, ids, mask, adv, old_logprobs=old, trace="both", lam=0.9,
                                                impl=impl, softcap=softcap)
            loss.backward()
        extra = mem.peak_excluding(h.grad, w.grad)  # a peak before the gradients existed counts in full
        workspace = 4 * V * CHUNK_ROWS if memory_budget is None else memory_budget
        assert extra <= _bound(impl, workspace), (memory_budget, extra, workspace)
        assert extra >= workspace // 2, (memory_budget, extra, workspace)  # the tracker sees the logits buffers


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("call", ["on", "off", "logprobs"])
def test_real_tokens_are_gathered_chunk_by_chunk(impl, call, monkeypatch, device):
    """With padding, each chunk's real rows are gathered into a chunk-sized buffer and its dX scattered back from
    another: nothing of [real tokens, H] is held. A wide H and a narrow V make such a copy larger than the bound
    (the off-policy 50-token rows exceed a chunk, so that loss takes its two passes)."""
    wide_h, narrow_v = 512, 300
    monkeypatch.setenv(plan.BUDGET_ENV, str(4 * narrow_v * CHUNK_ROWS))
    monkeypatch.delenv(plan.MEMORY_BUDGET_ENV, raising=False)
    hidden, _, ids, mask, adv, noise = _inputs(device)
    weight = torch.randn(narrow_v, wide_h, generator=torch.Generator().manual_seed(1)).to(device) * 0.1
    hidden = torch.randn(B, T, wide_h, generator=torch.Generator().manual_seed(2)).to(device)
    ids = ids % narrow_v
    old = _old_logprobs(hidden, weight, ids, noise) if call == "off" else None
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with PeakNewBytes() as mem:
        if call == "logprobs":
            lk.linear_logprobs(h, w, ids, mask=mask, impl=impl).sum().backward()
        else:
            loss, _ = lk.fused_grpo_lambda_loss(h, w, ids, mask, adv, old_logprobs=old, impl=impl)
            loss.backward()
    extra = mem.peak_excluding(h.grad, w.grad)
    chunk = 4 * narrow_v * CHUNK_ROWS
    bound = (chunk if impl == "triton" else TORCH_ROWS_TEMPORARIES * chunk) + 128 * B * T + 8192 \
        + 2 * 4 * CHUNK_ROWS * wide_h
    real_rows = 4 * int(mask.sum()) * wide_h  # one fp32 copy of the real tokens' hidden states
    assert bound < real_rows + chunk and extra <= bound, (extra, bound, real_rows)
