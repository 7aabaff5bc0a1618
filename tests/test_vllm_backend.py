"""The vLLM generation backend (`use_vllm=True`) on the CPU, against a fake `vllm` module: vLLM is not installed here.

The fake is the offline API as TRL 1.16 drives it in colocate mode (`LLM(...)`, `LLM.generate` on token-id prompts
returning RequestOutputs whose `.outputs[i].token_ids` are the completion, `SamplingParams(**kwargs)`, the model at
`llm_engine.model_executor.driver_worker.model_runner.model` with `load_weights` taking (name, tensor) pairs under
the Hugging Face checkpoint's names, `reset_prefix_cache`). It refuses keyword arguments vLLM does not take, loads
its own copy of the model from the folder, changes it only through `load_weights`, and samples from it token by token
(a generator seeded by the request's seed; top_p is recorded, not applied) until the tokenizer's EOS or an EOS id of
the generation config, as vLLM stops.
"""
import copy
import dataclasses
import importlib.machinery
import json
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from grpo_trainer.config import GRPOLambdaConfig
from grpo_trainer.generation import HFGenerationBackend, VLLMGenerationBackend
from grpo_trainer.model import BOS, EOS, PAD, load_policy, save_pretrained
from grpo_trainer.rewards import REGISTRY
from grpo_trainer.trainer import train

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
                index=j, token_ids=r, finish_reason=self._finish_reason(r, p)) for j, r in enumerate(rows)]))
        self.calls.append(SimpleNamespace(prompts=prompts, params=params, weights=weights, outputs=outputs))
        return outputs

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
                                 distributed_executor_backend="external_launcher", max_num_batched_tokens=4096)
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
        assert (p.n, p.temperature, p.top_p, p.max_tokens) == (1, 0.7, 0.9, 4)
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
        assert (p.n, p.temperature, p.top_p, p.max_tokens, p.seed) == (1, 0.0, 1.0, 4, None)
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
