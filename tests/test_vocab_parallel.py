"""Vocabulary-parallel heads (`process_group=`): two processes (gloo) each hold a block of the head's rows (of
unequal sizes); their log-probs, entropy, loss and metrics must match the whole head's fp64 oracle on both ranks
(bit-identical between ranks), dX likewise, and the concatenated dW/db shards the oracle's.

The ranks compute where the other kernel tests do: on the CPU under the interpreter, or, on a GPU machine with
compiled Triton, both on the one CUDA device (gloo moves CUDA tensors through host memory; NCCL refuses two ranks
on one GPU). The oracles are computed on the CPU."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lambda_kernels as lk
from lambda_kernels import reference as R

from .conftest import HAS_CUDA, INTERPRET
from ._lm_head import grads_of, make_batch, make_inputs, oracle, perturbed_old, reference_run

WORLD = 2
V = 300
SHARDS = [(0, 130), (130, 170)]  # (start, rows) per rank
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"  # the `device` fixture's rule
CASES = [  # (name, impl, extra options)
    ("logprobs", "triton", {}), ("logprobs", "torch", {}), ("logprobs", "triton", {"memory": str(4 * 40 * 64)}),
    ("logprobs", "triton", {"temperature": 0.05, "inf_shard": True}),  # rank 1's logits all −inf (banned)
    ("logprobs", "torch", {"temperature": 0.05, "inf_shard": True}),
    ("logprobs", "triton", {"dtype": torch.float16}), ("logprobs", "triton", {"dtype": torch.float16, "gemm": True}),
    ("logprobs", "triton", {"mask": True}),  # only the unmasked rows, -100 ids at the others
    ("fused_on", "triton", {}), ("fused_off", "triton", {}), ("fused_off", "torch", {}),
    # Gemma 2's final-logit soft-capping: each rank caps its own block of logits
    ("logprobs", "triton", {"softcap": 2.5}), ("fused_on", "triton", {"softcap": 2.5}),
    ("fused_off", "torch", {"softcap": 2.5}),
    ("fused_off", "triton", {"weights": True}), ("fused_on", "torch", {"weights": True}),  # policy_weights
    ("fused_on", "triton", {"entropy": True}), ("fused_off", "torch", {"entropy": True}),  # the entropy bonus
]


def _logprobs_inputs(extra):
    x, w, b, t = make_inputs(37, 24, V, seed=3, dtype=extra.get("dtype", torch.float32))
    x, w, b = x.detach(), w.detach(), b.detach()
    if extra.get("inf_shard"):  # a −inf bias over rank 1's whole block: that shard drops out of every row
        b = b.clone()
        b[130:] = float("-inf")
        t = t % 130
    mask = None
    if extra.get("mask"):  # padding that must never be read: NaN states, -100 ids
        mask = torch.arange(37) % 3 != 0
        t = torch.where(mask, t, torch.full_like(t, -100))
        x = x.clone()
        x[~mask] = float("nan")
    g = torch.Generator().manual_seed(5)
    return x, w, b, t, mask, torch.randn(37, generator=g), torch.randn(37, generator=g)


def _fused_inputs(off_policy: bool, softcap=None, weights=False, entropy=False):
    hidden, weight, b, ids, mask, adv = make_batch(B=3, T=9, H=24, V=V, seed=8)
    old = perturbed_old(hidden, weight, b, ids, 0.9, scale=0.3) if off_policy else None
    with torch.no_grad():
        ref = R.linear_logprobs(hidden.double(), weight.double(), ids, bias=b.double()).float() - 0.05
    kw = dict(old_logprobs=old, ref_logprobs=ref, temperature=0.9, trace="both", lam=0.9, beta=0.04,
              adv_clamp_min=-0.1, return_entropy=True, softcap=softcap,
              policy_weights=2 * torch.rand(3, 9, generator=torch.Generator().manual_seed(6)) if weights else None)
    if entropy:  # the bonus's H is the whole vocabulary's: its gradient needs the statistics combined over ranks
        kw.update(entropy_coef=0.7, entropy_weights=torch.rand(3, 9, generator=torch.Generator().manual_seed(7)))
    return hidden.detach(), weight.detach(), b.detach(), ids, mask, adv, kw


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _to_cpu(obj):
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_cpu(v) for v in obj]
    return obj.cpu() if isinstance(obj, torch.Tensor) else obj


def _run_case(case, rank, group, device):
    name, impl, extra = case
    start, rows = SHARDS[rank]
    if "memory" in extra:  # the vocab plan on each shard
        os.environ["LAMBDA_KERNELS_MEMORY_BUDGET"] = extra["memory"]
        os.environ["LAMBDA_KERNELS_GRAD_PLAN"] = "vocab"
    if extra.get("gemm"):
        os.environ["LAMBDA_KERNELS_LOGPROBS_GEMM"] = "triton"
    try:
        if name == "logprobs":
            x, w, b, t, mask, g_lp, g_ent = _on(device, *_logprobs_inputs(extra))
            temperature = extra.get("temperature", 0.8)
            x = x.requires_grad_()
            w_r, b_r = w[start:start + rows].clone().requires_grad_(), b[start:start + rows].clone().requires_grad_()
            lp, ent = lk.linear_logprobs(x, w_r, t, bias=b_r, temperature=temperature, return_entropy=True,
                                         impl=impl, process_group=group, mask=mask, softcap=extra.get("softcap"))
            ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
            out = dict(lp=lp.detach(), ent=ent.detach(), dx=x.grad, dw=w_r.grad, db=b_r.grad)
            # the reference's own vocabulary-parallel path (gathered logits), fp64
            leaves = [v.detach().double().requires_grad_() for v in (x, w_r, b_r)]
            lp64, ent64 = R.linear_logprobs(leaves[0], leaves[1], t, bias=leaves[2], temperature=temperature,
                                            return_entropy=True, process_group=group, mask=mask,
                                            softcap=extra.get("softcap"))
            grads = torch.autograd.grad((lp64 * g_lp.double()).sum() + (ent64 * g_ent.double()).sum(), leaves)
            return {**out, "ref": dict(lp=lp64.detach(), ent=ent64.detach(), dx=grads[0], dw=grads[1], db=grads[2])}
        hidden, weight, b, ids, mask, adv, kw = _fused_inputs(name == "fused_off", extra.get("softcap"),
                                                              extra.get("weights", False), extra.get("entropy", False))
        hidden, weight, b, ids, mask, adv = _on(device, hidden, weight, b, ids, mask, adv)
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        h = hidden.requires_grad_()
        w_r = weight[start:start + rows].clone().requires_grad_()
        b_r = b[start:start + rows].clone().requires_grad_()
        loss, metrics = lk.fused_grpo_lambda_loss(h, w_r, ids, mask, adv, bias=b_r, impl=impl, process_group=group,
                                                  **kw)
        loss.backward()
        return dict(loss=loss.detach(), metrics=metrics, dx=h.grad, dw=w_r.grad, db=b_r.grad)
    finally:
        for key in ("LAMBDA_KERNELS_MEMORY_BUDGET", "LAMBDA_KERNELS_GRAD_PLAN", "LAMBDA_KERNELS_LOGPROBS_GEMM"):
            os.environ.pop(key, None)


def _rank_main(rank, init_file, out_file, device):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = [_to_cpu(_run_case(case, rank, dist.group.WORLD, device)) for case in CASES]
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_parallel")
    mp.spawn(_rank_main, args=(str(tmp / "init"), str(tmp / "out"), DEVICE), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"out.{rank}", weights_only=False) for rank in range(WORLD)]


def _close(a, e, scale_tol=2e-5, name="", floor=1e-7):
    """max |a − e| within scale_tol of max |e|, plus an absolute floor (fp32 rounding of values near 0; none for
    the fp64 reference path)."""
    tol = scale_tol * (e.abs().max().item() + 1e-12)
    err = (a.double() - e).abs().max().item()
    assert err <= tol + floor, (name, err, tol)


@pytest.mark.parametrize("index", [i for i, c in enumerate(CASES) if c[0] == "logprobs"])
def test_linear_logprobs_vocab_parallel(rank_results, index):
    r0, r1 = rank_results[0][index], rank_results[1][index]
    assert torch.equal(r0["lp"], r1["lp"]) and torch.equal(r0["ent"], r1["ent"]) and torch.equal(r0["dx"], r1["dx"])
    _, impl, extra = CASES[index]
    x, w, b, t, mask, g_lp, g_ent = _logprobs_inputs(extra)
    temperature = extra.get("temperature", 0.8)
    lp, ent, leaves = oracle(x, w, b, t, temperature, mask, softcap=extra.get("softcap"))
    dx, dw, db = grads_of(lp, ent, g_lp.double(), g_ent.double(), leaves)
    assert all(torch.isfinite(v).all() for v in (lp, ent, dx, dw, db))
    if mask is not None:
        assert (r0["lp"][~mask] == 0).all() and (r0["dx"][~mask] == 0).all()
    if "dtype" in extra:  # fp16: no worse than the whole head through the same kernels
        xs, ws, bs = (v.to(DEVICE).requires_grad_() for v in (x, w, b))
        lp1, ent1 = lk.linear_logprobs(xs, ws, t.to(DEVICE), bias=bs, temperature=temperature, return_entropy=True,
                                       impl=impl)
        g1, g2 = g_lp.to(DEVICE), g_ent.to(DEVICE)
        whole = _to_cpu(torch.autograd.grad((lp1 * g1).sum() + (ent1 * g2).sum(), (xs, ws, bs)))
        got = (r0["dx"], torch.cat([r0["dw"], r1["dw"]]), torch.cat([r0["db"], r1["db"]]))
        for name, a, one, e in zip(["dx", "dw", "db"], got, whole, (dx, dw, db)):
            err, err_whole = (a.double() - e).abs().max().item(), (one.double() - e).abs().max().item()
            assert err <= 1.5 * err_whole + 1e-3 * e.abs().max().item(), (name, err, err_whole)
        _close(r0["lp"], lp.detach(), 1e-3, name="lp")
        return
    # the kernels (fp32), and the reference's gathered-logits path (fp64: no absolute floor)
    for ours, tol, floor in [(r0, 2e-5, 1e-7), (r0["ref"], 1e-12, 0.0)]:
        other = r1 if ours is r0 else r1["ref"]
        _close(ours["lp"], lp.detach(), tol, name="lp", floor=floor)
        _close(ours["ent"], ent.detach(), tol, name="ent", floor=floor)
        _close(ours["dx"], dx, tol, name="dx", floor=floor)
        _close(torch.cat([ours["dw"], other["dw"]]), dw, tol, name="dw", floor=floor)
        _close(torch.cat([ours["db"], other["db"]]), db, tol, name="db", floor=floor)


@pytest.mark.parametrize("index", [i for i, c in enumerate(CASES) if c[0].startswith("fused")])
def test_fused_loss_vocab_parallel(rank_results, index):
    r0, r1 = rank_results[0][index], rank_results[1][index]
    assert torch.equal(r0["loss"], r1["loss"]) and torch.equal(r0["dx"], r1["dx"])
    name, _, extra = CASES[index]
    hidden, weight, b, ids, mask, adv, kw = _fused_inputs(name == "fused_off", extra.get("softcap"),
                                                          extra.get("weights", False), extra.get("entropy", False))
    loss, metrics, (dx, dw, db) = reference_run(hidden, weight, b, ids, mask, adv, **kw)
    _close(r0["loss"], loss.detach(), name="loss")
    assert set(r0["metrics"]) == set(metrics)
    for k in metrics:
        _close(r0["metrics"][k], metrics[k].detach().double(), scale_tol=1e-4, name=k)
    _close(r0["dx"], dx, name="dx")
    _close(torch.cat([r0["dw"], r1["dw"]]), dw, name="dw")
    _close(torch.cat([r0["db"], r1["db"]]), db, name="db")


def test_process_group_without_distributed_is_a_clear_error():
    x, w, b, t = make_inputs(4, 8, 20)
    with pytest.raises(RuntimeError, match="`process_group` was given but torch.distributed is not initialised"):
        lk.linear_logprobs(x, w, t, process_group=object())
