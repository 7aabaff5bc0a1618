"""fused_grpo_lambda_loss: value, metrics and gradients against grpo_lambda_loss(linear_logprobs(...)) with full
logits (the reference, fp64 where it matters), on- and off-policy, every trace and loss type, and bad input."""
import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R

from ._helpers import IMPLS, LOSS_TYPES, poisoned_outputs, record_calls, set_chunk_rows
from ._lm_head import assert_loss_no_worse_than_naive, assert_matches, bf16_oracle_case, make_batch, perturbed_old, \
    reference_run



@pytest.fixture
def small_chunks(monkeypatch):
    set_chunk_rows(monkeypatch, 8)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("trace", [None, "recent", "both"])
@pytest.mark.parametrize("on_policy", [True, False])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference(impl, trace, on_policy, loss_type, device, small_chunks):
    seed = 3 * LOSS_TYPES.index(loss_type) + [None, "recent", "both"].index(trace)
    hidden, weight, b, ids, mask, adv = make_batch(device=device, seed=seed)
    temperature = 0.8
    old = None if on_policy else perturbed_old(hidden, weight, b, ids, temperature)
    with torch.no_grad():
        ref = R.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double()).float() - 0.05
    kw = dict(old_logprobs=old, ref_logprobs=ref, temperature=temperature, trace=trace, lam=0.9, beta=0.04,
              adv_clamp_min=-0.1 if trace else None, epsilon_high=0.28, loss_type=loss_type,
              max_completion_length=20 if loss_type == "dr_grpo" else None, return_entropy=True)
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, b, ids, mask, adv, **kw))
    assert (metrics["ratio_mean"] == 1) == on_policy


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("trace", [None, "both"])
def test_off_policy_with_clipped_tokens(impl, trace, device, small_chunks):
    hidden, weight, b, ids, mask, adv = make_batch(B=6, device=device, seed=21)
    old = perturbed_old(hidden, weight, b, ids, 1.0, scale=0.5)
    kw = dict(old_logprobs=old, trace=trace, lam=0.5, epsilon_low=0.1)
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, b, ids, mask, adv, **kw))
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_per_token_advantages_num_items_no_bias_no_kl(impl, on_policy, device, small_chunks):
    hidden, weight, _, ids, mask, adv = make_batch(device=device, bias=False, per_token_adv=True, seed=5)
    old = None if on_policy else perturbed_old(hidden, weight, None, ids, 1.0)
    kw = dict(old_logprobs=old, trace="both", lam=0.99, num_items_in_batch=torch.tensor(40.0), loss_type="dapo")
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, impl=impl, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert "kl" not in metrics and "entropy" not in metrics
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, None, ids, mask, adv, **kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_equals_composition_of_public_ops(impl, device):
    """fused == grpo_lambda_loss(linear_logprobs(...)) through the library's own kernels."""
    hidden, weight, b, ids, mask, adv = make_batch(device=device, seed=7)
    kw = dict(trace="recent", lam=0.95, adv_clamp_min=-0.1, loss_type="grpo")
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, temperature=1.2, impl=impl, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    lp = lk.linear_logprobs(hidden, weight, ids, bias=b, temperature=1.2, impl=impl)
    loss2, metrics2 = lk.grpo_lambda_loss(lp, None, adv, mask, impl=impl, **kw)
    grads2 = torch.autograd.grad(loss2, (hidden, weight, b))
    torch.testing.assert_close(loss, loss2, rtol=1e-6, atol=1e-7)
    for k in metrics2:
        torch.testing.assert_close(metrics[k], metrics2[k])
    for a, e in zip(grads, grads2):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_fp16_relative_oracle(impl, on_policy, device, small_chunks):
    hidden, weight, b, ids, mask, adv = make_batch(dtype=torch.float16, device=device, seed=11)
    old = None if on_policy else perturbed_old(hidden, weight, b, ids, 1.0)
    kw = dict(old_logprobs=old, trace="both", lam=0.99, adv_clamp_min=-0.1)
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    loss_r, _, grads_r = reference_run(hidden, weight, b, ids, mask, adv, **kw)
    # plain PyTorch in fp16: logits and their gradient in half precision, objective in fp32
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
    logits = (leaves[0] @ leaves[1].t() + leaves[2]).float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    loss_n, _ = R.grpo_lambda_loss(lp, old, adv, mask, **{k: v for k, v in kw.items() if k != "old_logprobs"})
    grads_n = torch.autograd.grad(loss_n, leaves)
    assert abs(loss.item() - loss_r.item()) <= 1.05 * abs(loss_n.item() - loss_r.item()) + 1e-5
    for a, n, e in zip(grads, grads_n, grads_r):
        err, err_n = (a.double() - e).abs().max().item(), (n.double() - e).abs().max().item()
        assert a.dtype == torch.float16
        assert err <= 1.05 * err_n + 1e-3 * e.abs().max().item(), (err, err_n)


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_is_never_read_and_gets_zero_grad(impl, device):
    """Masked rows (incl. a fully masked sequence) may hold NaN states and invalid ids: no effect, zero grad."""
    hidden, weight, b, ids, mask, adv = make_batch(B=4, T=9, device=device, seed=3)
    mask[2] = False
    dirty_h = hidden.detach().clone()
    dirty_h[~mask] = float("nan")
    dirty_h.requires_grad_()
    dirty_ids = torch.where(mask, ids, torch.full_like(ids, -100))
    loss, metrics = lk.fused_grpo_lambda_loss(dirty_h, weight, dirty_ids, mask, adv, bias=b, impl=impl,
                                              return_entropy=True)
    gh, gw = torch.autograd.grad(loss, (dirty_h, weight))
    loss_c, metrics_c = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl,
                                                  return_entropy=True)
    gh_c, gw_c = torch.autograd.grad(loss_c, (hidden, weight))
    assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert (gh[~mask] == 0).all()
    torch.testing.assert_close(loss, loss_c)
    torch.testing.assert_close(gh, gh_c)
    torch.testing.assert_close(gw, gw_c)
    for k in metrics:
        torch.testing.assert_close(metrics[k], metrics_c[k])


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_batch(impl, device):
    hidden, weight, b, ids, mask, adv = make_batch(B=2, T=5, device=device)
    mask = torch.zeros_like(mask)
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, return_entropy=True)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # fp16: dW kept in fp32, scaled and cast at once
@pytest.mark.parametrize("on_policy", [True, False])
def test_grad_output_scaling_and_no_grad(impl, dtype, on_policy, device):
    hidden, weight, b, ids, mask, adv = make_batch(device=device, seed=4, dtype=dtype)
    old = None if on_policy else perturbed_old(hidden, weight, b, ids, 1.0)
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, old_logprobs=old, impl=impl)
    g1 = torch.autograd.grad(loss, (hidden, weight, b))
    loss3, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, old_logprobs=old, impl=impl)
    g3 = torch.autograd.grad(loss3 * -2.5, (hidden, weight, b))
    for a, e in zip(g3, g1):
        assert a.dtype == dtype
        torch.testing.assert_close(a, -2.5 * e)
    with torch.no_grad():
        loss_ng, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, old_logprobs=old, impl=impl)
    assert not loss_ng.requires_grad
    torch.testing.assert_close(loss_ng, loss.detach())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("budget", ["none", None, "1G"])  # None: the default budget
def test_half_head_dw_cast_in_backward_unless_memory_budget(impl, budget, device, monkeypatch):
    """A half head's fp32 dW sum is held until the backward and scaled+cast there in one pass without a memory
    budget ("none"); under one (the default; token plan still chosen here) it is cast in the forward instead. Same
    gradients either way."""
    from lambda_kernels.ops.linear_logprobs import plan
    from lambda_kernels.ops.linear_logprobs.dw_sum import HalfHeadGradSum

    monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, "none")
    hidden, weight, b, ids, mask, adv = make_batch(dtype=torch.float16, device=device, seed=12)
    want = torch.autograd.grad(lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl)[0],
                               (hidden, weight, b))
    if budget is None:
        monkeypatch.delenv(plan.MEMORY_BUDGET_ENV)
    else:
        monkeypatch.setenv(plan.MEMORY_BUDGET_ENV, budget)
    held = budget == "none"
    casts = record_calls(monkeypatch, HalfHeadGradSum, "finish",
                         lambda self, impl_, scale=None: "forward" if scale is None else "backward")
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl)
    assert casts == ([] if held else ["forward"])
    got = torch.autograd.grad(loss, (hidden, weight, b))
    assert casts == (["backward"] if held else ["forward"])  # dW only: dX and db are small and cast in the forward
    for a, e in zip(got, want):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_outputs_fully_written_under_nan_poison(impl, on_policy, device, small_chunks):
    hidden, weight, b, ids, mask, adv = make_batch(device=device, seed=6)
    old = None if on_policy else perturbed_old(hidden, weight, b, ids, 1.0)
    ref = torch.full(ids.shape, -5.0, device=device)
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, old_logprobs=old,
                                                  ref_logprobs=ref, beta=0.1, impl=impl, return_entropy=True)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert all(torch.isfinite(g).all() for g in grads)


def test_frozen_head_skips_weight_grad(device, monkeypatch):
    from lambda_kernels.ops.linear_logprobs.gemm import Gemm

    hidden, weight, b, ids, mask, adv = make_batch(device=device, bias=False)
    w = weight.detach()
    dw_gemms = [record_calls(monkeypatch, Gemm, m, lambda *a: 1) for m in ("dw_write", "dw_accumulate")]
    loss, _ = lk.fused_grpo_lambda_loss(hidden, w, ids, mask, adv, trace="both")
    (gh,) = torch.autograd.grad(loss, hidden)
    assert dw_gemms == [[], []]  # no dW GEMM ran for the frozen head
    _, _, (gh_r, _) = reference_run(hidden, weight, None, ids, mask, adv, trace="both")
    torch.testing.assert_close(gh.double(), gh_r, rtol=1e-5, atol=1e-7)


def test_module_wrapper(device):
    hidden, weight, b, ids, mask, adv = make_batch(device=device)
    mod = lk.FusedGRPOLambdaLoss(trace="recent", lam=0.9, loss_type="bnpo", temperature=0.9, return_entropy=True)
    assert "trace='recent'" in repr(mod)
    loss, metrics = mod(hidden, weight, ids, mask, adv, bias=b)
    loss2, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, trace="recent", lam=0.9,
                                         loss_type="bnpo", temperature=0.9)
    torch.testing.assert_close(loss, loss2)
    assert "entropy" in metrics


@pytest.mark.parametrize("impl", IMPLS)
def test_inside_torch_compile(impl, device):
    """A compiled model that calls the fused loss (a graph break around it, no failure, same numbers)."""
    hidden, weight, b, ids, mask, adv = make_batch(B=2, T=6, H=16, V=50, device=device, bias=False)
    proj = torch.nn.Linear(16, 16).to(device)

    def step(h):
        loss, metrics = lk.fused_grpo_lambda_loss(torch.tanh(proj(h)), weight, ids, mask, adv, beta=0.0,
                                                  temperature=0.7, impl=impl, lam=0.97, entropy_coef=0.01)
        return loss * 2.0, metrics["ratio_mean"]

    compiled = torch.compile(step, backend="aot_eager" if device.type == "cpu" else "inductor")
    h1 = hidden.detach().clone().requires_grad_()
    out, ratio = compiled(h1)
    out.backward()
    h2 = hidden.detach().clone().requires_grad_()
    out2, _ = step(h2)
    out2.backward()
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(h1.grad, h2.grad)
    assert ratio.item() == 1.0


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs():
    hidden, weight, b, ids, mask, adv = make_batch(B=2, T=5, H=8, V=20)
    op = "fused_grpo_lambda_loss: "
    f = lk.fused_grpo_lambda_loss
    with pytest.raises(ValueError, match=op + r"`hidden` must have shape \[B, T, H\] = \[2, 4, H\].*shift by one"):
        f(hidden, weight, ids[:, :4], mask[:, :4], adv)
    with pytest.raises(ValueError,
                       match=r"`weight` must have shape \[V, H\] with H = 8 \(hidden's last dim\); got \[20, 9\]"):
        f(hidden, torch.randn(20, 9), ids, mask, adv)
    with pytest.raises(TypeError, match="`completion_ids` must be an int64 or int32 tensor of token ids"):
        f(hidden, weight, ids.float(), mask, adv)
    bad = ids.clone()
    bad[0, 0] = 20
    with pytest.raises(ValueError, match=r"`completion_ids` must hold token ids in \[0, V\) = \[0, 20\) at unmasked"):
        f(hidden, weight, bad, torch.ones_like(mask), adv)
    m2 = torch.ones_like(mask)
    m2[0, 0] = False
    f(hidden, weight, bad, m2, adv)  # the out-of-range id sits under the mask: fine
    for t in [0, -0.5, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
            f(hidden, weight, ids, mask, adv, temperature=t)
    with pytest.raises(TypeError,
                       match=r"`weight` must have the dtype of `hidden` \(torch.float32\); got torch.bfloat16"):
        f(hidden, weight.bfloat16(), ids, mask, adv)
    with pytest.raises(ValueError, match="`ref_logprobs` is required when beta > 0"):
        f(hidden, weight, ids, mask, adv, beta=0.1)
    with pytest.raises(ValueError, match=r"`completion_mask` must have shape \[2, 5\]"):
        f(hidden, weight, ids, mask[:, :3], adv)
    with pytest.raises(ValueError, match="`hidden` must be 3-D"):
        f(hidden[0], weight, ids, mask, adv)
    with pytest.raises(ValueError, match="`loss_type` must be one of"):
        f(hidden, weight, ids, mask, adv, loss_type="sum")


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("on_policy", [True, False])
def test_gpu_bf16_relative_oracle(on_policy):
    hidden, weight, ids, mask, adv, kw, oracle, naive = bf16_oracle_case(on_policy)
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, **kw)
    assert_loss_no_worse_than_naive((loss, torch.autograd.grad(loss, (hidden, weight))), oracle, naive)


@pytest.mark.gpu
def test_gpu_one_sequence_of_65536_tokens():
    """B = 1, T = 65,536: chunks keep every grid small; equals the composition of the public kernels."""
    dev = torch.device("cuda")
    hidden, weight, b, ids, mask, adv = make_batch(B=1, T=65536, H=256, V=4096, dtype=torch.bfloat16, device=dev,
                                                   bias=False, seed=8)
    mask = torch.ones_like(mask)
    mask[0, -100:] = False
    for old in (None, perturbed_old(hidden, weight, None, ids, 1.0, scale=0.02)):
        kw = dict(trace="both", lam=0.99, adv_clamp_min=-0.1)
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, old_logprobs=old, **kw)
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        lp = lk.linear_logprobs(hidden, weight, ids)
        loss2, _ = lk.grpo_lambda_loss(lp, old, adv, mask, **kw)
        gh2, gw2 = torch.autograd.grad(loss2, (hidden, weight))
        assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
        torch.testing.assert_close(loss, loss2, rtol=1e-4, atol=1e-6)
        assert ((gh.float() - gh2.float()).norm() / gh2.float().norm()).item() < 1e-2
        assert ((gw.float() - gw2.float()).norm() / gw2.float().norm()).item() < 1e-2


def test_hidden_sliced_from_full_sequence(device):
    """The documented call: full-sequence states h [B, P + T, H], hidden = h[:, P - 1:-1] (a non-contiguous view)."""
    B, P, T, H, V = 2, 3, 7, 16, 50
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, P + T, H, generator=g).to(device).requires_grad_()
    w = torch.randn(V, H, generator=g).to(device).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    adv = torch.tensor([1.0, -0.5], device=device)
    loss, _ = lk.fused_grpo_lambda_loss(h[:, P - 1:-1], w, ids, mask, adv, trace="recent", lam=0.9)
    (gh,) = torch.autograd.grad(loss, h)
    h64 = h.detach().double().requires_grad_()
    loss_r, _ = R.fused_grpo_lambda_loss(h64[:, P - 1:-1], w.detach().double(), ids, mask, adv, trace="recent",
                                         lam=0.9)
    (gh_r,) = torch.autograd.grad(loss_r, h64)
    # cuBLAS sums fp32 GEMMs in another order than the CPU: on CUDA the bound is relative to the gradient's scale
    atol = 1e-6 * gh_r.abs().max().item() if device.type == "cuda" else 1e-8
    torch.testing.assert_close(gh.double(), gh_r, rtol=1e-5, atol=atol)
    assert (gh[:, :P - 1] == 0).all() and (gh[:, -1] == 0).all()
