"""TRL as a drop-in (grpo_trainer.trl_trainer): with trace=None the loss and its gradients are TRL's own
GRPOTrainer's, for every loss type both support (the clipped ones, and cispo, sapo and vespo); GRPO-λ trains through
TRL's loop; unsupported options are refused.

Comparisons run without autocast (bf16=False): under it TRL rounds the head's logits to bf16 where the fused loss
does not, so the two would differ by bf16 rounding, not by their math."""
import dataclasses
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from grpo_trainer.config import ConfigError  # noqa: E402
from grpo_trainer.model import _prepare_tokenizer, build_char_tokenizer  # noqa: E402
from grpo_trainer.trl_trainer import GRPOLambdaTRLConfig, GRPOLambdaTRLTrainer  # noqa: E402


def tiny(arch, tmp_path_factory, edit=None, **config):
    """A tiny random `arch` (transformers' class prefix) with the character tokenizer, saved to a folder (TRL loads
    its reference model from a path); `edit(model, tokenizer)` may change the weights first."""
    import transformers

    tok = _prepare_tokenizer(build_char_tokenizer())
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(getattr(transformers, f"{arch}Config")(
        vocab_size=len(tok), hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **config))
    if edit is not None:
        with torch.no_grad():
            edit(model, tok)
    path = tmp_path_factory.mktemp(arch)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def raise_eos(model, tok):
    """Raise EOS on prompt-like states so completions end at different lengths (else every one is cut at
    max_completion_length and the loss types' normalisers all agree)."""
    ids = tok([f"{a}+{b}=" for a in range(5) for b in range(4)], return_tensors="pt", padding=True)
    h = model.base_model(**ids).last_hidden_state[ids["attention_mask"].bool()].mean(0)
    model.get_output_embeddings().weight[tok.eos_token_id] += 3 * h / h.pow(2).sum()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny("Llama", tmp_path_factory, edit=raise_eos, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory):
    """Untied head, logits divided by logits_scaling = 4 (TRL's head applies it; so must ours)."""
    return tiny("Granite", tmp_path_factory, tie_word_embeddings=False, logits_scaling=4.0)


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """Gemma 2: logits capped to c·tanh(logits / c) before the temperature (TRL's head applies it; so must ours).
    c = 3 and the head scaled so that its logits reach about ±15, over 40% of them beyond the cap."""
    def scale_head(model, tok):
        model.get_output_embeddings().weight.mul_(40)

    return tiny("Gemma2", tmp_path_factory, edit=scale_head, tie_word_embeddings=False, head_dim=12,
                final_logit_softcapping=3.0)


def digit_share(prompts, completions, **_):
    """A reward that varies between completions of a random model: the share of digits."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def make_trainer(model_dir, tmp_path, cls=GRPOLambdaTRLTrainer, dtype="float32", bf16=False, tools=None,
                 peft_config=None, **options):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_cls = GRPOLambdaTRLConfig if cls is GRPOLambdaTRLTrainer else trl.GRPOConfig
    options = dict(dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=6, max_steps=2,
                        report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", seed=0), **options)
    args = config_cls(output_dir=str(tmp_path / cls.__name__), bf16=bf16, **options)
    data = datasets.Dataset.from_list([{"prompt": f"{a}+{b}="} for a in range(5) for b in range(4)])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return cls(model, digit_share, args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir),
               tools=tools, peft_config=peft_config)


def loss_inputs(vocab, dtype, on_policy):
    """A hand-made micro-batch as TRL's _prepare_inputs hands it to _compute_loss: left-padded prompts,
    right-padded completions, off-policy log-probs far from the policy's (ratios far outside the clip range)."""
    g = torch.Generator().manual_seed(1)
    B, P, T = 4, 5, 6
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[2, 5:] = 0
    inputs = dict(prompt_ids=torch.randint(4, vocab, (B, P), generator=g), prompt_mask=prompt_mask,
                  completion_ids=torch.randint(4, vocab, (B, T), generator=g), completion_mask=completion_mask,
                  advantages=torch.randn(B, generator=g, dtype=dtype),
                  ref_per_token_logps=-4 * torch.rand(B, T, generator=g, dtype=dtype),
                  num_items_in_batch=completion_mask.sum().to(dtype))
    if not on_policy:
        inputs["old_per_token_logps"] = -4 * torch.rand(B, T, generator=g, dtype=dtype)
    return inputs


# the clipped ratio's, then the other policy terms (cispo: dapo's normaliser, sapo: grpo's); vespo (dapo's, token
# level only) runs on inputs of its own (test_cispo_cap_sapo_temperatures_and_vespo_shapes_are_trls, and
# test_metrics_combine_over_processes_as_trls's two simulated processes) and in TRL's loop
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo")
METRICS = ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
           "clip_ratio/high_max")


def policy_logprobs(trainer, inputs):
    """The current policy's log-probs [B, T] of the completions (no grad), to put old log-probs near them."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, inputs["completion_ids"].size(1))[0]


def loss_and_grads(trainer, inputs, loss_type):
    trainer.loss_type = loss_type
    trainer.current_gradient_accumulation_steps = 2  # what the training loop sets; divides the loss as TRL does
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach().double(), [p.grad.double() for p in trainer.model.parameters()]


def eval_loss(trainer, inputs, loss_type):
    """The loss as TRL's prediction_step computes it: eval mode, no_grad (no division by the accumulation steps)."""
    trainer.loss_type = loss_type
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs).double()
    trainer.model.train()
    return loss


def assert_same_metrics(ours, theirs, modes=("train",)):
    """Every metric TRL's _compute_loss logged and no other (cispo logs cispo_clip_ratio and no clip_ratio/*, sapo
    neither), with TRL's values, call by call."""
    for mode in modes:
        assert set(ours._metrics[mode]) == set(theirs._metrics[mode]), mode
        for name, values in theirs._metrics[mode].items():
            assert ours._metrics[mode][name] == pytest.approx(values, rel=1e-5, abs=1e-6, nan_ok=True), (mode, name)


# the size of the loss's parts on these batches (|Â|·ρ and β·KL per token, normalised): where they cancel (sapo's
# negative policy term and the KL nearly do on one of them) the loss is still rounded to about tol × this
LOSS_PARTS = 0.1


def assert_same_loss(ours, theirs, inputs, loss_types, tol, evaluate=False):
    """Loss to `tol` relative (or tol × LOSS_PARTS absolute), every parameter's gradient to `tol` × the largest
    gradient, for each loss type (and with `evaluate`, the eval-mode loss too). Returns our train losses."""
    losses = []
    for loss_type in loss_types:
        loss, grads = loss_and_grads(ours, inputs, loss_type)
        ref_loss, ref_grads = loss_and_grads(theirs, inputs, loss_type)
        assert loss.item() != 0 and torch.isclose(loss, ref_loss, rtol=tol, atol=tol * LOSS_PARTS), \
            (loss_type, loss, ref_loss)
        losses.append(loss.item())
        scale = max(g.abs().max().item() for g in ref_grads)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=0, atol=tol * scale, msg=loss_type)
        if evaluate:
            ours_eval, theirs_eval = eval_loss(ours, inputs, loss_type), eval_loss(theirs, inputs, loss_type)
            assert torch.isclose(ours_eval, theirs_eval, rtol=tol, atol=tol * LOSS_PARTS), \
                (loss_type, ours_eval, theirs_eval)
    return losses


@pytest.mark.parametrize("impl,dtype,tol", [("torch", "float64", 1e-6), ("auto", "float32", 2e-6)])
@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("kl_correction", [True, False])
def test_trace_none_is_trls_loss_and_gradient(model_dir, tmp_path, impl, dtype, tol, on_policy, kl_correction):
    """TRL folds its log-sum-exp in fp32 whatever the model's dtype: tol is its precision, not ours. The KL term with
    and without TRL's bias correction (the ratio-weighted KL, TRL's default, changes the gradient on-policy too).
    The loss in train and eval mode (there without the accumulation scaling; cispo's num_items too) and the
    metrics of each. cispo's cap is TRL's epsilon_high unset, epsilon = 0.2: off-policy the log-ratios (about −4 to
    0) fall on both sides of it; on-policy every token with Â > 0 is capped."""
    ours = make_trainer(model_dir, tmp_path, dtype=dtype, trace=None, impl=impl, beta=0.04,
                        use_bias_correction_kl=kl_correction)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, dtype=dtype, beta=0.04,
                          use_bias_correction_kl=kl_correction)
    inputs = loss_inputs(len(ours.processing_class), getattr(torch, dtype), on_policy)
    assert_same_loss(ours, theirs, inputs, LOSS_TYPES, tol, evaluate=True)
    assert_same_metrics(ours, theirs, ("train", "eval"))
    capped = ours._metrics["train"]["cispo_clip_ratio"][-1]
    assert 0 < capped < 1 and len(ours._metrics["train"]["clip_ratio/region_mean"]) == len(LOSS_TYPES) - 2




# the kernels (auto, fp32) in every case, the fp64 reference path in two
@pytest.mark.parametrize("impl,dtype,tol,on_policy,beta,vllm_weights,kl_correction", [
    ("auto", "float32", 2e-6, False, 0.0, False, False), ("auto", "float32", 2e-6, False, 0.04, False, False),
    ("auto", "float32", 2e-6, True, 0.04, True, False), ("auto", "float32", 2e-6, False, 0.3, False, True),
    ("auto", "float32", 2e-6, True, 0.3, False, True), ("torch", "float64", 1e-6, False, 0.04, False, False),
    ("torch", "float64", 1e-6, True, 0.3, False, True)])
def test_sequence_level_is_trls(model_dir, tmp_path, impl, dtype, tol, on_policy, beta, vllm_weights, kl_correction):
    """importance_sampling_level="sequence" (GSPO: every token shares its sequence's ratio exp(mean log-ratio)):
    the same loss (train and eval), gradients and metrics as trl.GRPOTrainer for every loss type. Off-policy, the
    old log-probs put one sequence's ratio above the clip range (Â > 0: high-clipped), one below (Â < 0:
    low-clipped) and two inside, with per-token noise of zero mean per sequence: the token level would clip
    fractions of sequences, the sequence level clips whole ones. On-policy (ratio 1) with vLLM's per-token
    importance weights, which weigh the shared ratio token by token (there the gradient is not the token level's).
    With use_bias_correction_kl (TRL's default) each token's KL is weighted by its sequence's ratio, whose gradient
    reaches every token of the sequence (on-policy too: the fused loss then takes its whole-sequence pass)."""
    kw = dict(importance_sampling_level="sequence", beta=beta, use_bias_correction_kl=kl_correction)
    ours = make_trainer(model_dir, tmp_path, dtype=dtype, trace=None, impl=impl, **kw)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, dtype=dtype, **kw)
    dt = getattr(torch, dtype)
    inputs = loss_inputs(len(ours.processing_class), dt, on_policy=True)
    inputs["advantages"] = torch.tensor([1.0, -0.8, 0.5, -0.3], dtype=dt)
    g = torch.Generator().manual_seed(6)
    if not on_policy:
        m = inputs["completion_mask"].to(dt)
        noise = 0.3 * torch.randn(4, 6, generator=g, dtype=dt)
        noise = noise - (noise * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        shift = torch.tensor([[0.6], [-0.6], [0.05], [-0.1]], dtype=dt)  # each sequence's mean log-ratio
        inputs["old_per_token_logps"] = policy_logprobs(theirs, inputs) - shift + noise
    if vllm_weights:
        inputs["importance_sampling_ratio"] = 2 * torch.rand(4, 6, generator=g, dtype=dt)
        for trainer in (ours, theirs):
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True  # what _compute_loss reads
    assert_same_loss(ours, theirs, inputs, LOSS_TYPES, tol, evaluate=True)
    assert_same_metrics(ours, theirs, ("train", "eval"))
    # one whole sequence clipped on each side (0 of 4 on-policy); the extremes over sequences
    want = [0.0, 0.0, 0.0, 0.0, 0.0] if on_policy else [0.25, 0.25, 0.5, 0.0, 1.0]
    assert [ours._metrics["train"][name][-1] for name in METRICS[1:]] == pytest.approx(want)
    # cispo's cap (epsilon = 0.2, TRL's epsilon_high unset) is below every ratio here: the two sequences with Â > 0
    assert ours._metrics["train"]["cispo_clip_ratio"] == pytest.approx([0.5])


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_sequence_level_clip_metrics_count_every_sequence(model_dir, tmp_path, loss_type):
    """At the sequence level TRL's clip fractions are means over all the sequences and its extremes range over all
    of them, one without completion tokens included (ratio 1), where the token level skips it. grpo: three sequences
    below the clip range with Â < 0 and an empty one (never clipped) give low_mean 3/4 and low_min 0 (1 and 1 at the
    token level). cispo with TRL's cap epsilon_high unset (epsilon, 0.2, below every ratio): the empty sequence's
    ratio 1 is capped too where its Â > 0, so with advantages of both signs (row 3 empty, Â > 0)
    cispo_clip_ratio is 3/4."""
    ours = make_trainer(model_dir, tmp_path, trace=None, importance_sampling_level="sequence", loss_type=loss_type)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, importance_sampling_level="sequence",
                          loss_type=loss_type)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy=True)
    inputs["completion_mask"][3] = 0
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum().float()
    if loss_type == "cispo":
        inputs["advantages"] = torch.tensor([1.0, -0.8, 0.5, 0.7])
        want = {"cispo_clip_ratio": 0.75}
    else:
        inputs["advantages"] = -0.1 - inputs["advantages"].abs()
        inputs["old_per_token_logps"] = policy_logprobs(ours, inputs) + 0.5  # every ratio e^−0.5 < 1 − ε
        want = {"clip_ratio/low_mean": 0.75, "clip_ratio/high_mean": 0.0, "clip_ratio/region_mean": 0.75,
                "clip_ratio/low_min": 0.0, "clip_ratio/high_max": 0.0}
    for trainer in (ours, theirs):
        loss_and_grads(trainer, inputs, loss_type)
    assert_same_metrics(ours, theirs)
    for name, value in want.items():
        assert ours._metrics["train"][name] == pytest.approx([value]), name



def as_rank_0_of_two(monkeypatch, trainer, inputs, rank_1_inputs, loss_type):
    """loss_and_grads as rank 0 of two processes whose rank 1 has `rank_1_inputs`: rank 1's run records what it
    hands to accelerator.reduce and gather (its own logs are dropped), then rank 0's run gets the sums and the
    concatenations with those (both ranks make the same calls in the same order)."""
    recorded = []
    monkeypatch.setattr(trainer.accelerator, "reduce", lambda t, reduction: recorded.append(t) or t)
    monkeypatch.setattr(trainer.accelerator, "gather", lambda t: recorded.append(t) or t)
    loss_and_grads(trainer, rank_1_inputs, loss_type)
    trainer._metrics["train"].clear()
    rank_1 = iter(recorded)
    monkeypatch.setattr(trainer.accelerator, "reduce", lambda t, reduction: t + next(rank_1))
    monkeypatch.setattr(trainer.accelerator, "gather", lambda t: torch.cat([t, next(rank_1)]))
    loss_and_grads(trainer, inputs, loss_type)
    assert recorded and next(rank_1, None) is None


@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("rank_1", ["short", "empty"])
def test_metrics_combine_over_processes_as_trls(model_dir, tmp_path, monkeypatch, level, rank_1, loss_type):
    """TRL combines each process's metrics with a reduce (its global_masked_mean: the token level weighs processes
    by their tokens, the sequence level by their sequences) and a gather (the extremes, NaN skipped): simulated for
    two processes, rank 1 with shorter sequences clipped otherwise than rank 0's, or with no completion tokens at
    all (the token level skips its extremes, the sequence level counts its sequences, unclipped). cispo's one clip
    metric (a cap of 1.3: each rank has a sequence with Â > 0 above it and one below) is combined as the clip
    fractions are; sapo has none (no gather). vespo (token level only) runs on sapo's trainers with rank 1 empty: its
    vespo/phi_seq_mean is a mean over the sequences at the token level too (rank 1's count, with φ = 1), over the
    tokens with per-token advantages [B, T] (rank 1 has none)."""
    kw = dict(beta=0.04, importance_sampling_level=level, use_bias_correction_kl=False, loss_type=loss_type,
              epsilon_high=1.3 if loss_type == "cispo" else None)
    ours = make_trainer(model_dir, tmp_path, trace=None, **kw)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, **kw)
    inputs, other = two_ranks_inputs(theirs, rank_1)
    for trainer in (ours, theirs):
        as_rank_0_of_two(monkeypatch, trainer, inputs, other, loss_type)
    assert_same_metrics(ours, theirs)
    if loss_type == "cispo":
        assert 0 < ours._metrics["train"]["cispo_clip_ratio"][0] < 1
    if loss_type == "sapo" and level == "token" and rank_1 == "empty":
        # rank 0's φ average 0.28 over its sequences (0.30 over its tokens); rank 1's sequences count, at φ = 1 (no
        # tokens: ratio 1), with advantages [B] only
        # (read at every call; the kernels' vespo is checked against TRL in
        # test_cispo_cap_sapo_temperatures_and_vespo_shapes_are_trls)
        ours.args.impl = "torch"
        for per_token_advantages, want in ((False, 0.642), (True, 0.302)):
            inputs, other = two_ranks_inputs(theirs, rank_1, per_token_advantages)
            for trainer in (ours, theirs):
                trainer._metrics["train"].clear()
                as_rank_0_of_two(monkeypatch, trainer, inputs, other, "vespo")
            assert_same_metrics(ours, theirs)
            assert ours._metrics["train"]["vespo/phi_seq_mean"] == pytest.approx([want], abs=1e-3)


def two_ranks_inputs(trainer, rank_1, per_token_advantages=False):
    """Rank 0's and rank 1's micro-batches of the test above (optionally with the advantages as [B, T])."""
    inputs = loss_inputs(len(trainer.processing_class), torch.float32, on_policy=True)
    inputs["advantages"] = torch.tensor([1.0, -0.8, 0.5, -0.3])
    inputs["old_per_token_logps"] = policy_logprobs(trainer, inputs) - torch.tensor([[0.6], [-0.6], [0.05], [-0.1]])
    lengths = torch.tensor([[2], [1], [3], [6]]) if rank_1 == "short" else torch.zeros(4, 1, dtype=torch.long)
    mask = (torch.arange(6) < lengths).long()
    other = dict(inputs, completion_mask=mask, num_items_in_batch=mask.sum().float(),
                 advantages=torch.tensor([-1.0, -1.0, 1.0, 0.5]))
    other["old_per_token_logps"] = policy_logprobs(trainer, other) - torch.tensor([[-0.6], [-0.6], [0.6], [0.0]])
    if per_token_advantages:
        for batch in (inputs, other):
            batch["advantages"] = batch["advantages"].unsqueeze(1).expand(4, 6).contiguous()
    return inputs, other


@pytest.mark.parametrize("loss_type, rank_1", [("grpo", "short"), ("grpo", "empty"), ("cispo", "empty")])
def test_per_token_advantages_at_the_sequence_level_combine_as_trls(model_dir, tmp_path, monkeypatch, loss_type,
                                                                    rank_1):
    """A subclass may hand per-token advantages [B, T] (TRL's _compute_loss supports them): at the sequence level
    TRL's clip masks are then [B, T], so its global_masked_mean weighs the processes by their tokens, not their
    sequences, and its per-sequence extremes skip the sequences without tokens (rank 1 "empty": all of its; with
    every rank-0 sequence low-clipped, low_min is 1, where counting rank 1's sequences would make it 0). Two
    simulated processes, as above."""
    kw = dict(importance_sampling_level="sequence", loss_type=loss_type,
              epsilon_high=1.3 if loss_type == "cispo" else None)
    ours = make_trainer(model_dir, tmp_path, trace=None, **kw)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, **kw)
    inputs, other = two_ranks_inputs(theirs, rank_1, per_token_advantages=True)
    all_low = loss_type == "grpo" and rank_1 == "empty"
    if all_low:  # Â < 0 and ratio e^−0.6 < 1 − ε on every token of rank 0
        inputs["advantages"] = -inputs["advantages"].abs()
        inputs["old_per_token_logps"] = policy_logprobs(theirs, inputs) + 0.6
    for trainer in (ours, theirs):
        as_rank_0_of_two(monkeypatch, trainer, inputs, other, loss_type)
    assert_same_metrics(ours, theirs)
    if all_low:
        assert ours._metrics["train"]["clip_ratio/low_min"] == [1.0]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("vllm_weights", [False, True])
def test_delta_is_trls_two_sided_clipping(model_dir, tmp_path, vllm_weights, level):
    """TRL's `delta` caps the ratio of the tokens with Â < 0 (the fused loss's dual_clip): same loss, gradients and
    metrics as trl.GRPOTrainer on off-policy inputs whose ratios pass it (with vLLM's importance weights too, as
    policy_weights), and not the loss without it, at the token level and at the sequence level (the sequence's
    ratio capped). Advantages of both signs: the cap leaves Â > 0 tokens alone."""
    ours = make_trainer(model_dir, tmp_path, trace=None, delta=1.5, importance_sampling_level=level)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, delta=1.5, importance_sampling_level=level)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy=False)
    inputs["advantages"] = torch.tensor([-1.0, 0.7, -0.4, 1.2])
    inputs["old_per_token_logps"] -= 4.0  # log-ratios from about −0.5 to 3.5: many past log(1.5)
    if vllm_weights:
        inputs["importance_sampling_ratio"] = 2 * torch.rand(4, 6, generator=torch.Generator().manual_seed(3))
        for trainer in (ours, theirs):
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True  # what _compute_loss reads
    assert_same_loss(ours, theirs, inputs, ("dapo", "bnpo"), 2e-6)
    assert_same_metrics(ours, theirs)
    uncapped = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, importance_sampling_level=level)
    if vllm_weights:
        uncapped.use_vllm = uncapped.vllm_importance_sampling_correction = True
    assert abs(loss_and_grads(uncapped, inputs, "dapo")[0] - loss_and_grads(theirs, inputs, "dapo")[0]) > 1e-3


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo_cap_sapo_temperatures_and_vespo_shapes_are_trls(model_dir, tmp_path, level):
    """cispo's cap (TRL's epsilon_high, 1.3 here) and sapo's temperatures (0.5 for Â > 0, 2.0 otherwise) reach the
    fused loss: same loss (train and eval), gradients and metrics as trl.GRPOTrainer, with a KL term and vLLM's
    weights, on off-policy ratios on both sides of the cap (tokens of ±0.5 log-ratio at the token level, sequences
    of ±0.6 at the sequence level) and advantages of both signs; and not TRL's loss with their defaults. `delta` is
    accepted with them and ignored, as TRL ignores it there (1.5 would be refused with a clipped loss type, below
    1 + epsilon_high). At the token level, vespo's k and λ (1.5 and 2.3 for Â ≥ 0, 2.3 fp32-rounded as TRL's
    torch.where rounds it; 2.5 and 1.5 otherwise) too, without vLLM's weights (refused with vespo), on sequences whose
    summed log-ratios (from −0.3 to 0.65, their tokens' ±0.15 apart) give weights φ from about 0.3 to 0.85; and with
    TRL's entropy mask and off-policy sequence mask (both sequences with Â < 0 dropped), which multiply its token
    losses as the other types', together with TRL's default use_bias_correction_kl (the KL weighted by each token's
    ratio)."""
    kw = dict(importance_sampling_level=level, beta=0.04, use_bias_correction_kl=False, loss_type="cispo",
              epsilon_high=1.3, sapo_temperature_pos=0.5, sapo_temperature_neg=2.0, vespo_k_pos=1.5,
              vespo_lambda_pos=2.3, vespo_k_neg=2.5, vespo_lambda_neg=1.5)
    ours = make_trainer(model_dir, tmp_path, trace=None, delta=1.5, **kw)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, delta=1.5, **kw)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy=True)
    inputs["advantages"] = torch.tensor([1.0, -0.8, 0.5, -0.3])
    g = torch.Generator().manual_seed(7)
    if level == "token":
        shift = torch.tensor([0.5, 0.0, -0.5]).repeat(2)  # each sequence: ratios e^0.5 > 1.3, 1 and e^−0.5
    else:
        shift = torch.tensor([[0.6], [-0.6], [0.05], [-0.1]])  # sequence 0 (Â > 0) above the cap, sequence 2 not
    inputs["old_per_token_logps"] = policy_logprobs(theirs, inputs) - shift
    inputs["importance_sampling_ratio"] = 2 * torch.rand(4, 6, generator=g)
    for trainer in (ours, theirs):
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True  # what _compute_loss reads
    assert_same_loss(ours, theirs, inputs, ("cispo", "sapo"), 2e-6, evaluate=True)
    assert_same_metrics(ours, theirs, ("train", "eval"))
    assert 0 < ours._metrics["train"]["cispo_clip_ratio"][0] < 1
    defaults = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, **dict(kw, epsilon_high=None,
                                                                              sapo_temperature_pos=1.0,
                                                                              sapo_temperature_neg=1.05,
                                                                              vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                                                                              vespo_k_neg=3.0, vespo_lambda_neg=2.0))
    defaults.use_vllm = defaults.vllm_importance_sampling_correction = True
    for loss_type in ("cispo", "sapo"):
        assert abs(loss_and_grads(defaults, inputs, loss_type)[0] - loss_and_grads(theirs, inputs, loss_type)[0]) \
            > 1e-3, loss_type
    if level == "sequence":
        return
    inputs = {k: v for k, v in inputs.items() if k != "importance_sampling_ratio"}  # (TRL folds it in φ if given)
    shift = torch.tensor([[0.05], [-0.1], [0.1], [-0.05]]) + torch.tensor([0.15, -0.15]).repeat(3)
    inputs["old_per_token_logps"] = policy_logprobs(theirs, inputs) - shift  # Σ: 0.3, −0.15, 0.65, −0.3
    for trainer in (ours, theirs, defaults):
        trainer.use_vllm = False
        trainer._metrics["train"].clear()
        trainer._metrics["eval"].clear()
    unmasked = assert_same_loss(ours, theirs, inputs, ("vespo",), 2e-6, evaluate=True)[0]
    assert_same_metrics(ours, theirs, ("train", "eval"))
    assert ours._metrics["train"]["vespo/phi_seq_mean"][0] == pytest.approx(0.64, abs=0.01)
    assert abs(loss_and_grads(defaults, inputs, "vespo")[0] - loss_and_grads(theirs, inputs, "vespo")[0]) > 1e-3
    for trainer in (ours, theirs):  # (all read at every call)
        trainer.top_entropy_quantile, trainer.off_policy_mask_threshold = 0.6, 0.04
        trainer.args.use_bias_correction_kl = True
        trainer._metrics["train"].clear()
    keep = theirs.get_off_policy_mask(inputs["advantages"].unsqueeze(1), policy_logprobs(theirs, inputs),
                                      inputs["old_per_token_logps"], inputs["completion_mask"], 0.04)
    assert keep.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]  # mean KLs 0.05 on the two sequences with Â < 0
    masked = assert_same_loss(ours, theirs, inputs, ("vespo",), 2e-6)[0]
    assert_same_metrics(ours, theirs)
    assert abs(masked - unmasked) > 1e-3


def test_trls_loss_types_are_policy_terms_and_normalisers(model_dir, tmp_path):
    """TRL's loss_type → the fused loss's (policy_loss, loss_type): cispo → CISPO capped at TRL's epsilon_high
    (epsilon when unset), dapo's normaliser; sapo → SAPO with TRL's temperatures as its torch.where makes them (a
    tensor of torch's default dtype: 1.05 becomes fp32's 1.0499999523), grpo's; vespo → VESPO with TRL's
    vespo_k_* / vespo_lambda_* (lambda_kernels' defaults; also rounded as TRL's torch.where rounds them), dapo's; the
    clipped types → Clip, their own."""
    import lambda_kernels as lk

    with pytest.warns(UserWarning, match=r"caps the importance weight at epsilon = 0\.3"):
        trainer = make_trainer(model_dir, tmp_path, trace=None, loss_type="cispo", epsilon=0.3)
    assert trainer._policy_term() == (lk.CISPO(max_ratio=0.3), "dapo")
    trainer.loss_type = "sapo"
    fp32_neg = torch.tensor(1.05, dtype=torch.float32).item()
    assert fp32_neg != 1.05 and trainer._policy_term() == (lk.SAPO(temperature_pos=1.0, temperature_neg=fp32_neg),
                                                           "grpo")
    trainer.loss_type = "vespo"
    assert trainer._policy_term() == (lk.VESPO(), "dapo")
    trainer.args.vespo_lambda_neg = 1.05
    assert trainer._policy_term() == (lk.VESPO(lambda_neg=fp32_neg), "dapo")
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        trainer.loss_type = loss_type
        assert trainer._policy_term() == (lk.Clip(), loss_type)


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_per_sequence_clip_extremes_are_trls(model_dir, tmp_path, sign):
    """clip_ratio/low_min and high_max, with advantages of one sign so that they are not trivially 0 (a sequence with
    Â > 0 has no low-clipped token, one with Â < 0 no high-clipped one)."""
    ours = make_trainer(model_dir, tmp_path, trace=None)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy=False)
    inputs["advantages"] = sign * inputs["advantages"].abs()
    # log-ratios of ±0.5 and 0 in turn: 1/3 to 2/3 of each sequence's tokens outside the clip range
    shift = torch.tensor([0.5, 0.0, -0.5]).repeat(2)
    inputs["old_per_token_logps"] = policy_logprobs(ours, inputs) - sign * shift
    for trainer in (ours, theirs):
        loss_and_grads(trainer, inputs, "dapo")
    name = "clip_ratio/low_min" if sign < 0 else "clip_ratio/high_max"
    assert ours._metrics["train"][name][-1] > 0
    for name in ("clip_ratio/low_min", "clip_ratio/high_max"):
        assert ours._metrics["train"][name] == pytest.approx(theirs._metrics["train"][name], rel=1e-6), name


def test_a_models_logit_scale_is_applied_as_trl_applies_it(granite_dir, tmp_path):
    ours = make_trainer(granite_dir, tmp_path, trace=None, beta=0.04, temperature=0.7)
    theirs = make_trainer(granite_dir, tmp_path, cls=trl.GRPOTrainer, beta=0.04, temperature=0.7)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy=False)
    assert_same_loss(ours, theirs, inputs, ("dapo", "grpo"), 2e-6)


def test_a_models_softcap_is_applied_as_trl_applies_it(gemma2_dir, tmp_path):
    """The loss and gradients (_compute_loss) and the old/reference log-probs (_get_per_token_logps_and_entropies) of
    a soft-capped Gemma 2 are TRL's; without the cap they would not be."""
    ours = make_trainer(gemma2_dir, tmp_path, trace=None, beta=0.04, temperature=0.7)
    theirs = make_trainer(gemma2_dir, tmp_path, cls=trl.GRPOTrainer, beta=0.04, temperature=0.7)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy=False)
    assert_same_loss(ours, theirs, inputs, ("dapo", "grpo"), 2e-6)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        lp, ent, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, 6, compute_entropy=True)
        ref_lp, ref_ent, _ = theirs._get_per_token_logps_and_entropies(theirs.model, ids, mask, 6,
                                                                       compute_entropy=True)
        m = inputs["completion_mask"]
        torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent * m, ref_ent * m, rtol=0, atol=1e-5)
        ours.model.config.final_logit_softcapping = None  # (read per call: nothing cached)
        uncapped, _, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, 6)
    assert (uncapped - lp).abs().max() > 1.0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("on_policy, vllm_weights, entropy_coef", [(True, False, 0.0), (False, False, 0.0),
                                                                   (False, True, 0.05)])
def test_top_entropy_quantile_is_trls(model_dir, tmp_path, on_policy, vllm_weights, entropy_coef, level):
    """TRL's entropy mask (only the top 40% highest-entropy tokens train, over the micro-batch's real tokens): the
    fused loss takes it as policy weights (times vLLM's importance weights when both are on): same loss, gradients
    and metrics as trl.GRPOTrainer, and not the loss without it, at the token and the sequence level. With TRL's
    entropy bonus, the entropy's mean over the kept tokens (the fused loss's entropy_weights; not weighed by vLLM's
    weights), in train and eval mode, with TRL's policy_loss metric."""
    kw = dict(beta=0.04, importance_sampling_level=level, entropy_coef=entropy_coef)
    ours = make_trainer(model_dir, tmp_path, trace=None, top_entropy_quantile=0.4, **kw)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, top_entropy_quantile=0.4, **kw)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy)
    if vllm_weights:
        inputs["importance_sampling_ratio"] = 2 * torch.rand(4, 6, generator=torch.Generator().manual_seed(4))
        for trainer in (ours, theirs):
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    assert_same_loss(ours, theirs, inputs, ("dapo", "grpo"), 2e-6, evaluate=entropy_coef != 0)
    assert_same_metrics(ours, theirs, ("train", "eval") if entropy_coef else ("train",))
    assert ("policy_loss" in ours._metrics["train"]) == (entropy_coef != 0)
    unmasked = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, **kw)
    if vllm_weights:
        unmasked.use_vllm = unmasked.vllm_importance_sampling_correction = True
    assert abs(loss_and_grads(unmasked, inputs, "dapo")[0] - loss_and_grads(theirs, inputs, "dapo")[0]) > 1e-3


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("vllm_weights", [False, True])
def test_off_policy_sequence_mask_is_trls(model_dir, tmp_path, vllm_weights, level):
    """TRL's off_policy_mask_threshold (DeepSeek-V3.2's off-policy sequence mask: a sequence with Â < 0 whose mean KL
    from the sampling policy passes the threshold is dropped), with the entropy mask too: same loss, gradients and
    metrics as trl.GRPOTrainer, with a threshold that drops some sequences and keeps others, at the token and the
    sequence level."""
    kw = dict(beta=0.04, off_policy_mask_threshold=1.0, top_entropy_quantile=0.8, importance_sampling_level=level)
    ours = make_trainer(model_dir, tmp_path, trace=None, **kw)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, **kw)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy=False)
    inputs["advantages"] = torch.tensor([-1.0, -0.5, 0.7, -1.2])
    lp = policy_logprobs(theirs, inputs)
    inputs["old_per_token_logps"] = lp + torch.tensor([[0.2], [3.0], [3.0], [0.1]])  # mean KLs 0.2, 3, 3, 0.1
    if vllm_weights:
        inputs["importance_sampling_ratio"] = 2 * torch.rand(4, 6, generator=torch.Generator().manual_seed(5))
        inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] + 0.5
        for trainer in (ours, theirs):
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    keep = theirs.get_off_policy_mask(inputs["advantages"].unsqueeze(1), lp, inputs.get(
        "sampling_per_token_logps", inputs["old_per_token_logps"]), inputs["completion_mask"], 1.0)
    assert keep.flatten().tolist() == [1.0, 0.0, 1.0, 1.0]  # Â < 0 and far off-policy: dropped; Â > 0: kept
    assert_same_loss(ours, theirs, inputs, ("dapo", "grpo"), 2e-6)
    assert_same_metrics(ours, theirs)


def test_entropy_bonus_is_trls(model_dir, tmp_path):
    """TRL's entropy bonus (entropy_coef 0.05): the loss minus the coefficient times the entropy's mean over TRL's
    effective mask (the completion mask here; times its entropy mask with top_entropy_quantile < 1, tested with it
    above; vLLM's weights, on here, weigh the policy term only), divided by the accumulation steps in training
    whatever the loss type: same loss (train and eval), gradients and metrics (policy_loss, the loss before the
    bonus; entropy_coef; entropy) as trl.GRPOTrainer, with dapo (whose normaliser holds the accumulation) and grpo
    (the loss divided by it)."""
    kw = dict(beta=0.04, entropy_coef=0.05)
    ours = make_trainer(model_dir, tmp_path, trace=None, **kw)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, **kw)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy=False)
    inputs["importance_sampling_ratio"] = 2 * torch.rand(4, 6, generator=torch.Generator().manual_seed(8))
    for trainer in (ours, theirs):
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    _, grpo_loss = assert_same_loss(ours, theirs, inputs, ("dapo", "grpo"), 2e-6, evaluate=True)
    assert_same_metrics(ours, theirs, ("train", "eval"))
    train = ours._metrics["train"]
    assert train["entropy_coef"] == [0.05, 0.05] and "entropy_coef" not in ours._metrics["eval"]
    # no rounding-sized bonus: grpo's loss × 2 accumulation steps is its policy_loss − 0.05 × an entropy of about 4.6
    assert train["policy_loss"][1] - 2 * grpo_loss > 0.1


def test_adaptive_entropy_control_is_trls(model_dir, tmp_path, monkeypatch):
    """use_adaptive_entropy (Skywork-OR1's controller, TRL's): at each optimizer step the coefficient moves by
    entropy_coef_delta, up if the accumulation window's entropy (over all its micro-batches' tokens: two micro-batches
    of 20 and 15 tokens here) is at or below entropy_target, else down; it applies from the next window on, only
    while the last window's entropy is at or below the target (never in the first window: inf). Two windows of
    _compute_loss (sync_gradients on each window's second micro-batch), the target below the entropy (about 4.6) in
    the first and above it in the second: the coefficient goes 0.1 → 0.05 → 0.1 and applies 0, then 0.05; same
    losses, gradients, metrics and controller state as trl.GRPOTrainer."""
    kw = dict(entropy_coef=0.1, use_adaptive_entropy=True, entropy_coef_delta=0.05)
    ours = make_trainer(model_dir, tmp_path, trace=None, **kw)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, **kw)
    first = loss_inputs(len(ours.processing_class), torch.float32, on_policy=False)
    second = dict(first, completion_mask=first["completion_mask"].flip(0))
    second["completion_mask"][0, 1:] = 0
    losses = []
    for target in (0.5, 10.0):
        for trainer in (ours, theirs):
            trainer.args.entropy_target = target  # (read at every call, by TRL too)
        for sync, inputs in ((False, first), (True, second)):
            monkeypatch.setattr(ours.accelerator.gradient_state, "sync_gradients", sync)  # (shared by both)
            losses += assert_same_loss(ours, theirs, inputs, ("grpo",), 2e-6)
        assert ours._last_world_entropy == pytest.approx(theirs._last_world_entropy, rel=1e-6)
        assert 0.5 < ours._last_world_entropy < 10.0
        assert ours._entropy_window_stats is None and theirs._entropy_window_stats is None
    assert_same_metrics(ours, theirs)
    assert ours._metrics["train"]["entropy_coef"] == pytest.approx([0.05, 0.1])
    # the same micro-batches on the same weights in both windows: only the applied bonus changes their loss, by
    # −0.05 × the micro-batch's entropy / 2 accumulation steps in the second
    entropy = ours._metrics["train"]["entropy"][:2]
    assert [b - a for a, b in zip(losses[:2], losses[2:])] == pytest.approx([-0.025 * e for e in entropy], rel=1e-5)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_vllm_importance_weights_are_trls(model_dir, tmp_path, level):
    """With vLLM, TRL weights each token's policy loss by an importance ratio (token or sequence level, zeros where
    masked; cispo's and sapo's too); the fused loss takes it as its policy_weights: same loss, gradients and clip
    metrics (TRL counts a zero-weight token's clipping too). (Only _compute_loss runs: no vLLM here.)"""
    ours = make_trainer(model_dir, tmp_path, trace=None, beta=0.04)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, beta=0.04)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy=False)
    g = torch.Generator().manual_seed(2)
    weights = 2 * torch.rand(4, 6 if level == "token" else 1, generator=g)
    weights[0, 0] = 0.0  # TRL's masking modes zero a ratio out of bounds
    weights[1] = 0.0  # a whole sequence, as its sequence modes do
    inputs["importance_sampling_ratio"] = weights
    for trainer in (ours, theirs):
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True  # what _compute_loss reads
    assert_same_loss(ours, theirs, inputs, ("dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo"), 2e-6)
    assert_same_metrics(ours, theirs)


def test_vllm_importance_weights_with_a_trace_multiply_the_clamped_term(model_dir, tmp_path):
    """GRPO-λ: the weight multiplies −min(ρ̃·Â_c, clip(ρ̃)·Â_c) with Â_c = max(Â, clamp), written out here from the
    public per-token ops (log-probs, trace) and compared with the trainer's fused loss."""
    import lambda_kernels as lk

    trainer = make_trainer(model_dir, tmp_path, trace="both", lam=0.9, adv_clamp_min=-0.1, impl="torch")
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    inputs = loss_inputs(len(trainer.processing_class), torch.float64, on_policy=False)
    inputs = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    inputs["importance_sampling_ratio"] = w = 2 * torch.rand(4, 6, generator=torch.Generator().manual_seed(3))
    loss, grads = loss_and_grads(trainer, inputs, "bnpo")

    trainer.model.zero_grad()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    m = inputs["completion_mask"]
    hidden, weight, _ = trainer._completion_states(trainer.model, ids, torch.cat([inputs["prompt_mask"], m], 1), 6)
    lp = lk.linear_logprobs(hidden, weight, inputs["completion_ids"], mask=m, impl="torch")
    z = lk.lambda_trace(lp - inputs["old_per_token_logps"], m, lam=0.9, style="both", impl="torch")
    adv = inputs["advantages"].clamp(min=-0.1).unsqueeze(1)
    ratio = torch.exp(z)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * w
    expected = (per_token * m).sum() / m.sum() / trainer.current_gradient_accumulation_steps
    expected.backward()
    assert torch.isclose(loss, expected.double(), rtol=1e-5), (loss, expected)
    for g_, p in zip(grads, trainer.model.parameters()):
        torch.testing.assert_close(g_, p.grad.double(), rtol=1e-4, atol=1e-7)


def test_logprobs_for_old_and_reference_are_trls(model_dir, tmp_path):
    ours = make_trainer(model_dir, tmp_path, trace=None)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy=True)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        lp, ent, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, 6, batch_size=3,
                                                             compute_entropy=True)
        ref_lp, ref_ent, _ = theirs._get_per_token_logps_and_entropies(theirs.model, ids, mask, 6,
                                                                       compute_entropy=True)
    assert lp.shape == ent.shape == (4, 6) and bool((lp[inputs["completion_mask"] == 0] == 0).all())
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent * inputs["completion_mask"], ref_ent * inputs["completion_mask"], rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_old_logprobs_from_the_same_weights_are_exactly_on_policy(model_dir, tmp_path, impl):
    """TRL computes ℓ_old with _get_per_token_logps_and_entropies when num_iterations > 1: on the first iteration
    the ratios must then be exactly 1 (the loss bit for bit the on-policy one, nothing clipped). The gradient takes
    the off-policy route (two passes), so it matches to rounding."""
    trainer = make_trainer(model_dir, tmp_path, impl=impl, trace="both", beta=0.04)
    inputs = loss_inputs(len(trainer.processing_class), torch.float32, on_policy=True)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        old, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 6)
    on_policy = loss_and_grads(trainer, inputs, "dapo")
    with_old = loss_and_grads(trainer, {**inputs, "old_per_token_logps": old}, "dapo")
    assert torch.equal(on_policy[0], with_old[0])
    for a, b in zip(on_policy[1], with_old[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] == 0


# one loss type per normaliser path of TRL's loop (dapo: num_items_in_batch; grpo and luspo: ÷ accumulation steps,
# as bnpo, dr_grpo and sapo; cispo and vespo: dapo's with their own policy term) and both levels; the equality tests
# above run every loss type on the same loss inputs; grpo with TRL's adaptive entropy bonus, its controller driven by
# the loop
@pytest.mark.parametrize("loss_type, level, entropy_bonus", [
    ("dapo", "token", False), ("grpo", "token", True), ("luspo", "token", False), ("cispo", "token", False),
    ("vespo", "token", False), ("dapo", "sequence", False), ("sapo", "sequence", False)])
def test_same_training_steps_as_trl_with_trace_none(model_dir, tmp_path, loss_type, level, entropy_bonus):
    """Two optimizer steps of TRL's loop (generation, rewards, advantages, updates) land on the same weights and log
    the same metrics (the same names: cispo's cispo_clip_ratio, vespo's vespo/phi_seq_mean, no clip_ratio/* for
    cispo, sapo and vespo), at the token level and GSPO's sequence level (without the KL's bias correction there).
    cispo's cap is 1.05, which the second iteration's ratios pass on some tokens; there vespo's φ moves off 1. With
    the adaptive entropy bonus (a target above the entropy) the coefficient rises by 0.05 at each optimizer step from
    0.1 and applies in the second (policy_loss and entropy_coef logged as TRL). SGD: Adam's first steps are ±lr
    wherever a gradient is nonzero, so rounding-level differences of near-zero gradients would flip whole steps."""
    options = dict(num_iterations=2, optim="sgd", learning_rate=0.5, loss_type=loss_type, max_completion_length=8,
                   per_device_train_batch_size=4, gradient_accumulation_steps=2, beta=0.04,
                   importance_sampling_level=level, use_bias_correction_kl=level == "token",
                   epsilon_high=1.05 if loss_type == "cispo" else None)
    if entropy_bonus:
        options.update(use_adaptive_entropy=True, entropy_coef=0.1, entropy_coef_delta=0.05, entropy_target=10.0)
    ours = make_trainer(model_dir, tmp_path, trace=None, **options)  # each trainer seeds the RNGs as it is built
    before = [p.detach().clone() for p in ours.model.parameters()]
    ours.train()
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, **options)
    theirs.train()
    logs = [e for e in ours.state.log_history if "reward" in e]
    assert [e["reward"] for e in logs] == [e.get("reward") for e in theirs.state.log_history if "reward" in e]
    assert any(e["completions/min_length"] < e["completions/max_length"] for e in logs)  # normalisers differ
    moved = max((p - b).abs().max().item() for p, b in zip(ours.model.parameters(), before))
    assert moved > 1e-3
    for p, r in zip(ours.model.parameters(), theirs.model.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=2e-7)  # measured ≤ 3e-8 (fp32 rounding)
    # every step's log (the loss and the gradient norm before clipping: the weights alone would not show a loss
    # scaled otherwise for the accumulation, which max_grad_norm's clipping hides)
    ours_logs, their_logs = ([e for e in t.state.log_history if "loss" in e] for t in (ours, theirs))
    assert len(ours_logs) == len(their_logs) == 2
    assert [set(e) for e in ours_logs] == [set(e) for e in their_logs]
    clip_names = {"cispo": ("cispo_clip_ratio",), "sapo": (), "vespo": ("vespo/phi_seq_mean",)}.get(loss_type,
                                                                                                  METRICS[1:])
    policy_metrics = METRICS[1:] + ("cispo_clip_ratio", "vespo/phi_seq_mean")
    assert not set(policy_metrics).difference(clip_names).intersection(ours_logs[0])
    bonus_names = ("policy_loss", "entropy_coef") if entropy_bonus else ()
    for name in ("entropy", "kl", "loss", "grad_norm") + clip_names + bonus_names:
        assert [e[name] for e in ours_logs] == pytest.approx([e[name] for e in their_logs], rel=1e-5, abs=1e-6), name
    if loss_type == "cispo":
        assert any(e["cispo_clip_ratio"] > 0 for e in ours_logs)
    if loss_type == "vespo":  # (1 on-policy; the second step's updates are off-policy: about 0.43 there)
        assert min(e["vespo/phi_seq_mean"] for e in ours_logs) < 0.9
    if entropy_bonus:
        assert [e["entropy_coef"] for e in ours_logs] == pytest.approx([0.15, 0.2])
        assert ours._last_world_entropy == pytest.approx(theirs._last_world_entropy, rel=1e-5)


def test_lora_adapters_train_as_in_trl(model_dir, tmp_path):
    """PEFT: the hidden states come through the adapters, and the reference log-probs (adapters disabled by TRL)
    through the base weights; the adapters end where TRL's do."""
    peft = pytest.importorskip("peft")

    def lora():  # gaussian init: the adapters change the output from the first step
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                               init_lora_weights="gaussian")

    options = dict(num_iterations=2, optim="sgd", learning_rate=0.5, beta=0.04)
    ours = make_trainer(model_dir, tmp_path, trace=None, peft_config=lora(), **options)
    ours.train()
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, peft_config=lora(), **options)
    theirs.train()
    trained = {n: p for n, p in ours.model.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n for n in trained)
    for (n, p), (_, r) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=2e-7, msg=n)
    kl = [e["kl"] for e in ours.state.log_history if "kl" in e]
    assert kl[-1] > 0 and kl == pytest.approx([e["kl"] for e in theirs.state.log_history if "kl" in e], rel=1e-5)


def test_resume_from_a_checkpoint_reproduces_the_run(model_dir, tmp_path):
    """TRL's checkpoints and resume are untouched: a run resumed from its first checkpoint ends on the weights of
    the uninterrupted run."""
    options = dict(trace="both", beta=0.04, learning_rate=1e-2, save_strategy="steps", save_steps=1)
    whole = make_trainer(model_dir, tmp_path / "whole", **options)
    whole.train()
    resumed = make_trainer(model_dir, tmp_path / "whole", **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "GRPOLambdaTRLTrainer" / "checkpoint-1"))
    for p, r in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, r)
    assert resumed.state.global_step == 2
    # step 1's log entry came from the checkpoint (its measured step_time too), not from training step 1 again
    assert resumed.state.log_history[0] == whole.state.log_history[0]


def test_the_patched_model_pickles_and_a_copy_uses_its_own_weights(model_dir, tmp_path):
    import copy
    import pickle

    trainer = make_trainer(model_dir, tmp_path)
    restored = pickle.loads(pickle.dumps(trainer.model))
    assert all(torch.equal(p, q) for p, q in zip(restored.parameters(), trainer.model.parameters()))
    clone = copy.deepcopy(trainer.model)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    ids = torch.randint(4, 50, (2, 8))
    hidden, weight, _ = clone(input_ids=ids, attention_mask=torch.ones_like(ids), completion_hidden_states=3)
    assert hidden.shape == (2, 3, 24) and not weight.any()  # the copy's head, not the original's


def test_the_lm_head_is_seen_by_ddp(tmp_path):
    """DDP (two CPU processes, gloo) with find_unused_parameters on and off: the head's parameters come out of the
    patched forward, so DDP counts them used; the gradients are the mean of the ranks' own."""
    import random
    import subprocess
    import sys

    script = Path(__file__).with_name("ddp_trl_forward.py")
    port = random.Random().randrange(20000, 40000)
    proc = subprocess.run([sys.executable, str(script), str(port), str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {f.name: f.read_text() for f in tmp_path.iterdir()}
    assert len(results) == 4, results
    for name, result in results.items():
        assert result.startswith("max_diff=") and float(result.split("=")[1]) < 1e-6, (name, result)


def test_grpo_lambda_trains_through_trls_loop(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, trace="both", lam=0.99, adv_clamp_min=-0.1, beta=0.04,
                           learning_rate=1e-2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for name in ("loss", "entropy", "kl", "clip_ratio/region_mean", "reward"):
            assert torch.isfinite(torch.tensor(entry[name])), (name, entry)
    assert max((p - b).abs().max().item() for p, b in zip(trainer.model.parameters(), before)) > 1e-3
    # evaluation: TRL's prediction_step calls the loss under no_grad, in eval mode (no accumulation scaling)
    results = trainer.evaluate(eval_dataset=trainer.train_dataset.select(range(8)))
    assert torch.isfinite(torch.tensor(results["eval_loss"])) and "eval_clip_ratio/region_mean" in results
    # GRPO-λ is not TRL's loss: the same batch gives another loss than trace=None
    inputs = loss_inputs(len(trainer.processing_class), torch.float32, on_policy=False)
    traced, _ = loss_and_grads(trainer, inputs, "dapo")
    trainer.args.trace = None
    plain, _ = loss_and_grads(trainer, inputs, "dapo")
    assert not torch.isclose(traced, plain)


def test_under_autocast_the_head_runs_in_the_autocast_dtype(model_dir, tmp_path):
    """bf16=True (GRPOConfig's default, on the CPU too): an fp32 model's final norm returns fp32 hidden states and
    the head runs in bf16, as F.linear under autocast (and TRL's head) would; gradients reach the fp32 weights, and
    the loss is TRL's up to bf16 rounding (TRL also rounds the logits to bf16, the fused loss keeps them fp32)."""
    ours = make_trainer(model_dir, tmp_path, trace=None, impl="torch", bf16=True)
    theirs = make_trainer(model_dir, tmp_path, cls=trl.GRPOTrainer, bf16=True)
    inputs = loss_inputs(len(ours.processing_class), torch.float32, on_policy=False)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    hidden, weight, bias = ours._completion_states(ours.model, ids, mask, 6)
    assert hidden.dtype == weight.dtype == torch.bfloat16 and bias is None
    loss, grads = loss_and_grads(ours, inputs, "dapo")
    ref_loss, ref_grads = loss_and_grads(theirs, inputs, "dapo")
    assert all(g.dtype == torch.float32 for g in ours.model.parameters())
    assert torch.isclose(loss, ref_loss, rtol=1e-2, atol=0), (loss, ref_loss)
    scale = max(g.abs().max().item() for g in ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=3e-2 * scale)
    ours.train()


def test_trl_options_keep_trls_defaults(tmp_path):
    """Only the GRPO-λ options are added: every TRL option keeps TRL's default (the bias-corrected KL among them)."""
    kw = dict(output_dir=str(tmp_path), use_cpu=True)
    ours, theirs = GRPOLambdaTRLConfig(**kw), trl.GRPOConfig(**kw)
    shared = {f.name for f in dataclasses.fields(trl.GRPOConfig)} - {"output_dir", "logging_dir"}
    assert {n: getattr(ours, n) for n in shared} == {n: getattr(theirs, n) for n in shared}
    assert ours.use_bias_correction_kl is True


@pytest.mark.parametrize("options,match", [
    (dict(loss_type="dapoo"), "loss_type must be one of .*Did you mean 'dapo'"),
    (dict(trace="bogus"), "trace must be one of"),
    (dict(lam=1.5), "lam must be in"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(adv_clamp_min=float("nan")), "adv_clamp_min must be a finite number"),
    (dict(delta=1.1), r"delta must be None or a finite number > 1 \+ epsilon_high = 1.2; got 1.1"),
    (dict(delta=1.28, epsilon_high=0.28), r"delta must be .* > 1 \+ epsilon_high = 1.28"),
    (dict(importance_sampling_level="sequense", trace=None),
     r"importance_sampling_level must be one of \['token', 'sequence'\]; got 'sequense'. Did you mean 'sequence'"),
    # the GRPO-λ default trace "both" asks for a trace that GSPO's sequence ratio replaces
    (dict(importance_sampling_level="sequence"),
     r"trace must be None with importance_sampling_level='sequence'; got 'both'.*pass trace=None"),
    (dict(importance_sampling_level="sequence", trace="recent"), r"trace must be None .*; got 'recent'"),
    # cispo's cap is TRL's epsilon_high (epsilon when unset), sapo's temperatures divide
    (dict(loss_type="cispo", epsilon_high=0.0), r"epsilon_high must be a finite number > 0; got 0\.0\. With "
                                                r"loss_type='cispo' it is CISPO's cap .*TRL recommends 5\.0"),
    (dict(loss_type="cispo", epsilon=0.0), r"epsilon_high must be a finite number > 0; got 0\.0.*epsilon when unset"),
    (dict(loss_type="sapo", sapo_temperature_neg=0.0), r"sapo_temperature_neg must be a finite number > 0; got 0\.0\. "
                                                       r"It is SAPO's gate temperature"),
    (dict(loss_type="sapo", sapo_temperature_pos=float("inf")), r"sapo_temperature_pos must be a finite number > 0"),
    # VESPO's sequence weight takes the trace's place (trace defaults to "both"); its shapes reach the fused loss
    (dict(loss_type="vespo"), r"trace must be None with loss_type='vespo'; got 'both'\. .*pass trace=None"),
    (dict(loss_type="vespo", trace="recent"), r"trace must be None with loss_type='vespo'; got 'recent'"),
    (dict(loss_type="vespo", trace=None, vespo_k_pos=float("nan")),
     r"vespo_k_pos must be a finite number; got nan\. It shapes VESPO's weight"),
    (dict(loss_type="vespo", trace=None, vespo_lambda_neg=float("-inf")),
     r"vespo_lambda_neg must be a finite number; got -inf"),
    # delta is checked with the clipped loss types, where TRL applies it
    (dict(loss_type="grpo", delta=1.5, epsilon_high=1.3), r"delta must be .* > 1 \+ epsilon_high = 2\.3; got 1\.5"),
    # the entropy bonus's coefficient reaches the fused loss: finite, also as the adaptive controller moves it
    (dict(entropy_coef=float("nan")), r"entropy_coef must be a finite number; got nan\. It weighs TRL's entropy bonus"),
    (dict(use_adaptive_entropy=True, entropy_coef_max=float("inf")),
     r"entropy_coef_max must be a finite number; got inf\. use_adaptive_entropy moves entropy_coef"),
])
def test_bad_options_are_config_errors(options, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        GRPOLambdaTRLConfig(output_dir=str(tmp_path), use_cpu=True, **options)


@pytest.mark.parametrize("options,match", [
    # TRL folds vLLM's importance-sampling ratios into VESPO's φ (the fused loss would weigh the tokens by them)
    (dict(loss_type="vespo", trace=None, use_vllm=True),
     "vllm_importance_sampling_correction must be False with loss_type='vespo' and use_vllm=True"),
    (dict(loss_type="vespo", trace=None, use_vllm=True, vllm_importance_sampling_mode="token_truncate"),
     "vllm_importance_sampling_correction must be False with loss_type='vespo'"),
    (dict(loss_type="vespo", importance_sampling_level="sequence", trace=None),
     "importance_sampling_level must be 'token' with loss_type='vespo'; got 'sequence'"),
])
def test_unsupported_trl_options_are_refused_before_any_model_work(tmp_path, options, match):
    with pytest.raises(ConfigError, match=f"does not implement these TRL options: .*{match}.*use trl.GRPOTrainer"):
        GRPOLambdaTRLConfig(output_dir=str(tmp_path), use_cpu=True, **options)


@pytest.mark.parametrize("options", [
    dict(loss_type="luspo"),
    dict(importance_sampling_level="sequence", trace=None),  # beta 0: the KL's bias correction does not apply
    dict(importance_sampling_level="sequence", trace="none", beta=0.04, use_bias_correction_kl=False),
    dict(importance_sampling_level="sequence", trace=None, beta=0.04),  # (TRL's default use_bias_correction_kl)
    dict(importance_sampling_level="sequence", trace=None, loss_type="luspo"),
    # cispo and sapo, with a trace (GRPO-λ's ratio under their policy term) or at the sequence level; TRL ignores
    # delta with them (here below 1 + epsilon_high, refused with a clipped loss type)
    dict(loss_type="cispo", epsilon_high=5.0, delta=1.5),
    dict(loss_type="cispo", epsilon_high=5.0, importance_sampling_level="sequence", trace=None),
    dict(loss_type="sapo", delta=1.1, sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
    dict(loss_type="sapo", importance_sampling_level="sequence", trace=None, beta=0.04, use_bias_correction_kl=False),
    # TRL's entropy bonus, static (a penalty too) or adaptive, with its entropy mask
    dict(entropy_coef=0.01, top_entropy_quantile=0.2),
    dict(entropy_coef=-0.01, loss_type="sapo"),
    dict(use_adaptive_entropy=True, entropy_target=0.5, entropy_coef_max=0.1),
    # vespo without a trace, with its shapes (any finite numbers; TRL ignores delta with it), vLLM without the
    # importance-sampling correction, TRL's masks and entropy bonus
    dict(loss_type="vespo", trace=None, delta=1.1, vespo_k_pos=0.0, vespo_lambda_pos=-1.0, vespo_k_neg=4.5,
         vespo_lambda_neg=0.5),
    dict(loss_type="vespo", trace="none", use_vllm=True, vllm_importance_sampling_correction=False, beta=0.04),
    dict(loss_type="vespo", trace=None, top_entropy_quantile=0.2, off_policy_mask_threshold=0.5, entropy_coef=0.01),
])
def test_supported_trl_options_are_accepted(tmp_path, options):
    args = GRPOLambdaTRLConfig(output_dir=str(tmp_path), use_cpu=True, **options)
    assert all(getattr(args, k) == (None if k == "trace" else v) for k, v in options.items())


def test_cispo_without_epsilon_high_warns_of_trls_cap(tmp_path):
    """TRL's cispo caps the importance weight at epsilon_high, which is epsilon (0.2) when unset: reproduced (the
    same loss as TRL's), with a warning, since a cap below 1 caps every on-policy token."""
    with pytest.warns(UserWarning, match=r"loss_type='cispo' with epsilon_high unset caps the importance weight at "
                                         r"epsilon = 0\.2 .*TRL recommends epsilon_high=5\.0"):
        GRPOLambdaTRLConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="cispo")


def test_trace_none_from_a_command_line_or_yaml(tmp_path):
    """TrlParser hands `--trace None` / `--trace none` over as a string: it means plain GRPO."""
    for given in ("None", "none"):
        assert GRPOLambdaTRLConfig(output_dir=str(tmp_path), use_cpu=True, trace=given).trace is None


def test_tools_are_refused(model_dir, tmp_path):
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first integer
            b: the second integer
        """
        return a + b

    with pytest.raises(ValueError, match="does not implement these TRL options: tools"):
        make_trainer(model_dir, tmp_path, tools=[add])
    with pytest.raises(ValueError, match="does not implement these TRL options: tools"):
        GRPOLambdaTRLTrainer(str(model_dir), digit_share, GRPOLambdaTRLConfig(output_dir=str(tmp_path), use_cpu=True),
                             environment_factory=object)


def test_plain_grpo_config_is_refused(model_dir, tmp_path):
    with pytest.raises(TypeError, match="must be a GRPOLambdaTRLConfig"):
        GRPOLambdaTRLTrainer(str(model_dir), digit_share, trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True))
