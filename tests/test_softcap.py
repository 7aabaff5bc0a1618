"""`softcap`: final-logit soft-capping (Gemma 2/3), logits = c·tanh((h·Wᵀ + b) / c) before the temperature.

The reference is checked against the formula written out; the kernels (row kernels, the on-policy row kernel, the
LSE GEMM epilogue, the PyTorch rows) against the fp64 reference: log-probs, entropy and every gradient, in every
plan of the fused loss, with saturated logits (where the gradient vanishes), a −inf bias (capped to −c, as HF does)
and NaN-poisoned outputs. The kernels' exp-based tanh against torch's. Vocabulary-parallel heads:
test_vocab_parallel.py; the trainers: test_trainer_model.py, test_trl_trainer.py."""
import math

import pytest
import torch
import triton
import triton.language as tl

import lambda_kernels as lk
from lambda_kernels import reference as R
from lambda_kernels.ops.linear_logprobs.kernels import tanh_f32

from ._helpers import IMPLS, PLANS, assert_module_is_function, force_plan, poisoned_outputs, set_chunk_rows
from ._lm_head import assert_fp32_matches_oracle, assert_loss_no_worse_than_naive, assert_matches, make_batch, \
    make_inputs, oracle, reference_run

# The interpreter evaluates both sides of tl.where on numpy arrays: tanh's polynomial branch at huge or infinite
# arguments and e^(2|u|) past fp32's range overflow there (to ±inf or NaN) on the side that is discarded.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@triton.jit
def tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o, tanh_f32(tl.load(x_ptr + o, mask=o < n)), mask=o < n)


CAP = 3.0  # small against the test logits (|x| up to ~10), so that many are in tanh's curved and flat parts


@pytest.fixture
def small_chunks(monkeypatch):
    set_chunk_rows(monkeypatch, 8)


def test_reference_is_the_formula_written_out():
    x, w, b, t = make_inputs(9, 16, 50, dtype=torch.float64)
    lp, ent = R.linear_logprobs(x, w, t, bias=b, temperature=0.7, softcap=CAP, return_entropy=True)
    z = CAP * torch.tanh((x @ w.t() + b) / CAP) / 0.7
    logp = torch.log_softmax(z, -1)
    torch.testing.assert_close(lp, logp.gather(1, t.unsqueeze(1)).squeeze(1), rtol=0, atol=1e-13)
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1), rtol=0, atol=1e-13)
    plain = R.linear_logprobs(x, w, t, bias=b, temperature=0.7)
    assert (lp - plain).abs().max() > 0.1  # the cap matters at these logits


def test_tanh_kernel_is_accurate_to_two_ulp(device):
    """The kernels' tanh (exp-based: the interpreter has no libdevice tanh) over its two branches, their seam,
    tiny and huge arguments and ±inf: ≤ 2 ulp with the interpreter's exact exp, ≤ 4 with a GPU's approximate one."""
    x = torch.cat([torch.linspace(-12, 12, 6001), torch.linspace(0.6, 0.65, 501), torch.linspace(-1e-3, 1e-3, 501),
                   torch.tensor([1e-30, -1e-30, 1e4, -1e4, 88.0, -88.0])]).to(device)
    y = torch.empty_like(x)
    tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * want.abs().clamp(min=torch.finfo(torch.float32).tiny)
    assert ((y.double() - want).abs() / ulp).max() <= (2.0 if x.device.type == "cpu" else 4.0)
    special = torch.tensor([math.inf, -math.inf, math.nan], device=device)
    tanh_kernel[(1,)](special, y, 3, BLOCK=16)
    assert y[:2].tolist() == [1.0, -1.0] and math.isnan(y[2].item())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N, H, V", [(37, 40, 123), (20, 13, 300)])  # H not a multiple of 16; several chunks
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_linear_logprobs_matches_oracle(impl, N, H, V, temperature, device, small_chunks):
    x, w, b, t = make_inputs(N, H, V, device=device, scale=2.0)
    with poisoned_outputs():
        lp, ent = lk.linear_logprobs(x, w, t, bias=b, temperature=temperature, softcap=CAP, return_entropy=True,
                                     impl=impl)
    assert_fp32_matches_oracle(lp, ent, x, w, b, t, temperature, softcap=CAP)
    assert (lp <= 0).all() and (ent >= 0).all() and (ent <= math.log(V)).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_saturated_logits_get_no_gradient(impl, device):
    """Logits far past the cap: tanh is ±1 in fp32, the capped logits tie at ±c and their gradient through the cap
    is 0 (the oracle's, in fp64, is e^(−2|x|/c)-small)."""
    x, w, b, t = make_inputs(6, 8, 40, device=device, bias=False, scale=200.0)
    lp, ent = lk.linear_logprobs(x, w, t, softcap=CAP, return_entropy=True, impl=impl)
    lp_ref, ent_ref, (x64, w64, _) = oracle(x, w, None, t, 1.0, softcap=CAP)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=2e-5)
    gx, gw = torch.autograd.grad(lp.sum(), (x, w))
    gx_ref, gw_ref = torch.autograd.grad(lp_ref.sum(), (x64, w64))
    for a, e in ((gx, gx_ref), (gw, gw_ref)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), e, rtol=0, atol=1e-5 * (e.abs().max().item() + 1))


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_bias_is_capped_to_minus_c(impl, device):
    """A banned token (−inf bias) becomes a logit of −c under the cap, as HF's Gemma 2 computes it: finite
    probability, finite gradients, the same as the oracle."""
    x, w, b, t = make_inputs(11, 16, 60, device=device)
    b = b.detach().clone()
    b[::4] = -math.inf
    b.requires_grad_()
    lp, ent = lk.linear_logprobs(x, w, t, bias=b, softcap=CAP, return_entropy=True, impl=impl)
    assert_fp32_matches_oracle(lp, ent, x, w, b, t, 1.0, softcap=CAP)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_path_is_bit_identical(impl, device, small_chunks):
    x, w, b, t = make_inputs(30, 24, 123, device=device, scale=2.0)
    lp = lk.linear_logprobs(x, w, t, bias=b, softcap=CAP, temperature=0.9, impl=impl)
    with torch.no_grad():
        lp0 = lk.linear_logprobs(x, w, t, bias=b, softcap=CAP, temperature=0.9, impl=impl)
    assert torch.equal(lp.detach(), lp0)


def _fused_case(device, on_policy, seed=0):
    hidden, weight, b, ids, mask, adv = make_batch(device=device, seed=seed)
    with torch.no_grad():
        lp = R.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double(), temperature=0.8, softcap=CAP)
    g = torch.Generator().manual_seed(seed + 100)
    noise = 0.3 * torch.randn(lp.shape, generator=g, dtype=torch.float64).to(device)
    old = None if on_policy else (lp + noise).float()
    ref = (lp - noise.abs()).float()
    kw = dict(old_logprobs=old, ref_logprobs=ref, temperature=0.8, softcap=CAP, beta=0.1, trace="both", lam=0.9,
              adv_clamp_min=-0.1, epsilon_high=0.28, return_entropy=True)
    return (hidden, weight, b, ids, mask, adv), kw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan, rows", PLANS)
@pytest.mark.parametrize("on_policy", [True, False])
def test_fused_loss_matches_reference_in_every_plan(impl, plan, rows, on_policy, device, monkeypatch):
    force_plan(monkeypatch, plan, rows)
    (hidden, weight, b, ids, mask, adv), kw = _fused_case(device, on_policy, seed=PLANS.index((plan, rows)))
    with poisoned_outputs():
        loss, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, impl=impl, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert_matches(loss, metrics, grads, reference_run(hidden, weight, b, ids, mask, adv, **kw))
    assert (metrics["ratio_mean"] == 1) == on_policy


def test_fused_on_policy_log_probs_are_linear_logprobs(device):
    """The fused loss's log-probs (through the on-policy row kernel) and `linear_logprobs`' under no_grad are the
    same bits: a ratio against old log-probs from the latter is exactly 1."""
    (hidden, weight, b, ids, mask, adv), kw = _fused_case(device, on_policy=True, seed=4)
    with torch.no_grad():
        old = lk.linear_logprobs(hidden, weight, ids, bias=b, temperature=0.8, softcap=CAP, mask=mask)
    _, metrics = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=b, **dict(kw, old_logprobs=old))
    assert metrics["ratio_mean"].item() == 1.0
    assert metrics["clip_ratio/region_mean"].item() == 0.0


def test_lse_gemm_epilogue(device, monkeypatch):
    """The Triton log-prob GEMM caps each logits tile in its epilogue (fp16 in the interpreter)."""
    from lambda_kernels.ops.linear_logprobs import launch, lse_gemm

    from ._helpers import record_calls

    monkeypatch.setenv(lse_gemm.GEMM_ENV, "triton")
    calls = record_calls(monkeypatch, launch, "lse_gemm_pass", lambda x, *args: x.shape[0])
    x, w, b, t = make_inputs(37, 40, 300, dtype=torch.float16, device=device, scale=2.0)
    with torch.no_grad():
        lp, ent = lk.linear_logprobs(x, w, t, bias=b, temperature=0.7, softcap=CAP, return_entropy=True)
    assert calls == [37]
    lp_ref, ent_ref, _ = oracle(x, w, b, t, 0.7, softcap=CAP)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=2e-5)


def test_modules_pass_it_on(device):
    (hidden, weight, b, ids, mask, adv), kw = _fused_case(device, on_policy=False, seed=5)
    options = {k: kw[k] for k in ("temperature", "softcap", "beta", "trace", "lam")}
    assert_module_is_function(lk.FusedGRPOLambdaLoss, lk.fused_grpo_lambda_loss, options,
                              (hidden, weight, ids, mask, adv), old_logprobs=kw["old_logprobs"],
                              ref_logprobs=kw["ref_logprobs"], bias=b)
    assert "softcap=3.0" in repr(lk.FusedGRPOLambdaLoss(softcap=3.0))


@pytest.mark.parametrize("bad", [0.0, -30.0, math.inf, math.nan, 1e39, True, "30", torch.tensor(30.0)])
def test_bad_softcap_is_a_clear_error(bad):
    x, w, b, t = make_inputs(4, 8, 20)
    match = "`softcap` must be a finite number > 0 or None; got .*final_logit_softcapping"
    with pytest.raises(ValueError, match=match):
        lk.linear_logprobs(x, w, t, softcap=bad)
    hidden, weight, _, ids, mask, adv = make_batch(B=2, T=3, H=8, V=20)
    with pytest.raises(ValueError, match=match):
        lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, softcap=bad)


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("on_policy", [True, False])
def test_gpu_bf16_relative_oracle(on_policy):
    """Gemma 2's cap (30) on a bf16 head at a large vocabulary: no worse than plain PyTorch in bf16 against fp32."""
    dev = torch.device("cuda")
    hidden, weight, _, ids, mask, adv = make_batch(B=4, T=256, H=512, V=32000, dtype=torch.bfloat16, device=dev,
                                                   bias=False, seed=2)
    hidden = (hidden.detach() * 8).requires_grad_()  # logits of tens: the cap bends them
    cap = 30.0
    leaves32 = [t.detach().float().requires_grad_() for t in (hidden, weight)]
    with torch.no_grad():
        lp0 = R.linear_logprobs(leaves32[0], leaves32[1], ids, softcap=cap)
    old = None if on_policy else lp0 + 0.05 * torch.randn_like(lp0)
    kw = dict(old_logprobs=old, ref_logprobs=lp0 - 0.05, beta=0.01, trace="both", lam=0.99, adv_clamp_min=-0.1)
    loss, _ = lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, softcap=cap, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight))
    loss_r, _ = R.grpo_lambda_loss(R.linear_logprobs(leaves32[0], leaves32[1], ids, softcap=cap), old, adv, mask,
                                   **{k: v for k, v in kw.items() if k != "old_logprobs"})
    grads_r = torch.autograd.grad(loss_r, leaves32)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    logits = cap * torch.tanh((leaves[0] @ leaves[1].t()) / cap)  # bf16, as HF's Gemma 2 in bf16
    lp_n = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    loss_n, _ = R.grpo_lambda_loss(lp_n, old, adv, mask, **{k: v for k, v in kw.items() if k != "old_logprobs"})
    grads_n = torch.autograd.grad(loss_n, leaves)
    assert_loss_no_worse_than_naive((loss, grads), (loss_r, grads_r), (loss_n, grads_n))
