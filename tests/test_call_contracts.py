"""What a trainer does with the results, the same under both implementations: edit the loss or a metric in place
(`loss /= accumulation_steps`, an all_reduce of a metric) before backward, pass ℓ_old / ℓ_ref / advantages that
still require grad (they are constants: no gradient reaches them), get an fp32 loss whatever the input dtype,
compile the caller with torch.compile (the kernels are a graph break), and call with T = 0."""
import pytest
import torch

import lambda_kernels as lk

from ._helpers import IMPLS, random_mask
from ._lm_head import make_batch

B, T = 3, 11


def _objective_inputs(device, dtype=torch.float32, T=T):
    g = torch.Generator().manual_seed(7)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    old = lp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    ref = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return lp, old, adv, random_mask(B, T, seed=7).to(device), ref


KW = dict(trace="both", lam=0.9, beta=0.04, adv_clamp_min=-0.1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_objective_loss_and_metrics_can_be_edited_in_place(impl, on_policy, device):
    lp, old, adv, mask, ref = _objective_inputs(device)
    grads = []
    for edit in (False, True):
        leaf = lp.clone().requires_grad_()
        loss, metrics = lk.grpo_lambda_loss(leaf, None if on_policy else old, adv, mask, ref_logprobs=ref,
                                            impl=impl, **KW)
        if edit:
            loss /= 4
            for v in metrics.values():
                v.mul_(100)  # e.g. dist.all_reduce(v) before the backward
        else:
            loss = loss / 4
        loss.backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_fused_loss_and_metrics_can_be_edited_in_place(impl, on_policy, device):
    hidden, weight, b, ids, mask, adv = make_batch(B=2, T=7, H=16, V=50, device=device, seed=8)
    old = None if on_policy else torch.full((2, 7), -4.0, device=device)
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, old_logprobs=old,
                                              return_entropy=True, impl=impl)
    loss /= 4
    for v in metrics.values():
        v.add_(1.0)
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_old_ref_and_advantages_are_constants(impl, device):
    """ℓ_old = ℓ itself (not detached) gives the gradient of ℓ_old = ℓ.detach(); nothing reaches old/ref/adv."""
    lp, _, adv, mask, ref = _objective_inputs(device)
    leaf = lp.clone().requires_grad_()
    old_leaf, ref_leaf, adv_leaf = (t.clone().requires_grad_() for t in (lp, ref, adv))
    loss, _ = lk.grpo_lambda_loss(leaf, old_leaf, adv_leaf, mask, ref_logprobs=ref_leaf, impl=impl, **KW)
    loss.backward()
    assert old_leaf.grad is None and ref_leaf.grad is None and adv_leaf.grad is None
    same = lp.clone().requires_grad_()
    loss2, _ = lk.grpo_lambda_loss(same, same, adv, mask, ref_logprobs=ref, impl=impl, **KW)
    loss2.backward()
    detached = lp.clone().requires_grad_()
    loss3, _ = lk.grpo_lambda_loss(detached, detached.detach(), adv, mask, ref_logprobs=ref, impl=impl, **KW)
    loss3.backward()
    torch.testing.assert_close(same.grad, detached.grad)
    assert same.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_is_fp32_for_fp64_inputs(impl, device):
    lp, old, adv, mask, ref = _objective_inputs(device, dtype=torch.float64)
    leaf = lp.clone().requires_grad_()
    loss, metrics = lk.grpo_lambda_loss(leaf, old, adv, mask, ref_logprobs=ref, impl=impl, **KW)
    loss.backward()
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in metrics.values())
    assert leaf.grad.dtype == torch.float64
    hidden, weight, b, ids, mask, adv = make_batch(B=2, T=5, H=8, V=20, dtype=torch.float64, device=device)
    loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float64


@pytest.mark.parametrize("impl", IMPLS)
def test_per_token_ops_inside_torch_compile(impl, device):
    lp, old, adv, mask, ref = _objective_inputs(device)

    def step(x):
        z = lk.lambda_trace(torch.tanh(x), mask, lam=0.9, impl=impl)
        loss, metrics = lk.grpo_lambda_loss(x + 0.1 * z, old, adv, mask, ref_logprobs=ref, impl=impl, **KW)
        a, ret = lk.gae(x.detach(), ref, mask, gamma=0.99, lam=0.95, impl=impl)
        return loss * 2.0, metrics["ratio_mean"], a.sum() + ret.sum()

    # aot_eager on every device: the graph breaks are the point, and inductor would only add compile time to the GPU
    # check's test stage
    compiled = torch.compile(step, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        leaf = lp.clone().requires_grad_()
        out = fn(leaf)
        out[0].backward()
        results.append((*out, leaf.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
@pytest.mark.parametrize("trace", [None, "both"])
def test_empty_sequences(impl, loss_type, trace, device):
    """T = 0: a zero loss with an empty gradient, an empty trace and an empty GAE, by both implementations."""
    lp, old, adv, mask, ref = _objective_inputs(device, T=0)
    leaf = lp.clone().requires_grad_()
    loss, metrics = lk.grpo_lambda_loss(leaf, old, adv, mask, ref_logprobs=ref, impl=impl, loss_type=loss_type,
                                        **{**KW, "trace": trace})
    loss.backward()
    assert loss.item() == 0.0 and leaf.grad.shape == (B, 0)
    assert lk.lambda_trace(lp, mask, lam=0.9, impl=impl).shape == (B, 0)
    assert all(t.shape == (B, 0) for t in lk.gae(lp, ref, mask, gamma=1.0, lam=0.9, impl=impl))


# (the interpreter's numpy warns about the exp that overflows, on purpose, and the inf·0 the selects then drop)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", IMPLS)
def test_overflowing_ratio_with_zero_or_positive_advantage(impl, device):
    """A traced log-ratio past exp's fp32 range (ρ̃ = inf): a token with Â = 0 (a zero-std group) adds exactly 0 and
    a clipped one (Â > 0) the constant clip·Â, with no inf·0 = NaN in the loss or the gradient; the same in both
    implementations."""
    T = 12
    lp = torch.full((2, T), -1.0, device=device)
    old = lp - 10.0  # Δ = 10 per token: with λ = 1 the recent trace passes 88 at the 9th token
    adv = torch.tensor([0.0, 1.0], device=device)
    mask = torch.ones(2, T, dtype=torch.bool, device=device)
    leaf = lp.clone().requires_grad_()
    loss, metrics = lk.grpo_lambda_loss(leaf, old, adv, mask, trace="recent", lam=1.0, impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(loss, torch.tensor(-1.2 * T / (2 * T), device=device))  # row 1: all clipped
    assert (leaf.grad == 0).all() and metrics["clip_ratio/high_mean"].item() == 0.5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("masked", [False, True])
def test_entropy_can_be_edited_in_place(impl, masked, device):
    hidden, weight, b, ids, mask, _ = make_batch(B=2, T=5, H=8, V=30, device=device, seed=9)
    lp, ent = lk.linear_logprobs(hidden, weight, ids, bias=b, return_entropy=True, impl=impl,
                                 mask=mask if masked else None)
    expected = ent.detach().clone()
    ent.mul_(0.5)  # e.g. for logging
    (-lp.sum() + ent.sum()).backward()
    torch.testing.assert_close(ent.detach(), expected * 0.5)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_num_items_as_a_host_tensor_of_one_element(device):
    """A trainer's token count over gradient accumulation, a [1] CPU tensor, with inputs on the test device."""
    lp, old, adv, mask, ref = _objective_inputs(device)
    losses = [lk.grpo_lambda_loss(lp, old, adv, mask, ref_logprobs=ref, impl=impl, num_items_in_batch=n, **KW)[0]
              for impl in IMPLS for n in (torch.tensor([7.0]), 7)]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_bias_is_read_by_its_strides(impl, device):
    """A bias that is a view with a stride (every other entry of a buffer, a column of a parameter) gives the same
    log-probs and gradients as its contiguous copy (the kernels read a bias with unit stride: it is made contiguous,
    differentiably, before them)."""
    hidden, weight, _, ids, mask, adv = make_batch(B=2, T=7, H=16, V=40, device=device, seed=3)
    storage = torch.randn(80, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
    results = []
    for bias in (storage[::2], storage[::2].detach().clone().requires_grad_()):
        lp = lk.linear_logprobs(hidden, weight, ids, bias=bias, impl=impl)
        loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=bias, impl=impl)
        results.append((lp, loss, *torch.autograd.grad(lp.sum() + loss, (hidden, bias))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kernels_launch_on_the_tensors_device():
    """Triton launches on the current CUDA device: each entry point makes it the tensors' device."""
    from lambda_kernels.functional import _on_device

    guard = _on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with _on_device(torch.device("cpu")):
        pass


@pytest.mark.gpu
def test_tensors_on_a_gpu_other_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    hidden, weight, b, ids, mask, adv = make_batch(B=2, T=9, H=32, V=300, device="cuda:1", seed=5)
    lp = lk.linear_logprobs(hidden, weight, ids, bias=b)
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, trace="both")
    lp_cpu = lk.linear_logprobs(hidden.cpu(), weight.cpu(), ids.cpu(), bias=b.cpu(), impl="torch")
    torch.testing.assert_close(lp.cpu(), lp_cpu, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(loss) and loss.device == torch.device("cuda", 1)


def test_chunked_scan_never_puts_more_rows_than_cuda_allows_on_grid_y(monkeypatch):
    from lambda_kernels._core.tuning import use_chunked_scan

    monkeypatch.setenv("LAMBDA_KERNELS_CHUNKED_SCAN", "1")
    assert use_chunked_scan(65535, 10000, 2048) and not use_chunked_scan(65536, 10000, 2048)
