"""TRL as a drop-in: TRL's `GRPOTrainer` with its loss and log-probs computed by lambda_kernels.

    from grpo_trainer.trl_trainer import GRPOLambdaTRLConfig, GRPOLambdaTRLTrainer

    args = GRPOLambdaTRLConfig(output_dir="out", trace="both", lam=0.99, adv_clamp_min=-0.1)  # + any GRPOConfig option
    trainer = GRPOLambdaTRLTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)  # GRPOTrainer's arguments
    trainer.train()

Everything else is TRL's: generation (transformers or vLLM), rewards, advantages, reference model, logging,
checkpoints. Two methods change:
- the training loss is `fused_grpo_lambda_loss` on the backbone's last hidden states and the LM head (no
  [B, T, V] logits; one pass when on-policy), with the GRPO-λ trace on top of TRL's clipped objective;
- the old-policy and reference log-probs come from `linear_logprobs`, the same kernels as the loss, so that an
  on-policy ratio is exactly 1.
`trace=None` is TRL's own loss (loss types grpo, bnpo, dr_grpo, dapo, luspo, with TRL's normalisers, and cispo,
sapo and vespo, the fused loss's `policy_loss` CISPO / SAPO / VESPO with TRL's dapo / grpo / dapo normalisers; at the
token level or, with `importance_sampling_level="sequence"`, GSPO's sequence level, vespo excepted), which
`tests/test_trl_trainer.py` checks value for value and gradient for gradient against TRL's GRPOTrainer. A model's
logit scale (Granite, Cohere, ...) is folded into the temperature and its final-logit soft-capping (Gemma 2/3) is
applied before the temperature, as TRL's head applies them (a model with both is refused). Metrics keep TRL's
names and values, the per-sequence `clip_ratio/low_min` and `clip_ratio/high_max` included (cispo: TRL's
`cispo_clip_ratio` instead; sapo: no clip metric; vespo: TRL's `vespo/phi_seq_mean`). TRL's `delta` (two-sided
clipping) is the fused loss's `dual_clip` (ignored with cispo, sapo and vespo, as TRL ignores it there); its vLLM
importance-sampling weights (refused with vespo, whose φ TRL folds them into) and its `top_entropy_quantile` and
`off_policy_mask_threshold` masks are the fused loss's `policy_weights` (the masks from one extra log-prob pass under
no_grad). TRL's entropy bonus (`entropy_coef`, and `use_adaptive_entropy`'s controller) is
the fused loss's `entropy_coef` over TRL's entropy mask (`entropy_weights`), with TRL's `policy_loss` and
`entropy_coef` metrics.

TRL options the fused loss does not implement are refused when the config is built (or, for the model and tools,
when the trainer is), rather than silently ignored. Written against TRL 1.16 (it overrides the private
`_compute_loss` and `_get_per_token_logps_and_entropies`); tested on the CPU with one process (LoRA adapters through
PEFT included), and its model patch under DDP with two CPU processes; FSDP and DeepSpeed are refused.
"""
from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from lambda_kernels import CISPO, SAPO, VESPO, Clip, fused_grpo_lambda_loss, linear_logprobs

from .config import (IMPLS, IMPORTANCE_SAMPLING_LEVELS, TRACES, ConfigError, _check_delta, _choice, _finite,
                     _positive_number, _unit_closed)
from .model import check_supported, head_softcap, head_temperature, lm_head

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("grpo_trainer.trl_trainer needs TRL: pip install 'lambda-kernels[trl]'. "
                      "Without TRL, `grpo-lambda train` is the trainer of this package.") from exc

# The overrides below replace private methods of TRL's GRPOTrainer: if a TRL release renames one, ours would never be
# called and TRL's own loss would run under our name. Refuse to import instead.
_OVERRIDDEN = ("_compute_loss", "_get_per_token_logps_and_entropies")
if not all(callable(getattr(GRPOTrainer, name, None)) for name in _OVERRIDDEN):  # pragma: no cover
    raise ImportError(f"grpo_trainer.trl_trainer was written against TRL 1.16, whose GRPOTrainer has {_OVERRIDDEN}; "
                      f"the installed TRL {trl.__version__} lacks some of them. pip install 'trl>=1.16,<2'.")

TESTED_TRL = "1.16."
if not trl.__version__.startswith(TESTED_TRL):  # the overrides rely on TRL's internals, not only on names
    warnings.warn(f"grpo_trainer.trl_trainer is tested with TRL {TESTED_TRL}x; TRL {trl.__version__} "
                  "is installed. Check the loss against trl.GRPOTrainer with trace=None (tests/test_trl_trainer.py).",
                  stacklevel=2)

CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the clipped ratio's, each with TRL's normaliser
# TRL's loss types with another policy term than the clipped ratio's: the fused loss's loss_type (TRL's normaliser
# for it) of each; the term itself is `_policy_term`'s
POLICY_LOSS_TYPES = {"cispo": "dapo", "sapo": "grpo", "vespo": "dapo"}
LOSS_TYPES = CLIP_LOSS_TYPES + tuple(POLICY_LOSS_TYPES)
# TRL options that change the loss in ways the fused loss does not implement: refused, never silently ignored.
# Pairs (is it set?, what to set instead: a string, or a function of the config), checked when the config is built,
# before any model is loaded.
_UNSUPPORTED_OPTIONS = (
    # TRL folds vLLM's importance-sampling ratios into VESPO's sequence sum (its φ), where the fused loss can only
    # weigh each token's term by them (policy_weights)
    (lambda a: a.loss_type == "vespo" and a.use_vllm and a.vllm_importance_sampling_correction,
     "vllm_importance_sampling_correction must be False with loss_type='vespo' and use_vllm=True (TRL folds vLLM's "
     "importance-sampling ratios into VESPO's sequence weight φ, which the fused loss cannot)"),
    # VESPO's weight is of the sequence's summed token log-ratios: the fused loss takes it at the token level only
    (lambda a: a.loss_type == "vespo" and a.importance_sampling_level != "token",
     lambda a: f"importance_sampling_level must be 'token' with loss_type='vespo'; got "
               f"{a.importance_sampling_level!r} (VESPO computes its own sequence-level weight from the token "
               "log-ratios; TRL warns and uses the sequence's ratio only in the KL's bias correction)"),
)
# the same, for what only the trainer knows (the model, the tools)
_NO_TOOLS = "tools (and environments) must not be given: tool-output tokens need a loss mask"
_UNSUPPORTED_SETUP = (
    (lambda t: t.aux_loss_enabled, "router_aux_loss_coef must be 0 for a mixture-of-experts model"),
    (lambda t: bool(t.tools), _NO_TOOLS),
    (lambda t: getattr(t, "_is_vlm", False), "the model must be text-only (not a vision-language model)"),
    # the fused loss uses the LM head's weight after the forward has returned, when FSDP and ZeRO-3 have resharded it
    (lambda t: t.accelerator.distributed_type in ("FSDP", "DEEPSPEED"), "FSDP and DeepSpeed must not be used"),
)
# vision-language inputs reaching the two overridden methods: refused there too (TRL's `_is_vlm`, checked when the
# trainer is built, is private), since the fused path would silently drop them
_MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                      "image_position_ids", "token_type_ids", "mm_token_type_ids", "num_images", "num_tiles")


@dataclass
class GRPOLambdaTRLConfig(GRPOConfig):
    """TRL's GRPOConfig plus the GRPO-λ options (defaults: the paper's trace "both", λ 0.99, clamp −0.1)."""

    trace: Optional[str] = field(default="both", metadata={
        "help": f"GRPO-λ eligibility trace: one of {list(TRACES)}, or None for TRL's plain GRPO loss (None with "
                "importance_sampling_level='sequence': GSPO's sequence ratio takes the trace's place)."})
    lam: float = field(default=0.99, metadata={"help": "Trace λ in [0, 1]."})
    trace_gamma: float = field(default=1.0, metadata={
        "help": "Discount γ in [0, 1] of the trace (it decays by γ·λ per token)."})
    adv_clamp_min: Optional[float] = field(default=-0.1, metadata={
        "help": "Clamp advantages from below (the paper's -0.1; only with a trace); None = no clamp."})
    impl: str = field(default="auto", metadata={
        "help": f"lambda_kernels implementation: one of {list(IMPLS)} ('auto' = Triton on GPU, PyTorch on CPU)."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.trace, str) and self.trace.lower() in ("none", "null"):  # from a command line or YAML
            self.trace = None
        if self.trace is not None:
            _choice("trace", self.trace, TRACES + (None,))
        _unit_closed("lam", self.lam)
        _unit_closed("trace_gamma", self.trace_gamma)
        if self.adv_clamp_min is not None:
            _finite("adv_clamp_min", self.adv_clamp_min)
        _choice("impl", self.impl, IMPLS)
        _choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        # what takes the λ-trace's place (trace defaults to "both": each needs it set to None explicitly)
        for chosen, option, what, instead in (
                (self.importance_sampling_level == "sequence", "importance_sampling_level='sequence'",
                 "GSPO gives every token its sequence's length-normalised ratio", "keep importance_sampling_level="
                 "'token'"),
                (self.loss_type == "vespo", "loss_type='vespo'", "VESPO weighs each token's gradient by a function "
                 "of its sequence's importance weight", "use another loss_type")):
            if chosen and self.trace is not None:
                raise ConfigError(f"trace must be None with {option}; got {self.trace!r}. {what}, which takes the "
                                  f"place of the λ-trace: pass trace=None (--trace none), or {instead} for GRPO-λ.")
        epsilon_high = self.epsilon if self.epsilon_high is None else self.epsilon_high  # (as TRL resolves it)
        if self.loss_type == "cispo":
            _positive_number("epsilon_high", epsilon_high,
                             "With loss_type='cispo' it is CISPO's cap of the importance weight, min(ratio, "
                             "epsilon_high) (epsilon when unset); TRL recommends 5.0.")
            if self.epsilon_high is None and epsilon_high < 1:
                warnings.warn(f"loss_type='cispo' with epsilon_high unset caps the importance weight at epsilon = "
                              f"{epsilon_high:g} (TRL's resolution), below 1: every on-policy token's weight is "
                              "capped. TRL recommends epsilon_high=5.0 for cispo.", stacklevel=2)
        elif self.loss_type == "sapo":
            for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
                _positive_number(name, getattr(self, name), "It is SAPO's gate temperature (TRL's defaults: 1.0 "
                                 "for sapo_temperature_pos, 1.05 for sapo_temperature_neg).")
        elif self.loss_type == "vespo":  # (TRL checks none of them; the fused loss needs them finite)
            for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
                _finite(name, getattr(self, name), "It shapes VESPO's weight φ(w) = e^λ·w^k·e^(−λw) (TRL's "
                        "defaults: k 2.0 and λ 3.0 where the advantage is ≥ 0, k 3.0 and λ 2.0 elsewhere).")
        if self.loss_type not in POLICY_LOSS_TYPES:  # TRL applies delta in the clipped loss only (ignored there)
            _check_delta(self.delta, epsilon_high)
        # (TRL checks none of them; its coefficient reaches the fused loss, which needs it finite)
        _finite("entropy_coef", self.entropy_coef, "It weighs TRL's entropy bonus; 0 turns it off.")
        if self.use_adaptive_entropy:
            for name in ("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta"):
                _finite(name, getattr(self, name), "use_adaptive_entropy moves entropy_coef by entropy_coef_delta "
                        "within [entropy_coef_min, entropy_coef_max] (TRL's defaults: 0.005 within [0, 1]).")
        _refuse([what(self) if callable(what) else what for bad, what in _UNSUPPORTED_OPTIONS if bad(self)],
                ConfigError)


def add_hidden_states_forward(model) -> None:
    """Let `model(..., completion_hidden_states=T)` return `(hidden, weight, bias)`: the backbone's last hidden states
    that predict the last T input tokens ([B, T, H], no LM head) and the LM head's parameters.

    Through the model's own call, so that a wrapper (DDP) sees a forward whose outputs reach every parameter the
    loss uses, the head's included (DDP with find_unused_parameters would otherwise take the head for unused and
    fail when its gradient arrives). Any other call is the model's forward as before (generation is unchanged).
    A method bound to the model, named after the class's forward (as TRL patches it), so that the model pickles."""
    previous = model.forward
    # the function behind the forward this patch wraps (TRL's fused-head patch, or the class's), called with `self`
    previous_func = previous.__func__ if getattr(previous, "__self__", None) is model else None

    @functools.wraps(type(model).forward)
    def forward(self, *args, completion_hidden_states: Optional[int] = None, **kwargs):
        if completion_hidden_states is None:
            return previous_func(self, *args, **kwargs) if previous_func is not None else previous(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        # as views (no copy): DDP finds the parameters an output uses by walking back from the outputs' autograd
        # nodes, and a parameter returned as such, a leaf, has none
        weight, bias = (None if p is None else p.view_as(p) for p in lm_head(self))
        return hidden[:, -completion_hidden_states - 1:-1], weight, bias

    model.forward = types.MethodType(forward, model)


class GRPOLambdaTRLTrainer(GRPOTrainer):
    """TRL's GRPOTrainer (same arguments) whose loss is `fused_grpo_lambda_loss` and whose old/reference log-probs
    are `linear_logprobs`. `args` must be a `GRPOLambdaTRLConfig`."""

    def __init__(self, model, reward_funcs=None, args: Optional[GRPOLambdaTRLConfig] = None, *rest, **kwargs):
        if args is None:  # as TRL names it: after the model's last path component
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GRPOLambdaTRLConfig(output_dir=f"{name.split('/')[-1]}-GRPO-lambda")
        if not isinstance(args, GRPOLambdaTRLConfig):
            raise TypeError(f"GRPOLambdaTRLTrainer: `args` must be a GRPOLambdaTRLConfig; got {type(args).__name__}. "
                            "It is TRL's GRPOConfig with the GRPO-λ options: GRPOLambdaTRLConfig(**your_options).")
        if kwargs.get("tools") or kwargs.get("environment_factory"):  # before TRL loads anything for them
            _refuse([_NO_TOOLS], ValueError)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        missing = [name for name in _TRL_ENTROPY_STATE if not hasattr(self, name)]
        if missing:  # pragma: no cover - (the entropy bonus reads and updates TRL's own state, as its checkpoints do)
            raise RuntimeError(f"GRPOLambdaTRLTrainer: TRL's GRPOTrainer must set {list(_TRL_ENTROPY_STATE)} as TRL "
                               f"1.16 does; TRL {trl.__version__} lacks {missing}. pip install 'trl>=1.16,<2'.")
        _refuse([what for bad, what in _UNSUPPORTED_SETUP if bad(self)], ValueError)
        for m in (self.model, self.ref_model):
            if m is not None:
                base = _base_model(m)
                check_supported(base)  # (also: the LM head is a plain nn.Linear, no adapter on it)
                add_hidden_states_forward(base)

    # ---- the two methods that change

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """Log-probs (and entropies) [B, T] of the last `logits_to_keep` tokens, through `linear_logprobs`."""
        _refuse_multimodal(multimodal)
        if compute_aux_loss:
            raise ValueError("GRPOLambdaTRLTrainer: the MoE auxiliary loss is not supported (router_aux_loss_coef=0).")
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        temperature, softcap = self._head_temperature(model), self._head_softcap(model)
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            hidden, weight, bias = self._completion_states(model, input_ids[rows], attention_mask[rows],
                                                           logits_to_keep)
            out = linear_logprobs(hidden, weight, input_ids[rows, -logits_to_keep:], bias=bias,
                                  temperature=temperature, softcap=softcap, return_entropy=compute_entropy,
                                  impl=self.args.impl, mask=attention_mask[rows, -logits_to_keep:])
            logp, entropy = out if compute_entropy else (out, None)
            logps.append(logp)
            entropies.append(entropy)
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    def _compute_loss(self, model, inputs):
        if "tool_mask" in inputs:
            raise ValueError("GRPOLambdaTRLTrainer: tool-calling batches (tool_mask) are not supported.")
        _refuse_multimodal(inputs)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        hidden, weight, bias = self._completion_states(model, input_ids, attention_mask, completion_ids.size(1))

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        policy, loss_type = self._policy_term()
        num_items = None
        if loss_type == "dapo":  # TRL's normaliser: the generation batch's tokens, per process and window
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation
        advantages = inputs["advantages"]
        adv_clamp_min = self.args.adv_clamp_min if self.args.trace is not None else None
        temperature, softcap = self._head_temperature(model), self._head_softcap(model)
        policy_weights = self._policy_weights(inputs)
        masks = self._current_policy_masks(inputs, hidden, weight, bias, temperature, softcap)
        for mask in (masks.entropy, masks.off_policy):
            if mask is not None:
                policy_weights = mask if policy_weights is None else policy_weights * mask
        # TRL's loss is its policy loss − apply_coef · E / accumulation, E the entropy's mean over its effective mask
        # (completion mask · entropy mask; neither OPSM nor vLLM's weights). The fused loss subtracts entropy_coef · E;
        # with dapo its loss is returned as is (TRL's dapo normaliser holds the accumulation), with the other types it
        # is divided by `accumulation` below, the bonus with it: so the coefficient is divided here with dapo only,
        # and the total is TRL's with every type.
        apply_coef = self._entropy_apply_coef() if self._entropy_bonus_enabled else 0.0
        entropy_coef = apply_coef / accumulation if loss_type == "dapo" else apply_coef
        loss, metrics = fused_grpo_lambda_loss(
            hidden, weight, completion_ids, completion_mask, advantages,
            old_logprobs=inputs.get("old_per_token_logps"),
            ref_logprobs=inputs["ref_per_token_logps"] if self.beta != 0.0 else None, bias=bias,
            temperature=temperature, softcap=softcap, trace=self.args.trace,
            lam=self.args.lam, gamma=self.args.trace_gamma, adv_clamp_min=adv_clamp_min,
            # (the clipped ratio's options: TRL's epsilon_high is CISPO's cap there, and TRL ignores delta)
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high if isinstance(policy, Clip) else None,
            dual_clip=self.args.delta if isinstance(policy, Clip) else None, beta=self.beta, loss_type=loss_type,
            max_completion_length=self.max_completion_length, num_items_in_batch=num_items, return_entropy=True,
            kl_bias_correction=self.args.use_bias_correction_kl, policy_weights=policy_weights,
            importance_sampling_level=self.importance_sampling_level, policy_loss=policy, impl=self.args.impl,
            entropy_coef=entropy_coef, entropy_weights=masks.entropy)
        policy_loss = window = None
        if self._entropy_bonus_enabled:
            stats = self._entropy_stats(metrics, completion_mask, masks)
            # TRL's policy_loss metric is its loss before the bonus (with every type but dapo, also before the
            # division by the accumulation steps): the fused loss's here, the bonus added back
            policy_loss = loss.detach() + entropy_coef * stats[0] / stats[1].clamp(min=1.0)
            window = self._entropy_window(mode, stats)
        if loss_type != "dapo":  # TRL divides the other types by the accumulation steps (dapo: in num_items)
            loss = loss / accumulation
        world_entropy = self._log_metrics(mode, metrics, completion_mask, advantages, policy_loss, window)
        if self._entropy_bonus_enabled:
            self._update_entropy_coef(mode, world_entropy)
        return loss

    # ---- helpers

    def _policy_term(self):
        """TRL's loss_type as (the fused loss's policy term, its loss_type: TRL's normaliser for it). cispo: CISPO
        with TRL's epsilon_high (epsilon when unset) as the cap, normalised as dapo; sapo: SAPO with TRL's
        temperatures, normalised as grpo; vespo: VESPO with TRL's vespo_k_* / vespo_lambda_*, normalised as dapo;
        the others: the clipped ratio, with their own normaliser."""
        if self.loss_type == "cispo":
            return CISPO(max_ratio=self.epsilon_high), POLICY_LOSS_TYPES["cispo"]
        if self.loss_type == "sapo":
            # TRL's temperatures are a tensor of torch's default dtype (torch.where of two floats): rounded as there
            pos, neg = torch.tensor([self.args.sapo_temperature_pos, self.args.sapo_temperature_neg]).tolist()
            return SAPO(temperature_pos=pos, temperature_neg=neg), POLICY_LOSS_TYPES["sapo"]
        if self.loss_type == "vespo":
            # TRL's k and λ are tensors of torch's default dtype too (get_gamma_weights' torch.where): rounded so
            args = self.args
            k_pos, lambda_pos, k_neg, lambda_neg = torch.tensor(
                [args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg]).tolist()
            return (VESPO(k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg, lambda_neg=lambda_neg),
                    POLICY_LOSS_TYPES["vespo"])
        return Clip(), self.loss_type

    @torch.no_grad()
    def _current_policy_masks(self, inputs, hidden, weight, bias, temperature, softcap) -> "_PolicyMasks":
        """TRL's masks that depend on the current policy, as [B, T] fp32 (each None when off): `top_entropy_quantile`
        (1 where a token's entropy is at least the quantile over every process's real tokens, TRL's
        `get_high_entropy_mask`; with the entropies it comes from) and `off_policy_mask_threshold` (DeepSeek-V3.2's
        off-policy sequence mask: 0 on a sequence with Â < 0 whose mean KL from the sampling policy passes the
        threshold, TRL's `get_off_policy_mask`). Both need the current log-probs or entropies before the loss's one
        pass: one log-prob pass of their own under no_grad (2·N·H·V FLOPs more)."""
        entropy_mask, opsm = self.top_entropy_quantile < 1.0, self.off_policy_mask_threshold is not None
        if not (entropy_mask or opsm):
            return _PolicyMasks()
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        out = linear_logprobs(hidden.detach(), weight.detach(), completion_ids,
                              bias=None if bias is None else bias.detach(), temperature=temperature, softcap=softcap,
                              return_entropy=entropy_mask, impl=self.args.impl, mask=completion_mask)
        logps, entropies = out if entropy_mask else (out, None)
        high_entropy = off_policy = None
        if entropy_mask:
            high_entropy = self.get_high_entropy_mask(entropies, completion_mask, 1 - self.top_entropy_quantile)
            high_entropy = high_entropy.to(torch.float32)
        if opsm:  # TRL's inputs: the sampler's log-probs (vLLM) or the old policy's, else the current ones
            old = inputs.get("old_per_token_logps")
            old = logps if old is None else old
            advantages = inputs["advantages"]
            advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
            off_policy = self.get_off_policy_mask(advantages, logps, inputs.get("sampling_per_token_logps", old),
                                                  completion_mask, self.off_policy_mask_threshold).to(torch.float32)
        return _PolicyMasks(high_entropy, off_policy, entropies)

    # ---- TRL's entropy bonus (its state is TRL's attributes, which its checkpoints save and restore)

    def _entropy_apply_coef(self) -> float:
        """The coefficient TRL applies to the bonus in this accumulation window: `entropy_coef`, but with
        `use_adaptive_entropy` 0 unless the last window's entropy was at or below `entropy_target` (TRL's gate; 0 in
        the first window, whose last entropy is inf)."""
        if self.use_adaptive_entropy and not self._last_world_entropy <= self.args.entropy_target:
            return 0.0
        return self.entropy_coef

    @staticmethod
    def _entropy_stats(metrics, mask, masks: "_PolicyMasks") -> torch.Tensor:
        """[Σ H, tokens] (fp32) over TRL's effective mask, the completion mask times the entropy mask: from the fused
        loss's entropy metric (the completion-mask mean) without an entropy mask, else from the entropies the mask
        came from."""
        if masks.entropy is None:
            tokens = mask.sum().to(torch.float32)
            return torch.stack([metrics["entropy"] * tokens, tokens])
        effective = mask * masks.entropy
        return torch.stack([(masks.entropies * effective).sum(), effective.sum()]).to(torch.float32)

    def _entropy_window(self, mode, stats):
        """With `use_adaptive_entropy` in training: adds a micro-batch's [Σ H, tokens] to its accumulation window's
        (TRL's `_entropy_window_stats`) and, at the window's last micro-batch (sync_gradients), returns the window's
        totals (for `_log_metrics` to sum over processes) and starts the next window; else None."""
        if not (self.use_adaptive_entropy and mode == "train"):
            return None
        window = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        self._entropy_window_stats = None if self.accelerator.sync_gradients else window
        return window if self.accelerator.sync_gradients else None

    def _update_entropy_coef(self, mode, world_entropy: Optional[float]) -> None:
        """TRL's adaptive control (Skywork-OR1) at a window's end, given the window's entropy over every process:
        entropy_coef ± entropy_coef_delta (up at or below entropy_target, else down) within [entropy_coef_min,
        entropy_coef_max], applied from the next window on. Then TRL's `entropy_coef` metric, at every train
        optimizer step."""
        if world_entropy is not None:
            args = self.args
            if world_entropy <= args.entropy_target:
                self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
            self._last_world_entropy = world_entropy
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _policy_weights(self, inputs):
        """TRL's vLLM importance-sampling weights of each token's policy term ([B, T] or [B, 1]: token or sequence
        modes), as the fused loss's `policy_weights` [B, T], or None without the correction."""
        if not (self.use_vllm and self.vllm_importance_sampling_correction):
            return None
        return inputs["importance_sampling_ratio"].expand(inputs["completion_mask"].shape).contiguous()

    def _completion_states(self, model, input_ids, attention_mask, logits_to_keep):
        """(hidden, weight, bias) for the fused ops, in the dtype the LM head's matmul would run in."""
        with self.accelerator.autocast():
            hidden, weight, bias = model(input_ids=input_ids, attention_mask=attention_mask,
                                         completion_hidden_states=logits_to_keep)
            device = hidden.device.type
            autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if self.args.cast_lm_head_to_fp32:
            dtype = torch.float32
        elif autocast_dtype is not None and hidden.dtype == torch.float32:
            # mixed precision with fp32 weights: the final norm returns fp32 and F.linear would run the head in the
            # autocast dtype (as TRL's head does); cast both, differentiably, so the gradients reach the fp32 weights
            dtype = autocast_dtype
        else:
            dtype = hidden.dtype
        return hidden.to(dtype), weight.to(dtype), (None if bias is None else bias.to(dtype))

    def _head_temperature(self, model) -> float:
        """TRL's temperature with the model's logit scale folded in (Granite, Cohere, ...), as TRL's head applies it."""
        return head_temperature(_base_model(self.accelerator.unwrap_model(model)), self.temperature)

    def _head_softcap(self, model) -> Optional[float]:
        """The model's final-logit soft-capping (Gemma 2/3), or None: TRL's head caps before the temperature too."""
        return head_softcap(_base_model(self.accelerator.unwrap_model(model)))

    def _log_metrics(self, mode, metrics, mask, advantages, policy_loss=None, entropy_window=None):
        """TRL's metric names and values (its `global_masked_mean`): each process's means combined over processes by
        what they are means over, and the per-sequence clip extremes over every process's sequences. `entropy` and
        `kl` are token means; the clip fractions (`clip_ratio/*_mean`, or cispo's `cispo_clip_ratio`) too at the
        token level, but at the sequence level with per-sequence advantages [B] (one clip decision per sequence)
        means over sequences, every sequence counted. With per-token advantages [B, T] (a subclass may hand them)
        TRL's clip masks are [B, T] at the sequence level too: token means, as the fused loss returns them then.
        The clip metrics are those the fused loss returns for its policy term, which are TRL's for the loss type
        (none for sapo and vespo). vespo's `vespo/phi_seq_mean` is TRL's mean of its φ: over the sequences, every one
        counted, with advantages [B] (TRL's φ is then [B, 1], at the token level too), over the tokens with [B, T]
        (φ per token). A process with nothing counted (no tokens, or at the sequence level with advantages [B] no
        sequences) has no extremes: NaN, skipped as TRL's nanmin/nanmax skip it; NaN when no process has any.
        With the entropy bonus: `policy_loss`, each process's loss before the bonus, logged as TRL's nanmean of it
        over processes; `entropy_window`, the adaptive controller's [Σ H, tokens] of an accumulation window at its
        end, summed over processes: its mean is returned (else None), as TRL's `.item()` of it. One reduce, one
        gather (with extremes or policy_loss only), one host read."""
        tokens = mask.sum().to(torch.float32)
        sequences = torch.full_like(tokens, mask.size(0))
        sequence = self.importance_sampling_level == "sequence" and advantages.dim() == 1
        clip_count = sequences if sequence else tokens
        # the means by what they are means over (this process's count of it)
        groups = [(["entropy"] + (["kl"] if self.beta != 0.0 else []), tokens),
                  ([n for n in _CLIP_FRACTIONS if n in metrics], clip_count),
                  ([n for n in _PER_SEQUENCE_MEANS if n in metrics], sequences if advantages.dim() == 1 else tokens)]
        sums = [metrics[n] * count for group, count in groups for n in group]
        window = [] if entropy_window is None else list(entropy_window.unbind(0))
        totals = self.accelerator.reduce(torch.stack(sums + [count for _, count in groups] + window),
                                         reduction="sum")
        n, k = len(sums), len(groups)
        counts = torch.cat([totals[n + i].expand(len(group)) for i, (group, _) in enumerate(groups)])
        values = [totals[:n] / counts.clamp(min=1.0)]
        names = [name for group, _ in groups for name in group]
        extremes = _CLIP_EXTREMES[0] in metrics  # (with the clipped ratio's metrics only, as TRL's)
        row = []  # this process's values to gather: its clip extremes, its policy_loss
        if extremes:
            row.append(torch.where(clip_count > 0, torch.stack([metrics[n] for n in _CLIP_EXTREMES]), torch.nan))
        if policy_loss is not None:
            row.append(policy_loss.reshape(1).to(torch.float32))
        if row:
            row = torch.cat(row)
            gathered = self.accelerator.gather(row.reshape(1, -1)).reshape(-1, row.numel())
            if extremes:
                nan = gathered.isnan()
                low_min = torch.where(nan[:, 0], torch.inf, gathered[:, 0]).amin()
                high_max = torch.where(nan[:, 1], -torch.inf, gathered[:, 1]).amax()
                both = torch.stack([low_min, high_max])
                values.append(torch.where(both.isinf(), torch.nan, both))
                names += list(_CLIP_EXTREMES)
            if policy_loss is not None:
                values.append(gathered[:, -1].nanmean().reshape(1))
                names.append("policy_loss")
        if window:
            values.append((totals[n + k] / totals[n + k + 1].clamp(min=1.0)).reshape(1))
        host = torch.cat(values).tolist()
        for name, value in zip(names, host):
            self._metrics[mode][name].append(value)
        return host[-1] if window else None


class _PolicyMasks(NamedTuple):
    """TRL's masks that depend on the current policy, [B, T] fp32 (None when off), and the entropies [B, T] the
    entropy mask came from (None without it)."""
    entropy: Optional[torch.Tensor] = None
    off_policy: Optional[torch.Tensor] = None
    entropies: Optional[torch.Tensor] = None


# TRL's entropy-bonus state that the drop-in reads and updates (set by GRPOTrainer.__init__; its checkpoints save
# entropy_coef and _last_world_entropy)
_TRL_ENTROPY_STATE = ("entropy_coef", "use_adaptive_entropy", "_entropy_bonus_enabled", "_last_world_entropy",
                      "_entropy_window_stats")
# the fused loss's clip metrics as TRL logs them: fractions (global_masked_mean), per-sequence extremes (min, max)
_CLIP_FRACTIONS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio")
_CLIP_EXTREMES = ("clip_ratio/low_min", "clip_ratio/high_max")
# the fused loss's means over the sequences with advantages [B] at either level (over the tokens with [B, T])
_PER_SEQUENCE_MEANS = ("vespo/phi_seq_mean",)


def _base_model(model):
    """The transformers model under a PEFT wrapper (the one whose forward and head are used), else the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _refuse(refused: list, error) -> None:
    if refused:
        raise error("GRPOLambdaTRLTrainer: the fused GRPO-λ loss does not implement these TRL options: "
                    + "; ".join(refused) + ". Change them, or use trl.GRPOTrainer for them.")


def _refuse_multimodal(named: dict) -> None:
    given = [k for k in _MULTIMODAL_INPUTS if named.get(k) is not None]
    if given:
        raise ValueError(f"GRPOLambdaTRLTrainer: text-only models are supported; got {given}. "
                         "Use trl.GRPOTrainer for vision-language models.")
