"""Public functions: docstrings, validation of user input, and dispatch between Triton kernels and PyTorch.

Every function validates once, here, before any kernel runs, with one exception: `linear_logprobs` may wait for its
token-id check (the one check that reads device values) after queueing its first logits chunk, whose kernels read
targets only through masked loads or compares. `impl` selects "triton" (compiled on CUDA, interpreted on CPU under
TRITON_INTERPRET=1), "torch" (the reference in `lambda_kernels.reference`) or "auto" (Triton when it can run on the
tensors' device, torch otherwise).
"""
from __future__ import annotations

import contextlib

import torch

from . import reference
from ._core import checks
from ._core.normalizers import LOSS_TYPES, row_scales
from ._core.params import SEQUENCE_STYLE, TRACE_CODES, ObjectiveParams, TraceParams
from ._core.runtime import resolve_impl
from .policy_losses import VESPO, Clip, resolve_policy_loss

TRACE_STYLES = ("recent", "both")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _on_device(device: torch.device):
    """Triton launches on the *current* CUDA device and its stream: make that the tensors' device (a policy on
    cuda:1 while cuda:0 is current would otherwise run the kernels on GPU 0 with GPU 1's pointers). Autograd runs a
    CUDA backward with its device current already."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


ADVANTAGE_SCALES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages `Â_i = (r_i − mean_group r) / (std + eps)` → fp32 `[B]`.

    Args:
        rewards: `[B]` floating, one scalar reward per completion. Groups are consecutive blocks of `group_size`
            rows (TRL's layout: the G completions of one prompt are adjacent).
        group_size: completions per prompt (G); must divide B.
        scale: "group" (divide by the group's unbiased std), "batch" (by the std of the whole batch, TRL's
            `scale_rewards="batch"`) or "none" (no division, Dr.GRPO).
        eps: added to the std before dividing.

    A group whose rewards are all equal gets advantage exactly 0. This op is O(B) and runs in PyTorch on any device.
    """
    op = "group_advantages"
    checks.float_tensor(op, "rewards", rewards, ndim=1)
    checks.positive_int(op, "group_size", group_size)
    if rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"{op}: `rewards` length must be a multiple of `group_size` = {group_size}; got {rewards.shape[0]}. "
            "Each prompt needs exactly group_size completions, stored consecutively."
        )
    checks.choice(op, "scale", scale, ADVANTAGE_SCALES)
    checks.non_negative(op, "eps", eps)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"{op}: `rewards` must be finite; got NaN or inf. Drop or replace failed rewards first.")
    return reference.group_advantages(rewards, group_size, scale=scale, eps=eps)


def _check_trace_args(op: str, lam, gamma, style, *, allow_none: bool = False) -> TraceParams:
    lam = checks.unit_interval(op, "lam", lam)
    gamma = checks.unit_interval(op, "gamma", gamma)
    options = TRACE_STYLES + ((None,) if allow_none else ())
    checks.choice(op, "trace" if allow_none else "style", style, options)
    return TraceParams(a=gamma * lam, style=TRACE_CODES[style])


def _check_row_tensor(op: str, name: str, t, shape, hint: str = "") -> torch.Tensor:
    checks.float_tensor(op, name, t)
    checks.same_shape(op, name, t, shape, hint)
    return t


def lambda_trace(x: torch.Tensor, mask: torch.Tensor, *, lam: float, gamma: float = 1.0, style: str = "both",
                 impl: str = "auto") -> torch.Tensor:
    """Eligibility trace `z_t = Σ_{j≤t} w(t, j)·m_j·x_j` of each row → fp32 `[B, T]`, differentiable in `x`.

    Weights (a = γ·λ, `w(t, t) = 1`): "recent" `w = a^(t−j)`; "both" `w = max(a^(t−j), a^j)` (GRPO-λ's Eq. 2).
    Forward is a causal scan, backward a reverse scan, both O(T). Masked positions contribute 0 but keep counting
    time (they do not reset the trace). See `lambda_kernels/ops/lambda_trace/README.md` for the maths.

    Args:
        x: `[B, T]` floating (fp16/bf16/fp32/fp64); the gradient comes back in x's dtype.
        mask: `[B, T]` bool/int/float; x where mask = 0 is never used (it may hold NaN or ±inf).
        lam, gamma: in [0, 1].
        style: "recent" or "both".
        impl: "auto" | "triton" | "torch".
    """
    op = "lambda_trace"
    checks.float_tensor(op, "x", x, ndim=2)
    checks.mask_tensor(op, "mask", mask, x.shape)
    params = _check_trace_args(op, lam, gamma, style)
    device = checks.same_device(op, [("x", x), ("mask", mask)])
    if resolve_impl(op, impl, device) == "torch":
        return reference.lambda_trace(x, mask, lam=lam, gamma=gamma, style=style).to(torch.float32)
    from .ops.lambda_trace.function import lambda_trace_apply

    with _on_device(device):
        return lambda_trace_apply(x, mask, params)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float,
        impl: str = "auto"):
    """Generalised advantage estimation → `(advantages, returns)`, fp32 `[B, T]` each (no gradient).

    `δ_t = r_t + γ·V_next − V_t`, `A_t = δ_t + γλ·A_next`, `returns = A + V`, computed as one reverse scan per row.
    Mask semantics: masked positions neither emit (A and returns are 0 there) nor break the recursion (the state
    passes through them: "next" means the next *valid* token); the value after the last valid token is 0.
    verl's estimator is a Python loop over T; this is one kernel launch.
    """
    op = "gae"
    checks.float_tensor(op, "rewards", rewards, ndim=2)
    _check_row_tensor(op, "values", values, rewards.shape)
    checks.mask_tensor(op, "mask", mask, rewards.shape)
    gamma = checks.unit_interval(op, "gamma", gamma)
    lam = checks.unit_interval(op, "lam", lam)
    device = checks.same_device(op, [("rewards", rewards), ("values", values), ("mask", mask)])
    if resolve_impl(op, impl, device) == "torch":
        adv, ret = reference.gae(rewards.detach(), values.detach(), mask, gamma=gamma, lam=lam)
        return adv.to(torch.float32), ret.to(torch.float32)
    from .ops.gae.launch import gae_forward

    with _on_device(device):
        return gae_forward(rewards.detach(), values.detach(), mask, gamma, lam)


def check_objective_args(op: str, shape, lead: tuple[str, torch.Tensor], *, old_logprobs, advantages, mask,
                         ref_logprobs, trace, lam, gamma, adv_clamp_min, epsilon_low, epsilon_high, beta, loss_type,
                         max_completion_length, num_items_in_batch, kl_bias_correction=False,
                         dual_clip=None, policy_weights=None, importance_sampling_level="token",
                         policy_loss="clip") -> ObjectiveParams:
    """Validation shared by grpo_lambda_loss and the fused loss (everything but the log-prob source).

    `shape` is [B, T] of the log-probs; `lead` the (name, tensor) they come from, for the device check.
    """
    B, T = shape
    if old_logprobs is not None:
        _check_row_tensor(op, "old_logprobs", old_logprobs, (B, T))
    checks.float_tensor(op, "advantages", advantages, ndim=(1, 2))
    checks.same_shape(op, "advantages", advantages, (B,) if advantages.dim() == 1 else (B, T),
                      "Pass one advantage per sequence [B] or per token [B, T].")
    checks.mask_tensor(op, "mask", mask, (B, T))
    beta = checks.non_negative(op, "beta", beta)
    kl_bias_correction = checks.flag(op, "kl_bias_correction", kl_bias_correction)
    if policy_weights is not None:
        _check_row_tensor(op, "policy_weights", policy_weights, (B, T),
                          "One weight >= 0 per token of the policy term (e.g. importance-sampling ratios).")
    if ref_logprobs is not None:
        _check_row_tensor(op, "ref_logprobs", ref_logprobs, (B, T))
    elif beta > 0:
        raise ValueError(f"{op}: `ref_logprobs` is required when beta > 0; got None with beta = {beta}. "
                         "Compute the reference model's log-probs, or set beta=0.")
    params_trace = _check_trace_args(op, lam, gamma, trace, allow_none=True)
    checks.choice(op, "importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    if importance_sampling_level == "sequence":
        if trace is not None:
            raise ValueError(f"{op}: importance_sampling_level='sequence' (GSPO) gives every token its sequence's "
                             f"mean log-ratio, which takes the place of the λ-trace; got trace={trace!r}. Pass "
                             "trace=None with it, or keep importance_sampling_level='token' for GRPO-λ.")
        params_trace = TraceParams(a=params_trace.a, style=SEQUENCE_STYLE)
    clamp = checks.finite_number(op, "adv_clamp_min", adv_clamp_min, allow_none=True)
    eps_low = checks.non_negative(op, "epsilon_low", epsilon_low)
    eps_high = eps_low if epsilon_high is None else checks.non_negative(op, "epsilon_high", epsilon_high)
    if dual_clip is not None and (not checks.is_finite_real(dual_clip) or not float(dual_clip) > 1.0):
        raise ValueError(f"{op}: `dual_clip` must be None or a finite number > 1; got {dual_clip!r}. It caps the "
                         "ratio of tokens with a negative advantage (dual-clip PPO: verl's `clip_ratio_c`, typically "
                         "3; TRL's `delta` when it is above 1 + epsilon_high).")
    policy = resolve_policy_loss(op, policy_loss)
    if isinstance(policy, VESPO) and (trace is not None or importance_sampling_level != "token"):
        raise ValueError(f"{op}: policy_loss='vespo' weighs each sequence by its own importance weight (a sum of its "
                         f"tokens' log-ratios), which takes the place of the λ-trace and of GSPO's ratio; got "
                         f"trace={trace!r}, importance_sampling_level={importance_sampling_level!r}. Pass trace=None "
                         "and importance_sampling_level='token' with it (as TRL's loss_type='vespo').")
    if dual_clip is not None and not isinstance(policy, Clip):
        raise ValueError(f"{op}: `dual_clip` caps the clipped objective's ratio; it does not apply to "
                         f"policy_loss={policy.name!r}. Pass dual_clip=None with it.")
    if epsilon_high is not None and not isinstance(policy, Clip):
        # (TRL reads its epsilon_high as CISPO's cap: a port that passes it here would otherwise be ignored)
        raise ValueError(f"{op}: `epsilon_high` is the clipped objective's upper clip range; policy_loss="
                         f"{policy.name!r} does not use it (got epsilon_high={epsilon_high!r}). Pass epsilon_high="
                         "None; CISPO's cap (TRL's epsilon_high for loss_type='cispo') is "
                         "lambda_kernels.CISPO(max_ratio=...).")
    checks.choice(op, "loss_type", loss_type, LOSS_TYPES)
    checks.positive_int(op, "max_completion_length", max_completion_length, allow_none=True)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"{op}: `num_items_in_batch` must be a number or a 1-element tensor; "
                                 f"got shape {list(num_items_in_batch.shape)}.")
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)) \
                or not num_items_in_batch > 0:
            raise ValueError(f"{op}: `num_items_in_batch` must be a positive number or None; "
                             f"got {num_items_in_batch!r}.")
    checks.same_device(op, [lead, ("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask),
                            ("ref_logprobs", ref_logprobs), ("policy_weights", policy_weights)])
    return ObjectiveParams(trace=params_trace, adv_clamp_min=clamp, epsilon_low=eps_low, epsilon_high=eps_high,
                           beta=beta, loss_type=loss_type, max_completion_length=max_completion_length,
                           kl_bias_correction=kl_bias_correction,
                           dual_clip=None if dual_clip is None else float(dual_clip), policy=policy)


def grpo_lambda_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *,
    ref_logprobs: torch.Tensor | None = None, trace: str | None = "both", lam: float = 0.99, gamma: float = 1.0,
    adv_clamp_min: float | None = None, epsilon_low: float = 0.2, epsilon_high: float | None = None,
    beta: float = 0.0, loss_type: str = "dapo", max_completion_length: int | None = None,
    num_items_in_batch=None, kl_bias_correction: bool = False, dual_clip: float | None = None,
    policy_weights: torch.Tensor | None = None, importance_sampling_level: str = "token", policy_loss="clip",
    impl: str = "auto",
):
    """The clipped GRPO-λ (or plain GRPO) objective on per-token log-probs → `(loss, metrics)`.

    Per token: `L = −min(ρ̃·Â, clip(ρ̃, 1−ε_low, 1+ε_high)·Â) + β·kl`, with the traced ratio
    `ρ̃_t = exp(z_t)`, `z = lambda_trace(m·(ℓ − ℓ_old))` (trace=None: `z = m·(ℓ − ℓ_old)`, plain GRPO exactly),
    `Â = max(advantages, adv_clamp_min)` and the k3 KL `kl = exp(ℓ_ref − ℓ) − (ℓ_ref − ℓ) − 1` on the untraced
    log-probs (times the token's ratio `exp(ℓ − ℓ_old)` with `kl_bias_correction`); with `dual_clip` c the
    policy term of a token with Â < 0 is at most −c·Â; then aggregated by `loss_type`:

    - "dapo":    Σ m·L / N, N = `num_items_in_batch` if given (e.g. over gradient accumulation), else Σ m;
    - "bnpo":    Σ m·L / max(Σ m, 1) over this batch;
    - "grpo":    mean over sequences of Σ_t m·L / max(Σ_t m, 1);
    - "dr_grpo": Σ m·L / (B · max_completion_length), max_completion_length defaulting to T;
    - "luspo":   Σ m·L / B (verl's "seq-mean-token-sum"; TRL's LUSPO).

    With `importance_sampling_level="sequence"` (GSPO, Zheng et al. 2025; TRL's and verl's name) the ratio is one
    per sequence, `ρ̃_i = exp(Σ_t m·(ℓ − ℓ_old) / max(Σ_t m, 1))`, shared by its tokens in place of the trace.

    Args:
        logprobs: `[B, T]` log-probs of the current policy (differentiable; any float dtype).
        old_logprobs: `[B, T]` of the sampling policy, or None for on-policy (ℓ_old = ℓ.detach(): ratios are 1 and
            the gradient is GRPO's with the per-token advantages of the trace).
        advantages: `[B]` (one per sequence) or `[B, T]` (per token).
        mask: `[B, T]` bool/int/float loss mask; the log-probs where it is 0 are never used (padding may hold NaN
            or ±inf), and their gradient is 0.
        ref_logprobs: `[B, T]` of the frozen reference model; required when beta > 0. old_logprobs, ref_logprobs
            and advantages are constants of the loss: no gradient reaches them, detached or not.
        trace: None (plain GRPO), "recent" or "both". lam, gamma: the trace decay a = γ·λ, each in [0, 1].
        adv_clamp_min: clamp advantages from below (the paper uses −0.1 with a trace); None = no clamp.
        epsilon_low, epsilon_high: clip range; epsilon_high=None means epsilon_low.
        beta: KL coefficient. loss_type, max_completion_length, num_items_in_batch: the aggregation above.
        kl_bias_correction: weight each token's KL by its own ratio `exp(ℓ − ℓ_old)` (untraced and unclipped;
            DeepSeek-V3.2, TRL's `use_bias_correction_kl`), which makes the KL gradient the unbiased reverse-KL
            gradient `ratio·(ℓ − ℓ_ref)` for tokens sampled from the old policy. It changes the gradient on-policy
            too (the ratio is 1 there but differentiable). Ignored when beta = 0.
        dual_clip: None, or c > 1: dual-clip PPO (Ye et al. 2020; verl's `clip_ratio_c`, 3 by default there): a
            token with Â < 0 and ratio ρ̃ > c contributes the constant −c·Â and no gradient, so one very off-policy
            token cannot dominate; tokens with Â ≥ 0 are unchanged. For c ≥ 1 + epsilon_high this is TRL's `delta`
            (`−min(min(ρ̃, c)·Â, clip(ρ̃)·Â)`; below that TRL's formula also caps Â > 0 tokens). Off-policy only in
            effect (on-policy ratios are 1).
        policy_weights: None, or `[B, T]` weights w ≥ 0 of each token's policy term (not of the KL term):
            importance-sampling corrections such as TRL's vLLM correction or verl's `rollout_is_weights`, or a
            token mask such as TRL's top-entropy one. A weight of 0 adds exactly 0. A constant (no gradient); not
            read at masked positions, and not checked at the others (that would need a host sync: a negative or NaN
            weight there reaches the loss); the clip metrics count every token as without weights, as TRL and verl
            do.
        importance_sampling_level: "token" (the traced per-token ratio) or "sequence" (GSPO's length-normalised
            sequence ratio; needs trace=None). Its gradient reaches every token of the sequence equally, so it is
            still a single pass on-policy. With one advantage per sequence [B] the clip metrics become TRL's
            sequence-level ones: means over all B sequences, and extremes over all of them (with per-token
            advantages they stay token means, as TRL's broadcast [B, T] clip masks would give). With
            kl_bias_correction the KL is weighted by the sequence's ratio (TRL's broadcast), whose gradient
            reaches every token of the sequence through the row's mean KL: the fused loss then needs the
            log-probs of whole sequences first, as off-policy (still one pass where every sequence fits a chunk).
        policy_loss: the policy term, "clip" (the clipped surrogate above, the default), "cispo" or "sapo" (their
            defaults), or an instance of `lambda_kernels.Clip` / `CISPO(max_ratio=5.0)` /
            `SAPO(temperature_pos=1.0, temperature_neg=1.05)` (see `lambda_kernels.policy_losses`). CISPO replaces
            the policy term by `−sg(min(ρ̃, max_ratio))·Â·ℓ` (TRL's `loss_type="cispo"`, its `epsilon_high` being
            max_ratio) and SAPO by `−(4/τ)·σ(τ·(ρ̃ − 1))·Â` (TRL's "sapo"); ρ̃ is the traced (or sequence) ratio in
            both, and the loss_type aggregates them as any other. Neither uses epsilon_low/high nor dual_clip
            (an epsilon_high or a dual_clip given with them is refused: CISPO's cap is `CISPO(max_ratio=...)`);
            their metrics are TRL's: "cispo_clip_ratio" (no "clip_ratio/*") for CISPO, none of the clip ones for
            SAPO. Both are one pass on-policy in the fused loss too. "vespo" / `VESPO(k_pos=2.0, lambda_pos=3.0,
            k_neg=3.0, lambda_neg=2.0)` (TRL's "vespo"): `−sg(φ(w))·Â·ℓ`, φ a gamma-shaped function of the
            sequence's weight w = exp(Σ_t m·clamp(ℓ − ℓ_old, ±20)) (clamped to [1e-8, e^20]), φ(1) = 1; it takes
            the trace's place (trace=None, importance_sampling_level="token"); metric "vespo/phi_seq_mean".
        impl: "auto" | "triton" | "torch".

    Returns:
        loss: fp32 scalar (whatever the inputs' dtype; it may be edited in place, e.g. `loss /= steps`).
        metrics: detached fp32 scalars "clip_ratio/low_mean", "clip_ratio/high_mean",
        "clip_ratio/region_mean", "ratio_mean" (of ρ̃) and "kl" (when beta > 0; the corrected one with
        `kl_bias_correction`, as TRL logs it), masked means over tokens; and TRL's per-sequence extremes
        "clip_ratio/low_min" and "clip_ratio/high_max": the least low-clipped and the most high-clipped fraction of a
        sequence's tokens, over the sequences with tokens (0 when none has). At the sequence level and with
        CISPO or SAPO, the clip metrics are those described under importance_sampling_level and policy_loss.
    """
    op = "grpo_lambda_loss"
    checks.float_tensor(op, "logprobs", logprobs, ndim=2)
    params = check_objective_args(
        op, logprobs.shape, ("logprobs", logprobs), old_logprobs=old_logprobs, advantages=advantages, mask=mask,
        ref_logprobs=ref_logprobs, trace=trace, lam=lam, gamma=gamma, adv_clamp_min=adv_clamp_min,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, loss_type=loss_type,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        kl_bias_correction=kl_bias_correction, dual_clip=dual_clip, policy_weights=policy_weights,
        importance_sampling_level=importance_sampling_level, policy_loss=policy_loss)
    if resolve_impl(op, impl, logprobs.device) == "torch":
        loss, metrics = reference.grpo_lambda_loss(
            logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, trace=trace, lam=lam, gamma=gamma,
            adv_clamp_min=adv_clamp_min, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
            loss_type=loss_type, max_completion_length=max_completion_length,
            num_items_in_batch=num_items_in_batch, kl_bias_correction=params.kl_bias_correction,
            dual_clip=params.dual_clip, policy_weights=policy_weights,
            importance_sampling_level=importance_sampling_level, policy_loss=params.policy)
        return loss.to(torch.float32), metrics  # (the reference keeps fp64 inputs' loss in fp64)
    from .ops.objective.function import grpo_lambda_objective

    with _on_device(logprobs.device):
        return grpo_lambda_objective(logprobs, old_logprobs, advantages, mask, ref_logprobs, params,
                                     num_items_in_batch, policy_weights)


def _check_lm_head(op: str, hidden, weight, bias, temperature, softcap):
    """Shared validation of (hidden, weight, bias, temperature, softcap) → (the `LogitTransform`, the bias as the
    kernels read it: contiguous, differentiably, since they read it with unit stride and a strided view would be
    misread)."""
    from .ops.linear_logprobs.logit_transform import LogitTransform

    H = hidden.shape[-1]
    checks.float_tensor(op, "weight", weight)
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"{op}: `weight` must have shape [V, H] with H = {H} (hidden's last dim); "
                         f"got {list(weight.shape)}.")
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: `weight` must have at least one row (V >= 1); got {list(weight.shape)}.")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: `weight` must have the dtype of `hidden` ({hidden.dtype}); got {weight.dtype}. "
                        "Cast one of them, e.g. weight.to(hidden.dtype).")
    if bias is not None:
        checks.float_tensor(op, "bias", bias)
        checks.same_shape(op, "bias", bias, (weight.shape[0],), "One bias per vocabulary entry.")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{op}: `bias` must have the dtype of `hidden` ({hidden.dtype}); got {bias.dtype}.")
        bias = bias.contiguous()
    inv_t = 1.0 / checks.positive_number(op, "temperature", temperature)
    # (at most fp32's largest: the kernels hold it in fp32, where a larger one is inf and its logits NaN)
    if softcap is not None and (not checks.is_finite_real(softcap)
                                or not 0 < float(softcap) <= torch.finfo(torch.float32).max):
        raise ValueError(f"{op}: `softcap` must be a finite number > 0 or None; got {softcap!r}. It is the model's "
                         "final-logit soft-capping (logits = softcap·tanh(logits / softcap)), e.g. "
                         "config.final_logit_softcapping = 30.0 for Gemma 2; None for models without one.")
    return LogitTransform(inv_t, None if softcap is None else float(softcap)), bias


def _vocab_shard(op: str, process_group, weight: torch.Tensor, device):
    """The VocabShard of a vocabulary-parallel head, or None (one collective: every rank's row count)."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: `process_group` was given but torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first, or pass process_group=None for a whole head.")
    from .ops.linear_logprobs.vocab_parallel import VocabShard

    return VocabShard.of(process_group, weight.shape[0], device)


def _queue_real_rows(op: str, name: str, ids: torch.Tensor, V: int, mask: torch.Tensor):
    """(`queue_token_check` of ids [R, C] with mask [R, C], then `real_token_positions`' [R·C + 1] positions and
    0-d device count): the positions are queued before the check's one host read, which brings the host their
    number (the sum of the counts)."""
    from .ops.real_tokens import queue_token_check, real_token_positions

    real = mask != 0
    return (queue_token_check(op, name, ids, V, real), *real_token_positions(real.reshape(-1)))


def _pending_tokens(op: str, name: str, ids: torch.Tensor, V: int, mask: torch.Tensor):
    """The token-id check of ids [R, C] with mask [R, C], queued, and the real tokens' positions (`PendingTokens`):
    the pass waits for the check's one host read when it needs the counts, after queueing what it can."""
    from .ops.real_tokens import PendingTokens

    finish, positions, n_real = _queue_real_rows(op, name, ids, V, mask)
    return PendingTokens(ids.numel(), positions, finish, n_real)


def _check_ids_dtype(op: str, name: str, ids) -> None:
    checks.tensor(op, name, ids)
    if ids.dtype not in checks.INT_DTYPES:
        raise TypeError(f"{op}: `{name}` must be an int64 or int32 tensor of token ids; got {ids.dtype}.")


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias=None,
                    temperature: float = 1.0, return_entropy: bool = False, impl: str = "auto",
                    process_group=None, mask=None, softcap: float | None = None):
    """Log-probs `log softmax((hidden·weightᵀ + bias) / temperature)[targets]` without materialising the logits
    (the logits soft-capped first with `softcap`).

    Computed chunk by chunk over the tokens (cuBLAS GEMMs with fp32 output, a Triton row kernel for the
    log-sum-exp), so at most one chunk of fp32 logits exists at a time: ≤ 1 GiB by default, set with the environment
    variable LAMBDA_KERNELS_LOGITS_BUDGET (bytes, or e.g. "256M", "2G"). Backward recomputes each chunk's logits
    from the saved log-sum-exp: dX, dW (accumulated in fp32 across chunks) and dbias, exact.

    Memory: a bf16/fp16 head that is trained also needs its fp32 dW sum, 4·V·H bytes, half of which live in the
    gradient tensor's own bytes until an in-place cast: 2·V·H extra (1.0 GiB at V152064, H3584).
    LAMBDA_KERNELS_MEMORY_BUDGET bounds *all* the workspace, accumulators included (default 960 MiB; "none" for no
    bound, the fastest): when the sum does not fit, the backward runs over vocabulary slabs (or, in the fused loss,
    sums dW in fp32 only for the vocabulary rows it has room for and gets the others from slabs over all rows),
    whichever a cost model rates faster. The results are the same to fp32 rounding; see
    `ops/linear_logprobs/plan.py` for the plans.

    Under `torch.no_grad()` this is the fast path for old-policy and reference log-probs; its values are
    bit-identical to the differentiable call on the same inputs (same chunks, same kernels), so on-policy ratios
    exp(ℓ − ℓ_old) are exactly 1.

    Args:
        hidden: `[..., H]` float (fp16/bf16/fp32/fp64): the states that predict `targets` (already shifted).
        weight: `[V, H]` LM head in nn.Linear layout, same dtype as hidden (may be tied to the embeddings).
        targets: `[...]` = hidden's leading shape, int64/int32 token ids in [0, V) where mask ≠ 0 (checked: one
            device→host read, waited for once the first logits GEMM is queued where its size does not depend on the
            count of real tokens, so the GPU does not idle at it).
        bias: optional `[V]`, same dtype as hidden.
        temperature: finite > 0; the distribution is softmax(logits / temperature).
        softcap: None, or the model's final-logit soft-capping c > 0 (Gemma 2/3: `config.final_logit_softcapping`):
            logits = c·tanh((hidden·weightᵀ + bias) / c), before the temperature (as HF and vLLM apply them).
        return_entropy: also return the entropy of that tempered distribution (differentiable too).
        impl: "auto" (Triton on CUDA, or on CPU under TRITON_INTERPRET=1; else torch), "triton", or "torch" (the
            same chunked pipeline with PyTorch row operations: memory-safe on CPU).
        process_group: a vocabulary-parallel (tensor-parallel) head: `weight`/`bias` hold this rank's contiguous
            block of vocabulary rows (ranks in order; blocks may differ in size), `hidden`, `targets` (global ids)
            and `mask` are the same on every rank. Results are the whole vocabulary's on every rank; the gradient
            of `hidden` is summed over the group, those of `weight`/`bias` are this rank's rows. Collective: every
            rank calls with the same hidden/targets/mask and runs the backward; an argument error raised on one
            rank only leaves the others waiting in the first collective.
        mask: optional `[...]` (targets' shape) bool/int/float: only the tokens with mask ≠ 0 are computed, e.g. the
            completion mask for old-policy and reference log-probs, so padding costs no GEMM FLOPs (verl's
            "remove padding"). Masked positions get log-prob 0 (and entropy 0) and no gradient; their hidden states
            and targets reach no result (padding ids such as -100, and NaN states, are fine there; a first chunk
            computed before the count of real tokens is known may run over some of them and be discarded). The
            real tokens' values are computed as by a call on just those rows (same chunks, same kernels; a CPU
            matmul may still round a row an ulp differently, by the gathered copy's memory alignment).

    Returns:
        fp32 log-probs (≤ 0) with the shape of `targets`, or `(logprobs, entropy)` with entropy in [0, log V]
        (fp64 for fp64 inputs). Differentiable w.r.t. hidden, weight and bias.
    """
    op = "linear_logprobs"
    checks.float_tensor(op, "hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError(f"{op}: `hidden` must have shape [..., H]; got a 0-d tensor.")
    transform, bias = _check_lm_head(op, hidden, weight, bias, temperature, softcap)
    _check_ids_dtype(op, "targets", targets)
    checks.same_shape(op, "targets", targets, hidden.shape[:-1],
                      "targets must have hidden's leading shape [...]. Did you forget to shift targets by one?")
    checks.flag(op, "return_entropy", return_entropy)
    if mask is not None:
        checks.mask_tensor(op, "mask", mask, targets.shape)
    device = checks.same_device(op, [("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias),
                                     ("mask", mask)])
    rows_impl = resolve_impl(op, impl, device)
    with _on_device(device):
        shard = _vocab_shard(op, process_group, weight, device)
        V = weight.shape[0] if shard is None else shard.vocab_size
        from .ops.linear_logprobs.function import LinearLogprobsParams, linear_logprobs_apply
        from .ops.real_tokens import PendingRows, queue_token_check

        # the id check's host read is waited for inside the pass, after its first GEMM is queued where that GEMM does
        # not depend on the count of real tokens (`PendingRows`, `launch.logprobs_forward`)
        if mask is None:
            finish = queue_token_check(op, "targets", targets, V, hint="or pass mask= to skip those positions")

            def count() -> int:  # every token: the check only has to pass
                finish()
                return targets.numel()

            rows = PendingRows(targets.numel(), None, count)
        else:  # all the tokens as one row: one count
            finish, positions, _ = _queue_real_rows(op, "targets", targets.reshape(1, -1), V, mask.reshape(1, -1))
            rows = PendingRows(targets.numel(), positions, lambda: finish()[0])

        lp, ent = linear_logprobs_apply(hidden, weight, bias, targets,
                                        LinearLogprobsParams(transform, return_entropy, rows_impl, shard), rows)
        return (lp, ent) if return_entropy else lp


def fused_grpo_lambda_loss(hidden, weight, completion_ids, completion_mask, advantages, *, old_logprobs=None,
                           ref_logprobs=None, bias=None, temperature=1.0, trace="both", lam=0.99, gamma=1.0,
                           adv_clamp_min=None, epsilon_low=0.2, epsilon_high=None, beta=0.0, loss_type="dapo",
                           max_completion_length=None, num_items_in_batch=None, return_entropy=False,
                           kl_bias_correction=False, dual_clip=None, policy_weights=None,
                           importance_sampling_level="token", policy_loss="clip", impl="auto", process_group=None,
                           softcap=None, entropy_coef=0.0, entropy_weights=None):
    """The GRPO-λ (or plain GRPO) loss straight from the last hidden states and the LM head → `(loss, metrics)`.

    Same value, gradients and metrics as
    `grpo_lambda_loss(linear_logprobs(hidden, weight, completion_ids, ...), old_logprobs, advantages,
    completion_mask, ...)` (see those two functions for the maths and every option), without ever holding more
    than one chunk of logits (LAMBDA_KERNELS_LOGITS_BUDGET, default 1 GiB):

    - on-policy (`old_logprobs=None`, one optimiser step per rollout) the token gradient is known before the
      log-probs, so each chunk's logits are produced once and turned into their gradient in place: ≈ 6·N·H·V FLOPs,
      the cost of the forward and backward GEMMs alone;
    - off-policy the log-probs of whole sequences are needed first: when every sequence fits a chunk of logits,
      chunks hold whole sequences and the objective runs on each chunk's rows (rows do not interact), again one
      pass (6·N·H·V); a longer sequence (e.g. 65,536 tokens) takes a second pass that recomputes the logits.

    A trained bf16/fp16 head needs an fp32 dW sum, half of which fits in the gradient's own bytes; the other half
    (2·V·H) and the logits chunk must fit LAMBDA_KERNELS_MEMORY_BUDGET (the whole workspace: 960 MiB by default,
    "none" for no bound). Where they do not (a 7B head), the chunks sum dW for only some vocabulary rows and a tail
    pass over vocabulary slabs gives the others (the split plan: still one pass for the loss and dX, (8·V −
    2·V_t)·N·H FLOPs), or the gradient pass runs over vocabulary slabs after a log-prob pass (8·N·H·V FLOPs),
    whichever a cost model rates faster; same results to fp32 rounding.

    Tokens with mask 0 are skipped (zero loss weight, zero gradient), so padding costs no matmul FLOPs. All
    gradients are computed during the forward and the backward only scales them; they flow to hidden, weight and
    bias (advantages, old_logprobs, ref_logprobs, policy_weights are constants).

    Args:
        hidden: `[B, T, H]` float, **already aligned with completion_ids**: hidden[:, t] is the state that predicts
            completion_ids[:, t]. The caller shifts: with a prompt of length P and full-sequence states `h`,
            pass `h[:, P - 1:-1]`.
        weight: `[V, H]` LM head (nn.Linear layout, same dtype as hidden; may be tied to the embeddings).
        completion_ids: `[B, T]` int64/int32 token ids, in [0, V) at unmasked positions (masked ones are not read).
        completion_mask: `[B, T]` bool/int/float loss mask; where it is 0 nothing is read that could change the
            result (hidden states, ids, old and reference log-probs may hold anything there).
        advantages: `[B]` or `[B, T]`.
        old_logprobs: `[B, T]` of the sampling policy, or None for on-policy (the fast single-pass path).
        ref_logprobs: `[B, T]` of the reference model; required when beta > 0.
        bias: optional `[V]`. temperature: finite > 0, the logits are divided by it (as in sampling).
        softcap: None, or the final-logit soft-capping c > 0 of Gemma 2/3 (c·tanh(logits / c), before the
            temperature), as in `linear_logprobs`.
        trace, lam, gamma, adv_clamp_min, epsilon_low, epsilon_high, beta, loss_type, max_completion_length,
        num_items_in_batch, kl_bias_correction, dual_clip, policy_weights, importance_sampling_level, policy_loss:
        as in `grpo_lambda_loss` (GSPO's sequence-level ratio, CISPO, SAPO and VESPO are one pass on-policy too).
        return_entropy: add metrics["entropy"], the masked token mean of the tempered distribution's entropy.
        entropy_coef: c, a finite number: an entropy bonus, loss − c·Σ_t m_t·w_t·H_t / max(Σ_t m_t·w_t, 1) with
            its exact gradient (H: that tempered entropy, m: the mask, w: entropy_weights). TRL's `entropy_coef`
            (over its effective mask, c divided by the accumulation steps as its loss is) and verl's
            `entropy_coeff` with token-mean aggregation. Computed in the same passes (no extra matmul); 0 = off.
        entropy_weights: None (w = 1), or `[B, T]` bool/int/float constant weights w of the bonus, e.g. TRL's
            top-entropy mask; not read where the mask is 0. For another aggregation of H, use
            `linear_logprobs(..., return_entropy=True)`.
        impl: "auto" | "triton" | "torch" (the same chunked pipeline with PyTorch row ops and the reference
            objective: the CPU fallback).

    Returns:
        loss: fp32 scalar. metrics: detached fp32 scalars, as grpo_lambda_loss's, plus "entropy" when asked.
    """
    op = "fused_grpo_lambda_loss"
    checks.float_tensor(op, "hidden", hidden, ndim=3)
    _check_ids_dtype(op, "completion_ids", completion_ids)
    if completion_ids.dim() != 2:
        raise ValueError(f"{op}: `completion_ids` must be 2-D [B, T]; got shape {list(completion_ids.shape)}.")
    B, T = completion_ids.shape
    if tuple(hidden.shape[:2]) != (B, T):
        raise ValueError(
            f"{op}: `hidden` must have shape [B, T, H] = [{B}, {T}, H] to match `completion_ids` [{B}, {T}]; "
            f"got {list(hidden.shape)}. hidden[:, t] must be the state that predicts completion_ids[:, t]: shift by "
            "one and drop the prompt yourself, e.g. hidden = last_hidden_state[:, P - 1:-1] for a prompt of length P.")
    transform, bias = _check_lm_head(op, hidden, weight, bias, temperature, softcap)
    checks.mask_tensor(op, "completion_mask", completion_mask, (B, T))
    checks.flag(op, "return_entropy", return_entropy)
    entropy_coef = checks.finite_number(op, "entropy_coef", entropy_coef)
    if entropy_weights is not None:
        checks.mask_tensor(op, "entropy_weights", entropy_weights, (B, T))
    params = check_objective_args(
        op, (B, T), ("hidden", hidden), old_logprobs=old_logprobs, advantages=advantages, mask=completion_mask,
        ref_logprobs=ref_logprobs, trace=trace, lam=lam, gamma=gamma, adv_clamp_min=adv_clamp_min,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, loss_type=loss_type,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        kl_bias_correction=kl_bias_correction, dual_clip=dual_clip, policy_weights=policy_weights,
        importance_sampling_level=importance_sampling_level, policy_loss=policy_loss)
    device = checks.same_device(op, [("hidden", hidden), ("weight", weight), ("completion_ids", completion_ids),
                                     ("bias", bias), ("entropy_weights", entropy_weights)])
    rows_impl = resolve_impl(op, impl, device)
    with _on_device(device):
        shard = _vocab_shard(op, process_group, weight, device)
        tokens = _pending_tokens(op, "completion_ids", completion_ids,
                                 weight.shape[0] if shard is None else shard.vocab_size, completion_mask)
        from .ops.fused_loss.entropy_bonus import EntropyBonus
        from .ops.fused_loss.function import FusedLossParams, fused_grpo_lambda_apply
        from .ops.fused_loss.objectives import KernelObjective, ReferenceObjective

        mask_f = completion_mask.to(torch.float32)
        scales = row_scales(mask_f, loss_type, max_completion_length, num_items_in_batch)
        objective = (KernelObjective if rows_impl == "triton" else ReferenceObjective)(params, num_items_in_batch)
        bonus = None if entropy_coef == 0 else EntropyBonus(entropy_coef, mask_f, entropy_weights)
        fparams = FusedLossParams(objective=objective, beta=params.beta, transform=transform,
                                  with_entropy=return_entropy, rows_impl=rows_impl, shard=shard, tokens=tokens,
                                  bonus=bonus)
        return fused_grpo_lambda_apply(hidden, weight, bias, completion_ids, mask_f, advantages, old_logprobs,
                                       ref_logprobs, policy_weights, scales, fparams)
