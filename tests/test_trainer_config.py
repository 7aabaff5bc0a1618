"""grpo_trainer configuration: defaults, YAML + overrides, the CLI's help, and every start-up error message."""
import dataclasses
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from grpo_trainer import cli
from grpo_trainer.config import FIELDS, ConfigError, GRPOLambdaConfig, build_config
from grpo_trainer.trainer import GRPOLambdaTrainer, policy_loss, policy_term

from ._helpers import LOSS_TYPES

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_match_shipped_yaml():
    cfg = GRPOLambdaConfig().validate()
    shipped = build_config(ROOT / "grpo_trainer" / "configs" / "default.yaml")
    assert shipped == cfg
    assert cfg.algorithm == "grpo_lambda" and cfg.trace == "both" and cfg.lam == 0.99 and cfg.adv_clamp_min == -0.1
    assert cfg.impl == "auto"


def test_baseline_yaml_is_plain_grpo():
    cfg = build_config(ROOT / "grpo_trainer" / "configs" / "grpo_baseline.yaml")
    assert cfg.algorithm == "grpo" and cfg.loss_trace is None and cfg.loss_adv_clamp_min is None


def test_yaml_then_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("learning_rate: 1e-3\nnum_generations: 4\nreward_funcs: [arithmetic]\nreward_weights: null\n")
    cfg = build_config(y, {"num-generations": "2", "beta": "0", "adv_clamp_min": "none", "dynamic_sampling": "true",
                           "reward_funcs": "arithmetic,format", "entropy_coef": "-0.01"})
    assert cfg.learning_rate == 1e-3 and cfg.num_generations == 2 and cfg.beta == 0.0 and cfg.entropy_coef == -0.01
    assert cfg.adv_clamp_min is None and cfg.dynamic_sampling is True
    assert cfg.reward_funcs == ["arithmetic", "format"] and cfg.reward_weights is None


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, f in FIELDS.items():
        if "train" in f.metadata["commands"]:
            assert f"--{name}" in text, name
    assert text.count("(default:") >= sum("train" in f.metadata["commands"] for f in FIELDS.values())
    assert "(default: grpo_lambda)" in text and "(default: 0.99)" in text and "(default: -0.1)" in text


def test_evaluate_help_and_missing_model(capsys):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "--eval_samples" in out and "--num_generations" not in out
    assert cli.main(["evaluate"]) == 2
    assert "model_name_or_path must name the checkpoint" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "grpo_trainer", "train", "--num_generations", "1"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2
    assert "num_generations must be an integer >= 2" in r.stderr


@pytest.mark.parametrize("overrides, message", [
    ({"per_device_train_batch_size": 10, "num_generations": 4}, r"must be divisible by num_generations = 4; got 10"),
    ({"generation_batch_size": 30, "num_generations": 8}, r"divisible by num_generations = 8; got 30.*e\.g\. \[8, 16"),
    ({"num_generations": 1}, r"num_generations must be an integer >= 2.*got 1"),
    ({"learning_rate": -1e-4}, r"learning_rate must be a finite number > 0; got -0\.0001"),
    ({"loss_type": "dapp"}, r"loss_type must be one of \['dapo', 'bnpo', 'grpo', 'dr_grpo', 'luspo'\]; got 'dapp'\. "
                            r"Did you mean 'dapo'\?"),
    ({"importance_sampling_level": "sequense", "algorithm": "grpo"},
     r"importance_sampling_level must be one of \['token', 'sequence'\]; got 'sequense'\. Did you mean 'sequence'"),
    # GSPO's sequence ratio replaces the trace, which the default algorithm (grpo_lambda) asks for
    ({"importance_sampling_level": "sequence"}, r"algorithm must be 'grpo' with importance_sampling_level = "
                                                r"'sequence'; got 'grpo_lambda'\..*--algorithm grpo"),
    ({"algorithm": "ppo"}, r"algorithm must be one of \['grpo', 'grpo_lambda'\]; got 'ppo'"),
    ({"trace": "all"}, r"trace must be one of \['recent', 'both'\]"),
    ({"lam": 1.5}, r"lam must be in \[0, 1\]; got 1\.5"),
    ({"beta": -0.1}, r"beta must be a finite number >= 0"),
    ({"delta": 1.1}, r"delta must be None or a finite number > 1 \+ epsilon_high = 1\.2; got 1\.1.*clip_ratio_c"),
    ({"delta": 1.2}, r"delta must be None or a finite number > 1 \+ epsilon_high = 1\.2; got 1\.2"),
    ({"delta": 1.3, "epsilon_high": 0.4}, r"delta must be .* > 1 \+ epsilon_high = 1\.4; got 1\.3"),
    ({"delta": float("inf")}, r"delta must be None or a finite number"),
    ({"policy_loss": "cipso"}, r"policy_loss must be one of \['clip', 'cispo', 'sapo', 'vespo'\]; got 'cipso'\. "
                               r"Did you mean 'cispo'\?"),
    # VESPO's sequence weight replaces the trace (the default algorithm, grpo_lambda, asks for one) and is of the
    # sequence's summed token log-ratios (the token level only)
    ({"policy_loss": "vespo"}, r"algorithm must be 'grpo' with policy_loss = 'vespo'; got 'grpo_lambda'\. .*takes the "
                               r"place of the λ-trace: pass --algorithm grpo"),
    ({"policy_loss": "vespo", "algorithm": "grpo", "importance_sampling_level": "sequence"},
     r"importance_sampling_level must be 'token' with policy_loss = 'vespo'; got 'sequence'\. .*set "
     r"importance_sampling_level token"),
    ({"policy_loss": "vespo", "algorithm": "grpo", "vespo_k_pos": float("nan")},
     r"vespo_k_pos must be a finite number; got nan\. It shapes VESPO's weight phi\(w\)"),
    ({"policy_loss": "vespo", "algorithm": "grpo", "vespo_lambda_neg": float("-inf")},
     r"vespo_lambda_neg must be a finite number; got -inf"),
    ({"policy_loss": "vespo", "algorithm": "grpo", "vespo_lambda_pos": "3"},
     r"vespo_lambda_pos must be a finite number; got '3'"),
    ({"policy_loss": "cispo", "cispo_max_ratio": 0.0},
     r"cispo_max_ratio must be a finite number > 0; got 0\.0\. It caps CISPO's importance weight"),
    ({"cispo_max_ratio": float("nan")}, r"cispo_max_ratio must be a finite number > 0; got nan"),
    ({"policy_loss": "sapo", "sapo_temperature_neg": -1.05},
     r"sapo_temperature_neg must be a finite number > 0; got -1\.05\. It is SAPO's gate temperature"),
    ({"policy_loss": "sapo", "sapo_temperature_pos": 0}, r"sapo_temperature_pos must be a finite number > 0; got 0"),
    # a policy term's own options, refused with the other policy terms (else silently unused)
    ({"cispo_max_ratio": 5.0}, r"cispo_max_ratio must be null with policy_loss = 'clip'; got 5\.0\. It is CISPO's "
                               r"cap, used with policy_loss cispo only: set --policy_loss cispo, or leave "
                               r"cispo_max_ratio null\."),
    ({"policy_loss": "sapo", "cispo_max_ratio": 4.0}, r"cispo_max_ratio must be null with policy_loss = 'sapo'; "
                                                      r"got 4\.0"),
    ({"sapo_temperature_pos": 0.5}, r"sapo_temperature_pos must be null with policy_loss = 'clip'; got 0\.5\. It is "
                                    r"SAPO's gate temperature, used with policy_loss sapo only: set --policy_loss "
                                    r"sapo, or leave sapo_temperature_pos null\."),
    ({"policy_loss": "cispo", "sapo_temperature_neg": 1.05},
     r"sapo_temperature_neg must be null with policy_loss = 'cispo'; got 1\.05"),
    ({"vespo_k_neg": 3.0}, r"vespo_k_neg must be null with policy_loss = 'clip'; got 3\.0\. It is a shape parameter "
                           r"of VESPO's weight phi, used with policy_loss vespo only: set --policy_loss vespo, or "
                           r"leave vespo_k_neg null\."),
    ({"policy_loss": "sapo", "vespo_lambda_pos": 3.0}, r"vespo_lambda_pos must be null with policy_loss = 'sapo'"),
    ({"policy_loss": "vespo", "algorithm": "grpo", "sapo_temperature_pos": 1.0},
     r"sapo_temperature_pos must be null with policy_loss = 'vespo'; got 1\.0"),
    ({"policy_loss": "vespo", "algorithm": "grpo", "cispo_max_ratio": 5.0},
     r"cispo_max_ratio must be null with policy_loss = 'vespo'"),
    # the clipped objective's epsilon_high (TRL's cispo cap, ours is cispo_max_ratio) and dual clip: refused with the
    # other policy terms (a valid delta for clip)
    ({"policy_loss": "cispo", "epsilon_high": 5.0},
     r"epsilon_high must be null with policy_loss = 'cispo'; got 5\.0\. .*its cap is cispo_max_ratio \(TRL's "
     r"epsilon_high for loss_type cispo\), e\.g\. --cispo_max_ratio 5\.0"),
    ({"policy_loss": "sapo", "epsilon_high": 0.28}, r"epsilon_high must be null with policy_loss = 'sapo'; got 0\.28"),
    ({"policy_loss": "cispo", "delta": 3.0}, r"delta must be null with policy_loss = 'cispo'; got 3\.0\. .*CISPO "
                                             r"replaces by its capped weight \(cispo_max_ratio\).*policy_loss clip"),
    ({"policy_loss": "sapo", "delta": 3.0}, r"delta must be null with policy_loss = 'sapo'; got 3\.0\. .*soft gate"),
    ({"policy_loss": "vespo", "algorithm": "grpo", "epsilon_high": 0.28},
     r"epsilon_high must be null with policy_loss = 'vespo'; got 0\.28\. .*VESPO does not use \(its weight has "
     r"vespo_k_\* / vespo_lambda_\*\)"),
    ({"policy_loss": "vespo", "algorithm": "grpo", "delta": 3.0},
     r"delta must be null with policy_loss = 'vespo'; got 3\.0\. .*VESPO replaces by its sequence's weight phi"),
    ({"top_entropy_quantile": 0.0}, r"top_entropy_quantile must be in \(0, 1\]; got 0\.0"),
    ({"top_entropy_quantile": 1.5}, r"top_entropy_quantile must be in \(0, 1\]; got 1\.5"),
    ({"entropy_coef": float("nan")}, r"entropy_coef must be a finite number; got nan\. It weighs the entropy bonus; "
                                     r"0 turns it off"),
    ({"entropy_coef": float("-inf")}, r"entropy_coef must be a finite number; got -inf"),
    ({"entropy_coef": "0.01"}, r"entropy_coef must be a finite number; got '0\.01'"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"temperature": 0}, r"temperature must be a finite number > 0"),
    ({"impl": "cuda"}, r"impl must be one of \['auto', 'torch', 'triton'\]"),
    ({"reward_weights": [1.0]}, r"reward_weights must have one weight per reward function \(2"),
    ({"hidden_size": 30, "num_attention_heads": 4}, r"hidden_size must be a multiple of num_attention_heads = 4"),
    ({"max_steps": 0}, r"max_steps must be an integer >= 1; got 0"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
    ({"model_dtype": "float16"}, r"model_dtype must be float32 or bfloat16 to train; got float16.*overflows"),
    ({"model_name_or_path": "/nonexistent/model"}, r"must be an existing folder or a Hugging Face hub id.*"
                                                   r"'/nonexistent/model', which does not exist"),
    ({"model_name_or_path": "outputs/no-such-run/final"}, r"which does not exist"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(GRPOLambdaConfig(), **overrides).validate()


@pytest.mark.parametrize("overrides, message", [
    ({"num_generations": "two"}, r"num_generations must be an integer; got 'two'"),
    ({"learning_rate": "fast"}, r"learning_rate must be a number; got 'fast'"),
    ({"dynamic_sampling": "maybe"}, r"dynamic_sampling must be true or false; got 'maybe'"),
    ({"num_generation": "4"}, r"unknown option 'num_generation'\. Did you mean 'num_generations'\?"),
])
def test_override_parse_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, overrides)


@pytest.mark.parametrize("overrides", [
    {"algorithm": "grpo", "importance_sampling_level": "sequence"},
    {"algorithm": "grpo", "importance_sampling_level": "sequence", "loss_type": "luspo"},
    {"algorithm": "grpo", "importance_sampling_level": "sequence", "kl_bias_correction": "true", "beta": "0"},
    {"algorithm": "grpo", "importance_sampling_level": "sequence", "kl_bias_correction": "true", "beta": "0.04"},
    {"loss_type": "luspo"},
])
def test_gspo_and_luspo_options_validate(overrides):
    cfg = build_config(None, overrides)
    assert cfg.loss_type == overrides.get("loss_type", "dapo")
    assert cfg.importance_sampling_level == overrides.get("importance_sampling_level", "token")


@pytest.mark.parametrize("overrides", [
    {"policy_loss": "cispo"},
    {"policy_loss": "cispo", "cispo_max_ratio": "4", "algorithm": "grpo", "importance_sampling_level": "sequence"},
    {"policy_loss": "sapo", "sapo_temperature_pos": "0.5", "sapo_temperature_neg": "2", "loss_type": "grpo"},
    {"policy_loss": "sapo", "kl_bias_correction": "true", "top_entropy_quantile": "0.2", "num_iterations": "2"},
    {"policy_loss": "clip", "delta": "3"},
    {"policy_loss": "vespo", "algorithm": "grpo"},
    {"policy_loss": "vespo", "algorithm": "grpo", "vespo_k_pos": "1.5", "vespo_lambda_neg": "-1", "loss_type": "grpo",
     "beta": "0.04", "kl_bias_correction": "true", "top_entropy_quantile": "0.2", "num_iterations": "2"},
    {"policy_loss": "vespo", "algorithm": "grpo", "vespo_k_pos": "0", "vespo_lambda_pos": "0.5", "vespo_k_neg": "4",
     "vespo_lambda_neg": "2.5"},
])
def test_policy_loss_options_validate(overrides):
    """Accepted, and the policy term the loss gets: the options given, else their defaults (TRL's recommended cap
    5.0 for cispo, its temperatures 1.0 and 1.05 for sapo, lambda_kernels' VESPO defaults, TRL's, for vespo), which
    the config leaves null."""
    import lambda_kernels as lk

    vespo_options = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
    cfg = build_config(None, overrides)
    assert cfg.policy_loss == overrides["policy_loss"]
    want = {"clip": lk.Clip(), "cispo": lk.CISPO(max_ratio=float(overrides.get("cispo_max_ratio", 5.0))),
            "sapo": lk.SAPO(temperature_pos=float(overrides.get("sapo_temperature_pos", 1.0)),
                            temperature_neg=float(overrides.get("sapo_temperature_neg", 1.05))),
            "vespo": lk.VESPO(**{name[len("vespo_"):]: float(overrides[name]) for name in vespo_options
                                 if name in overrides})}
    assert policy_term(cfg) == want[cfg.policy_loss]
    assert all(getattr(cfg, name) == (float(overrides[name]) if name in overrides else None)
               for name in ("cispo_max_ratio", "sapo_temperature_pos", "sapo_temperature_neg") + vespo_options)


@pytest.mark.parametrize("policy, level", [("cispo", "token"), ("cispo", "sequence"), ("sapo", "token"),
                                           ("sapo", "sequence"), ("vespo", "token")])
def test_policy_loss_reaches_the_loss(tmp_path, policy, level):
    """policy_loss cispo / sapo / vespo with its options (a cap of 1.1 that some tokens pass, temperatures 0.5 / 2.0,
    VESPO's (k, λ) (1.5, 2.0) for Â ≥ 0 and (2.5, 1.5) otherwise, instead of the defaults) is the reference fused
    loss with lambda_kernels' CISPO / SAPO / VESPO, loss and metrics (cispo's cispo_clip_ratio, vespo's
    vespo/phi_seq_mean, none of the clip_ratio/* ones), on off-policy log-probs (±0.3 per token), with GRPO-λ's trace
    at the token level and GSPO's ratio at the sequence level (vespo: algorithm grpo, its own sequence weight at the
    token level); clip, and the library's defaults, give other losses."""
    import torch

    import lambda_kernels as lk
    from grpo_trainer import trainer as trainer_mod
    from grpo_trainer.model import completion_hidden, lm_head
    from lambda_kernels import reference as R

    from .test_trainer_e2e import _same_batch, tiny

    options = {"cispo": dict(cispo_max_ratio=1.1), "sapo": dict(sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
               "vespo": dict(vespo_k_pos=1.5, vespo_lambda_pos=2.0, vespo_k_neg=2.5, vespo_lambda_neg=1.5)}[policy]
    untraced = level == "sequence" or policy == "vespo"
    algorithm = dict(algorithm="grpo") if untraced else dict(algorithm="grpo_lambda", trace="both", lam=0.9)
    cfg = tiny(tmp_path, policy_loss=policy, importance_sampling_level=level, num_iterations=2, impl="torch",
               beta=0.0, adv_clamp_min=None, **options, **algorithm).validate()
    model, batch = _same_batch(cfg)
    with torch.no_grad():
        lp = trainer_mod.batch_logprobs(model, batch, trainer_mod.micro_batches(batch, cfg), cfg)
        old = lp - 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(0))
        hidden = completion_hidden(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                   batch.attention_mask)
        weight, _ = lm_head(model)
        term = {"cispo": lk.CISPO(max_ratio=1.1), "sapo": lk.SAPO(temperature_pos=0.5, temperature_neg=2.0),
                "vespo": lk.VESPO(k_pos=1.5, lambda_pos=2.0, k_neg=2.5, lambda_neg=1.5)}[policy]

        def reference(policy_loss):
            return R.fused_grpo_lambda_loss(
                hidden.double(), weight.double(), batch.completion_ids, batch.loss_mask, batch.advantages.double(),
                old_logprobs=old.double(), trace=cfg.loss_trace, lam=cfg.lam, temperature=cfg.temperature,
                importance_sampling_level=level, policy_loss=policy_loss, return_entropy=True)

        want, want_metrics = reference(term)
        got, metrics = policy_loss(model, batch, cfg, old_logprobs=old)
        clip = policy_loss(model, batch, dataclasses.replace(cfg, policy_loss="clip"), old_logprobs=old)[0]
        defaults = reference(policy)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert set(metrics) == set(want_metrics)
    assert ("cispo_clip_ratio" in metrics) == (policy == "cispo")
    assert ("vespo/phi_seq_mean" in metrics) == (policy == "vespo")
    assert not any(k.startswith("clip_ratio/") for k in metrics)
    for name, value in want_metrics.items():
        torch.testing.assert_close(metrics[name].double(), value.double(), rtol=1e-5, atol=1e-6, msg=name)
    if policy == "cispo":
        assert 0 < metrics["cispo_clip_ratio"] < 1
    if policy == "vespo":  # (off-policy: the sequences' weights are not on-policy's φ(1) = 1)
        assert abs(metrics["vespo/phi_seq_mean"] - 1) > 1e-2
    assert abs(got - clip) > 1e-3 and abs(got.double() - defaults) > 1e-3


@pytest.mark.parametrize("policy", ["cispo", "sapo", "vespo"])
def test_an_update_logs_the_metrics_of_the_policy_term(tmp_path, policy):
    """The trainer's update averages whatever metrics the loss returns: cispo's cispo_clip_ratio, vespo's
    vespo/phi_seq_mean, no clip_ratio/* for any (the per-sequence extremes are the clipped ratio's only), nor the
    loss's ratio_mean; two micro-batches, two iterations. The entropy bonus (entropy_coef 0.1) lowers an update's
    loss by 0.1 × the entropy's token mean over the batch's loss tokens, with micro-batches of 4 and 2 rows holding
    other shares of the tokens, with dapo's normaliser (cispo and vespo here) and grpo's (sapo)."""
    import copy
    import math

    import torch

    from grpo_trainer.model import completion_hidden, lm_head
    from lambda_kernels import reference as R

    from .test_trainer_e2e import _same_batch, tiny

    cfg = tiny(tmp_path, policy_loss=policy, cispo_max_ratio=1.0 if policy == "cispo" else None, impl="torch",
               beta=0.0, num_iterations=2, per_device_train_batch_size=4, num_generations=2,
               reward_funcs=["arithmetic"], reward_weights=None, loss_type="grpo" if policy == "sapo" else "dapo",
               algorithm="grpo" if policy == "vespo" else "grpo_lambda")
    trainer = GRPOLambdaTrainer(cfg)
    start = copy.deepcopy(trainer.model.state_dict())
    _, batch = _same_batch(cfg)
    out = trainer._update(batch)
    assert out["skipped"] == 0 and math.isfinite(out["loss"]) and math.isfinite(out["entropy"])
    assert ("cispo_clip_ratio" in out) == (policy == "cispo")
    assert ("vespo/phi_seq_mean" in out) == (policy == "vespo")
    assert not any(k.startswith("clip_ratio/") for k in out) and "ratio_mean" not in out

    mask = batch.loss_mask.clone()
    mask[4, 1:] = 0  # the second micro-batch's share of the tokens is not its share of the rows
    batch = dataclasses.replace(batch, loss_mask=mask)
    assert mask[4:].sum() / mask.sum() < 2 / 6
    trainer.model.load_state_dict(start)
    with torch.no_grad():
        hidden = completion_hidden(trainer.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                   batch.attention_mask)
        _, ent = R.linear_logprobs(hidden, lm_head(trainer.model)[0], batch.completion_ids, return_entropy=True,
                                   temperature=cfg.temperature, mask=mask)
    losses = {}
    for coef in (0.0, 0.1):  # one on-policy update each, from the same weights
        trainer.model.load_state_dict(start)
        trainer.cfg = dataclasses.replace(cfg, num_iterations=1, entropy_coef=coef)
        losses[coef] = trainer._update(batch)["loss"]
    assert losses[0.1] - losses[0.0] == pytest.approx(-0.1 * ((ent * mask).sum() / mask.sum()).item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_importance_sampling_level_and_luspo_reach_the_loss(tmp_path, beta):
    """policy_loss with importance_sampling_level sequence and loss_type luspo is the reference fused loss with both
    (GSPO's shared sequence ratio, Σ m·L / B), on old log-probs off by a different amount at each token (so the
    sequence's mean ratio is not its tokens'); the token level gives another loss. With beta > 0 and
    kl_bias_correction (reference log-probs 1 below the policy's), the KL weighted by each sequence's ratio, as the
    reference weighs it, which is not the uncorrected loss."""
    import torch

    from grpo_trainer import trainer as trainer_mod
    from grpo_trainer.model import completion_hidden, lm_head
    from lambda_kernels import reference as R

    from .test_trainer_e2e import _same_batch, tiny

    cfg = tiny(tmp_path, algorithm="grpo", importance_sampling_level="sequence", loss_type="luspo", num_iterations=2,
               impl="torch", beta=beta, kl_bias_correction=beta > 0).validate()
    model, batch = _same_batch(cfg)
    with torch.no_grad():
        lp = trainer_mod.batch_logprobs(model, batch, trainer_mod.micro_batches(batch, cfg), cfg)
        old = lp - 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(0))
        ref = lp - 1.0 if beta > 0 else None
        hidden = completion_hidden(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                   batch.attention_mask)
        weight, _ = lm_head(model)
        want, _ = R.fused_grpo_lambda_loss(hidden.double(), weight.double(), batch.completion_ids, batch.loss_mask,
                                           batch.advantages.double(), old_logprobs=old.double(),
                                           ref_logprobs=None if ref is None else ref.double(), trace=None,
                                           temperature=cfg.temperature, loss_type="luspo", beta=beta,
                                           kl_bias_correction=beta > 0, importance_sampling_level="sequence")
        got = {level: policy_loss(model, batch, dataclasses.replace(cfg, importance_sampling_level=level),
                                  old_logprobs=old, ref_logprobs=ref)[0] for level in ("sequence", "token")}
        uncorrected = policy_loss(model, batch, dataclasses.replace(cfg, kl_bias_correction=False), old_logprobs=old,
                                  ref_logprobs=ref)[0]
    torch.testing.assert_close(got["sequence"].double(), want, rtol=1e-5, atol=1e-7)
    assert abs(got["sequence"] - got["token"]) > 1e-3
    assert (abs(got["sequence"] - uncorrected) > 1e-4) == (beta > 0)


@pytest.mark.parametrize("level, want", [("token", 0.5), ("sequence", 1 / 3)])
def test_clip_extremes_of_a_micro_batch_without_loss_tokens(tmp_path, monkeypatch, level, want):
    """A micro-batch without loss tokens has no per-sequence clip extremes at the token level (left out of the
    step's mean, as TRL's logging drops NaN), but at the sequence level its sequences count, unclipped (as in TRL):
    the library's 0 enters the mean. Three micro-batches, the last without loss tokens; the library's low_min of
    the other two replaced by 0.5, as a clipped off-policy pass could give."""
    import torch

    from grpo_trainer import trainer as trainer_mod

    from .test_trainer_e2e import _same_batch, tiny

    cfg = tiny(tmp_path, algorithm="grpo", importance_sampling_level=level, impl="torch", beta=0.0,
               per_device_train_batch_size=2, num_generations=2, reward_funcs=["arithmetic"], reward_weights=None)
    trainer = GRPOLambdaTrainer(cfg)
    _, batch = _same_batch(cfg)
    batch.loss_mask = batch.loss_mask.clone()
    batch.loss_mask[4:] = 0
    library_loss = trainer_mod.policy_loss

    def loss_with_clipping(model, mb, cfg, **kw):
        loss, metrics = library_loss(model, mb, cfg, **kw)
        if mb.loss_mask.any():
            metrics["clip_ratio/low_min"] = torch.tensor(0.5)
        else:
            assert metrics["clip_ratio/low_min"] == 0
        return loss, metrics

    monkeypatch.setattr(trainer_mod, "policy_loss", loss_with_clipping)
    assert trainer._update(batch)["clip_ratio/low_min"] == pytest.approx(want)


def test_cli_reports_config_error(capsys):
    assert cli.main(["train", "--per-device-train-batch-size", "10", "--num_generations", "4"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "divisible by num_generations = 4" in err


def _start(tmp_path, **kw):
    cfg = dataclasses.replace(GRPOLambdaConfig(), output_dir=str(tmp_path / "out"), **kw)
    return GRPOLambdaTrainer(cfg)


def test_unknown_reward_fails_at_startup(tmp_path):
    with pytest.raises(ConfigError, match=r"reward_funcs entries must be one of \['arithmetic', 'format', 'math'\].*"
                                          r"got 'exact'"):
        _start(tmp_path, reward_funcs=["exact"], reward_weights=None)
    with pytest.raises(ConfigError, match=r"reward_funcs entry 'no_such_pkg\.fn' must be importable"):
        _start(tmp_path, reward_funcs=["no_such_pkg.fn"], reward_weights=None)
    # the accuracy reward too, named as its own option, before the warm-up or any evaluation runs
    with pytest.raises(ConfigError, match=r"eval_reward entries must be one of \['arithmetic', 'format', 'math'\]"):
        _start(tmp_path, eval_reward="bogus")
    assert not (tmp_path / "out").exists()  # nothing written before validation passed


def test_missing_dataset_column_fails_at_startup(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1=", "answer": "2"}\n' * 10)
    with pytest.raises(ConfigError, match=r"prompt_column must name a column of dataset .*got 'prompt'.*"
                                          r"columns: \['answer', 'question'\]"):
        _start(tmp_path, dataset=str(data))
    with pytest.raises(ConfigError, match=r"dataset must be 'arithmetic', an existing \.jsonl file"):
        _start(tmp_path, dataset=str(tmp_path / "missing.jsonl"))


def test_resume_without_checkpoint_fails_at_startup(tmp_path):
    with pytest.raises(ConfigError, match=r"resume must point to a checkpoint; got 'latest' but .* holds none"):
        _start(tmp_path, resume="latest")
    with pytest.raises(ConfigError, match=r"resume must be 'latest' or a checkpoint folder"):
        _start(tmp_path, resume=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_fails_clearly_when_missing():
    from grpo_trainer.generation import VLLMGenerationBackend

    with pytest.raises(ConfigError, match=r"use_vllm must be false when vllm is not installed.*"
                                          r"lambda-kernels\[vllm\]"):
        dataclasses.replace(GRPOLambdaConfig(), use_vllm=True).validate()
    with pytest.raises(RuntimeError, match=r"use_vllm=True needs vLLM"):
        VLLMGenerationBackend("x", None, max_prompt_length=8, max_completion_length=8)


def test_hf_datasets_fail_clearly_when_missing(monkeypatch):
    from grpo_trainer.data import load_rows

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError, installed or not
    with pytest.raises(ConfigError, match=r"needs the `datasets` library.*lambda-kernels\[datasets\]"):
        load_rows("hf:openai/gsm8k:main@train")


def test_option_lists_are_the_librarys():
    """The config's choices are copies (its --help stays free of torch); they must not drift from the library's."""
    from grpo_trainer import config
    from lambda_kernels import functional, policy_losses
    from lambda_kernels._core import normalizers, runtime

    assert set(config.LOSS_TYPES) == set(normalizers.LOSS_TYPES)
    assert set(config.IMPORTANCE_SAMPLING_LEVELS) == set(functional.IMPORTANCE_SAMPLING_LEVELS)
    assert set(config.POLICY_LOSSES) == set(policy_losses.POLICY_LOSSES)
    assert set(config.IMPLS) == set(runtime.IMPLS)
    assert set(config.SCALE_REWARDS) == set(functional.ADVANTAGE_SCALES)
    assert set(config.TRACES) == {t for t in functional.TRACE_STYLES if t is not None}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_unequal_micro_batches_sum_to_the_whole_batch_loss(loss_type):
    """Micro-batches of 16 and 8 rows: the weighted sum of their losses is the loss of the 24 rows at once."""
    import torch

    import lambda_kernels as lk
    from grpo_trainer.trainer import micro_batch_weights

    g = torch.Generator().manual_seed(0)
    B, T = 24, 12
    lp, old = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    adv = torch.randn(B, generator=g)
    kw = dict(trace="both", lam=0.9, loss_type=loss_type, max_completion_length=T, impl="torch")
    num_items = mask.sum() if loss_type == "dapo" else None
    whole, _ = lk.grpo_lambda_loss(lp, old, adv, mask, num_items_in_batch=num_items, **kw)
    chunks = [slice(0, 16), slice(16, 32)]
    parts = sum(w * lk.grpo_lambda_loss(lp[sl], old[sl], adv[sl], mask[sl], num_items_in_batch=num_items, **kw)[0]
                for sl, w in zip(chunks, micro_batch_weights(mask, chunks, loss_type)))
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)


def test_device_and_dtype_options():
    import torch

    assert GRPOLambdaConfig(device="cpu").torch_device() == torch.device("cpu")
    assert GRPOLambdaConfig().torch_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'tpu'"):
        GRPOLambdaConfig(device="tpu").validate("train")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device 'cuda' needs CUDA.*--device cpu"):
            GRPOLambdaConfig(device="cuda").validate("train")
    with pytest.raises(ConfigError, match=r"model_dtype must be one of"):
        GRPOLambdaConfig(model_dtype="int8").validate("train")


def test_fp16_model_can_still_be_evaluated(tmp_path):
    cfg = dataclasses.replace(GRPOLambdaConfig(), model_dtype="float16", model_name_or_path=str(tmp_path))
    cfg.validate("evaluate")


def test_hub_ids_are_not_taken_for_missing_folders():
    dataclasses.replace(GRPOLambdaConfig(), model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct").validate()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match=r"impl must be 'auto' or 'torch' on the CPU; got 'triton'"):
        dataclasses.replace(GRPOLambdaConfig(), impl="triton", device="cpu").validate()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dataclasses.replace(GRPOLambdaConfig(), impl="triton", device="cpu").validate()


def test_other_reward_functions_weigh_one_each_unless_given():
    """The default weights (1.0, 0.1) belong to the default functions: naming others resets them."""
    assert build_config(None, {"reward_funcs": "arithmetic"}).reward_weights is None
    assert build_config(None, {"reward_funcs": "arithmetic", "reward_weights": "2.0"}).reward_weights == [2.0]
    assert build_config(None, {}).reward_weights == [1.0, 0.1]


def test_an_empty_held_out_split_is_an_error(tmp_path):
    from grpo_trainer.data import load_datasets

    path = tmp_path / "four.jsonl"
    path.write_text("".join(f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}\n' for i in range(4)))
    with pytest.raises(ConfigError, match=r"held-out split must hold at least one problem.*at least 5 rows"):
        load_datasets(dataclasses.replace(GRPOLambdaConfig(), dataset=str(path)))


def test_interrupt_says_how_to_resume(monkeypatch, capsys):
    import grpo_trainer.trainer as trainer_mod

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod, "train", interrupted)
    assert cli.main(["train"]) == 130
    assert "interrupted. Continue from the last checkpoint with the same options and --resume latest" in \
        capsys.readouterr().err


def test_vllm_on_another_gpu_than_cuda_0_is_refused(monkeypatch):
    """vLLM's in-process engine runs on cuda:0 (LOCAL_RANK): a policy on cuda:1 would sit apart from it."""
    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"device must be 'cuda' or 'cuda:0' with use_vllm; got 'cuda:1'.*"
                                          r"CUDA_VISIBLE_DEVICES=1"):
        dataclasses.replace(GRPOLambdaConfig(), use_vllm=True, device="cuda:1").validate()
    dataclasses.replace(GRPOLambdaConfig(), use_vllm=True, device="cuda:0", impl="torch").validate()


def test_resume_warns_about_options_changed_since_the_interrupted_run(tmp_path):
    """An option that differs from the interrupted run's config.yaml is named; one its config.yaml lacks (an option
    added since) is compared with its default, which is what that run used."""
    old = build_config(overrides={"learning_rate": 1e-5})
    old.save_yaml(tmp_path / "config.yaml", resume=None)
    saved = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text("\n".join(line for line in saved.splitlines()
                                                    if not line.startswith("entropy_coef:")))

    def warnings_for(**overrides):
        printed = []
        trainer = types.SimpleNamespace(out=tmp_path, cfg=build_config(overrides={"learning_rate": 1e-5, **overrides}),
                                        _print=printed.append)
        GRPOLambdaTrainer._warn_config_changes(trainer)
        return printed

    assert warnings_for() == []
    assert warnings_for(entropy_coef=0.0) == []  # missing there, the default here: unchanged
    (changed,) = warnings_for(entropy_coef=0.01, learning_rate=2e-5)
    assert "['entropy_coef', 'learning_rate']" in changed  # (in the options' order)
