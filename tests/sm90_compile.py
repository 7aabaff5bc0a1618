"""Compile every Triton kernel of the library for an H100 (sm_90) on a machine without a GPU, through the library's
own launchers, and report what the compiler made of each: shared memory, registers, spills, vector accesses.

The interpreter tests check what kernels compute, not whether they compile for a GPU; this does the second. A fake
active driver gives Triton the sm_90 target, and every launch becomes a compile-only warm-up (nothing runs, so the
outputs of the calls below are garbage and are not looked at). ptxas (shipped inside the triton wheel) assembles the
PTX and reports registers and spills.

    python tests/sm90_compile.py            # prints one JSON object; tests/test_sm90_compile.py checks it
"""
import itertools
import os

os.environ["TRITON_INTERPRET"] = "0"  # JIT functions, not interpreted ones; before anything imports triton

import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Sm90Driver:
    """Just enough of a CUDA driver for Triton to compile (never to launch) for an H100."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED = []


def _compile_only(original):
    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.append((self.fn.__name__, kernel))
        return kernel
    return run


def scenarios():
    """Representative calls: bf16 LM-head shapes with V and H divisible by 16, every objective/scan style."""
    import lambda_kernels as lk

    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 64, 256, 2048
    hidden = torch.randn(B, T, H, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 16).bfloat16().requires_grad_()
    bias = torch.zeros(V).bfloat16().requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    adv = torch.randn(B, generator=g)
    lp = -torch.rand(B, T, generator=g)
    yield "linear_logprobs", lambda: lk.linear_logprobs(hidden, weight, ids, bias=bias, return_entropy=True)[1].sum()
    # the GPU row tile (4096) over several tiles with a partial last one; V not divisible by 16; V = 1 (Triton passes
    # an int argument equal to 1 as a constant)
    for v_odd in (8208, 5000, 1):
        w_odd = (torch.randn(v_odd, H, generator=g) / 16).bfloat16().requires_grad_()
        b_odd = torch.zeros(v_odd).bfloat16().requires_grad_()
        ids_odd = ids % v_odd
        yield f"linear_logprobs V={v_odd}", lambda w_odd=w_odd, b_odd=b_odd, ids_odd=ids_odd: lk.linear_logprobs(
            hidden, w_odd, ids_odd, bias=b_odd, return_entropy=True)[1].sum()
        yield f"fused on-policy V={v_odd}", lambda w_odd=w_odd, b_odd=b_odd, ids_odd=ids_odd: lk.fused_grpo_lambda_loss(
            hidden, w_odd, ids_odd, mask, adv, bias=b_odd, ref_logprobs=lp, beta=0.04, return_entropy=True)[0]
    # Gemma 2's soft-capping: every row kernel (bias, entropy, KL: the widest variants) at the 4096 tile, and V % 16
    w_8208 = (torch.randn(8208, H, generator=g) / 16).bfloat16().requires_grad_()
    b_8208 = torch.zeros(8208).bfloat16().requires_grad_()
    for v_cap, w_cap, b_cap in ((8208, w_8208, b_8208), (2048, weight, bias)):
        ids_cap = ids % v_cap
        yield f"linear_logprobs softcap V={v_cap}", lambda w_cap=w_cap, b_cap=b_cap, ids_cap=ids_cap: \
            lk.linear_logprobs(hidden, w_cap, ids_cap, bias=b_cap, return_entropy=True, softcap=30.0)[1].sum()
        yield f"fused on-policy softcap V={v_cap}", lambda w_cap=w_cap, b_cap=b_cap, ids_cap=ids_cap: \
            lk.fused_grpo_lambda_loss(hidden, w_cap, ids_cap, mask, adv, bias=b_cap, ref_logprobs=lp, beta=0.04,
                                      return_entropy=True, softcap=30.0)[0]
    for trace in (None, "recent", "both"):
        yield f"fused on-policy {trace}", lambda trace=trace: lk.fused_grpo_lambda_loss(
            hidden, weight, ids, mask, adv, ref_logprobs=lp, beta=0.04, trace=trace)[0]
    yield "fused off-policy", lambda: lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, old_logprobs=lp,
                                                                 trace="both", loss_type="grpo")[0]
    for old in (None, lp):  # the KL weighted by the token's ratio: on-policy row kernel, objective kernels
        yield f"fused corrected KL old={old is not None}", lambda old=old: lk.fused_grpo_lambda_loss(
            hidden, weight, ids, mask, adv, old_logprobs=old, ref_logprobs=lp, beta=0.04, kl_bias_correction=True)[0]
        yield f"objective corrected KL old={old is not None}", lambda old=old: lk.grpo_lambda_loss(
            lp.clone().requires_grad_(), old, torch.randn(B, T), mask, ref_logprobs=lp, beta=0.04,
            kl_bias_correction=True)[0]
    yield "objective dual clip", lambda: lk.grpo_lambda_loss(lp.clone().requires_grad_(), lp - 0.5, torch.randn(B),
                                                             mask, trace="both", dual_clip=3.0)[0]
    yield "objective policy weights", lambda: lk.grpo_lambda_loss(
        lp.clone().requires_grad_(), lp - 0.5, torch.randn(B), mask, trace="both", policy_weights=torch.rand(B, T))[0]
    # GSPO's sequence level: the row walks before the objective kernels' loops (the KL weighted by the sequence's
    # ratio: one more in the backward)
    for old, corrected in itertools.product((None, lp - 0.5), (False, True)):
        yield f"objective sequence level old={old is not None} corrected={corrected}", \
            lambda old=old, corrected=corrected: lk.grpo_lambda_loss(
                lp.clone().requires_grad_(), old, torch.randn(B), mask, trace=None,
                importance_sampling_level="sequence", ref_logprobs=lp, beta=0.04, kl_bias_correction=corrected)[0]
    yield "fused on-policy sequence level", lambda: lk.fused_grpo_lambda_loss(
        hidden, weight, ids, mask, adv, trace=None, importance_sampling_level="sequence")[0]
    for policy in ("cispo", "sapo"):  # the other policy terms, on- and off-policy, through the fused loss too
        yield f"objective {policy}", lambda policy=policy: lk.grpo_lambda_loss(
            lp.clone().requires_grad_(), lp - 0.5, torch.randn(B), mask, trace="both", policy_loss=policy,
            policy_weights=torch.rand(B, T))[0]
        yield f"fused on-policy {policy}", lambda policy=policy: lk.fused_grpo_lambda_loss(
            hidden, weight, ids, mask, adv, policy_loss=policy)[0]
        yield f"objective {policy} sequence level", lambda policy=policy: lk.grpo_lambda_loss(
            lp.clone().requires_grad_(), lp - 0.5, torch.randn(B), mask, trace=None, policy_loss=policy,
            importance_sampling_level="sequence", adv_clamp_min=-0.1)[0]
    # VESPO: a first walk sums the row's clamped log-ratios (off-policy), φ per token or per row
    for adv_shape in ((B,), (B, T)):
        yield f"objective vespo adv {adv_shape}", lambda adv_shape=adv_shape: lk.grpo_lambda_loss(
            lp.clone().requires_grad_(), lp - 0.1, torch.randn(adv_shape), mask, trace=None, policy_loss="vespo",
            policy_weights=torch.rand(B, T))[0]
    yield "fused on-policy vespo", lambda: lk.fused_grpo_lambda_loss(
        hidden, weight, ids, mask, adv, trace=None, policy_loss="vespo")[0]
    for loss_type in ("bnpo", "dr_grpo", "luspo"):
        yield f"objective {loss_type}", lambda loss_type=loss_type: lk.grpo_lambda_loss(
            lp.clone().requires_grad_(), lp, torch.randn(B, T), mask, loss_type=loss_type,
            num_items_in_batch=torch.tensor(100.0), adv_clamp_min=-0.1)[0]
    # the entropy bonus: its gradient in the on-policy row kernel (WITH_ENT_GRAD) and the off-policy dlogits kernel
    yield "fused on-policy entropy bonus", lambda: lk.fused_grpo_lambda_loss(
        hidden, weight, ids, mask, adv, bias=bias, ref_logprobs=lp, beta=0.04, entropy_coef=0.01)[0]
    yield "fused off-policy entropy bonus", lambda: lk.fused_grpo_lambda_loss(
        hidden, weight, ids, mask, adv, old_logprobs=lp - 0.1, entropy_coef=0.01)[0]
    os.environ["LAMBDA_KERNELS_GRAD_PLAN"] = "split"  # the on-policy row kernel that also stores lse and g
    yield "fused on-policy split plan", lambda: lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv, bias=bias,
                                                                         ref_logprobs=lp, beta=0.04)[0]
    yield "fused on-policy split plan entropy bonus", lambda: lk.fused_grpo_lambda_loss(  # every variant at once
        hidden, weight, ids, mask, adv, bias=bias, ref_logprobs=lp, beta=0.04, entropy_coef=0.01, softcap=30.0)[0]
    yield "fused on-policy split plan softcap", lambda: lk.fused_grpo_lambda_loss(
        hidden, weight, ids, mask, adv, bias=bias, ref_logprobs=lp, beta=0.04, softcap=30.0)[0]
    os.environ.pop("LAMBDA_KERNELS_GRAD_PLAN")
    for gemm in ("triton", "triton_tma"):
        os.environ["LAMBDA_KERNELS_LOGPROBS_GEMM"] = gemm
        for softcap in (None, 30.0):
            yield f"lse gemm {gemm} softcap={softcap}", lambda softcap=softcap: lk.linear_logprobs(
                hidden.detach(), weight.detach(), ids, bias=bias.detach(), return_entropy=True,
                softcap=softcap)[1].sum()
            # the backward's chunks: the DLOGITS epilogue (bias, the entropy's gradient, softcap)
            yield f"linear_logprobs backward {gemm} softcap={softcap}", lambda softcap=softcap: lk.linear_logprobs(
                hidden, weight, ids, bias=bias, return_entropy=True, softcap=softcap)[1].sum()
        yield f"linear_logprobs backward {gemm} plain", lambda: lk.linear_logprobs(hidden, weight, ids).sum()
        # the fused loss's chunks through the same GEMM with the probability-emitting epilogue, and the kernel that
        # turns its output into dlogits: on-policy with the KL (token plan, then split plan's stats), off-policy
        yield f"fused on-policy probs {gemm}", lambda: lk.fused_grpo_lambda_loss(
            hidden, weight, ids, mask, adv, bias=bias, ref_logprobs=lp, beta=0.04, return_entropy=True)[0]
        # the benchmarks' and most models' variant: no bias, no entropy (it spilled before 2026-11-28)
        yield f"fused on-policy probs {gemm} no bias", lambda: lk.fused_grpo_lambda_loss(
            hidden, weight, ids, mask, adv, ref_logprobs=lp, beta=0.04)[0]
        yield f"fused off-policy probs {gemm}", lambda: lk.fused_grpo_lambda_loss(
            hidden, weight, ids, mask, adv, old_logprobs=lp, trace="both")[0]
        os.environ["LAMBDA_KERNELS_GRAD_PLAN"] = "split"
        yield f"fused on-policy probs split plan {gemm}", lambda: lk.fused_grpo_lambda_loss(
            hidden, weight, ids, mask, adv, ref_logprobs=lp, beta=0.04, kl_bias_correction=True)[0]
        os.environ.pop("LAMBDA_KERNELS_GRAD_PLAN")
    os.environ.pop("LAMBDA_KERNELS_LOGPROBS_GEMM")
    # the dW sums through the Triton GEMM with TMA reductions (opt-in): chunks of 128 rows, so that the first piece
    # writes its sums and the next adds into them; the log-prob backward's and the fused loss's probability chunks
    os.environ.update(LAMBDA_KERNELS_DW_GEMM="triton_tma", LAMBDA_KERNELS_LOGITS_BUDGET=str(4 * V * 128))
    yield "linear_logprobs backward dw triton_tma", lambda: lk.linear_logprobs(hidden, weight, ids).sum()
    os.environ["LAMBDA_KERNELS_LOGPROBS_GEMM"] = "triton_tma"
    yield "fused on-policy probs dw triton_tma", lambda: lk.fused_grpo_lambda_loss(hidden, weight, ids, mask, adv)[0]
    for name in ("LAMBDA_KERNELS_DW_GEMM", "LAMBDA_KERNELS_LOGITS_BUDGET", "LAMBDA_KERNELS_LOGPROBS_GEMM"):
        os.environ.pop(name)
    x_long = torch.randn(2, 8192, generator=g).requires_grad_()
    mask_long = torch.ones(2, 8192)
    for style in ("recent", "both"):
        yield f"trace {style} chunked", lambda style=style: lk.lambda_trace(
            x_long, mask_long, lam=0.99, style=style).sum()
        yield f"trace {style}", lambda style=style: lk.lambda_trace(
            x_long[:, :1000].repeat(40, 1), mask_long[:, :1000].repeat(40, 1), lam=0.99, style=style).sum()
    yield "gae chunked", lambda: lk.gae(torch.randn(2, 8192), torch.randn(2, 8192), mask_long, gamma=1.0, lam=0.95)
    yield "gae", lambda: lk.gae(torch.randn(64, 1000), torch.randn(64, 1000), torch.ones(64, 1000), gamma=1.0,
                                lam=0.95)


def ptxas_report(ptx: str) -> dict:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    return dict(ptxas_rc=out.returncode, registers=int(regs.group(1)) if regs else None,
                spill_bytes=int(spills.group(1)) if spills else None)


def _constants(kernel) -> dict:
    """The kernel's constexpr arguments by name (Triton keys them by argument path)."""
    src = getattr(kernel, "src", None)
    if src is None:
        return {}
    names = src.fn.arg_names
    return {names[k[0]] if isinstance(k, tuple) else str(k): v for k, v in src.constants.items()
            if isinstance(v, (int, bool, str))}


def main() -> dict:
    triton_driver.set_active(Sm90Driver())
    JITFunction.run = _compile_only(JITFunction.run)
    import lambda_kernels.functional as functional

    # CPU tensors would otherwise take the PyTorch path (no interpreter): send them to the Triton launchers
    functional.resolve_impl = lambda op, impl, device: "torch" if impl == "torch" else "triton"
    # and the TMA kernel would see CPU tensors, not a Hopper GPU: the scenarios' operands are TMA-aligned
    from lambda_kernels.ops.linear_logprobs import lse_gemm

    lse_gemm.tma_serves = lambda *operands: True
    # an H100 SXM's 132 SMs
    lse_gemm.persistent_programs = lambda device, config, size: 132 * lse_gemm.programs_per_sm(config, size)
    from lambda_kernels.ops.linear_logprobs import dw_gemm

    dw_gemm._programs = lambda device: 132
    dw_gemm.config_fits = lambda device: dw_gemm.config_smem(dw_gemm.dw_config()) <= 227 * 1024  # (an H100's blocks)
    errors = {}
    for name, call in scenarios():
        try:
            out = call()
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.backward()
        except Exception as e:  # a kernel that does not compile: reported, the next scenario runs
            errors[name] = f"{type(e).__name__}: {e}"[-1500:]
    kernels, seen = [], set()
    for name, kernel in COMPILED:
        if id(kernel) in seen:
            continue
        seen.add(id(kernel))
        ptx = kernel.asm["ptx"]
        kernels.append(dict(
            name=name, shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps,
            num_stages=kernel.metadata.num_stages, constants=_constants(kernel),
            wgmma="warp_group_dot" in kernel.asm.get("ttgir", ""),
            cp_async=bool(re.search(r"cp\.async\.(ca|cg)", ptx)),  # per-thread async copies (Ampere style)
            tma="cp.async.bulk.tensor" in ptx,  # tensor-memory-accelerator copies (Hopper)
            tma_reduce="cp.reduce.async.bulk.tensor" in ptx,  # TMA reductions into global memory
            vector_loads=bool(re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx)),  # 16 bytes
            vector_stores=bool(re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx)), **ptxas_report(ptx)))
    return dict(triton=triton.__version__, errors=errors, kernels=kernels)


if __name__ == "__main__":
    print(json.dumps(main(), default=str))
