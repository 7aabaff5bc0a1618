"""grpo_trainer.model: the log-probs the trainer optimises are those of the distribution the model samples from,
whatever logit scale the architecture applies (folded into the temperature); logit transforms that cannot be
folded are refused."""
import types

import pytest
import torch

from grpo_trainer.config import ConfigError
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
        with pytest.raises(ConfigError, match="final_logit_softcapping=30.0"):
            check_supported(types.SimpleNamespace(config=config))
    with pytest.raises(ConfigError, match="positive multiple .* got logits_scaling=-2.0"):
        check_supported(types.SimpleNamespace(config=GraniteConfig(logits_scaling=-2.0)))


@pytest.mark.parametrize("value", [0.5, "inv_sqrt_d_model"])
def test_a_scale_the_architecture_may_ignore_is_refused(value):
    """MPT's config has a logit_scale its modelling code never applies: folding it would be wrong, ignoring it
    could be; the model is refused instead of guessed at."""
    from transformers import MptConfig

    with pytest.raises(ConfigError, match=f"got logit_scale={value!r} on a mpt model.*knows logit_scale for"):
        check_supported(types.SimpleNamespace(config=MptConfig(logit_scale=value)))
    assert logit_scale(types.SimpleNamespace(config=MptConfig(logit_scale=None))) == 1.0


def test_a_head_that_is_more_than_a_linear_layer_is_refused():
    """A subclass of nn.Linear may scale, quantise or adapt (transformers' Dory head learns a per-token scale):
    the fused ops use weight and bias only, so only a plain nn.Linear is taken."""
    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = tiny_model("llama")
    model.lm_head = ScaledHead(16, 50, bias=False)
    with pytest.raises(ConfigError, match="LM head must be a plain torch.nn.Linear; got ScaledHead"):
        check_supported(model)
