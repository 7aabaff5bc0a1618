"""The GRPO / GRPO-λ training loop, built only on lambda_kernels' public API.

One step: prompts → G completions each (a GenerationBackend) → rewards (weighted sum of reward functions) →
`group_advantages` (optionally dropping groups with equal rewards) → old / reference log-probs under no_grad via
`linear_logprobs` on hidden states → `num_iterations` updates, each over gradient-accumulated micro-batches of
`fused_grpo_lambda_loss` on hidden states (no [B, T, V] logits) → grad clipping, AdamW, LR schedule.
With vLLM, TRL's importance-sampling correction weights each token's policy term by π_old/q (see
`vllm_importance_weights`), the fused loss's `policy_weights`. The policy term is the clipped ratio's, CISPO's,
SAPO's or VESPO's (`policy_loss`); the metrics are those the loss returns for it. `entropy_coef` subtracts an entropy
bonus, a token mean over the update's trained tokens (`entropy_coefficients`).
A non-finite loss or gradient skips the update (weights untouched) and is logged as `skipped`.
"""
from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lambda_kernels import CISPO, SAPO, VESPO, Clip, fused_grpo_lambda_loss, group_advantages, linear_logprobs
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import ConfigError, GRPOLambdaConfig
from .data import PromptSampler, load_datasets
from .evaluate import eval_reward_set, evaluate_rows, format_result
from .generation import HFGenerationBackend, VLLMGenerationBackend
from .importance import vllm_importance_weights
from .model import (completion_hidden, completion_logprobs, head_softcap, head_temperature, lm_head, load_policy,
                    quiet_transformers, save_pretrained)
from .plot import plot_reward_curve
from .rewards import RewardSet
from .warmup import sft_warmup


@dataclass
class Batch:
    """Rows of one rollout, laid out for the loss (see generation.Generation)."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    attention_mask: torch.Tensor    # completion tokens up to and including EOS
    loss_mask: torch.Tensor         # attention_mask, minus truncated rows if mask_truncated_completions
    advantages: torch.Tensor        # [B] fp32
    sampling_logprobs: Optional[torch.Tensor] = None  # [B, T] the sampler's log-probs (vLLM), else None
    policy_weights: Optional[torch.Tensor] = None     # [B, T] vLLM importance-sampling weights of the policy term

    def __len__(self):
        return self.prompt_ids.shape[0]

    def _map(self, fn) -> "Batch":
        return Batch(*(v if v is None else fn(v) for v in (getattr(self, f.name) for f in fields(self))))

    def to(self, device) -> "Batch":
        return self._map(lambda t: t.to(device))

    def select(self, idx) -> "Batch":
        return self._map(lambda t: t[idx])


def policy_term(cfg: GRPOLambdaConfig):
    """The fused loss's `policy_loss` of the config: lambda_kernels' Clip, CISPO, SAPO or VESPO with its options."""
    if cfg.policy_loss == "cispo":
        return CISPO(max_ratio=cfg.loss_cispo_max_ratio)
    if cfg.policy_loss == "sapo":
        pos, neg = cfg.loss_sapo_temperatures
        return SAPO(temperature_pos=pos, temperature_neg=neg)
    if cfg.policy_loss == "vespo":
        return VESPO(**cfg.loss_vespo_options)
    return Clip()


def policy_loss(model, batch: Batch, cfg: GRPOLambdaConfig, *, old_logprobs=None, ref_logprobs=None,
                num_items_in_batch=None, entropy_coef: Optional[float] = None):
    """The GRPO(-λ) loss of `model` on `batch` from hidden states and the LM head → (loss, metrics).

    `entropy_coef`: the fused loss's coefficient of the entropy bonus over `batch`'s trained tokens (the loss tokens,
    or those top_entropy_quantile keeps); None = cfg.entropy_coef, `batch` being the whole update (a micro-batch's
    is from `entropy_coefficients`)."""
    hidden = completion_hidden(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                               batch.attention_mask)
    weight, bias = lm_head(model)
    temperature, softcap = head_temperature(model, cfg.temperature), head_softcap(model)
    weights, keep = batch.policy_weights, None
    if cfg.top_entropy_quantile < 1.0:
        keep = high_entropy_mask(hidden, weight, bias, batch, temperature, softcap, cfg)
        weights = keep if weights is None else weights * keep
    return fused_grpo_lambda_loss(
        hidden, weight, batch.completion_ids, batch.loss_mask, batch.advantages, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, bias=bias, temperature=temperature,
        softcap=softcap, trace=cfg.loss_trace, lam=cfg.lam, gamma=cfg.gamma,
        adv_clamp_min=cfg.loss_adv_clamp_min, policy_weights=weights,
        epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, dual_clip=cfg.delta, beta=cfg.beta,
        loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level, policy_loss=policy_term(cfg),
        max_completion_length=cfg.max_completion_length, num_items_in_batch=num_items_in_batch,
        return_entropy=True, kl_bias_correction=cfg.kl_bias_correction, impl=cfg.impl,
        entropy_coef=cfg.entropy_coef if entropy_coef is None else entropy_coef, entropy_weights=keep)


@torch.no_grad()
def high_entropy_mask(hidden, weight, bias, batch: Batch, temperature: float, softcap, cfg: GRPOLambdaConfig):
    """TRL's `top_entropy_quantile` mask as policy weights [B, T] fp32: 1 where a loss token's entropy is at least
    the (1 − q)-quantile of the micro-batch's loss tokens' (linearly interpolated, as TRL's torch.quantile), else 0.
    The entropies come from a log-prob pass of their own (2·N·H·V FLOPs more): the fused loss needs the mask before
    its one pass. No host sync: padding enters the quantile as NaN, which nanquantile skips (all padding: a NaN
    threshold, which no entropy reaches)."""
    real = batch.loss_mask != 0
    _, entropies = linear_logprobs(hidden.detach(), weight.detach(), batch.completion_ids,
                                   bias=None if bias is None else bias.detach(), temperature=temperature,
                                   softcap=softcap, return_entropy=True, impl=cfg.impl, mask=batch.loss_mask)
    threshold = torch.nanquantile(torch.where(real, entropies.float(), torch.nan), 1 - cfg.top_entropy_quantile)
    return ((entropies >= threshold) & real).to(torch.float32)


def micro_batches(batch: Batch, cfg: GRPOLambdaConfig) -> list[slice]:
    """The row slices of `batch` that one forward/backward takes at a time."""
    size = cfg.per_device_train_batch_size
    return [slice(s, s + size) for s in range(0, len(batch), size)]


@torch.no_grad()
def batch_logprobs(model, batch: Batch, chunks: list[slice], cfg: GRPOLambdaConfig) -> torch.Tensor:
    """Per-token log-probs [B, T] of the completions under `model` (no grad), micro-batch by micro-batch."""
    out = []
    for sl in chunks:
        mb = batch.select(sl)
        out.append(completion_logprobs(model, mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.attention_mask,
                                       temperature=cfg.temperature, impl=cfg.impl))
    return torch.cat(out)


def micro_batch_weights(loss_mask: torch.Tensor, chunks: list[slice], loss_type: str) -> list:
    """Per micro-batch factor that makes the sum of micro-batch losses the whole batch's loss, for any sizes.

    dapo gets the batch's token count as num_items_in_batch (factor 1); the library normalises each micro-batch
    by its own rows (grpo, dr_grpo, luspo) or tokens (bnpo), so those are rescaled by the micro-batch's share of them.
    """
    if loss_type == "dapo":
        return [1.0] * len(chunks)
    if loss_type == "bnpo":
        tokens = loss_mask.sum(dim=1).to(torch.float32)
        total = tokens.sum().clamp(min=1.0)
        return [tokens[sl].sum().clamp(min=1.0) / total for sl in chunks]  # each chunk divides by max(Σm, 1)
    rows = loss_mask.shape[0]
    return [(min(sl.stop, rows) - sl.start) / rows for sl in chunks]


def entropy_coefficients(loss_mask: torch.Tensor, chunks: list[slice], weights: list, coef: float) -> list[float]:
    """Per micro-batch `entropy_coef` of the fused loss that makes the micro-batches' bonuses, each multiplied by its
    loss weight (`micro_batch_weights`), the update's: −coef × the entropy's token mean over the batch's loss tokens.

    The fused loss takes a micro-batch's own token mean, Σ m·w·H / max(Σ m·w, 1) (w: the top-entropy mask, else 1);
    the micro-batch's share of the batch's loss tokens is bnpo's loss weight, so it gets coef × that share / its own
    loss weight: coef with bnpo, coef × its token share with dapo (weight 1), whatever loss_type (the bonus is a token
    mean in all). With top_entropy_quantile < 1 each micro-batch's mean is over the tokens its own quantile keeps,
    weighted by its loss tokens. One host read per update (none when coef is 0)."""
    if coef == 0:
        return [0.0] * len(chunks)
    shares = micro_batch_weights(loss_mask, chunks, "bnpo")
    return [coef * r for r in torch.stack([share / weight for share, weight in zip(shares, weights)]).tolist()]


def _finite_or_none(v):
    v = float(v)
    return v if math.isfinite(v) else None


class GRPOLambdaTrainer:
    """Holds the model(s), optimiser, data and output folder; `train()` runs the loop."""

    def __init__(self, cfg: GRPOLambdaConfig, backend_factory=None):
        """`backend_factory(model, tokenizer, cfg) -> GenerationBackend` plugs in another generation backend."""
        self.cfg = cfg.validate("train")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.output_dir)
        # Everything that can be wrong with the configuration fails here, before any model work.
        self.rewards = RewardSet(cfg.reward_funcs, cfg.reward_weights)
        self.eval_reward = eval_reward_set(cfg)
        self.train_rows, self.eval_rows = load_datasets(cfg)
        self.resume_path = ckpt.find_checkpoint(self.out, cfg.resume) if cfg.resume else None

        self.metrics_path = self.out / "metrics.jsonl"
        earlier_run = self.metrics_path.exists() or ckpt.checkpoint_root(self.out).exists()
        if self.resume_path is None and earlier_run and not cfg.overwrite_output_dir:
            # never delete an interrupted run's checkpoints because --resume was forgotten
            resumable = "Pass --resume latest to continue it, " if ckpt.list_checkpoints(self.out) else (
                "It has no checkpoint to resume: pass ")
            raise ConfigError(
                f"output_dir {str(self.out)!r} already holds an earlier run (metrics.jsonl or checkpoints/); got no "
                f"--resume. {resumable}--overwrite_output_dir true to start over there, or choose another "
                "--output_dir.")
        if self.resume_path is not None:
            self._check_resumable(len(self.train_rows))
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume_path is None:  # a new run owns the folder's run files
            shutil.rmtree(ckpt.checkpoint_root(self.out), ignore_errors=True)
            self.metrics_path.unlink(missing_ok=True)
        else:
            ckpt.remove_partial_saves(self.out)
            self._warn_config_changes()
        cfg.save_yaml(self.out / "config.yaml", resume=None)  # (what the run is; resuming it is not an option of it)

        self.model, self.tokenizer = load_policy(cfg, path=str(self.resume_path) if self.resume_path else None)
        self.model.train()
        self.backend = backend_factory(self.model, self.tokenizer, cfg) if backend_factory else self._make_backend()
        self.sampler = PromptSampler(len(self.train_rows), cfg.seed)
        self.updates_per_step = cfg.num_iterations
        total_updates = cfg.max_steps * self.updates_per_step
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=math.ceil(cfg.warmup_ratio * total_updates),
                                       num_training_steps=total_updates)
        self.ref_model = None
        self.start_step = 0
        self.eval_before: dict | None = None

    # ------------------------------------------------------------------ set-up pieces
    def _make_backend(self):
        cfg = self.cfg
        if cfg.use_vllm:
            init = self.out / "vllm_init"
            save_pretrained(self.model, self.tokenizer, init)
            return VLLMGenerationBackend(str(init), self.tokenizer, max_prompt_length=cfg.max_prompt_length,
                                         max_completion_length=cfg.max_completion_length, dtype=cfg.model_dtype,
                                         seed=cfg.seed)
        return HFGenerationBackend(self.model, self.tokenizer, max_prompt_length=cfg.max_prompt_length,
                                   max_completion_length=cfg.max_completion_length)

    def _check_resumable(self, n_rows: int):
        """Checkpoint and options must belong together: the same data and seed (exact resume), and the warm-up's
        reference model where the KL needs it (kept beside the checkpoints of the run that wrote them)."""
        sampler = json.loads((self.resume_path / "trainer_state.json").read_text())["sampler"]
        if (sampler["n_rows"], sampler["seed"]) != (n_rows, self.cfg.seed):
            raise ConfigError(f"seed and data must be the checkpoint's to resume it: {sampler['n_rows']} training "
                              f"rows and seed {sampler['seed']}; got {n_rows} rows and seed {self.cfg.seed}. Resume "
                              "with the interrupted run's --seed and dataset options (its config.yaml).")
        sft = self._sft_model_dir()
        if self.cfg.beta > 0 and self.cfg.sft_warmup_steps > 0 and not sft.is_dir():
            raise ConfigError(f"resume needs the warm-up model the KL is measured against, {str(sft)!r}, beside the "
                              f"checkpoints of the run that wrote {str(self.resume_path)!r}; got no such folder. "
                              "Keep that run's folder whole.")

    def _sft_model_dir(self) -> Path:
        """The warm-up result of this run, or of the run whose checkpoint it resumes (possibly another folder)."""
        if self.resume_path is None:
            return self.out / "sft_model"
        return self.resume_path.parent.parent / "sft_model"  # <run>/checkpoints/checkpoint-k

    def _warn_config_changes(self):
        saved = self.out / "config.yaml"
        if not saved.is_file():
            return
        import yaml

        before = yaml.safe_load(saved.read_text()) or {}
        # an option the interrupted run's config.yaml lacks (added to the trainer since) ran at its default
        defaults = {f.name: f.default for f in fields(self.cfg) if f.default is not MISSING}
        changed = [k for k, v in self.cfg.to_dict().items()
                   if k != "resume" and (k in before or k in defaults) and before.get(k, defaults.get(k)) != v]
        if changed:
            self._print(f"warning: resuming with options that differ from the interrupted run: {changed}; "
                        "the continuation will not reproduce an uninterrupted run")

    def _load_reference(self):
        """The frozen policy at the start of RL: the warm-up result, else the initial model."""
        cfg = self.cfg
        if self.resume_path is None:
            ref = copy.deepcopy(self.model)
        elif cfg.sft_warmup_steps > 0:
            ref, _ = load_policy(cfg, path=str(self._sft_model_dir()))
        else:
            ref, _ = load_policy(cfg)
        ref.eval()
        ref.requires_grad_(False)
        return ref

    def _prepare(self):
        """Warm-up + evaluation before RL on a new run; optimizer/scheduler/RNG/sampler state on a resume."""
        cfg = self.cfg
        if self.resume_path is None:
            if cfg.sft_warmup_steps > 0:
                sft_warmup(self.model, self.tokenizer, self.train_rows, cfg)
                save_pretrained(self.model, self.tokenizer, self.out / "sft_model")
                self.backend.sync_weights(self.model)  # a vLLM engine was built from the weights before warm-up
            self.eval_before = evaluate_rows(self.backend, self.eval_rows, cfg, self.eval_reward)
            self._print(f"before RL: {format_result(self.eval_before)}")
        else:
            state = ckpt.load_training_state(self.resume_path, self.optimizer, self.scheduler)
            self.sampler.load_state_dict(state["sampler"])
            self.start_step, self.eval_before = state["step"], state["eval_before"]
            self._truncate_metrics(self.start_step)
            self._print(f"resumed from {self.resume_path} at step {self.start_step}")
        if cfg.beta > 0:
            self.ref_model = self._load_reference()

    def _truncate_metrics(self, step: int):
        if not self.metrics_path.exists():
            return
        lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
        if lines:  # a kill in the middle of a write leaves a torn last line: drop it
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                lines.pop()
        keep = [ln for ln in lines if json.loads(ln)["step"] <= step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def _print(self, msg: str):
        tqdm.write(msg)

    # ------------------------------------------------------------------ one RL step
    def rl_step(self, step: int) -> dict:
        """Generate, score, and apply `num_iterations` updates; return the step's metrics (TRL names)."""
        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        rows = [self.train_rows[i] for i in self.sampler.next_indices(cfg.prompts_per_step)]
        gen = self.backend.generate([r["prompt"] for r in rows], G, temperature=cfg.temperature, top_p=cfg.top_p)
        rep_rows = [r for r in rows for _ in range(G)]
        rewards, per_func = self.rewards([r["prompt"] for r in rep_rows], gen.texts, rep_rows)
        advantages = group_advantages(rewards, G, scale=cfg.scale_rewards)

        group_std = rewards.view(-1, G).std(dim=1)
        zero_std = rewards.view(-1, G).amax(1) == rewards.view(-1, G).amin(1)
        lengths = gen.completion_mask.sum(1).float()
        metrics = {"step": step + 1, "reward": rewards.mean().item(), "reward_std": group_std.mean().item()}
        for name, col in zip(self.rewards.short_names, per_func.T):
            metrics[f"rewards/{name}/mean"] = _finite_or_none(torch.nanmean(col))
        metrics.update({"frac_reward_zero_std": zero_std.float().mean().item(),
                        "completions/mean_length": lengths.mean().item(),
                        "completions/clipped_ratio": gen.truncated.float().mean().item()})

        loss_mask = gen.completion_mask.clone()
        if cfg.mask_truncated_completions:
            loss_mask[gen.truncated] = 0
        batch = Batch(gen.prompt_ids, gen.prompt_mask, gen.completion_ids, gen.completion_mask, loss_mask,
                      advantages, gen.sampling_logprobs).to(self.model.device)  # rewards, advantages: on the CPU
        if cfg.dynamic_sampling:
            batch = batch.select((~zero_std).repeat_interleave(G).nonzero().squeeze(1).to(self.model.device))
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's (first) update uses
        update = self._update(batch) if len(batch) else {"loss": None, "grad_norm": None, "skipped": 0}
        metrics.update(update)
        metrics["learning_rate"] = lr
        self.backend.sync_weights(self.model)
        metrics["step_time"] = time.perf_counter() - t0
        return metrics

    def _update(self, batch: Batch) -> dict:
        cfg, model = self.cfg, self.model
        chunks = micro_batches(batch, cfg)
        correct = cfg.vllm_importance_sampling_correction and batch.sampling_logprobs is not None
        old_logprobs = batch_logprobs(model, batch, chunks, cfg) if cfg.num_iterations > 1 or correct else None
        is_metrics = {}
        if correct:  # TRL's vLLM importance sampling: weights of each token's policy term (not of the KL)
            is_weights, is_metrics = vllm_importance_weights(
                old_logprobs, batch.sampling_logprobs, batch.loss_mask, mode=cfg.vllm_importance_sampling_mode,
                clip_min=cfg.vllm_importance_sampling_clip_min, clip_max=cfg.vllm_importance_sampling_clip_max)
            batch = replace(batch, policy_weights=is_weights.expand(batch.loss_mask.shape).contiguous())
        if cfg.num_iterations == 1:
            old_logprobs = None  # on-policy: the fused loss's one-pass path (ratio exactly 1)
        ref_logprobs = batch_logprobs(self.ref_model, batch, chunks, cfg) if self.ref_model is not None else None
        num_items = batch.loss_mask.sum().clamp(min=1) if cfg.loss_type == "dapo" else None
        weights = micro_batch_weights(batch.loss_mask, chunks, cfg.loss_type)
        entropy_coefs = entropy_coefficients(batch.loss_mask, chunks, weights, cfg.entropy_coef)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        skipped = 0

        # TRL's per-sequence clip extremes are undefined for a micro-batch without loss tokens (NaN there, which
        # `add` skips, as TRL's logging drops NaN), not 0; at the sequence level they range over every sequence, one
        # without tokens included (unclipped, 0), as TRL's do. (Only the clipped ratio has them: the metrics are
        # whatever the loss returns for the policy term, cispo's cispo_clip_ratio, none of the clip ones for sapo
        # and vespo, which has its vespo/phi_seq_mean.)
        per_sequence = ("clip_ratio/low_min", "clip_ratio/high_max")
        token_level = cfg.importance_sampling_level == "token"

        def add(key, value):
            if value is not None and math.isfinite(value):
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1

        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            # loss and metrics stay on the device until the update is decided: one host sync of the trainer's per
            # update (the library adds one per fused-loss call, its token-id check)
            loss_total, per_chunk, names = 0.0, [], []
            for sl, weight, entropy_coef in zip(chunks, weights, entropy_coefs):
                loss, m = policy_loss(
                    model, batch.select(sl), cfg, num_items_in_batch=num_items,
                    old_logprobs=None if old_logprobs is None else old_logprobs[sl],
                    ref_logprobs=None if ref_logprobs is None else ref_logprobs[sl], entropy_coef=entropy_coef)
                loss = loss * weight
                loss.backward()  # a non-finite loss makes a non-finite gradient: the update is skipped below
                loss_total = loss_total + loss.detach()
                names = list(m)
                values = {k: v.detach().float() for k, v in m.items()}
                if token_level:
                    has_tokens = batch.loss_mask[sl].sum() > 0
                    values.update({k: torch.where(has_tokens, values[k], torch.nan) for k in per_sequence
                                   if k in values})
                per_chunk.append(torch.stack(list(values.values())))
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            loss_value, norm_value, *metric_values = torch.cat(
                [torch.stack([loss_total.float(), grad_norm.float()]), torch.stack(per_chunk).flatten()]).tolist()
            for i, value in enumerate(metric_values):
                add(names[i % len(names)], value)
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):  # zero_grad below: weights unchanged
                skipped += 1
                self._print(f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'}: update skipped, "
                            "weights unchanged")
            else:
                self.optimizer.step()
                self.scheduler.step()  # like AMP's skipped steps, a skipped update does not advance the schedule
                add("loss", loss_value)
                add("grad_norm", norm_value)
            self.optimizer.zero_grad(set_to_none=True)

        out = {k: sums[k] / counts[k] for k in sums}
        if is_metrics:  # (one host sync for the five)
            out.update(zip(is_metrics, torch.stack(list(is_metrics.values())).tolist()))
        out.setdefault("loss", None)
        out.setdefault("grad_norm", None)
        out.pop("ratio_mean", None)
        out["skipped"] = skipped
        return out

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        cfg = self.cfg
        self._prepare()
        bar = tqdm(total=cfg.max_steps, initial=self.start_step, desc=f"{cfg.algorithm}", disable=cfg.disable_tqdm,
                   dynamic_ncols=True)
        with open(self.metrics_path, "a") as log:
            for step in range(self.start_step, cfg.max_steps):
                metrics = self.rl_step(step)
                log.write(json.dumps({k: (_finite_or_none(v) if isinstance(v, float) else v)
                                      for k, v in metrics.items()}) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}",
                                kl=f"{metrics['kl']:.4f}" if metrics.get("kl") is not None else "-",
                                step_time=f"{metrics['step_time']:.2f}s")
                if cfg.disable_tqdm and ((step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.max_steps):
                    self._print(json.dumps(metrics))
                if cfg.save_steps and (step + 1) % cfg.save_steps == 0:
                    ckpt.save_checkpoint(self.out, step + 1, self.model, self.tokenizer, self.optimizer,
                                         self.scheduler, {"sampler": self.sampler.state_dict(),
                                                          "eval_before": self.eval_before},
                                         cfg.save_total_limit)
        bar.close()
        return self._finish()

    def _finish(self) -> dict:
        cfg = self.cfg
        save_pretrained(self.model, self.tokenizer, self.out / "final")
        plot_reward_curve(self.metrics_path, self.out / "reward_curve.png",
                          title=f"{cfg.algorithm} (trace={cfg.loss_trace}, λ={cfg.lam})")
        self.model.eval()
        after = evaluate_rows(self.backend, self.eval_rows, cfg, self.eval_reward)
        summary = {"before_rl": self.eval_before, "after_rl": after}
        (self.out / "eval_results.json").write_text(json.dumps(summary, indent=1))
        self._print(f"before RL: {format_result(self.eval_before)}")
        self._print(f"after RL:  {format_result(after)}")
        return summary


def train(cfg: GRPOLambdaConfig) -> dict:
    """Run a full training job (`grpo-lambda train`); returns {'before_rl': ..., 'after_rl': ...}."""
    with quiet_transformers():
        return GRPOLambdaTrainer(cfg).train()
