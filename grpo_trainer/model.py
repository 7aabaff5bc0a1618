"""Models and tokenizers: a tiny Llama/Qwen2 built from a config with a character tokenizer made locally (fully
offline), or any Hugging Face causal LM; hidden states aligned with completion tokens; the LM head.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from .config import ConfigError, GRPOLambdaConfig

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


# How architectures scale their head's output before the softmax, from transformers' modelling code (5.24):
# config attribute → {model_type: "multiply" | "divide"}. Any other model type whose config sets one of these to a
# value other than 1 is refused: whether its head applies it is unknown (MPT's config has a logit_scale its
# modelling code ignores).
LOGIT_SCALES = {
    "logit_scale": dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass"), "multiply"),
    "lm_head_multiplier": {"falcon_h1": "multiply"},
    "output_multiplier": dict.fromkeys(("muse_glimmer", "muse_spark"), "multiply"),
    "logits_scaling": {"hyperclovax": "multiply", **dict.fromkeys(
        ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa",
         "minicpm3"), "divide")},
}


def text_config(model):
    """The config of the language model (a vision-language model's `text_config`, else the config itself)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def logit_scale(model) -> float:
    """The factor the model applies to its head's output before the softmax: 1.0 for most models, Cohere's
    `logit_scale`, Granite's 1/`logits_scaling`, ... (`LOGIT_SCALES`). The fused ops take it folded into the
    temperature: softmax(s·z / τ) = softmax(z / (τ/s))."""
    cfg = text_config(model)
    types = {getattr(model.config, "model_type", None), getattr(cfg, "model_type", None)}
    scale = 1.0
    for attr, ops in LOGIT_SCALES.items():
        value = getattr(cfg, attr, None)
        op = next((ops[t] for t in types if t in ops), None)
        if value is None or (op is None and value == 1):
            continue
        if op is None:
            kind = "/".join(sorted(filter(None, types)))
            raise ConfigError(f"the model's logits must be hidden·Wᵀ (+ bias) up to a known scale; got "
                              f"{attr}={value!r} on a {kind} model, which the fused loss does not know how to apply "
                              f"(it knows {attr} for {sorted(ops)}).")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"the model's logits must be a positive multiple of hidden·Wᵀ (+ bias); got "
                              f"{attr}={value!r} ({type(model).__name__}).")
        scale *= value if op == "multiply" else 1 / value
    return scale


# Model types whose config may carry a final_logit_softcapping that their forward does not apply (transformers 5.24:
# Gemma3ForConditionalGeneration caps nothing, while vLLM's Gemma 3 caps with its text config's value): which
# distribution generation samples from would depend on the backend, so a cap set on one is refused.
SOFTCAP_IGNORED = ("gemma3",)


def head_softcap(model) -> float | None:
    """The model's final-logit soft-capping c (Gemma 2/3's `final_logit_softcapping`: logits = c·tanh(logits / c),
    then the temperature, as HF's forward and vLLM's sampler apply them), or None when it has none. The fused ops take
    it as `softcap`."""
    cfg = text_config(model)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
        raise ConfigError(f"the model's final_logit_softcapping must be a finite number > 0 or None; got "
                          f"final_logit_softcapping={cap!r} ({type(model).__name__}). Set it to None in the model's "
                          "config for no capping (Gemma 2 checkpoints use 30.0).")
    model_type = getattr(model.config, "model_type", None)
    if model_type in SOFTCAP_IGNORED:
        raise ConfigError(f"got final_logit_softcapping={cap!r} on a {model_type} model ({type(model).__name__}), "
                          "whose transformers forward does not apply it (vLLM's does): the distribution the loss "
                          "should use is ambiguous. Set text_config.final_logit_softcapping to None (released "
                          "Gemma 3 checkpoints have none), or load the language model alone (Gemma3ForCausalLM).")
    scale = logit_scale(model)
    if scale != 1:
        # Muse Glimmer and Muse Spark multiply by their output_multiplier before the cap. c·tanh(s·z / c) equals
        # s·c'·tanh(z / c') with c' = c/s, so such a scale could be folded too; refused until a model with both is
        # tested against its transformers forward
        raise ConfigError(f"the model's logits must have a logit scale or a final-logit softcap, not both; got a "
                          f"scale of {scale!r} and final_logit_softcapping={cap!r} ({type(model).__name__}). The "
                          "trainer folds a scale into the temperature, after the cap, and such a model may apply it "
                          "before (Muse Glimmer's output_multiplier does): not supported; use trl.GRPOTrainer.")
    return float(cap)


def check_supported(model) -> None:
    """Refuse, at start-up, a model whose next-token distribution is not softmax(s·(hidden·Wᵀ + b) / τ) or
    softmax(c·tanh((hidden·Wᵀ + b) / c) / τ)."""
    logit_scale(model)
    head_softcap(model)
    if hasattr(model, "get_output_embeddings"):
        lm_head(model)


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
    # exactly nn.Linear: a subclass may do more than x·Wᵀ + b (a learned per-token scale, a quantised weight, an
    # adapter), which the fused ops would silently drop
    if type(head) is not torch.nn.Linear:
        raise ConfigError(f"the LM head must be a plain torch.nn.Linear; got {type(head).__name__} "
                          f"({type(model).__name__}). The fused loss computes x·Wᵀ + b from its weight and bias only: "
                          "an adapter on the head (PEFT target_modules with lm_head), a quantised head or a head with "
                          "extra parameters is not supported.")
    return head.weight, head.bias


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
                           softcap=head_softcap(model), impl=impl, mask=completion_mask)
