"""The vLLM generation backend (`use_vllm=True`) on the CPU, against a fake `vllm` module: vLLM is not installed here.

The fake is the offline API as TRL 1.16 drives it in colocate mode (`LLM(...)`, `LLM.generate` on token-id prompts
returning RequestOutputs whose `.outputs[i].token_ids` are the completion, `SamplingParams(**kwargs)`, the model at
`llm_engine.model_executor.driver_worker.model_runner.model` with `load_weights` taking (name, tensor) pairs under
the Hugging Face checkpoint's names, `reset_prefix_cache`). It refuses keyword arguments vLLM does not take, loads
its own copy of the model from the folder, changes it only through `load_weights`, and samples from it token by token
(a generator seeded by the request's seed; top_p is recorded, not applied) until the tokenizer's EOS or an EOS id of
the generation config, as vLLM stops. Asked for `logprobs=0`, each output carries `.logprobs`, one {token id: Logprob}
dict per generated token with the sampled token's log-prob, of the tempered distribution under
`logprobs_mode="processed_logprobs"` and of the raw one otherwise (vLLM's default), plus `logprob_offset(request,
position)`: a controlled difference between the engine's numerics and the policy's.

The vLLM importance-sampling correction (TRL's) is checked here too: its weights against TRL's lines written out as an
oracle, and the trainer's loss (the weights as the fused loss's policy_weights) against TRL's loss written out and
against the fused loss on weighted advantages.
"""
import copy
import dataclasses
import importlib.machinery
import json
import math
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import grpo_trainer.trainer as trainer_module
from grpo_trainer.config import ConfigError, GRPOLambdaConfig
from grpo_trainer.generation import HFGenerationBackend, VLLMGenerationBackend
from grpo_trainer.model import BOS, EOS, PAD, completion_hidden, lm_head, load_policy, save_pretrained
from grpo_trainer.rewards import REGISTRY
from grpo_trainer.trainer import Batch, GRPOLambdaTrainer, train, vllm_importance_weights
from lambda_kernels import fused_grpo_lambda_loss

SAMPLING_DEFAULTS = dict(n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, max_tokens=16,
                         stop_token_ids=None, ignore_eos=False, logprobs=None, repetition_penalty=1.0)
LLM_ARGS = {"dtype", "seed", "max_model_len", "gpu_memory_utilization", "distributed_executor_backend",
            "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size", "enable_sleep_mode", "model_impl",
            "trust_remote_code", "quantization", "logprobs_mode"}
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class FakeSamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(SAMPLING_DEFAULTS)
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        self.__dict__.update({**SAMPLING_DEFAULTS, **kwargs})


class FakeEngineModel:
    """vLLM's model as `load_weights` sees it: checkpoint names in, copied into its own parameters."""

    def __init__(self, hf_model):
        self.hf = hf_model
        self.loaded = []  # every (name, tensor) pair it was given

    @torch.no_grad()
    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        done = set()
        for name, tensor in weights:
            self.loaded.append((name, tensor))
            if name == "lm_head.weight" and self.hf.config.tie_word_embeddings:
                continue  # as vLLM's loaders: a tied head is the embedding
            if name not in params:
                raise ValueError(f"There is no module or parameter named {name!r} in {type(self.hf).__name__}")
            params[name].copy_(tensor)
            done.add(name)
        return done


class FakeLLM:
    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        unknown = set(kwargs) - LLM_ARGS
        if unknown:
            raise TypeError(f"LLM got unexpected keyword arguments {sorted(unknown)}")
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            assert all(os.environ.get(k) for k in LAUNCHER_ENV), "external_launcher reads the torch.distributed env"
        self.kwargs = {"model": model, **kwargs}
        self.env = {k: os.environ.get(k) for k in LAUNCHER_ENV}
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, kwargs["dtype"]))
        self.model.eval().requires_grad_(False)
        eos = GenerationConfig.from_pretrained(model).eos_token_id
        self.stop_ids = {AutoTokenizer.from_pretrained(model).eos_token_id, *([eos] if isinstance(eos, int) else eos)}
        self.engine_model = FakeEngineModel(self.model)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=SimpleNamespace(model=self.engine_model))))
        self.calls, self.resets = [], []
        self.script = None  # (request index, prompt ids, params) -> completion ids, instead of sampling
        self.logprob_offset = lambda i, t: 0.0  # (request index, position) -> added to the reported log-prob
        sys.modules["vllm"].engines.append(self)

    def reset_prefix_cache(self):
        self.resets.append(len(self.engine_model.loaded))

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts) and all(isinstance(p, FakeSamplingParams) for p in params)
        weights = {k: v.clone() for k, v in self.model.state_dict().items()}  # what this call samples from
        outputs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            ids = prompt["prompt_token_ids"]
            assert isinstance(ids, list) and ids and all(type(t) is int for t in ids)
            rows = [self.script(i, ids, p) if self.script else self._sample(ids, p, j) for j in range(p.n)]
            outputs.append(SimpleNamespace(prompt_token_ids=ids, outputs=[SimpleNamespace(
                index=j, token_ids=r, finish_reason=self._finish_reason(r, p),
                logprobs=None if p.logprobs is None else self._logprobs(i, ids, r, p))
                for j, r in enumerate(rows)]))
        self.calls.append(SimpleNamespace(prompts=prompts, params=params, weights=weights, outputs=outputs))
        return outputs

    @torch.no_grad()
    def _logprobs(self, request, prompt_ids, row, p):
        """vLLM's per-token logprobs: [{sampled id: Logprob}] (logprobs=0: the sampled token only)."""
        assert p.logprobs == 0, "the backend asks for the sampled tokens' log-probs only"
        if not row:
            return []
        logits = self.model(torch.tensor([prompt_ids + row])).logits[0, len(prompt_ids) - 1:-1].float()
        if self.kwargs.get("logprobs_mode") == "processed_logprobs" and p.temperature > 0:
            logits = logits / p.temperature  # else vLLM's default: the raw distribution's log-probs
        logp = torch.log_softmax(logits, -1)
        out = []
        for t, tok in enumerate(row):
            rank = int((logp[t] > logp[t, tok]).sum()) + 1
            out.append({tok: SimpleNamespace(logprob=float(logp[t, tok]) + self.logprob_offset(request, t), rank=rank,
                                             decoded_token=None)})
        return out

    def _finish_reason(self, row, p):  # vLLM V1 checks the length first
        return "length" if len(row) >= p.max_tokens else "stop"

    @torch.no_grad()
    def _sample(self, prompt_ids, p, index):
        gen = torch.Generator().manual_seed(p.seed + index) if p.seed is not None else None
        out = []
        while len(out) < p.max_tokens and not (out and out[-1] in self.stop_ids):
            logits = self.model(torch.tensor([prompt_ids + out])).logits[0, -1].float()
            if p.temperature == 0:
                out.append(int(logits.argmax()))
            else:
                out.append(int(torch.multinomial(torch.softmax(logits / p.temperature, -1), 1, generator=gen)))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # so find_spec("vllm") finds it
    module.LLM, module.SamplingParams, module.engines = FakeLLM, FakeSamplingParams, []
    monkeypatch.setitem(sys.modules, "vllm", module)
    for key in LAUNCHER_ENV:  # unset for the test, and whatever the backend sets is undone after it
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    return module


def tiny_policy(tmp_path, tie=True, dtype="float32"):
    """(model, tokenizer, folder): the trainer's tiny Llama and character tokenizer, saved for the engine to load."""
    cfg = GRPOLambdaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           device="cpu", model_dtype=dtype)
    model, tok = load_policy(cfg)
    if not tie:
        from transformers import LlamaForCausalLM

        config = copy.deepcopy(model.config)
        config.tie_word_embeddings = False
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(model.dtype)
    path = tmp_path / "init"
    save_pretrained(model, tok, path)
    return model, tok, str(path)


def make_backend(path, tok, **kw):
    return VLLMGenerationBackend(path, tok, **{"max_prompt_length": 8, "max_completion_length": 4,
                                               "dtype": "float32", "seed": 3, **kw})


def chars(tok, s):
    return [tok.convert_tokens_to_ids(c) for c in s]


def test_engine_options(tmp_path, fake_vllm, monkeypatch):
    _, tok, path = tiny_policy(tmp_path)
    make_backend(path, tok, max_prompt_length=10, max_completion_length=6, dtype="bfloat16", seed=7)
    (engine,) = fake_vllm.engines
    assert engine.kwargs == dict(model=path, dtype="bfloat16", seed=7, max_model_len=16, gpu_memory_utilization=0.3,
                                 distributed_executor_backend="external_launcher", max_num_batched_tokens=4096,
                                 logprobs_mode="processed_logprobs")  # the sampled log-probs after temperature
    assert engine.model.dtype == torch.bfloat16
    env = engine.env
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "0", "1", "localhost")
    assert 0 < int(env["MASTER_PORT"]) < 65536
    monkeypatch.setenv("MASTER_PORT", "29533")  # a launcher's own settings are kept
    monkeypatch.setenv("RANK", "0")
    make_backend(path, tok)
    assert fake_vllm.engines[1].env["MASTER_PORT"] == "29533"


def test_generation_layout(tmp_path, fake_vllm):
    """Prompts go in as unpadded token ids (left-truncated), each G times; completions come back right-padded, masked
    up to and including the stop token vLLM ended them with (the tokenizer's EOS or the generation config's)."""
    from transformers import GenerationConfig

    _, tok, path = tiny_policy(tmp_path)
    bang = tok.convert_tokens_to_ids("!")
    gen_cfg = GenerationConfig.from_pretrained(path)
    gen_cfg.eos_token_id = [EOS, bang]  # a model with a second EOS id (as Qwen2.5's <|endoftext|>)
    gen_cfg.save_pretrained(path)
    backend = make_backend(path, tok)  # max_prompt_length 8, max_completion_length 4
    (engine,) = fake_vllm.engines
    script = ["7", "123", "1234", "", "4!", "99", "abcd", "x", "y"]  # + EOS unless 4 long or ending in "!"
    engine.script = lambda i, ids, p: chars(tok, script[i]) + ([] if len(script[i]) == 4 or "!" in script[i]
                                                               else [EOS])
    out = backend.generate(["1+2=", "12+30=", "123456789+1="], 3, temperature=0.5)

    short, mid, cut = [BOS] + chars(tok, "1+2="), [BOS] + chars(tok, "12+30="), [BOS] + chars(tok, "6789+1=")
    assert engine.calls[0].prompts == [{"prompt_token_ids": ids} for ids in [short] * 3 + [mid] * 3 + [cut] * 3]
    assert out.prompt_ids.tolist() == [[PAD] * 3 + short] * 3 + [[PAD] + mid] * 3 + [cut] * 3
    assert out.prompt_mask.tolist() == [[0] * 3 + [1] * 5] * 3 + [[0] + [1] * 7] * 3 + [[1] * 8] * 3

    ids = {c: tok.convert_tokens_to_ids(c) for c in "123479abcdxy!"}
    assert out.completion_ids.tolist() == [
        [ids["7"], EOS, PAD, PAD], [ids["1"], ids["2"], ids["3"], EOS], [ids["1"], ids["2"], ids["3"], ids["4"]],
        [EOS, PAD, PAD, PAD], [ids["4"], bang, PAD, PAD], [ids["9"], ids["9"], EOS, PAD],
        [ids["a"], ids["b"], ids["c"], ids["d"]], [ids["x"], EOS, PAD, PAD], [ids["y"], EOS, PAD, PAD]]
    assert out.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0],
                                            [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    # row 1 ends with EOS as its 4th token, which vLLM reports as finish_reason "length": not truncated
    assert engine.calls[0].outputs[1].outputs[0].finish_reason == "length"
    assert out.truncated.tolist() == [False, False, True, False, False, False, True, False, False]
    assert out.texts == ["7", "123", "1234", "", "4!", "99", "abcd", "x", "y"]
    assert out.completion_ids.dtype == out.completion_mask.dtype == torch.long and out.truncated.dtype == torch.bool


def test_sampling_params_and_seeds(tmp_path, fake_vllm):
    _, tok, path = tiny_policy(tmp_path)
    backend = make_backend(path, tok)
    (engine,) = fake_vllm.engines
    prompts = ["1+2=", "3+4="]
    torch.manual_seed(0)
    first = backend.generate(prompts, 4, temperature=0.7, top_p=0.9)
    torch.manual_seed(0)
    again = backend.generate(prompts, 4, temperature=0.7, top_p=0.9)
    later = backend.generate(prompts, 4, temperature=0.7, top_p=0.9)
    greedy = backend.generate(prompts, 2, greedy=True)

    sampled = engine.calls[0].params
    assert len(sampled) == 8
    for p in sampled:
        assert (p.n, p.temperature, p.top_p, p.max_tokens, p.logprobs) == (1, 0.7, 0.9, 4, 0)
        assert (p.top_k, p.min_p) == (0, 0.0)  # vLLM's defaults: no top-k, no min-p (the HF backend's top_k=0)
    seeds = [p.seed for p in sampled]
    assert all(type(s) is int for s in seeds) and len(set(seeds)) == 8  # one seed per completion
    # drawn from torch's RNG: the same torch seed samples the same completions, the next call others
    assert [p.seed for p in engine.calls[1].params] == seeds
    assert torch.equal(first.completion_ids, again.completion_ids) and first.texts == again.texts
    assert set(p.seed for p in engine.calls[2].params).isdisjoint(seeds)
    assert not torch.equal(first.completion_ids, later.completion_ids)
    assert len(set(map(tuple, first.completion_ids[:4].tolist()))) > 1  # the G completions of a prompt differ
    for p in engine.calls[3].params:
        assert (p.n, p.temperature, p.top_p, p.max_tokens, p.seed, p.logprobs) == (1, 0.0, 1.0, 4, None, None)
    assert first.sampling_logprobs is not None and greedy.sampling_logprobs is None
    assert torch.equal(greedy.completion_ids[0], greedy.completion_ids[1])


@pytest.mark.parametrize("tie,dtype", [(True, "float32"), (False, "bfloat16")])
def test_sync_weights_pushes_every_current_weight_in_place(tmp_path, fake_vllm, tie, dtype):
    model, tok, path = tiny_policy(tmp_path, tie=tie, dtype=dtype)
    backend = make_backend(path, tok, dtype=dtype)
    (engine,) = fake_vllm.engines
    with torch.no_grad():  # the policy moves on after the engine was built
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    engine_state = engine.model.state_dict()
    assert not any(torch.equal(engine_state[k], v) for k, v in model.state_dict().items())

    backend.sync_weights(model)
    names = [name for name, _ in model.named_parameters()]
    assert ("lm_head.weight" in names) is not tie  # a tied head goes once, as the embedding
    assert [name for name, _ in engine.engine_model.loaded] == names
    for (_, pushed), (_, p) in zip(engine.engine_model.loaded, model.named_parameters()):
        assert pushed.data_ptr() == p.data_ptr() and pushed.dtype == p.dtype == getattr(torch, dtype)  # no copy
    engine_state = engine.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(engine_state[k], v), k
    assert engine.resets == [len(names)]  # the prefix cache is dropped after the new weights are in

    # a torch.compile'd policy pushes the same names (no _orig_mod. prefix)
    backend.sync_weights(torch.compile(model))
    assert [name for name, _ in engine.engine_model.loaded[len(names):]] == names


def test_greedy_generation_after_sync_matches_transformers(tmp_path, fake_vllm):
    """After a sync the engine generates from the policy's weights: the same Generation as the HF backend's."""
    model, tok, path = tiny_policy(tmp_path)
    backend = make_backend(path, tok, max_completion_length=6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    backend.sync_weights(model)
    prompts = ["1+2=", "12+30=", "7*8=", "123456789+1="]
    hf = HFGenerationBackend(model, tok, max_prompt_length=8, max_completion_length=6).generate(prompts, 2, greedy=True)
    vl = backend.generate(prompts, 2, greedy=True)
    for field in dataclasses.fields(vl):
        a, b = getattr(vl, field.name), getattr(hf, field.name)
        assert (torch.equal(a, b.cpu()) if isinstance(a, torch.Tensor) else a == b), field.name


def test_sync_weights_refuses_a_peft_model(tmp_path, fake_vllm):
    peft = pytest.importorskip("peft")
    model, tok, path = tiny_policy(tmp_path)
    backend = make_backend(path, tok)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"got a PEFT model.*merge_and_unload"):
        backend.sync_weights(lora)
    assert fake_vllm.engines[0].engine_model.loaded == []


def short_reward(prompts, completions, **kwargs):
    return [-len(c) / 4 for c in completions]  # dense, so the tiny model's update is not zero


def test_trainer_with_vllm_samples_from_the_synced_weights(tmp_path, fake_vllm, monkeypatch):
    """A run with use_vllm=True: the engine is built from the policy in its dtype and seed, is synced after the
    warm-up and after each update, and the trainer learns from the completions the engine returned."""
    monkeypatch.setitem(REGISTRY, "short", short_reward)
    cfg = dataclasses.replace(
        GRPOLambdaConfig(), output_dir=str(tmp_path / "out"), use_vllm=True, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, arithmetic_max_operand=9, eval_size=16, sft_warmup_steps=2,
        sft_batch_size=8, max_steps=2, num_generations=4, per_device_train_batch_size=8, max_completion_length=4,
        eval_samples=1, save_steps=1, save_total_limit=0, disable_tqdm=True, learning_rate=1e-2, warmup_ratio=0.0,
        num_threads=1, device="cpu", reward_funcs=["arithmetic", "short"], reward_weights=[1.0, 1.0])
    train(cfg)
    out = tmp_path / "out"
    (engine,) = fake_vllm.engines
    assert engine.kwargs["model"] == str(out / "vllm_init")
    assert (engine.kwargs["dtype"], engine.kwargs["seed"], engine.kwargs["max_model_len"]) == ("float32", 42, 68)

    def weights(folder):
        return load_file(out / folder / "model.safetensors")

    def same(engine_weights, saved):
        return all(torch.equal(engine_weights[k], v) for k, v in saved.items())

    init, sft, ckpt1, final = (weights(f) for f in ("vllm_init", "sft_model", "checkpoints/checkpoint-1", "final"))
    assert not same(init, sft) and not same(sft, ckpt1) and not same(ckpt1, final)  # every phase moved the weights
    # calls: evaluation before RL (greedy, pass@1), the rollouts of steps 1 and 2, evaluation after RL
    calls = engine.calls
    assert len(calls) == 6
    assert [c.params[0].temperature for c in calls] == [0.0, cfg.eval_temperature, 1.0, 1.0, 0.0,
                                                        cfg.eval_temperature]
    assert all(same(c.weights, sft) for c in calls[:3])  # synced after the warm-up
    assert same(calls[3].weights, ckpt1) and all(same(c.weights, final) for c in calls[4:])
    names = [name for name, _ in load_policy(cfg)[0].named_parameters()]
    assert engine.resets == [len(names) * k for k in (1, 2, 3)]  # warm-up, step 1, step 2: every weight each time
    assert [name for name, _ in engine.engine_model.loaded] == names * 3

    # the rollouts the trainer scored are the engine's completions
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row, call in zip(rows, calls[2:4]):
        completions = [o.outputs[0].token_ids for o in call.outputs]
        assert len(completions) == 8 and [len(r["prompt_token_ids"]) > 1 for r in call.prompts] == [True] * 8
        assert row["completions/mean_length"] == pytest.approx(sum(map(len, completions)) / 8)
        truncated = [len(c) == 4 and c[-1] != EOS for c in completions]
        assert row["completions/clipped_ratio"] == pytest.approx(sum(truncated) / 8)
        # the importance-sampling correction (on by default): the fake engine samples the synced weights in fp32, so
        # its log-probs are the trainer's to rounding and every sequence's ratio is 1 (TRL's metric names)
        assert row["sampling/sampling_logp_difference/max"] < 1e-5
        assert 0 <= row["sampling/sampling_logp_difference/mean"] <= row["sampling/sampling_logp_difference/max"]
        for stat in ("min", "mean", "max"):
            assert row[f"sampling/importance_sampling_ratio/{stat}"] == pytest.approx(1.0, abs=1e-4)



# ---------------------------------------------------------------------- the sampled tokens' log-probs

SCRIPT = ["7", "123", "1234", "", "49", "99", "abcd", "x"]  # + EOS unless 4 long: 2, 4, 4, 1, 3, 3, 4, 2 tokens


def script_engine(engine, tok):
    def script(i, ids, p):
        text = SCRIPT[i % len(SCRIPT)]
        return chars(tok, text) + ([] if len(text) == 4 else [EOS])
    engine.script = script


@torch.no_grad()
def full_logprobs(model, gen, temperature):
    """[B, T] log-probs of the completion tokens from the model's full logits (not linear_logprobs), 0 at padding."""
    ids = torch.cat([gen.prompt_ids, gen.completion_ids], 1)
    mask = torch.cat([gen.prompt_mask, gen.completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    P = gen.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1:-1].float() / temperature, -1)
    return logp.gather(-1, gen.completion_ids.unsqueeze(-1)).squeeze(-1) * gen.completion_mask


def test_sampling_logprobs_layout(tmp_path, fake_vllm):
    """The sampled tokens' log-probs come back as [B, T] fp32 in the completions' layout, 0 at padding, each the one
    vLLM reported for that token: of the tempered distribution (logprobs_mode="processed_logprobs")."""
    model, tok, path = tiny_policy(tmp_path)
    backend = make_backend(path, tok)
    (engine,) = fake_vllm.engines
    script_engine(engine, tok)
    engine.logprob_offset = lambda i, t: 0.25 * i - 0.5 * t
    out = backend.generate(["1+2=", "12+30="], 4, temperature=0.5)
    lp, mask = out.sampling_logprobs, out.completion_mask.bool()
    assert lp.dtype == torch.float32 and lp.shape == out.completion_ids.shape == (8, 4)
    assert mask.sum(1).tolist() == [2, 4, 4, 1, 3, 3, 4, 2]
    assert torch.all(lp[~mask] == 0)
    for i, o in enumerate(engine.calls[0].outputs):  # exactly what vLLM reported, token by token
        reported = [lp_t[token].logprob for lp_t, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
        assert lp[i, :len(reported)].tolist() == pytest.approx(reported, abs=0, rel=1e-6)
    offset = torch.tensor([[0.25 * i - 0.5 * t for t in range(4)] for i in range(8)]) * mask
    tempered = full_logprobs(model, out, 0.5)
    torch.testing.assert_close(lp, tempered + offset, atol=2e-5, rtol=0)
    assert (lp - offset - full_logprobs(model, out, 1.0))[mask].abs().max() > 0.1  # not the raw distribution's

    # a token vLLM could not score (NaN) stays NaN, as TRL keeps it; greedy rows have none to report
    engine.logprob_offset = lambda i, t: math.nan if (i, t) == (1, 2) else 0.0
    out = backend.generate(["1+2=", "12+30="], 4, temperature=0.5)
    nan = torch.isnan(out.sampling_logprobs)
    assert nan.nonzero().tolist() == [[1, 2]]
    torch.testing.assert_close(out.sampling_logprobs[~nan], tempered[~nan], atol=2e-5, rtol=0)
    assert backend.generate(["1+2="], 2, greedy=True).sampling_logprobs is None


def test_hf_backend_stops_where_vllm_does(tmp_path, monkeypatch):
    """The HF backend ends a completion at the tokenizer's EOS or at any eos_token_id of the model's generation
    config (a second EOS id, as Qwen2.5-Instruct's <|endoftext|>): generate is told to stop at both, and a row is cut
    after the first of either (scripted tokens: a random tiny model emits neither on demand)."""
    model, tok, _ = tiny_policy(tmp_path)
    bang = tok.convert_tokens_to_ids("!")
    model.generation_config.eos_token_id = [EOS, bang]
    script = [chars(tok, "4!7") + [EOS], chars(tok, "12") + [EOS, PAD], chars(tok, "1234"), chars(tok, "!") + [PAD] * 3]
    seen = []

    def fake_generate(input_ids, attention_mask, generation_config):
        seen.append(generation_config.eos_token_id)
        return torch.cat([input_ids, torch.tensor(script)], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    out = HFGenerationBackend(model, tok, max_prompt_length=8, max_completion_length=4).generate(["1+2=", "3+4="], 2)
    assert seen == [sorted([EOS, bang])]
    ids = {c: tok.convert_tokens_to_ids(c) for c in "1234"}
    assert out.completion_ids.tolist() == [[ids["4"], bang, PAD, PAD], [ids["1"], ids["2"], EOS, PAD],
                                           [ids["1"], ids["2"], ids["3"], ids["4"]], [bang, PAD, PAD, PAD]]
    assert out.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert out.truncated.tolist() == [False, False, True, False]
    assert out.texts == ["4!", "12", "1234", "!"]


def test_hf_backend_returns_no_sampling_logprobs(tmp_path):
    model, tok, _ = tiny_policy(tmp_path)
    out = HFGenerationBackend(model, tok, max_prompt_length=8, max_completion_length=4).generate(["1+2="], 2)
    assert out.sampling_logprobs is None


# ---------------------------------------------------------------------- TRL's importance-sampling weights

def trl_importance_sampling(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions: the vLLM importance-sampling ratio and its metrics,
    written out as an oracle (one process: TRL's gathers are identities)."""
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True) if sequence_level_is else per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    elif mode in ["sequence_mask", "token_mask"]:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    delta = torch.abs(old - sampling)
    m = mask.bool()
    delta = delta[m & ~torch.isnan(delta)]
    flat = ratio.flatten() if sequence_level_is else ratio[m]
    metrics = {"sampling/sampling_logp_difference/mean": torch.mean(delta),
               "sampling/sampling_logp_difference/max": torch.max(delta),
               "sampling/importance_sampling_ratio/min": torch.min(flat),
               "sampling/importance_sampling_ratio/mean": torch.mean(flat),
               "sampling/importance_sampling_ratio/max": torch.max(flat)}
    return ratio, metrics


MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
L2 = math.log(2.0)
# ratios exp(old − sampling) per token: row 0: 2, 4, padding (old 5.0 there); row 1: 1/4, 1, 1/2;
# row 2: 2, a NaN sampling log-prob (ratio 1), padding. Sequence ratios: 8, 1/8, 2.
EXPLICIT = [
    ("token_truncate", None, 3.0, [[2, 3, 1], [0.25, 1, 0.5], [2, 1, 1]]),
    ("token_mask", None, 3.0, [[2, 0, 1], [0.25, 1, 0.5], [2, 1, 1]]),
    ("sequence_truncate", None, 3.0, [[3], [0.125], [2]]),
    ("sequence_mask", None, 3.0, [[0], [0.125], [2]]),
    ("token_truncate", 0.3, None, [[2, 4, 1], [0.3, 1, 0.5], [2, 1, 1]]),
    ("token_mask", 0.3, None, [[2, 4, 1], [0, 1, 0.5], [2, 1, 1]]),
    ("sequence_truncate", 0.2, 3.0, [[3], [0.2], [2]]),
    ("sequence_mask", 0.2, 3.0, [[0], [0], [2]]),
]


@pytest.mark.parametrize("mode, clip_min, clip_max, expected", EXPLICIT)
def test_importance_weights_explicit_values(mode, clip_min, clip_max, expected):
    old = torch.tensor([[L2, 2 * L2, 5.0], [-2 * L2, 0.0, -L2], [L2, -1.0, 7.0]])
    sampling = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, math.nan, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    weights, metrics = vllm_importance_weights(old, sampling, mask, mode=mode, clip_min=clip_min, clip_max=clip_max)
    expected = torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)
    flat = expected.flatten() if mode.startswith("sequence") else expected[mask.bool()]
    assert metrics["sampling/importance_sampling_ratio/min"].item() == pytest.approx(flat.min().item())
    assert metrics["sampling/importance_sampling_ratio/mean"].item() == pytest.approx(flat.mean().item())
    assert metrics["sampling/importance_sampling_ratio/max"].item() == pytest.approx(flat.max().item())
    # |old − sampling| over the real tokens vLLM scored: ln 2, ln 4, ln 4, 0, ln 2, ln 2
    assert metrics["sampling/sampling_logp_difference/mean"].item() == pytest.approx(7 * L2 / 6)
    assert metrics["sampling/sampling_logp_difference/max"].item() == pytest.approx(2 * L2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip_min, clip_max", [(None, 3.0), (0.5, 2.0), (0.5, None)])
def test_importance_weights_equal_trl(mode, clip_min, clip_max):
    g = torch.Generator().manual_seed(0)
    B, T = 16, 12
    old = -torch.rand(B, T, generator=g) * 3
    sampling = old + (torch.rand(B, T, generator=g) - 0.5) * (1.2 if mode.startswith("sequence") else 3.0)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    old = torch.where(mask.bool(), old, torch.full_like(old, -7.0))  # the trainer's padding holds anything
    sampling = sampling * mask
    sampling[3, 0] = math.nan
    weights, metrics = vllm_importance_weights(old, sampling, mask, mode=mode, clip_min=clip_min, clip_max=clip_max)
    want, want_metrics = trl_importance_sampling(old, sampling, mask, mode, clip_min, clip_max)
    assert weights.shape == want.shape == ((B, 1) if mode.startswith("sequence") else (B, T))
    assert torch.equal(weights, want)
    assert metrics.keys() == want_metrics.keys()
    for k in metrics:
        assert torch.equal(metrics[k], want_metrics[k]), k
    # the draw reaches every branch: weights clipped or zeroed at each bound set, and some left as they were
    ratio = torch.exp(torch.nan_to_num((old - sampling) * mask, nan=0.0))
    if mode.startswith("sequence"):
        ratio = ratio.prod(-1, keepdim=True)
    changed = ~torch.isclose(weights, ratio)
    assert changed.any() and (~changed).any()
    if clip_max is not None:
        assert (ratio > clip_max).any()
    if clip_min is not None:
        assert (ratio < clip_min).any()


# ---------------------------------------------------------------------- the correction in the trainer

# the engine's log-prob minus the policy's, per completion and position (ratio exp(−offset)); sequence sums over
# the scripted lengths: −1.2, 1.0, −1.2, 1.6, 0.0, −1.2, 0.55, −0.6 (ratios 3.32, 0.37, 3.32, 0.20, 1, 3.32, 0.58, 1.82)
OFFSETS = torch.tensor([[-1.5, 0.3, 0.0, 0.2], [0.4, -0.6, 1.2, 0.0], [-0.9, -0.9, 0.5, 0.1], [1.6, 0.0, 0.0, 0.0],
                        [0.2, -0.2, 0.0, 0.0], [-0.3, -0.4, -0.5, 0.0], [0.8, 0.6, -1.3, 0.45], [-1.2, 0.6, 0.0, 0.0]])
ADVANTAGES = torch.tensor([1.2, -0.8, 0.4, -0.05, 0.9, -1.1, 0.0, -0.3])


def vllm_trainer(tmp_path, **kw):
    cfg = dataclasses.replace(GRPOLambdaConfig(), **{
        "output_dir": str(tmp_path / "out"), "use_vllm": True, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "arithmetic_max_operand": 9, "eval_size": 16,
        "sft_warmup_steps": 0, "max_steps": 1, "num_generations": 4, "per_device_train_batch_size": 8,
        "max_completion_length": 4, "temperature": 0.7, "beta": 0.05, "device": "cpu", "num_threads": 1,
        "impl": "torch", **kw})
    trainer = GRPOLambdaTrainer(cfg)
    trainer.optimizer.step = lambda: None  # the weights stay: every update below sees the same policy
    if cfg.beta > 0:
        trainer.ref_model = trainer._load_reference()
        with torch.no_grad():  # a reference away from the policy, so that the KL term is not 0
            for p in trainer.ref_model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return trainer


def rollout(trainer):
    """A generation batch from the engine: the scripted completions, log-probs off the policy's by OFFSETS."""
    if trainer.cfg.use_vllm:
        engine = trainer.backend.llm
        script_engine(engine, trainer.tokenizer)
        engine.logprob_offset = lambda i, t: float(OFFSETS[i, t])
    gen = trainer.backend.generate(["1+2=", "12+30="], 4, temperature=trainer.cfg.temperature)
    loss_mask = gen.completion_mask.clone()
    if trainer.cfg.mask_truncated_completions:
        loss_mask[gen.truncated] = 0
    return gen, Batch(gen.prompt_ids, gen.prompt_mask, gen.completion_ids, gen.completion_mask, loss_mask,
                      ADVANTAGES.clone(), gen.sampling_logprobs)


@pytest.fixture
def loss_calls(monkeypatch):
    """Every fused-loss call the trainer makes: its arguments and loss."""
    calls = []

    def spy(*args, **kwargs):
        loss, metrics = fused_grpo_lambda_loss(*args, **kwargs)
        calls.append(SimpleNamespace(advantages=args[4], kwargs=kwargs, loss=loss.detach().clone()))
        return loss, metrics

    monkeypatch.setattr(trainer_module, "fused_grpo_lambda_loss", spy)
    return calls


@pytest.fixture
def logprob_calls(monkeypatch):
    """The models whose log-probs the trainer computes under no_grad (batch_logprobs)."""
    calls = []
    real = trainer_module.batch_logprobs

    def spy(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "batch_logprobs", spy)
    return calls


def trl_loss(trainer, gen, batch, weights):
    """TRL 1.16's _compute_loss (loss_type dapo, one process and accumulation step, on-policy, vLLM correction),
    written out on the policy's full logits: −min(ρÂ, clip(ρ)Â)·w + β·k3 over the loss mask's tokens."""
    cfg = trainer.cfg
    logp = full_logprobs(trainer.model, gen, cfg.temperature)
    ref = full_logprobs(trainer.ref_model, gen, cfg.temperature)
    coef_1 = torch.exp(logp - logp)  # old_per_token_logps: the policy's own (ratio 1 on-policy)
    coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon, 1 + (cfg.epsilon_high or cfg.epsilon))
    adv = batch.advantages.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    per_token_loss = per_token_loss * weights  # inputs["importance_sampling_ratio"]
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token_loss = per_token_loss + cfg.beta * per_token_kl
    mask = batch.loss_mask.float()
    return (per_token_loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("mode", MODES)
def test_trainer_loss_is_trls_with_the_correction(tmp_path, fake_vllm, loss_calls, logprob_calls, mode):
    """Plain GRPO (no trace, no clamp): the trainer's loss is TRL's with the vLLM importance-sampling weights, the KL
    unweighted; the on-policy one-pass path is kept (no old log-probs to the loss) and the metrics are TRL's."""
    trainer = vllm_trainer(tmp_path, algorithm="grpo", vllm_importance_sampling_mode=mode,
                           vllm_importance_sampling_clip_min=0.5)
    gen, batch = rollout(trainer)
    old = full_logprobs(trainer.model, gen, trainer.cfg.temperature)
    weights, want_metrics = trl_importance_sampling(old, gen.sampling_logprobs, batch.loss_mask, mode, 0.5, 3.0)
    assert (weights == 0).any() if mode.endswith("mask") else ((weights == 3.0).any() and (weights == 0.5).any())
    expected = trl_loss(trainer, gen, batch, weights)
    uncorrected = trl_loss(trainer, gen, batch, torch.ones_like(weights))

    out = trainer._update(batch)
    (call,) = loss_calls
    assert call.kwargs["old_logprobs"] is None and call.kwargs["adv_clamp_min"] is None
    assert torch.equal(call.advantages, ADVANTAGES)  # the weights go in as the policy term's, not in Â
    torch.testing.assert_close(call.kwargs["policy_weights"], weights.expand(8, 4), atol=1e-5, rtol=0)
    assert call.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - uncorrected.item()) > 0.05 * abs(uncorrected.item())
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert logprob_calls == [trainer.model, trainer.ref_model]  # ℓ_old once (for the weights), then the reference
    for k, v in want_metrics.items():
        assert out[k] == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
    # the engine's log-probs are the policy's plus OFFSETS: the logged difference is |OFFSETS| on the real tokens
    real = batch.loss_mask.bool()
    assert out["sampling/sampling_logp_difference/max"] == pytest.approx(1.6, abs=1e-5)
    assert out["sampling/sampling_logp_difference/mean"] == pytest.approx(OFFSETS[real].abs().mean().item(), abs=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_trainer_grpo_lambda_loss_with_the_correction(tmp_path, fake_vllm, loss_calls, mode):
    """GRPO-λ: the weights multiply each token's clamped policy term: the loss equals fused_grpo_lambda_loss on
    per-token advantages clamped first, then weighted (no second clamp), with truncated completions out of the loss
    (they are out of the weights' mask too)."""
    trainer = vllm_trainer(tmp_path, vllm_importance_sampling_mode=mode, mask_truncated_completions=True)
    cfg = trainer.cfg
    gen, batch = rollout(trainer)
    assert gen.truncated.tolist() == [False, False, True, False, False, False, True, False]
    old = full_logprobs(trainer.model, gen, cfg.temperature)
    weights, _ = trl_importance_sampling(old, gen.sampling_logprobs, batch.loss_mask, mode, None, 3.0)
    adv = (ADVANTAGES.clamp(min=cfg.adv_clamp_min).unsqueeze(1) * weights).expand(8, 4)
    with torch.no_grad():
        hidden = completion_hidden(trainer.model, gen.prompt_ids, gen.prompt_mask, gen.completion_ids,
                                   gen.completion_mask)
        weight, bias = lm_head(trainer.model)
        ref = full_logprobs(trainer.ref_model, gen, cfg.temperature)

        def loss_with(advantages, clamp):
            return fused_grpo_lambda_loss(
                hidden, weight, gen.completion_ids, batch.loss_mask, advantages, ref_logprobs=ref, bias=bias,
                temperature=cfg.temperature, trace=cfg.trace, lam=cfg.lam, gamma=cfg.gamma, adv_clamp_min=clamp,
                epsilon_low=cfg.epsilon, beta=cfg.beta, loss_type=cfg.loss_type, impl="torch")[0].item()

        expected = loss_with(adv, None)
        uncorrected = loss_with(ADVANTAGES, cfg.adv_clamp_min)
        weighted_then_clamped = loss_with(ADVANTAGES.unsqueeze(1) * weights.expand(8, 4), cfg.adv_clamp_min)

    trainer._update(batch)
    (call,) = loss_calls
    assert call.kwargs["old_logprobs"] is None and call.kwargs["adv_clamp_min"] == cfg.adv_clamp_min
    assert call.kwargs["trace"] == "both"
    assert torch.equal(call.advantages, ADVANTAGES)
    torch.testing.assert_close(call.kwargs["policy_weights"], weights.expand(8, 4), atol=1e-5, rtol=0)
    assert call.loss.item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - uncorrected) > 0.05 * abs(uncorrected)
    assert abs(expected - weighted_then_clamped) > 1e-4 * abs(expected)  # the order matters, and is TRL's


def test_trainer_correction_with_several_iterations(tmp_path, fake_vllm, loss_calls, logprob_calls):
    """num_iterations = 2: ℓ_old is computed once and serves both the weights and the loss's ratio."""
    trainer = vllm_trainer(tmp_path, num_iterations=2, vllm_importance_sampling_mode="token_truncate")
    gen, batch = rollout(trainer)
    old = full_logprobs(trainer.model, gen, trainer.cfg.temperature)
    weights, _ = trl_importance_sampling(old, gen.sampling_logprobs, batch.loss_mask, "token_truncate", None, 3.0)
    trainer._update(batch)
    assert logprob_calls == [trainer.model, trainer.ref_model]
    assert len(loss_calls) == 2
    for call in loss_calls:
        torch.testing.assert_close(call.kwargs["old_logprobs"], old, atol=2e-5, rtol=0)
        torch.testing.assert_close(call.kwargs["policy_weights"], weights, atol=1e-5, rtol=0)
        assert torch.equal(call.advantages, ADVANTAGES) and call.kwargs["adv_clamp_min"] == -0.1
    assert loss_calls[0].kwargs["old_logprobs"].data_ptr() == loss_calls[1].kwargs["old_logprobs"].data_ptr()


@pytest.mark.parametrize("backend", ["vllm, correction off", "hf"])
def test_no_correction_is_the_old_behaviour(tmp_path, fake_vllm, loss_calls, logprob_calls, backend):
    """Correction off, or the HF backend (no sampling log-probs): the loss gets the sequence advantages and the
    configured clamp as before, no ℓ_old is computed on-policy, and nothing is logged under sampling/."""
    off = backend != "hf"
    trainer = vllm_trainer(tmp_path, use_vllm=off, vllm_importance_sampling_correction=not off)
    gen, batch = rollout(trainer)
    assert (gen.sampling_logprobs is not None) is off
    cfg = trainer.cfg
    with torch.no_grad():
        hidden = completion_hidden(trainer.model, gen.prompt_ids, gen.prompt_mask, gen.completion_ids,
                                   gen.completion_mask)
        weight, bias = lm_head(trainer.model)
        expected = fused_grpo_lambda_loss(
            hidden, weight, gen.completion_ids, batch.loss_mask, ADVANTAGES,
            ref_logprobs=full_logprobs(trainer.ref_model, gen, cfg.temperature), bias=bias,
            temperature=cfg.temperature, trace="both", lam=cfg.lam, adv_clamp_min=-0.1, beta=cfg.beta,
            impl="torch")[0].item()
    out = trainer._update(batch)
    (call,) = loss_calls
    assert torch.equal(call.advantages, ADVANTAGES) and call.kwargs["policy_weights"] is None
    assert call.kwargs["adv_clamp_min"] == -0.1 and call.kwargs["old_logprobs"] is None
    assert call.loss.item() == pytest.approx(expected, rel=1e-5)
    assert logprob_calls == [trainer.ref_model]
    assert not any(k.startswith("sampling/") for k in out)
    # the same loss as a batch that never had sampling log-probs
    loss_calls.clear()
    trainer._update(dataclasses.replace(batch, sampling_logprobs=None))
    assert loss_calls[0].loss.item() == call.loss.item()


@pytest.mark.parametrize("overrides, message", [
    ({"vllm_importance_sampling_mode": "token"}, r"vllm_importance_sampling_mode must be one of \['token_truncate', "
                                                 r"'token_mask', 'sequence_truncate', 'sequence_mask'\]; got 'token'"),
    ({"vllm_importance_sampling_clip_max": 0.0}, r"vllm_importance_sampling_clip_max must be a finite number > 0; "
                                                 r"got 0\.0\. Pass None for no upper bound"),
    ({"vllm_importance_sampling_clip_min": -1.0}, r"vllm_importance_sampling_clip_min must be a finite number >= 0"),
    ({"vllm_importance_sampling_clip_min": 3.0}, r"vllm_importance_sampling_clip_min must be below "
                                                 r"vllm_importance_sampling_clip_max = 3\.0; got 3\.0"),
    ({"vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": None},
     r"vllm_importance_sampling_clip_max or vllm_importance_sampling_clip_min must be set with "
     r"vllm_importance_sampling_mode = 'token_truncate'; got None for both"),
    ({"vllm_importance_sampling_correction": "yes"}, r"vllm_importance_sampling_correction must be true or false"),
])
def test_importance_sampling_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(GRPOLambdaConfig(), **overrides).validate()


def test_importance_sampling_config_defaults_are_trls():
    trl = pytest.importorskip("trl")
    trl_defaults = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    cfg = GRPOLambdaConfig()
    for name in ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                 "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min"):
        assert getattr(cfg, name) == trl_defaults[name], name
    # a mask mode needs no bound; a lower bound alone is enough for truncation
    dataclasses.replace(cfg, vllm_importance_sampling_clip_max=None).validate()
    dataclasses.replace(cfg, vllm_importance_sampling_mode="sequence_truncate", vllm_importance_sampling_clip_max=None,
                        vllm_importance_sampling_clip_min=0.5).validate()


def test_per_sequence_clip_extremes_skip_micro_batches_without_tokens(tmp_path, fake_vllm, monkeypatch):
    """One completion per micro-batch, the truncated ones masked out of the loss: their micro-batches have no
    sequence, so TRL's clip_ratio/high_max is undefined there (NaN, dropped by its logging), not 0. Ratio 2 on every
    token: each micro-batch with Â > 0 has high_max 1, the others 0; the mean runs over the non-empty ones only."""
    real = trainer_module.batch_logprobs

    def old_below_policy(model, *a, **k):  # ℓ_old = ℓ − 0.7: every ratio is 2, past 1 + ε
        out = real(model, *a, **k)
        return out - 0.7 if model is trainer.model else out

    monkeypatch.setattr(trainer_module, "batch_logprobs", old_below_policy)
    trainer = vllm_trainer(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=8, num_iterations=2,
                           mask_truncated_completions=True, vllm_importance_sampling_correction=False,
                           algorithm="grpo")
    gen, batch = rollout(trainer)
    real_rows = ~gen.truncated
    assert 0 < int(real_rows.sum()) < len(batch)
    expected = float(((batch.advantages.cpu() > 0) & real_rows).sum() / real_rows.sum())
    assert 0 < expected < 1
    out = trainer._update(batch)
    assert out["clip_ratio/high_max"] == pytest.approx(expected, abs=1e-6)
