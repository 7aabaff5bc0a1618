"""grpo_trainer.model: the log-probs the trainer optimises are those of the distribution the model samples from,
whatever logit scale the architecture applies (folded into the temperature); logit transforms that cannot be
folded are refused."""
import types

import pytest
import torch

from grpo_trainer.model import check_supported, completion_logprobs, head_temperature, logit_scale

TINY = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)


def tiny_model(arch):
    import transformers as tf

    configs = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
               "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),  # logits / 4
               "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25})}       # logits · 0.25
    config_cls, model_cls, extra = configs[arch]
    torch.manual_seed(0)
    return getattr(tf, model_cls)(getattr(tf, config_cls)(**TINY, **extra)).eval()


@pytest.mark.parametrize("arch,scale", [("llama", 1.0), ("granite", 0.25), ("cohere", 0.25)])
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_logprobs_are_the_models_own(arch, scale, impl):
    model = tiny_model(arch)
    assert logit_scale(model) == scale and head_temperature(model, 0.7) == pytest.approx(0.7 / scale)
    g = torch.Generator().manual_seed(1)
    prompt_ids, completion_ids = torch.randint(1, 50, (3, 4), generator=g), torch.randint(1, 50, (3, 5), generator=g)
    prompt_mask, completion_mask = torch.ones(3, 4, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)
    completion_mask[1, 2:] = 0
    with torch.no_grad():
        lp = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=0.7,
                                 impl=impl)
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1)).logits[:, 3:-1]  # the model's own
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, completion_ids[..., None])[..., 0]
    torch.testing.assert_close(lp, expected * completion_mask, rtol=1e-5, atol=1e-5)


def test_transforms_that_cannot_be_folded_are_refused():
    from transformers import Gemma2Config, Gemma3Config, GraniteConfig

    for config in (Gemma2Config(final_logit_softcapping=30.0),
                   Gemma3Config(text_config=dict(final_logit_softcapping=30.0))):  # a VLM's language head
        with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
            check_supported(types.SimpleNamespace(config=config))
    with pytest.raises(ValueError, match="positive multiple .* got a logit scale of -0.5"):
        check_supported(types.SimpleNamespace(config=GraniteConfig(logits_scaling=-2.0)))
