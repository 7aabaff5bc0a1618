"""Models and tokenizers: a tiny Llama/Qwen2 built from a config with a character tokenizer made locally (fully
offline), or any Hugging Face causal LM; hidden states aligned with completion tokens; the LM head.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from .config import GRPOLambdaConfig

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and info logs (weights loading/saving) inside the trainer."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_char_tokenizer():
    """A character-level tokenizer over printable ASCII, built with `tokenizers` (no download).

    Encoding prepends <bos>; decoding concatenates characters; characters outside ASCII map to <unk>.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def _prepare_tokenizer(tokenizer):
    tokenizer.padding_side = "left"       # prompts are left-padded so completions start at one column
    tokenizer.truncation_side = "left"    # keep the end of long prompts (the question)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(cfg: GRPOLambdaConfig, tokenizer):
    """A tiny causal LM from `cfg` (seeded init), with tied input/output embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=max(128, cfg.max_prompt_length + cfg.max_completion_length),
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        if cfg.model_arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(**common))
        else:
            model = Qwen2ForCausalLM(Qwen2Config(**common))
    return model


def load_policy(cfg: GRPOLambdaConfig, path: str | None = None):
    """(model, tokenizer): from `path` / cfg.model_name_or_path if given, else the tiny model built from scratch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = path if path is not None else cfg.model_name_or_path
    with quiet_transformers():
        if source is None:
            tokenizer = _prepare_tokenizer(build_char_tokenizer())
            model = build_model(cfg, tokenizer)
        else:
            tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(source))
            # loaded straight in the training dtype: a bf16 checkpoint never takes an fp32 detour (2× its size)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, cfg.model_dtype))
    check_supported(model)
    return model.to(device=cfg.torch_device(), dtype=getattr(torch, cfg.model_dtype)), tokenizer


def logit_scale(model) -> float:
    """The factor the model applies to its head's output before the softmax, 1.0 for most models.

    Cohere multiplies by `logit_scale`, Muse Glimmer by `output_multiplier`, Falcon-H1 by `lm_head_multiplier`,
    HyperCLOVA X by `logits_scaling`; Granite and MiniCPM3 divide by `logits_scaling` (the list TRL's fused head
    applies). Read from the text config, so a vision-language model's language head counts too. The fused ops take
    it folded into the temperature: softmax(s·z / τ) = softmax(z / (τ/s)).
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(cfg, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(cfg, name, None) if scale is None else scale
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    scale = 1.0 if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"model_name_or_path must name a model whose logits are a positive multiple of "
                         f"hidden·Wᵀ (+ bias); got a logit scale of {scale} ({type(model).__name__}).")
    return scale


def check_supported(model) -> None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        raise ValueError(f"model_name_or_path must name a model whose logits are hidden·Wᵀ (+ bias), up to a scale; "
                         f"got final_logit_softcapping={cfg.final_logit_softcapping} ({type(model).__name__}), "
                         "which the fused loss does not apply.")
    logit_scale(model)


def head_temperature(model, temperature: float) -> float:
    """The temperature to give the fused ops on `model`'s hidden states: the sampling temperature with the model's
    logit scale folded in (so the log-probs are those of the distribution generation samples from)."""
    return temperature / logit_scale(model)


def save_pretrained(model, tokenizer, directory) -> None:
    """Model (safetensors) + config + tokenizer into `directory`."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias or None) of the output layer (tied to the input embeddings or not)."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """Final-layer hidden states aligned with the completion: out[:, t] predicts completion_ids[:, t].

    Runs the base model (no LM head, so no [B, T, V] logits) on prompt ⧺ completion; prompts are left-padded,
    completions right-padded, and position ids count real tokens only.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    return out.last_hidden_state[:, P - 1:P - 1 + T]


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *, temperature: float,
                        impl: str) -> torch.Tensor:
    """Per-token log-probs [B, T] of the completions from the hidden states and the LM head (no [B, T, V] logits);
    only the real tokens' rows are computed, padding gets 0."""
    from lambda_kernels import linear_logprobs

    hidden = completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    weight, bias = lm_head(model)
    return linear_logprobs(hidden, weight, completion_ids, bias=bias, temperature=head_temperature(model, temperature),
                           impl=impl,
                           mask=completion_mask)
