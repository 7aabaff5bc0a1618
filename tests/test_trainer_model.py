"""grpo_trainer.model: the log-probs the trainer optimises are those of the distribution the model samples from,
whatever logit scale the architecture applies (folded into the temperature) and with its final-logit soft-capping
(Gemma 2/3, applied by the fused ops); logit transforms they cannot apply are refused."""
import types

import pytest
import torch

from grpo_trainer.config import ConfigError
from grpo_trainer.model import check_supported, completion_logprobs, head_softcap, head_temperature, logit_scale

TINY = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
CAPPED = dict(final_logit_softcapping=2.0, head_dim=8, tie_word_embeddings=False)


def tiny_model(arch):
    import transformers as tf

    configs = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
               "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),  # logits / 4
               "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),      # logits · 0.25
               # c·tanh(logits / c), c = 2: small against the logits of the head `capped` scales up
               "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", CAPPED),
               "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", CAPPED)}
    config_cls, model_cls, extra = configs[arch]
    torch.manual_seed(0)
    return getattr(tf, model_cls)(getattr(tf, config_cls)(**TINY, **extra)).eval()


def capped(arch):
    """A tiny soft-capped model whose head's logits reach ±9 (the random init's reach ±0.25): over 40% of them beyond
    the cap, 2, where an uncapped log-prob would be far off."""
    model = tiny_model(arch)
    with torch.no_grad():
        model.lm_head.weight.mul_(36)
    return model


def logprobs_and_expected(model, impl):
    """(completion_logprobs at temperature 0.7, the same from the model's own forward's logits), padding zeroed."""
    g = torch.Generator().manual_seed(1)
    prompt_ids, completion_ids = torch.randint(1, 50, (3, 4), generator=g), torch.randint(1, 50, (3, 5), generator=g)
    prompt_mask, completion_mask = torch.ones(3, 4, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)
    completion_mask[1, 2:] = 0
    with torch.no_grad():
        lp = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=0.7,
                                 impl=impl)
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1)).logits[:, 3:-1]  # the model's own
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, completion_ids[..., None])[..., 0]
    return lp, expected * completion_mask


@pytest.mark.parametrize("arch,scale", [("llama", 1.0), ("granite", 0.25), ("cohere", 0.25)])
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_logprobs_are_the_models_own(arch, scale, impl):
    model = tiny_model(arch)
    assert logit_scale(model) == scale and head_temperature(model, 0.7) == pytest.approx(0.7 / scale)
    assert head_softcap(model) is None
    lp, expected = logprobs_and_expected(model, impl)
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_softcapped_logprobs_are_the_models_own(arch, impl):
    """HF's forward caps the logits (then generation divides by the temperature): the fused ops, given the cap,
    give the same log-probs; without it they would be far off."""
    model = capped(arch)
    check_supported(model)
    assert head_softcap(model) == 2.0 and head_temperature(model, 0.7) == 0.7
    lp, expected = logprobs_and_expected(model, impl)
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-5)
    model.config.final_logit_softcapping = None
    uncapped, _ = logprobs_and_expected(model, impl)
    assert (uncapped - lp).abs().max() > 1.0


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_the_trainers_loss_on_a_softcapped_model_is_the_models_own(impl):
    """policy_loss (plain GRPO, off-policy, bnpo) on a capped Gemma 2: the value and every gradient of the clipped
    objective written out from the model's own forward."""
    import dataclasses

    from grpo_trainer.config import GRPOLambdaConfig
    from grpo_trainer.trainer import Batch, policy_loss

    model = capped("gemma2")
    g = torch.Generator().manual_seed(2)
    prompt_ids, completion_ids = torch.randint(1, 50, (3, 4), generator=g), torch.randint(1, 50, (3, 5), generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 2:] = 0
    batch = Batch(prompt_ids, torch.ones(3, 4, dtype=torch.long), completion_ids, mask, mask,
                  advantages=torch.tensor([1.0, -0.5, 0.7]))
    cfg = dataclasses.replace(GRPOLambdaConfig(), algorithm="grpo", beta=0.0, loss_type="bnpo", temperature=0.7,
                              impl=impl)
    logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1)).logits[:, 3:-1]  # capped by HF
    own = torch.log_softmax(logits / 0.7, -1).gather(-1, completion_ids[..., None])[..., 0]
    old = own.detach() + 0.3 * torch.randn(3, 5, generator=g)  # ratios in and out of the clip range
    ratio, adv = torch.exp(own - old), batch.advantages[:, None]
    expected = (-torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * mask).sum() / mask.sum()
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    loss, _ = policy_loss(model, batch, cfg, old_logprobs=old)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert any(e is not None and e.abs().max() > 0 for e in expected_grads)
    for got, want in zip(grads, expected_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_softcapped_configs_are_supported():
    """Gemma 2's default cap (30.0) and a Gemma 3 language model's."""
    from transformers import Gemma2Config, Gemma3TextConfig

    for config in (Gemma2Config(), Gemma3TextConfig(final_logit_softcapping=30.0)):
        model = types.SimpleNamespace(config=config)
        check_supported(model)
        assert head_softcap(model) == 30.0 and logit_scale(model) == 1.0
    assert head_softcap(types.SimpleNamespace(config=Gemma3TextConfig())) is None  # released Gemma 3: no cap


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_a_bad_softcap_is_refused(value):
    model = tiny_model("gemma2")
    model.config.final_logit_softcapping = value
    with pytest.raises(ConfigError, match=f"must be a finite number > 0 or None; got final_logit_softcapping={value!r} "
                                          r"\(Gemma2ForCausalLM\)"):
        check_supported(model)


def test_a_scale_and_a_softcap_together_are_refused():
    """Muse Glimmer multiplies by output_multiplier before its cap (its default config has both); the trainer folds a
    scale into the temperature, after the cap."""
    from transformers import GraniteConfig, MuseGlimmerConfig

    for config, scale in ((MuseGlimmerConfig(), MuseGlimmerConfig().get_text_config().output_multiplier),
                          (GraniteConfig(logits_scaling=4.0, final_logit_softcapping=5.0), 0.25)):
        cap = config.get_text_config().final_logit_softcapping
        with pytest.raises(ConfigError, match=f"scale or a final-logit softcap, not both; got a scale of {scale!r} and "
                                              f"final_logit_softcapping={cap!r}"):
            check_supported(types.SimpleNamespace(config=config))


def test_a_softcap_the_models_forward_ignores_is_refused():
    """transformers' Gemma3ForConditionalGeneration does not cap its logits, whatever its text config says (vLLM's
    Gemma 3 does): with a cap set, which distribution generation samples from depends on the backend."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(text_config=dict(**TINY, **CAPPED), mm_tokens_per_image=4, vision_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14))
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    with pytest.raises(ConfigError, match="final_logit_softcapping=2.0 on a gemma3 model .* does not apply it"):
        check_supported(model)
    ids = torch.randint(1, 50, (2, 6))
    with torch.no_grad():
        model.lm_head.weight.mul_(36)
        raw = model.lm_head(model.base_model(input_ids=ids).last_hidden_state)
        assert raw.abs().max() > 4.0  # the cap, 2, would change them
        torch.testing.assert_close(model(input_ids=ids).logits, raw, rtol=0, atol=0)  # uncapped


def test_a_negative_scale_is_refused():
    from transformers import GraniteConfig

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
