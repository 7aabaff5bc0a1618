"""Generation backends behind one small interface: Hugging Face `generate` (default) and vLLM (optional).

A backend turns prompts into G completions each and returns token tensors laid out for the loss: prompts
left-padded, completions right-padded, the G completions of a prompt adjacent (TRL's layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Generation:
    prompt_ids: torch.Tensor        # [B, P] left-padded
    prompt_mask: torch.Tensor       # [B, P]
    completion_ids: torch.Tensor    # [B, T] right-padded with pad_token_id after EOS
    completion_mask: torch.Tensor   # [B, T] 1 up to and including EOS
    truncated: torch.Tensor         # [B] bool: no EOS within max_new_tokens
    texts: list[str]                # decoded completions (special tokens removed)


class GenerationBackend(Protocol):
    def generate(self, prompts: list[str], num_generations: int, *, greedy: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0) -> Generation:
        """Return num_generations completions per prompt (B = len(prompts) · num_generations rows)."""

    def sync_weights(self, model) -> None:
        """Make the backend sample from the current weights of `model` (a no-op when it shares them)."""


def tokenize_prompts(tokenizer, prompts: list[str], max_prompt_length: int):
    enc = tokenizer(prompts, padding=True, truncation=True, max_length=max_prompt_length, return_tensors="pt",
                    add_special_tokens=True)
    return enc["input_ids"], enc["attention_mask"]


def finish_completions(tokens: torch.Tensor, eos_id: int, pad_id: int):
    """Cut each row after its first EOS: (ids with pad after EOS, mask incl. EOS, truncated[B])."""
    is_eos = tokens == eos_id
    has_eos = is_eos.any(dim=1)
    T = tokens.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, T, dtype=torch.long))
    mask = torch.arange(T, device=tokens.device).unsqueeze(0) <= first.unsqueeze(1)
    ids = torch.where(mask, tokens, torch.full_like(tokens, pad_id))
    return ids, mask.long(), ~has_eos


class HFGenerationBackend:
    """`model.generate` on the policy itself (weights are shared, so nothing to sync)."""

    def __init__(self, model, tokenizer, *, max_prompt_length: int, max_completion_length: int):
        self.model, self.tokenizer = model, tokenizer
        self.max_prompt_length, self.max_completion_length = max_prompt_length, max_completion_length

    @torch.no_grad()
    def generate(self, prompts, num_generations, *, greedy=False, temperature=1.0, top_p=1.0) -> Generation:
        from transformers import GenerationConfig

        tok = self.tokenizer
        prompt_ids, prompt_mask = tokenize_prompts(tok, prompts, self.max_prompt_length)
        prompt_ids, prompt_mask = prompt_ids.to(self.model.device), prompt_mask.to(self.model.device)
        prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
        gen_cfg = GenerationConfig(
            max_new_tokens=self.max_completion_length, do_sample=not greedy, temperature=temperature if not greedy
            else None, top_p=top_p if not greedy else None, top_k=0 if not greedy else None,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg)
        self.model.train(was_training)
        completion_ids, completion_mask, truncated = finish_completions(
            out[:, prompt_ids.shape[1]:], tok.eos_token_id, tok.pad_token_id)
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        return Generation(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, texts)

    def sync_weights(self, model) -> None:
        self.model = model


class VLLMGenerationBackend:
    """vLLM generation (GPU, optional extra). Weights are pushed into the engine after every update.

    Experimental: written against vLLM's offline `LLM` API; not exercised by the CPU test suite.
    """

    def __init__(self, model_path: str, tokenizer, *, max_prompt_length: int, max_completion_length: int,
                 gpu_memory_utilization: float = 0.3):
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError("use_vllm=True needs vLLM: pip install 'lambda-kernels[vllm]' (it pins its own CUDA "
                               "torch). Set use_vllm=false to generate with transformers.") from None
        self.tokenizer = tokenizer
        self.max_prompt_length, self.max_completion_length = max_prompt_length, max_completion_length
        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization, dtype="bfloat16")

    def generate(self, prompts, num_generations, *, greedy=False, temperature=1.0, top_p=1.0) -> Generation:
        from vllm import SamplingParams

        tok = self.tokenizer
        params = SamplingParams(n=num_generations, temperature=0.0 if greedy else temperature,
                                top_p=1.0 if greedy else top_p, max_tokens=self.max_completion_length)
        prompt_ids, prompt_mask = tokenize_prompts(tok, prompts, self.max_prompt_length)
        token_prompts = [{"prompt_token_ids": [t for t, m in zip(ids.tolist(), mk.tolist()) if m]}
                         for ids, mk in zip(prompt_ids, prompt_mask)]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        rows = [list(c.token_ids) for o in outputs for c in o.outputs]
        T = max(1, max(len(r) for r in rows))
        tokens = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        completion_ids, completion_mask, truncated = finish_completions(tokens, tok.eos_token_id, tok.pad_token_id)
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        return Generation(prompt_ids.repeat_interleave(num_generations, 0),
                          prompt_mask.repeat_interleave(num_generations, 0),
                          completion_ids, completion_mask, truncated, texts)

    def sync_weights(self, model) -> None:
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights(model.state_dict().items())
