"""Generation backends behind one small interface: Hugging Face `generate` (default) and vLLM (optional).

A backend turns prompts into G completions each and returns token tensors laid out for the loss: prompts
left-padded, completions right-padded, the G completions of a prompt adjacent (TRL's layout).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional, Protocol

import torch


@dataclass
class Generation:
    prompt_ids: torch.Tensor        # [B, P] left-padded
    prompt_mask: torch.Tensor       # [B, P]
    completion_ids: torch.Tensor    # [B, T] right-padded with pad_token_id after EOS
    completion_mask: torch.Tensor   # [B, T] 1 up to and including the first stop token (`stop_token_ids`)
    truncated: torch.Tensor         # [B] bool: no EOS within max_new_tokens
    texts: list[str]                # decoded completions (special tokens removed)
    # [B, T] fp32: log-prob of each sampled token under the distribution it was sampled from, as the sampler computed
    # it (vLLM: after temperature), 0 at padding, NaN where the sampler gave none; None when the backend samples from
    # the policy itself (HF) or decoded greedily. The trainer's importance-sampling correction reads it.
    sampling_logprobs: Optional[torch.Tensor] = None


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


def stop_token_ids(tokenizer, generation_eos) -> set[int]:
    """The ids a completion ends at: the tokenizer's EOS and every `eos_token_id` of the model's generation config
    (an int, a list or None; e.g. Qwen2.5-Instruct's <|im_end|> and <|endoftext|>, Llama 3.1's three), as vLLM stops
    (TRL's eos_token_ids). Both backends use them, so a completion ends at the same token whichever generates it."""
    extra = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    return {i for i in (tokenizer.eos_token_id, *extra) if i is not None}


def finish_completions(tokens: torch.Tensor, stop_ids, pad_id: int):
    """Cut each row after its first stop token (any of `stop_ids`): (ids with pad after it, mask including it,
    truncated[B]: no stop token)."""
    is_eos = torch.isin(tokens, torch.tensor(sorted(stop_ids), dtype=tokens.dtype, device=tokens.device))
    has_eos = is_eos.any(dim=1)
    T = tokens.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, T, dtype=torch.long))
    mask = torch.arange(T, device=tokens.device).unsqueeze(0) <= first.unsqueeze(1)
    ids = torch.where(mask, tokens, torch.full_like(tokens, pad_id))
    return ids, mask.long(), ~has_eos


class HFGenerationBackend:
    """`model.generate` on the policy itself (weights are shared, so nothing to sync). A completion ends at the
    tokenizer's EOS or at an `eos_token_id` of the model's generation config (`stop_token_ids`), as vLLM's do."""

    def __init__(self, model, tokenizer, *, max_prompt_length: int, max_completion_length: int):
        self.model, self.tokenizer = model, tokenizer
        self.max_prompt_length, self.max_completion_length = max_prompt_length, max_completion_length
        generation_config = getattr(model, "generation_config", None)
        self.stop_ids = stop_token_ids(tokenizer, getattr(generation_config, "eos_token_id", None))

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
            pad_token_id=tok.pad_token_id, eos_token_id=sorted(self.stop_ids), bos_token_id=tok.bos_token_id)
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg)
        self.model.train(was_training)
        completion_ids, completion_mask, truncated = finish_completions(
            out[:, prompt_ids.shape[1]:], self.stop_ids, tok.pad_token_id)
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        return Generation(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, texts)

    def sync_weights(self, model) -> None:
        self.model = model


class VLLMGenerationBackend:
    """vLLM generation in the training process (TRL's "colocate" mode), an optional extra for GPUs.

    The engine is built from a folder holding the policy (`model_path`), in the policy's dtype (`dtype`: vLLM's
    "auto" would sample an fp32 policy in bf16), with max_model_len = max_prompt_length + max_completion_length,
    in-process (`distributed_executor_backend="external_launcher"`, as TRL), so `sync_weights` can reach its model.
    One request per completion, each with its own seed drawn from torch's RNG (which the trainer seeds and
    checkpoints): runs sample alike up to the GPU's non-determinism, and evaluation (under a forked RNG) shifts
    nothing. A completion ends where vLLM stopped it, at the tokenizer's EOS or an `eos_token_id` of the model's
    generation config (the mask includes it); `truncated` rows end at max_completion_length without one (TRL's rule).
    Sampled (not greedy) rows also return the log-prob vLLM sampled each token with (`SamplingParams(logprobs=0)`,
    the engine built with `logprobs_mode="processed_logprobs"` as TRL builds it, so that they are of the tempered
    distribution the trainer's log-probs use; with top_p < 1, of the renormalised nucleus, as TRL's; the fake vLLM of
    the tests does not model top_p), as `Generation.sampling_logprobs`.

    Tested on the CPU against a fake `vllm` module with the offline `LLM` API of vLLM 0.22-0.31 (the versions TRL
    1.16 supports) as TRL uses it (tests/test_vllm_backend.py); not run against a real vLLM, nor on a GPU.
    """

    def __init__(self, model_path: str, tokenizer, *, max_prompt_length: int, max_completion_length: int,
                 dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.3):
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError("use_vllm=True needs vLLM: pip install 'lambda-kernels[vllm]' (it pins its own CUDA "
                               "torch). Set use_vllm=false to generate with transformers.") from None
        from transformers import GenerationConfig

        self.tokenizer = tokenizer
        self.max_prompt_length, self.max_completion_length = max_prompt_length, max_completion_length
        try:  # vLLM stops at these too (TRL's eos_token_ids)
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:
            eos = None
        self.stop_ids = stop_token_ids(tokenizer, eos)
        # external_launcher runs the engine in this process, as a one-rank torch.distributed job
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "localhost")):
            os.environ.setdefault(key, value)
        if not os.environ.get("MASTER_PORT"):
            with socket.socket() as s:
                s.bind(("", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        max_model_len = max_prompt_length + max_completion_length
        # max_num_batched_tokens: TRL's 4096 (vLLM's larger default misleads its memory profiler)
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, distributed_executor_backend="external_launcher",
                       max_num_batched_tokens=max(4096, max_model_len),
                       # the sampled tokens' log-probs after temperature (vLLM's default is the raw distribution's)
                       logprobs_mode="processed_logprobs")

    def generate(self, prompts, num_generations, *, greedy=False, temperature=1.0, top_p=1.0) -> Generation:
        from vllm import SamplingParams

        tok = self.tokenizer
        prompt_ids, prompt_mask = tokenize_prompts(tok, prompts, self.max_prompt_length)
        prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
        B = prompt_ids.shape[0]
        seeds = [None] * B if greedy else torch.randint(0, 2**31 - 1, (B,)).tolist()
        # logprobs=0: the sampled token's log-prob only (a greedy row has no sampling distribution to correct for)
        params = [SamplingParams(n=1, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                 max_tokens=self.max_completion_length, seed=seed, logprobs=None if greedy else 0)
                  for seed in seeds]
        requests = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(prompt_ids, prompt_mask)]
        outputs = [out.outputs[0] for out in self.llm.generate(requests, params, use_tqdm=False)]
        rows = [list(o.token_ids) for o in outputs]
        T = max(1, max(len(r) for r in rows))
        completion_ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros((B, T), dtype=torch.long)
        for i, r in enumerate(rows):
            completion_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            completion_mask[i, :len(r)] = 1
        sampling_logprobs = None if greedy else sampled_logprobs(outputs, rows, T)
        # not vLLM's finish_reason: it says "length" when the stop token is the max_tokens-th
        truncated = torch.tensor([not r or r[-1] not in self.stop_ids for r in rows])
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        return Generation(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, texts,
                          sampling_logprobs)

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Load `model`'s parameters into the engine in place, under the Hugging Face names vLLM's `load_weights`
        maps (a tied LM head once, as the embedding), one live tensor at a time (no copy); then drop the prefix
        cache, whose KV came from the old weights."""
        if hasattr(model, "peft_config"):
            raise TypeError("sync_weights takes a plain Hugging Face model; got a PEFT model, whose parameter names "
                            "and unmerged adapters vLLM would not load. Merge it first (merge_and_unload()).")
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, param in model.named_parameters():  # (a torch.compile'd model's names carry _orig_mod.)
            engine_model.load_weights([(name.replace("_orig_mod.", ""), param.data)])
        self.llm.reset_prefix_cache()


def sampled_logprobs(outputs, rows: list[list[int]], T: int) -> torch.Tensor:
    """[B, T] fp32 log-probs of the sampled tokens from vLLM's CompletionOutputs, 0 at padding.

    Each output's `.logprobs` holds one dict per generated token, token id → Logprob (`.logprob`); with
    `logprobs=0` it has the sampled token only (with top-k ones, the sampled token is looked up by its id). A NaN
    stays NaN, as TRL keeps it (its correction then leaves that token's ratio at 1)."""
    out = torch.zeros((len(rows), T), dtype=torch.float32)
    for i, (o, r) in enumerate(zip(outputs, rows)):
        if o.logprobs is None or len(o.logprobs) != len(r):
            raise RuntimeError(f"vLLM returned {'no' if o.logprobs is None else len(o.logprobs)} per-token "
                               f"log-probs for a completion of {len(r)} tokens; asked for one per token "
                               "(SamplingParams(logprobs=0)).")
        out[i, :len(r)] = torch.tensor([float(lp[t].logprob) for lp, t in zip(o.logprobs, r)], dtype=torch.float32)
    return out
