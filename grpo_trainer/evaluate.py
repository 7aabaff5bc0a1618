"""Held-out evaluation: greedy accuracy and pass@1 averaged over n samples (both reported, always labelled).

Accuracy is the mean of a 0/1 reward (`eval_reward`) over problems; a None reward counts as wrong. Sampling runs
under a forked, seeded torch RNG, so evaluating never shifts the training run's random stream.
"""
from __future__ import annotations

import json
import time

import torch

from .config import GRPOLambdaConfig
from .rewards import RewardSet


def eval_reward_name(cfg: GRPOLambdaConfig) -> str:
    if cfg.eval_reward != "auto":
        return cfg.eval_reward
    return "arithmetic" if cfg.dataset == "arithmetic" and cfg.eval_dataset in (None, "arithmetic") else "math"


def eval_reward_set(cfg: GRPOLambdaConfig) -> RewardSet:
    """The accuracy reward, resolved (and so checked) when the trainer is built, before any model work."""
    return RewardSet([eval_reward_name(cfg)], None, option="eval_reward")


def _score(reward: RewardSet, rows, prompts, texts, repeat) -> list[float]:
    """Rewards of `repeat` completions per row (a None reward counts 0: RewardSet's NaN-aware sum)."""
    total, _ = reward([p for p in prompts for _ in range(repeat)], texts, [r for r in rows for _ in range(repeat)])
    return total.tolist()


@torch.no_grad()
def evaluate_rows(backend, rows: list[dict], cfg: GRPOLambdaConfig, reward: RewardSet) -> dict:
    """{'accuracy_greedy', 'pass@1' (if cfg.eval_samples > 0), counts and sampling settings} on `rows`."""
    name = reward.names[0]
    samples = cfg.eval_samples
    start = time.perf_counter()
    greedy, sampled = [], []
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 1)
        for i in range(0, len(rows), cfg.eval_batch_size):
            chunk = rows[i:i + cfg.eval_batch_size]
            prompts = [r["prompt"] for r in chunk]
            out = backend.generate(prompts, 1, greedy=True)
            greedy += _score(reward, chunk, prompts, out.texts, 1)
            if samples > 0:
                out = backend.generate(prompts, samples, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p)
                sampled += _score(reward, chunk, prompts, out.texts, samples)
    result = {"n_problems": len(rows), "eval_reward": name, "accuracy_greedy": sum(greedy) / max(len(greedy), 1)}
    if samples > 0:
        result.update({"pass@1": sum(sampled) / max(len(sampled), 1), "pass@1_samples": samples,
                       "pass@1_temperature": cfg.eval_temperature, "pass@1_top_p": cfg.eval_top_p})
    result["eval_time"] = time.perf_counter() - start
    return result


def format_result(result: dict) -> str:
    s = f"greedy accuracy {100 * result['accuracy_greedy']:.1f}%"
    if "pass@1" in result:
        s += (f", pass@1 {100 * result['pass@1']:.1f}% (mean of {result['pass@1_samples']} samples at "
              f"T={result['pass@1_temperature']}, top-p {result['pass@1_top_p']})")
    return s + f" on {result['n_problems']} held-out problems"


def run_evaluate(cfg: GRPOLambdaConfig) -> dict:
    """`grpo-lambda evaluate`: score the checkpoint cfg.model_name_or_path on the held-out rows."""
    from .data import load_datasets
    from .generation import HFGenerationBackend
    from .model import load_policy

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    reward = eval_reward_set(cfg)  # a bad eval_reward fails before the model loads
    _, held = load_datasets(cfg, need_train=False)
    model, tokenizer = load_policy(cfg)
    model.eval()
    backend = HFGenerationBackend(model, tokenizer, max_prompt_length=cfg.max_prompt_length,
                                  max_completion_length=cfg.max_completion_length)
    result = {"model": cfg.model_name_or_path, "dataset": cfg.eval_dataset or cfg.dataset,
              **evaluate_rows(backend, held, cfg, reward)}
    print(format_result(result))
    print(json.dumps(result))
    return result
