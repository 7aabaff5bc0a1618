"""The fused GRPO-λ loss from hidden states: ours against what users would run instead, at real model shapes.

Providers (forward + backward of a GRPO token loss from hidden [B, T, H] and an LM head [V, H], bf16):
  ours_on        fused_grpo_lambda_loss on-policy (old_logprobs=None), defaults: workspace ≤ the default memory
                 budget (960 MiB, accumulators included), which at these shapes is the split plan (token chunks in
                 one pass summing dW for 63–99% of the vocabulary, a tail pass over vocabulary slabs for the rest:
                 (8·V − 2·V_t)·N·H FLOPs), and on a Hopper GPU the Triton TMA GEMM (LAMBDA_KERNELS_LOGPROBS_GEMM=auto:
                 see ours_on_tma); the note column names each fused row's plan and its time by the planner's cost
                 model (kernels only), to check the model
  ours_off       the same off-policy (old_logprobs given): one pass when every sequence fits a chunk of logits
                 (the 1.5B/7B/8B shapes), else two (the 65,536-token row)
  ours_on_unbounded  ours_on with LAMBDA_KERNELS_MEMORY_BUDGET=none: the token plan, ≈ 6·N·H·V FLOPs with the
                 2·V·H-byte fp32 dW sum of the bf16 head beside the chunk (the default before 2026-11-27)
  ours_on_vocab  ours_on with the vocab plan forced (LAMBDA_KERNELS_GRAD_PLAN=vocab): 8·N·H·V FLOPs
  ours_on_softcap  ours_on with Gemma 2's final-logit soft-capping (softcap=30): what the tanh in the row kernels
                 costs (compare with ours_on)
  ours_on_entropy  ours_on with an entropy bonus (entropy_coef=0.01): what its gradient in the row kernels costs
  ours_on_half_exposed  ours_on planned as if half of each probability chunk's fp32 dW read and write were
                 hidden behind its GEMM (plan.DW_TRAFFIC_EXPOSED_PROBS = 0.5, the constant before run 6 measured 1
                 faster at 7B and 8B): smaller chunks and a larger V_t under the same budget (on a Hopper GPU: the
                 cuBLAS chunks keep plan.DW_TRAFFIC_EXPOSED); if faster again, the constant should go back
  ours_on_tma / ours_off_tma  ours_on / ours_off with LAMBDA_KERNELS_LOGPROBS_GEMM=triton_tma (what "auto", the
                 default, takes on a Hopper GPU): the token chunks through the persistent TMA GEMM whose epilogue
                 stores fp16 probabilities (2 bytes a logit where cuBLAS chunks hold 4 of fp32 logits; a kernel turns
                 them into dlogits once the row's lse is known), so the budget holds twice the rows, ℓ bit-identical
                 to ours_logprobs_masked_tma's, and a split plan's tail slabs write dlogits from the same GEMM
  ours_on_cublas / ours_off_cublas / ours_logprobs_masked_cublas  with LAMBDA_KERNELS_LOGPROBS_GEMM=cublas (the
                 default before 2026-11-27, and on GPUs without TMA): fp32 logits chunks from cuBLAS, row kernels
  ours_on_dw_tma / ours_off_dw_tma  ours_on / ours_off with LAMBDA_KERNELS_DW_GEMM=triton_tma (opt-in): the dW sums
                 through the Triton GEMM whose tiles leave by asynchronous TMA reductions (`dw_gemm`), planned with
                 plan.DW_TRAFFIC_EXPOSED_TRITON (a guess, 0.5: smaller chunks, more dW rows in them)
  ours_on_dw_tma_exposed  ours_on_dw_tma planned as ours_on (DW_TRAFFIC_EXPOSED_TRITON = 1): the same chunks and
                 tail as ours_on, so the difference is the dW GEMM alone
  ours_on_dw_tma_whole  ours_on_dw_tma_exposed with the dW tiles' whole-tile epilogue (LAMBDA_KERNELS_DW_GEMM_CONFIG
                 128,256,32,8,4,1: 4 stages 32 deep, one 128-KiB staging buffer, no wait between halves)
  ours_logprobs  linear_logprobs under torch.no_grad (old/ref log-probs): ≈ 2·N·H·V FLOPs, forward only
  ours_logprobs_masked  the same with mask=completion_mask: only the real tokens' rows (what a trainer should call)
  ours_logprobs_masked_tma  ours_logprobs_masked with LAMBDA_KERNELS_LOGPROBS_GEMM=triton_tma (persistent TMA GEMM
                 with a log-sum-exp epilogue, no logits in memory; its tile configs: bench_lse_gemm.py)
  naive          full logits, fp32 log_softmax, gather, plain GRPO in torch (the anchors' definition)
  compiled       `naive` under torch.compile
  liger / cce    Liger's LigerFusedLinearGRPOLoss and CCE's linear_cross_entropy, when importable
  trl            TRL's fused LM head (TRL ≥ 1.16 trains GRPO with it: ChunkedLogProbFunction over the real tokens'
                 rows, vocabulary chunks of 32768) and plain GRPO on its log-probs, when importable
  trl_logprobs   the same head under torch.no_grad (TRL's old/ref log-probs): compare with ours_logprobs_masked
Ours runs GRPO-λ (trace="both", λ = 0.99, clamp −0.1, β = 0.04 k3 KL); the baselines run plain GRPO with the same
KL (they have no trace), so ours does strictly more work.

Each case: a correctness check first (ours against the fp32 reference on two sequences of the same H and V), then
the median time (`triton.testing.do_bench`), the peak memory above inputs and gradients, and the time over the FLOP
floor 6·N·H·V (2·N·H·V for log-probs) at the bf16 matmul rate measured in the same run on 8192³, with N = B·T
(the anchors' convention; padding included) and, for ours, also over the floor of the unmasked tokens only.

Run `pytest benchmarks/bench_fused_loss.py` (GPU cases skip on CPU; the smoke case runs in the interpreter), or
`python -m benchmarks.bench_fused_loss` for the table.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time

import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R
from lambda_kernels.ops.linear_logprobs.dw_gemm import DW_CONFIG_ENV, DW_GEMM_ENV, dw_gemm
from lambda_kernels.ops.linear_logprobs.dw_gemm import takes as dw_takes
from lambda_kernels.ops.linear_logprobs.launch import probs_row_bytes
from lambda_kernels.ops.linear_logprobs.lse_gemm import CONFIG_ENV, GEMM_ENV, GPU_CONFIG, gemm_for
from lambda_kernels.ops.linear_logprobs import plan as plan_module
from lambda_kernels.ops.linear_logprobs.plan import MEMORY_BUDGET_ENV, PLAN_ENV, grad_plan, modelled_seconds

from .harness import LOSS_OPTIONS, ceilings, do_bench, matmul_tflops, scoped_env

# (name, B, T, H, V): the shapes, ~30% padding in the mask
SHAPES = [
    ("qwen2.5-1.5b", 8, 1024, 1536, 151936),
    ("qwen2.5-7b", 8, 1024, 3584, 152064),
    ("llama3.1-8b", 16, 1024, 4096, 128256),
    ("qwen2.5-1.5b-long", 1, 65536, 1536, 151936),
]
FUSED_OURS = ("ours_on", "ours_off", "ours_on_tma", "ours_off_tma", "ours_on_cublas", "ours_off_cublas",
              "ours_on_dw_tma", "ours_off_dw_tma", "ours_on_dw_tma_exposed", "ours_on_dw_tma_whole",
              "ours_on_unbounded", "ours_on_vocab", "ours_on_softcap", "ours_on_entropy", "ours_on_half_exposed")
OURS = [*FUSED_OURS, "ours_logprobs", "ours_logprobs_masked", "ours_logprobs_masked_tma",
        "ours_logprobs_masked_cublas"]
OFF_POLICY = ("ours_off", "ours_off_tma", "ours_off_cublas", "ours_off_dw_tma")  # fused providers given old log-probs
LOGPROBS_ONLY = ("ours_logprobs", "ours_logprobs_masked", "ours_logprobs_masked_tma",
                 "ours_logprobs_masked_cublas")  # forward only: 2·N·H·V
MASKED = ("ours_logprobs_masked", "ours_logprobs_masked_tma", "ours_logprobs_masked_cublas")  # they pass mask=
# environment per provider (the library reads these on every call); every other provider runs with them unset,
# which is the library's defaults
PROVIDER_ENV = {"ours_on_unbounded": {MEMORY_BUDGET_ENV: "none"},
                "ours_on_vocab": {PLAN_ENV: "vocab"},
                "ours_logprobs_masked_tma": {GEMM_ENV: "triton_tma"},
                "ours_on_tma": {GEMM_ENV: "triton_tma"}, "ours_off_tma": {GEMM_ENV: "triton_tma"},
                "ours_logprobs_masked_cublas": {GEMM_ENV: "cublas"},
                "ours_on_cublas": {GEMM_ENV: "cublas"}, "ours_off_cublas": {GEMM_ENV: "cublas"},
                **{name: {DW_GEMM_ENV: "triton_tma"} for name in ("ours_on_dw_tma", "ours_off_dw_tma",
                                                                  "ours_on_dw_tma_exposed")},
                "ours_on_dw_tma_whole": {DW_GEMM_ENV: "triton_tma", DW_CONFIG_ENV: "128,256,32,8,4,1"}}
ENV_KEYS = sorted({k for env in PROVIDER_ENV.values() for k in env})
# planner constants per provider (plan module attributes), patched inside its block like PROVIDER_ENV
PROVIDER_PLAN_CONSTANTS = {"ours_on_half_exposed": {"DW_TRAFFIC_EXPOSED_PROBS": 0.5},
                           "ours_on_dw_tma_exposed": {"DW_TRAFFIC_EXPOSED_TRITON": 1.0},
                           "ours_on_dw_tma_whole": {"DW_TRAFFIC_EXPOSED_TRITON": 1.0}}
# options per provider beyond LOSS_OPTIONS (the entropy bonus: what its gradient adds to the row kernels)
PROVIDER_OPTIONS = {"ours_on_softcap": {"softcap": 30.0}, "ours_on_entropy": {"entropy_coef": 0.01}}
BASELINES = ["naive", "compiled", "liger", "cce", "trl", "trl_logprobs"]
BASELINE_LOGPROBS = ("trl_logprobs",)  # forward only: 2·N·H·V
# the largest anchor shape; the 65,536-token row would need > 100 GB of logits: not run for the baselines that hold
# them (and, as in the anchors' table, not for Liger and CCE); TRL's head holds one chunk, like ours
BASELINE_MAX_LOGITS = 16384 * 128256
CHUNKED_BASELINES = ("trl", "trl_logprobs")
# TRL 1.16's vocabulary chunk, trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE: copied, as importing that module pulls
# in TRL's trainer stack (datasets, ...), which the GPU machine does not have; the kernels module needs only torch
TRL_VOCAB_CHUNK = 32768


def not_run_at(provider: str, N: int, V: int) -> bool:
    """A baseline left out at N tokens of a V vocabulary (BASELINE_MAX_LOGITS)."""
    return provider in BASELINES and provider not in CHUNKED_BASELINES and N * V > BASELINE_MAX_LOGITS


def make_inputs(B, T, H, V, device, dtype=torch.bfloat16, pad=0.3, seed=0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(B, T, H, device=device, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(V, H, device=device, generator=g) / H**0.5).to(dtype)
    ids = torch.randint(0, V, (B, T), device=device, generator=g)
    if B > 1:  # right padding, lengths uniform in [1 − 2·pad, 1]·T: ≈ pad of the tokens are padding
        lengths = (T * (1 - 2 * pad * torch.rand(B, device=device, generator=g))).long().clamp(min=1)
        lengths[0] = T
    else:
        lengths = torch.full((1,), int(T * (1 - pad)), device=device)
    mask = torch.arange(T, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(B, device=device, generator=g)
    with torch.no_grad():
        lp = lk.linear_logprobs(hidden, weight, ids)
    noise = torch.randn(B, T, device=device, generator=g)
    return dict(hidden=hidden.requires_grad_(), weight=weight.requires_grad_(), ids=ids, mask=mask, adv=adv,
                old=lp + 0.01 * noise, ref=lp - 0.01 * noise)


def grpo_from_logp(lp, old, ref, adv, mask, beta=0.04, eps=0.2):
    """Plain GRPO with the k3 KL, the anchors' baseline objective."""
    ratio = torch.exp(lp - old)
    a = adv.unsqueeze(-1)
    per_tok = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
    per_tok = per_tok + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
    m = mask.to(per_tok.dtype)
    return (per_tok * m).sum() / m.sum().clamp(min=1)


def naive_loss(h, w, ids, mask, adv, old, ref):
    logits = (h @ w.t()).float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return grpo_from_logp(lp, old, ref, adv, mask)


def _baseline_fn(provider):
    if provider == "naive":
        return naive_loss
    if provider in ("compiled", "liger"):
        # compiled afresh for each shape: static shapes, as a user training at one shape gets (a compile cache
        # shared across shapes turns dynamic after the second, and Liger 0.8.5 then failed in dynamo's guards)
        torch._dynamo.reset()
    if provider == "compiled":
        return torch.compile(naive_loss)
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        lig = LigerFusedLinearGRPOLoss(beta=0.04, compiled=True, use_ref_model=True, loss_type="dapo",
                                       epsilon_low=0.2, epsilon_high=0.2)

        def liger_loss(h, w, ids, mask, adv, old, ref):
            out = lig(h, w, ids, mask.long(), adv, ref_per_token_logps=ref, old_per_token_logps=old)
            return out[0] if isinstance(out, tuple) else out
        return liger_loss
    if provider in CHUNKED_BASELINES:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def trl_logprobs(h, w, ids, mask):
            """TRL's fused head as its GRPOTrainer calls it on a Triton device: the real tokens' rows only."""
            keep = mask.bool()
            lp = ChunkedLogProbFunction.apply(h[keep], w, None, ids[keep], 1.0, TRL_VOCAB_CHUNK, None, 1.0,
                                              ("log_probs",))[0]
            return lp.new_zeros(mask.shape).masked_scatter(keep, lp)

        if provider == "trl_logprobs":
            return trl_logprobs

        def trl_loss(h, w, ids, mask, adv, old, ref):
            return grpo_from_logp(trl_logprobs(h, w, ids, mask), old, ref, adv, mask)
        return trl_loss
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce_loss(h, w, ids, mask, adv, old, ref):
            nll = linear_cross_entropy(h, w, ids, reduction="none", filter_eps=None)  # exact (no gradient filter)
            return grpo_from_logp(-nll.float(), old, ref, adv, mask)
        return cce_loss
    raise KeyError(provider)


@contextlib.contextmanager
def provider_env(provider: str | None):
    """The provider's PROVIDER_ENV set (and the other keys unset) and its PROVIDER_PLAN_CONSTANTS patched inside the
    block, both restored after."""
    env = PROVIDER_ENV.get(provider, {})
    constants = PROVIDER_PLAN_CONSTANTS.get(provider, {})
    before = {name: getattr(plan_module, name) for name in constants}
    try:
        for name, value in constants.items():
            setattr(plan_module, name, value)
        with scoped_env({k: env.get(k) for k in ENV_KEYS}):
            yield
    finally:
        for name, value in before.items():
            setattr(plan_module, name, value)


def make_step(provider: str, inp: dict):
    """A zero-argument callable: one forward+backward (forward only for ours_logprobs), grads reset first."""
    h, w = inp["hidden"], inp["weight"]
    args = (inp["ids"], inp["mask"], inp["adv"])
    if provider in LOGPROBS_ONLY:
        mask = inp["mask"] if provider in MASKED else None

        def step():
            with torch.no_grad(), provider_env(provider):
                return lk.linear_logprobs(h, w, inp["ids"], mask=mask)
        return step
    if provider in FUSED_OURS:
        old = inp["old"] if provider in OFF_POLICY else None

        def step():
            h.grad = w.grad = None
            with provider_env(provider):
                loss, _ = lk.fused_grpo_lambda_loss(h, w, *args, old_logprobs=old, ref_logprobs=inp["ref"],
                                                    **LOSS_OPTIONS, **PROVIDER_OPTIONS.get(provider, {}))
                loss.backward()
            return loss
        return step
    fn = _baseline_fn(provider)
    if provider in BASELINE_LOGPROBS:
        def step():
            with torch.no_grad():
                return fn(h, w, inp["ids"], inp["mask"])
        return step

    def step():
        h.grad = w.grad = None
        loss = fn(h, w, inp["ids"], inp["mask"], inp["adv"], inp["old"], inp["ref"])
        loss.backward()
        return loss
    return step


def check_correct(inp: dict, rows: int = 2, tokens: int = 1024, providers=None) -> dict:
    """Ours (each of our providers, or those named) against the fp32 reference on the first `rows` × `tokens`:
    relative errors by provider less its "ours_" (loss and grads; log-probs, relative to their norm)."""
    sub = {k: (v[:rows, :tokens].detach() if k != "weight" and v.dim() >= 2 else v[:rows].detach())
           for k, v in inp.items() if k != "weight"}
    h = sub["hidden"].clone().requires_grad_()
    w = inp["weight"].detach().clone().requires_grad_()
    out, references = {}, {}
    for provider in FUSED_OURS:
        if providers and provider not in providers:
            continue
        old = sub["old"] if provider in OFF_POLICY else None
        options = PROVIDER_OPTIONS.get(provider, {})
        kw = dict(old_logprobs=old, ref_logprobs=sub["ref"], **LOSS_OPTIONS, **options)
        with provider_env(provider):
            loss, _ = lk.fused_grpo_lambda_loss(h, w, sub["ids"], sub["mask"], sub["adv"], **kw)
            gh, gw = torch.autograd.grad(loss, (h, w))
        key = (old is None, tuple(sorted(options.items())))  # (providers differing in settings alone share one)
        if key not in references:
            h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
            loss_r, _ = R.fused_grpo_lambda_loss(h32, w32, sub["ids"], sub["mask"], sub["adv"], **kw)
            references[key] = (loss_r, *torch.autograd.grad(loss_r, (h32, w32)))
        loss_r, gh_r, gw_r = references[key]
        out[provider.replace("ours_", "")] = max(abs(loss.item() - loss_r.item()) / max(abs(loss_r.item()), 1e-6),
                                                 ((gh.float() - gh_r).norm() / gh_r.norm()).item(),
                                                 ((gw.float() - gw_r).norm() / gw_r.norm()).item())
    with torch.no_grad():
        for name in LOGPROBS_ONLY:
            if providers and name not in providers:
                continue
            mask = sub["mask"] if name in MASKED else None
            lp_r = R.linear_logprobs(h.detach().float(), w.detach().float(), sub["ids"], mask=mask)
            with provider_env(name):
                lp = lk.linear_logprobs(h.detach(), w.detach(), sub["ids"], mask=mask)
            out[name.replace("ours_", "")] = ((lp - lp_r).norm() / lp_r.norm()).item()
    return out


def peak_extra_gib(step, inp) -> float:
    """Peak memory of one step above what is live before it, less the gradients it leaves (the anchors' "extra")."""
    step()
    torch.cuda.synchronize()
    h, w = inp["hidden"], inp["weight"]
    h.grad = w.grad = None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (h, w) if t.grad is not None)
    return (torch.cuda.max_memory_allocated() - base - grads) / 2**30


def provider_available(provider: str) -> bool:
    try:
        if provider == "liger":
            import liger_kernel.chunked_loss  # noqa: F401
        elif provider == "cce":
            import cut_cross_entropy  # noqa: F401
        elif provider in CHUNKED_BASELINES:
            import trl.kernels.chunked_logprob  # noqa: F401
    except Exception:
        return False
    return True


def plan_note(p) -> str:
    """A gradient plan (`plan.GradPlan`) in a few words."""
    if p.kind == "split":
        return (f"split plan, {p.rows} rows, dW of {p.dw_rows} vocab rows in the chunks, tail {p.tail.rows} rows × "
                f"{p.tail.cols} vocab")
    return f"{p.kind} plan, {p.rows} rows" + ("" if p.kind == "tokens" else f" × {p.cols} vocab")


def test_plan_note_and_table(monkeypatch):
    monkeypatch.delenv(MEMORY_BUDGET_ENV, raising=False)

    monkeypatch.setenv(CONFIG_ENV, ",".join(map(str, GPU_CONFIG)))  # (the GPU's tiles: its statistics' bytes)

    def note(provider, N, V, H, probs=False):
        with provider_env(provider):  # (the Triton dW GEMM as on a Hopper GPU where the provider opts in)
            return plan_note(grad_plan(N, V, H, dw_accumulator=True, dx_accumulator=True,
                                       row_bytes=probs_row_bytes(V) if probs else None,
                                       triton_dw=dw_gemm() == "triton_tma"))

    # 7B: on-policy plans for all B·T = 8192 rows (it queues its first chunk before the real ones are counted)
    assert note("ours_on", 8192, 152064, 3584).startswith("split plan, 1024 rows, dW of ")
    assert note("ours_on_unbounded", 8192, 152064, 3584) == "tokens plan, 1664 rows"
    assert note("ours_on_vocab", 5734, 152064, 3584).startswith("vocab plan, 5734 rows × ")
    # chunks of 2-byte probabilities: twice the rows; planned as if half their dW traffic were hidden, smaller
    # chunks and more dW rows in them (run 6's notes; the constant restored after)
    assert note("ours_on", 8192, 152064, 3584, probs=True).startswith("split plan, 2048 rows, dW of 98304 ")
    assert note("ours_on_half_exposed", 8192, 152064, 3584, probs=True).startswith(
        "split plan, 1408 rows, dW of 113280 ")
    assert plan_module.DW_TRAFFIC_EXPOSED_PROBS == 1.0
    # the Triton dW sums: rated with their own constant; ours_on_dw_tma_exposed plans as ours_on
    assert note("ours_on_dw_tma", 8192, 152064, 3584, probs=True).startswith("split plan, 1408 rows, dW of 113280 ")
    assert note("ours_on_dw_tma_exposed", 8192, 152064, 3584, probs=True) == note("ours_on", 8192, 152064, 3584,
                                                                                 probs=True)
    assert plan_module.DW_TRAFFIC_EXPOSED_TRITON == 0.5
    row = dict(shape="s", provider="ours_on", ms=1.0, peak_extra_gib=0.5, floor_ms=1.0, over_floor=1.0,
               check_rel_err=1e-3, plan="tokens plan, 896 rows")
    assert "check rel err 1.0e-03; tokens plan, 896 rows |" in markdown_table([row])
    assert "[tokens plan, 896 rows]" in format_row(row)


def run_case(shape: str, provider: str, inp: dict) -> dict:
    _, B, T, H, V = next(s for s in SHAPES if s[0] == shape)
    N = B * T
    row = dict(shape=shape, provider=provider, B=B, T=T, H=H, V=V)
    if not_run_at(provider, N, V):
        return {**row, "error": "not run: full logits would not fit"}
    if not provider_available(provider):
        return {**row, "error": "not importable"}
    n_valid = int(inp["mask"].sum())
    if provider in FUSED_OURS:  # (off-policy, token chunks hold whole sequences, up to the plan's max_rows)
        # on-policy token chunks plan for all B·T rows, as they queue their first chunk before the real ones are
        # counted (`fused_loss.launch._PiecesAhead`); the other paths plan for the real rows
        with provider_env(provider):
            # (token chunks of 2-byte probabilities where the provider's chunks take the Triton GEMM)
            probs = provider not in PROVIDER_OPTIONS and gemm_for(inp["weight"]) != "cublas"
            triton_dw = dw_takes(inp["weight"], "triton")
            chunk = dict(dw_accumulator=True, dx_accumulator=True, row_bytes=probs_row_bytes(V) if probs else None,
                         triton_dw=triton_dw)
            p = grad_plan(N if provider.startswith("ours_on") else n_valid, V, H, **chunk)
            if p.kind == "vocab":
                p = grad_plan(n_valid, V, H, **chunk)
            # the planner's cost model of this plan's kernels (no host time), to check it against the measured time
            model_ms = modelled_seconds(p, n_valid, V, H, triton_dw=triton_dw) * 1e3
            row["plan"] = f"{plan_note(p)}; model {model_ms:.1f} ms" + ("; Triton dW" if triton_dw else "")
    rate = ceilings()["bf16_matmul_TFLOPs"] * 1e12
    flops = (2 if provider in LOGPROBS_ONLY + BASELINE_LOGPROBS else 6) * H * V
    try:
        step = make_step(provider, inp)
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        extra = peak_extra_gib(step, inp)
        ms = do_bench(step, warmup=50, rep=400)
    except Exception as e:  # a baseline that crashes (OOM, dynamo) is a finding, not a failure of the run
        torch.cuda.empty_cache()
        return {**row, "error": f"{type(e).__name__}: {e}"[:200]}
    floor = flops * N / rate * 1e3
    return {**row, "ms": ms, "first_call_s": first_s, "peak_extra_gib": extra, "floor_ms": floor,
            "over_floor": ms / floor, "valid_frac": n_valid / N,
            "over_floor_valid": ms / (flops * n_valid / rate * 1e3) if n_valid else None}


def main(time_budget_s: float | None = None, shapes=None, providers=None) -> list[dict]:
    """All shapes × providers (or those named); stops starting new cases once `time_budget_s` is spent. Prints one
    line per case."""
    unknown = set(providers or ()) - set(OURS + BASELINES)
    if unknown:
        raise ValueError(f"unknown provider(s) {sorted(unknown)}; choose from {OURS + BASELINES}")
    t_start = time.perf_counter()
    rows = []
    for shape, B, T, H, V in SHAPES:
        if shapes and shape not in shapes:
            continue
        inp = make_inputs(B, T, H, V, "cuda")
        err = check_correct(inp, providers=providers)
        print(f"# {shape}: correctness (rel err vs fp32 reference) "
              + " ".join(f"{k} {v:.2e}" for k, v in err.items()), flush=True)
        for provider in [p for p in OURS + BASELINES if not providers or p in providers]:
            if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                rows.append(dict(shape=shape, provider=provider, error="not run: time budget spent"))
                continue
            row = run_case(shape, provider, inp)
            if provider in OURS:
                row["check_rel_err"] = err[provider.replace("ours_", "")]
            rows.append(row)
            print(format_row(row), flush=True)
        del inp
        torch.cuda.empty_cache()
        # the card's rate right after the shape's cases (each ratio divides by the run's first measurement): drift
        # in the clocks under sustained load shows here, not in the ratios
        now = matmul_tflops()
        for row in rows:
            if row["shape"] == shape:
                row["matmul_after_TFLOPs"] = now
        print(f"# {shape}: bf16 matmul after its cases {now:.0f} TFLOP/s "
              f"(the run's ceiling {ceilings()['bf16_matmul_TFLOPs']:.0f})", flush=True)
    return rows


def kernel_breakdown(shape: str, provider: str, top: int = 8, trace_dir: str | None = None) -> dict:
    """Where one step's GPU time goes: torch.profiler's CUDA kernel totals (ms) for one step after a warm-up, the
    `top` largest by name; with trace_dir, also the step's timeline (host and device) as a gzipped Chrome trace
    there. The data for deciding which kernel or host gap to work on next."""
    _, B, T, H, V = next(s for s in SHAPES if s[0] == shape)
    inp = make_inputs(B, T, H, V, "cuda")
    step = make_step(provider, inp)
    step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    mallocs = torch.cuda.memory_stats().get("num_device_alloc", 0)
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize()
    # cudaMalloc calls of the step (a warmed-up step should take all its memory from the caching allocator): each
    # is a host sync and may show as GPU idle time
    mallocs = torch.cuda.memory_stats().get("num_device_alloc", 0) - mallocs
    if trace_dir:  # the timeline (host gaps between kernels), for chrome://tracing or Perfetto
        import gzip
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            with open(f.name, "rb") as src, gzip.open(os.path.join(trace_dir, f"trace_{shape}_{provider}.json.gz"),
                                                      "wb") as dst:
                dst.write(src.read())
    times: dict = {}
    spans = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] = times.get(e.name, 0.0) + e.device_time_total / 1e3
            spans.append((e.time_range.start / 1e3, e.time_range.end / 1e3))
    biggest = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    busy, span = busy_and_span(spans)
    return dict(shape=shape, provider=provider, total_ms=sum(times.values()), span_ms=span, idle_ms=span - busy,
                cuda_mallocs=mallocs, kernels={name[:90]: round(ms, 3) for name, ms in biggest})


def busy_and_span(intervals) -> tuple[float, float]:
    """(time covered by the union of the [start, end) intervals, end of the last − start of the first): the GPU's
    idle time inside a step, e.g. waiting for the host between the argument check's kernels and the first GEMM, is
    span − busy."""
    busy, reach = 0.0, None
    ordered = sorted(intervals)
    for start, end in ordered:
        begin = start if reach is None else max(start, reach)  # the part not covered by earlier intervals
        busy += max(end - begin, 0.0)
        reach = end if reach is None else max(reach, end)
    return busy, (reach - ordered[0][0] if ordered else 0.0)


def test_busy_and_span():
    assert busy_and_span([]) == (0.0, 0.0)
    assert busy_and_span([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (2.5, 2.75)]) == (4.0, 6.0)  # idle 3–5


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['shape']:18s} {r['provider']:14s} {r['error']}"
    valid = "" if r.get("over_floor_valid") is None or r["provider"] not in OURS else \
        f" (×{r['over_floor_valid']:.2f} of the unmasked floor)"
    plan = f"  [{r['plan']}]" if "plan" in r else ""
    return (f"{r['shape']:18s} {r['provider']:14s} {r['ms']:9.2f} ms  extra {r['peak_extra_gib']:6.2f} GiB  "
            f"floor {r['floor_ms']:7.2f} ms  ×{r['over_floor']:.2f}{valid}{plan}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| shape | provider | ms | extra GiB | floor ms | × floor (N=B·T) | × floor (unmasked) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['provider']} | | | | | | {r['error']} |")
            continue
        valid = "" if r.get("over_floor_valid") is None or r["provider"] not in OURS else f"{r['over_floor_valid']:.2f}"
        note = "; ".join(([f"check rel err {r['check_rel_err']:.1e}"] if "check_rel_err" in r else [])
                         + ([r["plan"]] if "plan" in r else []))
        lines.append(f"| {r['shape']} | {r['provider']} | {r['ms']:.2f} | {r['peak_extra_gib']:.2f} | "
                     f"{r['floor_ms']:.2f} | {r['over_floor']:.2f} | {valid} | {note} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ pytest
@functools.lru_cache(maxsize=1)
def _shape_inputs(shape: str):
    """(inputs, correctness errors) of a shape, built and checked once for all its providers."""
    _, B, T, H, V = next(s for s in SHAPES if s[0] == shape)
    inp = make_inputs(B, T, H, V, "cuda")
    return inp, check_correct(inp)


@pytest.mark.gpu
@pytest.mark.parametrize("provider", OURS + BASELINES)  # varies fastest: one shape's inputs serve all its providers
@pytest.mark.parametrize("shape", [s[0] for s in SHAPES])
def test_fused_loss_benchmarks(benchmark, shape, provider):
    if not provider_available(provider):
        pytest.skip(f"{provider} is not installed")
    _, B, T, H, V = next(s for s in SHAPES if s[0] == shape)
    if not_run_at(provider, B * T, V):
        pytest.skip("full logits would not fit")
    inp, err = _shape_inputs(shape)
    if provider in OURS:
        assert max(err.values()) < 3e-2, err
    row = run_case(shape, provider, inp)  # the timing (do_bench median) and memory are in the row
    benchmark.extra_info.update(row)
    assert "error" not in row or row["error"].startswith("not "), row
    benchmark.pedantic(lambda: None, rounds=1)  # the case is timed once, by run_case, not again here


@pytest.fixture(scope="module")
def smoke_inputs():
    """Tiny CPU inputs, checked once against the reference for every provider below."""
    if torch.cuda.is_available():
        pytest.skip("GPU present: the real cases run instead")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAMBDA_KERNELS_LOGITS_BUDGET", str(4 * 123 * 8))
        inp = make_inputs(2, 12, 24, 123, "cpu", dtype=torch.float32)
        err = check_correct(inp)
    assert max(err.values()) < 1e-4, err
    return inp


@pytest.mark.parametrize("provider", OURS + ["naive", "trl", "trl_logprobs"])
def test_smoke_interpreter(benchmark, provider, smoke_inputs, monkeypatch):
    """CPU smoke case: the benchmark code paths run (kernels interpreted, tiny shapes); timings mean nothing.
    The baselines' results are checked against the reference here (the GPU run times them only)."""
    if not provider_available(provider):
        pytest.skip(f"{provider} is not installed (the `trl` extra)")
    monkeypatch.setenv("LAMBDA_KERNELS_LOGITS_BUDGET", str(4 * 123 * 8))
    step = make_step(provider, smoke_inputs)
    out = benchmark.pedantic(step, rounds=1, iterations=1)
    inp = smoke_inputs
    ref_lp = R.linear_logprobs(inp["hidden"].detach(), inp["weight"].detach(), inp["ids"], mask=inp["mask"])
    if provider == "trl_logprobs":
        torch.testing.assert_close(out, ref_lp, rtol=1e-5, atol=1e-5)
    elif provider in ("naive", "trl"):
        expected = grpo_from_logp(ref_lp, inp["old"], inp["ref"], inp["adv"], inp["mask"])
        torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    print(ceilings())
    only = os.environ.get("SHAPES")
    for line in markdown_table(main(shapes=only.split(",") if only else None)).splitlines():
        print(line)
