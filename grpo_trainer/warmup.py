"""Supervised warm-up: a few steps of next-token training on (prompt, answer) so RL starts from a policy that is
sometimes right (GRPO learns nothing from groups that are all wrong).

The loss is the mean negative log-prob of the answer tokens and EOS, computed by `linear_logprobs` on hidden
states, like the RL loss (no [B, T, V] logits).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import GRPOLambdaConfig
from .generation import tokenize_prompts
from .model import completion_logprobs


def encode_answers(tokenizer, answers: list[str]):
    """Right-padded answer ids followed by EOS, and their mask."""
    rows = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def sft_loss(model, tokenizer, rows: list[dict], cfg: GRPOLambdaConfig) -> torch.Tensor:
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [r["prompt"] for r in rows], cfg.max_prompt_length)
    ids, mask = encode_answers(tokenizer, [r["answer"] for r in rows])
    prompt_ids, prompt_mask, ids, mask = (t.to(model.device) for t in (prompt_ids, prompt_mask, ids, mask))
    logp = completion_logprobs(model, prompt_ids, prompt_mask, ids, mask, temperature=1.0, impl=cfg.impl)
    m = mask.to(logp.dtype)
    return -(logp * m).sum() / m.sum()


def sft_warmup(model, tokenizer, train_rows: list[dict], cfg: GRPOLambdaConfig) -> list[float]:
    """Run cfg.sft_warmup_steps AdamW steps (seeded batches); return the loss per step."""
    if cfg.sft_warmup_steps == 0:
        return []
    rng = np.random.default_rng([cfg.seed, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.sft_warmup_steps // 10)))
    model.train()
    losses = []
    bar = tqdm(range(cfg.sft_warmup_steps), desc="SFT warm-up", disable=cfg.disable_tqdm, dynamic_ncols=True)
    for _ in bar:
        batch = [train_rows[i] for i in rng.integers(0, len(train_rows), cfg.sft_batch_size)]
        loss = sft_loss(model, tokenizer, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
