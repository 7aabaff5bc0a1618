"""grpo_trainer end to end on tiny sizes: files written, weights change, exact resume, skipped non-finite steps,
reward errors surfacing from the loop, evaluate, JSONL data, and torch vs triton on the same batch."""
import dataclasses
import json
import math
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

import grpo_trainer.trainer as trainer_mod
from grpo_trainer.config import GRPOLambdaConfig
from grpo_trainer.evaluate import run_evaluate
from grpo_trainer.generation import HFGenerationBackend
from grpo_trainer.model import build_char_tokenizer, build_model, load_policy
from grpo_trainer.rewards import REGISTRY, RewardFunctionError
from grpo_trainer.trainer import Batch, GRPOLambdaTrainer, policy_loss, train

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            arithmetic_max_operand=9, eval_size=16, sft_warmup_steps=2, sft_batch_size=8, max_steps=3,
            num_generations=4, per_device_train_batch_size=8, max_completion_length=4, eval_samples=1,
            save_steps=0, disable_tqdm=True, learning_rate=1e-2, warmup_ratio=0.0, num_threads=1,
            reward_funcs=["arithmetic", "format", "short"], reward_weights=[1.0, 0.1, 0.1])


def short_reward(prompts, completions, **kwargs):
    """A dense test reward (shorter is better), so a tiny untrained model still gets a learning signal."""
    return [-len(c) / 4 for c in completions]


@pytest.fixture(autouse=True)
def _register_short_reward(monkeypatch):
    monkeypatch.setitem(REGISTRY, "short", short_reward)


def tiny(tmp_path, name="out", **kw) -> GRPOLambdaConfig:
    return dataclasses.replace(GRPOLambdaConfig(), output_dir=str(tmp_path / name), **{**TINY, **kw})


def metrics(cfg):
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


TRL_KEYS = {"step", "reward", "reward_std", "rewards/arithmetic/mean", "rewards/format/mean", "rewards/short/mean",
            "frac_reward_zero_std",
            "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
            "clip_ratio/low_min", "clip_ratio/high_max",
            "completions/mean_length", "completions/clipped_ratio", "loss", "grad_norm", "learning_rate",
            "step_time", "skipped"}


def test_end_to_end_writes_files_and_changes_weights(tmp_path):
    cfg = tiny(tmp_path, save_steps=2)
    result = train(cfg)
    out = tmp_path / "out"
    for name in ("metrics.jsonl", "reward_curve.png", "config.yaml", "eval_results.json", "final/model.safetensors",
                 "final/config.json", "final/tokenizer.json", "sft_model/model.safetensors",
                 "checkpoints/checkpoint-2/optimizer.pt", "checkpoints/checkpoint-2/trainer_state.json"):
        assert (out / name).is_file(), name
    rows = metrics(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert TRL_KEYS <= set(rows[0]), TRL_KEYS - set(rows[0])
    assert all(r["skipped"] == 0 and math_finite(r["loss"]) for r in rows)
    assert 0 <= result["before_rl"]["accuracy_greedy"] <= 1 and "pass@1" in result["after_rl"]
    sft, final = weights(out / "sft_model"), weights(out / "final")
    assert any(not torch.equal(sft[k], final[k]) for k in final)  # RL changed the weights
    assert all(torch.isfinite(v).all() for v in final.values())
    # the saved run reloads, and `evaluate` scores it
    model, tok = load_policy(cfg, path=str(out / "final"))
    assert model.config.vocab_size == len(tok)
    ev = run_evaluate(dataclasses.replace(cfg, model_name_or_path=str(out / "final"), eval_samples=2))
    assert ev["n_problems"] == 16 and ev["pass@1_samples"] == 2 and ev["eval_reward"] == "arithmetic"


def math_finite(x):
    return x is not None and abs(x) < float("inf")


def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    common = dict(max_steps=4, save_steps=2, beta=0.05, num_iterations=2, gradient_accumulation_steps=2,
                  per_device_train_batch_size=4)
    straight = tiny(tmp_path, "straight", **common)
    train(straight)

    interrupted = tiny(tmp_path, "resumed", **common)
    real_step = GRPOLambdaTrainer.rl_step

    def crash_at_third(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(GRPOLambdaTrainer, "rl_step", crash_at_third)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted)
    monkeypatch.setattr(GRPOLambdaTrainer, "rl_step", real_step)
    assert [r["step"] for r in metrics(interrupted)] == [1, 2]
    # what a kill can leave behind: a torn last metrics line, a half-written checkpoint folder
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    partial = tmp_path / "resumed" / "checkpoints" / ".tmp-checkpoint-4-12345"
    partial.mkdir()
    from grpo_trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"seed and data must be the checkpoint's.*seed 42; got .* seed 7"):
        GRPOLambdaTrainer(dataclasses.replace(interrupted, resume="latest", seed=7))
    # a checkpoint resumed into another folder (a fork) finds the reference model beside its checkpoints
    fork = tiny(tmp_path, "fork", **common, resume=str(tmp_path / "resumed" / "checkpoints" / "checkpoint-2"))
    train(fork)
    train(dataclasses.replace(interrupted, resume="latest"))
    assert not partial.exists()
    assert yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())["resume"] is None

    wf = weights(tmp_path / "fork" / "final")
    assert all(torch.equal(wf[k], w) for k, w in weights(tmp_path / "straight" / "final").items())
    a, b = metrics(straight), metrics(interrupted)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ra:
            if k != "step_time":
                assert ra[k] == pytest.approx(rb[k], abs=1e-6), (ra["step"], k)
    wa, wb = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = json.loads((tmp_path / "straight" / "eval_results.json").read_text())
    eb = json.loads((tmp_path / "resumed" / "eval_results.json").read_text())
    for phase in ("before_rl", "after_rl"):
        assert ea[phase]["accuracy_greedy"] == eb[phase]["accuracy_greedy"]


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("fault", ["loss", "grad"])
def test_non_finite_step_is_skipped(tmp_path, monkeypatch, fault):
    cfg = tiny(tmp_path, max_steps=2, sft_warmup_steps=0, eval_samples=0)
    real = trainer_mod.fused_grpo_lambda_loss
    calls = []

    def faulty(*args, **kwargs):
        loss, m = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # first update only
            loss = loss * float("nan") if fault == "loss" else _NanGrad.apply(loss)
        return loss, m

    monkeypatch.setattr(trainer_mod, "fused_grpo_lambda_loss", faulty)
    trainer = GRPOLambdaTrainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer._prepare()
    first = trainer.rl_step(0)
    assert first["skipped"] == 1 and first["loss"] is None and first["grad_norm"] is None
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing written into the weights
    assert not trainer.optimizer.state  # the optimizer never stepped
    second = trainer.rl_step(1)
    assert second["skipped"] == 0 and second["loss"] is not None
    assert any(not torch.equal(before[k], trainer.model.state_dict()[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_raising_reward_in_training_names_function_and_sample(tmp_path, monkeypatch):
    state = {}

    def picky(prompts, completions, **kw):  # fails on the second prompt of the first batch
        if "target" not in state:
            state["target"] = prompts[4]
        target = state["target"]
        if target in prompts:
            raise ValueError(f"cannot score {target!r}")
        return [0.0] * len(completions)

    monkeypatch.setitem(REGISTRY, "picky", picky)
    cfg = tiny(tmp_path, reward_funcs=["short", "picky"], reward_weights=None, sft_warmup_steps=0, eval_samples=0)
    with pytest.raises(RewardFunctionError, match=r"reward function 'picky' raised ValueError: cannot score .* on "
                                                  r"sample 4 \(prompt='.*', completion='.*'\)"):
        train(cfg)


def test_jsonl_dataset_and_plain_grpo(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=", "solution": str(a + b), "level": a % 3}) + "\n"
                            for a in range(10) for b in range(10)))
    seen = []

    def level_reward(prompts, completions, level, answer, **kw):  # columns arrive as keywords, answer as `answer`
        seen.append(level)
        return [None if lv == 0 else 0.5 for lv in level]

    REGISTRY["level_reward"] = level_reward
    try:
        cfg = tiny(tmp_path, dataset=str(data), prompt_column="question", answer_column="solution",
                   reward_funcs=["short", "level_reward"], reward_weights=None, eval_reward="arithmetic",
                   algorithm="grpo", beta=0.0, max_steps=2, dynamic_sampling=True, loss_type="grpo")
        train(cfg)
    finally:
        del REGISTRY["level_reward"]
    rows = metrics(cfg)
    assert len(rows) == 2 and "kl" not in rows[0] and rows[0]["rewards/level_reward/mean"] == 0.5
    assert seen and all(lv in (0, 1, 2) for lv in seen[0])


def _same_batch(cfg):
    tok = build_char_tokenizer()
    tok.padding_side = "left"
    model = build_model(cfg, tok)
    torch.manual_seed(0)
    gen = HFGenerationBackend(model, tok, max_prompt_length=16, max_completion_length=4).generate(
        ["1+2=", "13+4=", "7-5="], 2, temperature=1.0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 0.0])
    batch = Batch(gen.prompt_ids, gen.prompt_mask, gen.completion_ids, gen.completion_mask, gen.completion_mask, adv)
    return model, batch


def test_torch_and_triton_give_the_same_loss(tmp_path):
    """The same batch through policy_loss with impl="torch" and impl="triton" (CPU: the Triton interpreter)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        pytest.skip("impl='triton' on CPU needs TRITON_INTERPRET=1 before the first `import triton` "
                    "(tests/conftest.py sets it)")
    cfg = tiny(tmp_path, beta=0.1, num_iterations=2, temperature=0.7)
    model, batch = _same_batch(cfg)
    with torch.no_grad():
        old = trainer_mod.batch_logprobs(model, batch, trainer_mod.micro_batches(batch, cfg),
                                         dataclasses.replace(cfg, impl="torch")) - 0.05
        ref = old + 0.1
    results = {}
    for impl in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        loss, m = policy_loss(model, batch, dataclasses.replace(cfg, impl=impl), old_logprobs=old, ref_logprobs=ref)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (loss.detach(), m, grads)
    (lt, mt, gt), (lk, mk, gk) = results["torch"], results["triton"]
    torch.testing.assert_close(lk, lt, rtol=1e-5, atol=1e-6)
    for k in ("kl", "entropy", "clip_ratio/region_mean"):
        torch.testing.assert_close(mk[k], mt[k], rtol=1e-5, atol=1e-6)
    for n in gt:
        torch.testing.assert_close(gk[n], gt[n], rtol=1e-4, atol=1e-6)


def test_kl_bias_correction_reaches_the_loss(tmp_path):
    """Old log-probs 0.05 below the policy's: every token's ratio is e^0.05, so the ratio-weighted KL is e^0.05 × the
    plain one, token by token (and so is its mean)."""
    cfg = tiny(tmp_path, beta=0.1, num_iterations=2, impl="torch")
    model, batch = _same_batch(cfg)
    with torch.no_grad():
        old = trainer_mod.batch_logprobs(model, batch, trainer_mod.micro_batches(batch, cfg), cfg) - 0.05
        kl = {flag: policy_loss(model, batch, dataclasses.replace(cfg, kl_bias_correction=flag), old_logprobs=old,
                                ref_logprobs=old + 0.3)[1]["kl"] for flag in (False, True)}
    assert kl[False] > 0
    torch.testing.assert_close(kl[True], kl[False] * math.exp(0.05), rtol=1e-5, atol=0)


def test_delta_reaches_the_loss(tmp_path):
    """Old log-probs 1 below the policy's: every ratio is about e (the trace only raises it), so `delta` = 1.5 caps
    every token of the sequences with Â < 0; a delta no ratio reaches changes nothing."""
    cfg = tiny(tmp_path, num_iterations=2, impl="torch", beta=0.0)
    model, batch = _same_batch(cfg)
    assert (batch.advantages < 0).any()
    with torch.no_grad():
        old = trainer_mod.batch_logprobs(model, batch, trainer_mod.micro_batches(batch, cfg), cfg) - 1.0
        loss = {delta: policy_loss(model, batch, dataclasses.replace(cfg, delta=delta), old_logprobs=old)[0]
                for delta in (None, 1.5, 1e6)}
    assert loss[1.5] < loss[None] - 1e-3  # capped tokens pay −1.5·Â instead of −ρ̃·Â > −1.5·Â
    torch.testing.assert_close(loss[1e6], loss[None], rtol=0, atol=0)


def test_top_entropy_quantile_trains_the_high_entropy_tokens(tmp_path):
    """top_entropy_quantile = 0.5: the loss is the fused loss with policy weights 1 on the loss tokens whose entropy
    is at least the median of the micro-batch's (computed here from the reference's entropies), 0 elsewhere; the
    entropy bonus (entropy_coef) is over those tokens too."""
    from lambda_kernels import reference as R
    from grpo_trainer.model import completion_hidden, lm_head

    cfg = tiny(tmp_path, num_iterations=2, impl="torch", beta=0.0, top_entropy_quantile=0.5)
    model, batch = _same_batch(cfg)
    with torch.no_grad():
        old = trainer_mod.batch_logprobs(model, batch, trainer_mod.micro_batches(batch, cfg), cfg) - 0.2
        hidden = completion_hidden(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                   batch.attention_mask)
        weight, _ = lm_head(model)
        _, ent = R.linear_logprobs(hidden.double(), weight.double(), batch.completion_ids, return_entropy=True,
                                   temperature=cfg.temperature, mask=batch.loss_mask)
        real = batch.loss_mask != 0
        keep = ((ent >= torch.quantile(ent[real], 0.5)) & real).float()
        assert 0 < keep.sum() < real.sum()
        want, _ = R.fused_grpo_lambda_loss(hidden.double(), weight.double(), batch.completion_ids, batch.loss_mask,
                                           batch.advantages.double(), old_logprobs=old.double(), trace=cfg.trace,
                                           lam=cfg.lam, adv_clamp_min=cfg.adv_clamp_min, temperature=cfg.temperature,
                                           loss_type=cfg.loss_type, policy_weights=keep)
        got = {q: policy_loss(model, batch, dataclasses.replace(cfg, top_entropy_quantile=q), old_logprobs=old)[0]
               for q in (0.5, 1.0)}
    torch.testing.assert_close(got[0.5].double(), want, rtol=1e-5, atol=1e-7)
    assert abs(got[0.5] - got[1.0]) > 1e-3
    # entropy_coef 0.1: the loss and every gradient move by those of −0.1 × the kept tokens' mean entropy
    moved = []
    for coef in (0.0, 0.1):
        model.zero_grad(set_to_none=False)
        loss = policy_loss(model, batch, dataclasses.replace(cfg, entropy_coef=coef), old_logprobs=old)[0]
        loss.backward()
        moved.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    model.zero_grad(set_to_none=False)
    hidden = completion_hidden(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                               batch.attention_mask)
    _, ent = R.linear_logprobs(hidden, lm_head(model)[0], batch.completion_ids, return_entropy=True,
                               temperature=cfg.temperature, mask=batch.loss_mask)
    bonus = -0.1 * (ent * keep).sum() / keep.sum()
    bonus.backward()
    expected = [bonus.detach()] + [p.grad for p in model.parameters()]
    assert bonus < -0.1  # (an entropy above 1 nat: no rounding-sized change)
    for without, with_bonus, want_change in zip(*moved, expected):
        torch.testing.assert_close(with_bonus - without, want_change, rtol=1e-4, atol=1e-6)
    # a micro-batch without loss tokens: nothing to keep (and no error from an empty quantile)
    empty = dataclasses.replace(batch, loss_mask=torch.zeros_like(batch.loss_mask))
    keep_none = trainer_mod.high_entropy_mask(hidden, weight, None, empty, cfg.temperature, None, cfg)
    assert keep_none.shape == batch.loss_mask.shape and (keep_none == 0).all()


def test_new_run_never_deletes_an_earlier_runs_checkpoints(tmp_path):
    """Forgetting --resume on a folder with an interrupted run stops at start-up instead of wiping it."""
    from grpo_trainer.config import ConfigError

    cfg = tiny(tmp_path)
    ckpt_dir = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    ckpt_dir.mkdir(parents=True)
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1}\n')
    # killed before its first complete checkpoint: nothing to resume, and the hints say so (not "--resume latest",
    # which would refuse in turn)
    with pytest.raises(ConfigError, match=r"already holds an earlier run.*no checkpoint to resume.*"
                                          r"--overwrite_output_dir"):
        GRPOLambdaTrainer(cfg)
    with pytest.raises(ConfigError, match=r"holds none.*--overwrite_output_dir true"):
        GRPOLambdaTrainer(dataclasses.replace(cfg, resume="latest"))
    (ckpt_dir / "trainer_state.json").write_text("{}")  # a complete checkpoint: resuming is the hint
    with pytest.raises(ConfigError, match=r"already holds an earlier run.*--resume latest.*--overwrite_output_dir"):
        GRPOLambdaTrainer(cfg)
    assert ckpt_dir.is_dir()
    GRPOLambdaTrainer(dataclasses.replace(cfg, overwrite_output_dir=True))  # explicit: the folder is reused
    assert not ckpt_dir.exists()
