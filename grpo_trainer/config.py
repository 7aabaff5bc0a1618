"""Every trainer option in one dataclass: defaults, help text, YAML loading, `--key value` overrides, validation.

The defaults ARE the embedded offline job (`grpo-lambda train` with no arguments): a tiny Llama trained from
scratch on the shipped arithmetic task, warmed up by a short supervised phase, then trained with GRPO-λ.
Option names follow TRL's GRPOConfig where TRL has the option.

Validation errors read ``<option> must be ...; got .... [hint]`` and are raised as `ConfigError` at start-up.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

TRAIN, EVAL = "train", "evaluate"
BOTH = (TRAIN, EVAL)

ALGORITHMS = ("grpo", "grpo_lambda")
TRACES = ("recent", "both")
LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
POLICY_LOSSES = ("clip", "cispo", "sapo", "vespo")
# the policy terms' own options, their values when left null (TRL's recommended epsilon_high for cispo, its SAPO
# temperatures, its VESPO shapes: lambda_kernels' defaults too) and the one policy_loss that uses each
CISPO_MAX_RATIO = 5.0
SAPO_TEMPERATURE_POS, SAPO_TEMPERATURE_NEG = 1.0, 1.05
VESPO_K_POS, VESPO_LAMBDA_POS, VESPO_K_NEG, VESPO_LAMBDA_NEG = 2.0, 3.0, 3.0, 2.0
VESPO_OPTIONS = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
POLICY_LOSS_OPTIONS = {"cispo_max_ratio": "cispo", "sapo_temperature_pos": "sapo", "sapo_temperature_neg": "sapo",
                       **{name: "vespo" for name in VESPO_OPTIONS}}
# what each policy term's own options are, for the messages
_POLICY_OPTION_WHAT = {"cispo": "CISPO's cap", "sapo": "SAPO's gate temperature",
                       "vespo": "a shape parameter of VESPO's weight phi"}
SCALE_REWARDS = ("group", "batch", "none")
IMPLS = ("auto", "torch", "triton")
MODEL_ARCHS = ("llama", "qwen2")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


class ConfigError(ValueError):
    """An invalid option, reported at start-up before any work is done."""


def opt(default, help: str, commands=BOTH, group: str = "run"):
    """A dataclass field carrying its help text, the sub-commands it applies to and its help group."""
    kw = {"default_factory": (lambda d=default: list(d))} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "commands": commands, "group": group}, **kw)


@dataclass
class GRPOLambdaConfig:
    # ---- model
    model_name_or_path: Optional[str] = opt(
        None, "A Hugging Face model folder/name to train (or, for `evaluate`, the checkpoint to score). "
              "None builds the tiny model below from scratch, with a character tokenizer made locally.",
        group="model")
    model_arch: str = opt("llama", f"Architecture of the model built from scratch: one of {MODEL_ARCHS}.",
                          TRAIN, "model")
    hidden_size: int = opt(128, "Hidden size of the model built from scratch.", TRAIN, "model")
    intermediate_size: int = opt(512, "MLP size of the model built from scratch.", TRAIN, "model")
    num_hidden_layers: int = opt(4, "Layers of the model built from scratch.", TRAIN, "model")
    num_attention_heads: int = opt(4, "Attention heads of the model built from scratch (must divide hidden_size).",
                                   TRAIN, "model")
    # ---- data
    dataset: str = opt("arithmetic", "Training data: 'arithmetic' (the shipped generator), a path to a .jsonl file "
                                     "with prompt/answer columns, or 'hf:NAME[:CONFIG][@SPLIT]' (needs `datasets`).",
                       group="data")
    eval_dataset: Optional[str] = opt(None, "Held-out data in the same forms; None splits `eval_size` rows off "
                                            "`dataset` (arithmetic: problems never seen in training).", group="data")
    prompt_column: str = opt("prompt", "Column holding the prompt text.", group="data")
    answer_column: str = opt("answer", "Column holding the reference answer (passed to rewards as `answer`).",
                             group="data")
    arithmetic_max_operand: int = opt(29, "Arithmetic task: operands are drawn from 0..N.", group="data")
    arithmetic_ops: str = opt("+-", "Arithmetic task: operators to use, a subset of '+-*' (a-b keeps a >= b).",
                              group="data")
    eval_size: int = opt(300, "Number of held-out problems scored before and after RL (and by `evaluate`).",
                         group="data")
    # ---- rewards
    reward_funcs: list = opt(["arithmetic", "format"], "Reward functions, by registry name (arithmetic, math, "
                                                       "format) or dotted path 'pkg.module:func' / 'pkg.module.func'.",
                             TRAIN, "rewards")
    reward_weights: Optional[list] = opt([1.0, 0.1], "One weight per reward function (None: all 1.0; the default "
                                                     "1.0,0.1 goes with the default reward_funcs only).", TRAIN,
                                         "rewards")
    eval_reward: str = opt("auto", "Reward that defines accuracy in evaluation (a 0/1 function); 'auto' picks "
                                   "'arithmetic' for the arithmetic task and 'math' otherwise.", group="rewards")
    # ---- generation
    num_generations: int = opt(8, "Completions sampled per prompt (the group size G, >= 2).", TRAIN, "generation")
    per_device_train_batch_size: int = opt(128, "Completions per optimisation micro-batch.", TRAIN, "generation")
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated into one optimiser update.", TRAIN,
                                           "generation")
    generation_batch_size: Optional[int] = opt(
        None, "Completions generated per step (a multiple of num_generations); None = "
              "per_device_train_batch_size x gradient_accumulation_steps.", TRAIN, "generation")
    max_prompt_length: int = opt(64, "Prompts are truncated from the left to this many tokens.", group="generation")
    max_completion_length: int = opt(8, "Maximum generated tokens per completion.", group="generation")
    temperature: float = opt(1.0, "Sampling temperature in training (the log-probs use the same one).", TRAIN,
                             "generation")
    top_p: float = opt(1.0, "Nucleus sampling in training, in (0, 1].", TRAIN, "generation")
    use_vllm: bool = opt(False, "Generate with vLLM (optional extra `lambda-kernels[vllm]`, GPU only).", TRAIN,
                         "generation")
    vllm_importance_sampling_correction: bool = opt(
        True, "With use_vllm: weight each token's policy term by the importance ratio π_old/q of the trainer's "
              "log-probs over those vLLM sampled with (TRL's option and default; the KL term is not weighted).",
        TRAIN, "generation")
    vllm_importance_sampling_mode: str = opt(
        "sequence_mask", f"One of {VLLM_IS_MODES} (TRL's): per-token or per-sequence ratio (the product over the "
                         "sequence's tokens), clipped to [clip_min, clip_max] (truncate) or set to 0 outside it "
                         "(mask).",
        TRAIN, "generation")
    vllm_importance_sampling_clip_max: Optional[float] = opt(
        3.0, "Upper bound C_max of the ratio (None = none).", TRAIN, "generation")
    vllm_importance_sampling_clip_min: Optional[float] = opt(
        None, "Lower bound C_min of the ratio (None = none; below clip_max).", TRAIN, "generation")
    # ---- algorithm
    algorithm: str = opt("grpo_lambda", f"One of {ALGORITHMS}; 'grpo' ignores trace/lam/gamma/adv_clamp_min.",
                         TRAIN, "algorithm")
    trace: str = opt("both", f"GRPO-λ eligibility trace: one of {TRACES}.", TRAIN, "algorithm")
    lam: float = opt(0.99, "Trace λ in [0, 1].", TRAIN, "algorithm")
    gamma: float = opt(1.0, "Discount γ in [0, 1] (the trace decays by γ·λ per token).", TRAIN, "algorithm")
    adv_clamp_min: Optional[float] = opt(-0.1, "Clamp advantages from below (the paper's -0.1); None = no clamp.",
                                         TRAIN, "algorithm")
    beta: float = opt(0.001, "KL coefficient (k3 estimator); > 0 loads a frozen reference model, 0 loads none.",
                      TRAIN, "algorithm")
    kl_bias_correction: bool = opt(False, "Weight each token's KL by its ratio π/π_old (TRL's use_bias_correction_kl; "
                                   "the paper's runs: false).", TRAIN, "algorithm")
    policy_loss: str = opt(
        "clip", f"Policy term of the objective: one of {POLICY_LOSSES}. 'clip': PPO's clipped ratio (epsilon, "
                "epsilon_high, delta); 'cispo': CISPO, -sg(min(ratio, cispo_max_ratio))*A*log-prob (TRL's loss_type "
                "cispo); 'sapo': SAPO's soft gate -(4/t)*sigmoid(t*(ratio - 1))*A, t = sapo_temperature_pos where "
                "A > 0, else sapo_temperature_neg (TRL's loss_type sapo); 'vespo': VESPO, -sg(phi(w))*A*log-prob "
                "with w the sequence's importance weight exp(sum of its log-ratios) and phi(w) = "
                "exp(l)*w^k*exp(-l*w), (k, l) = (vespo_k_pos, vespo_lambda_pos) where A >= 0, else (vespo_k_neg, "
                "vespo_lambda_neg) (TRL's loss_type vespo; needs algorithm grpo and importance_sampling_level "
                "token). The ratio of the first three is traced with grpo_lambda, and the sequence's with "
                "importance_sampling_level sequence; cispo, sapo and vespo use neither epsilon nor epsilon_high, and "
                "refuse epsilon_high and delta; cispo_max_ratio, the sapo_temperature_* and the vespo_* are refused "
                "with the other policy terms. loss_type still aggregates (TRL's cispo and vespo are dapo's, its sapo "
                "grpo's).", TRAIN, "algorithm")
    epsilon: float = opt(0.2, "Lower clip range ε of the ratio (policy_loss clip).", TRAIN, "algorithm")
    epsilon_high: Optional[float] = opt(None, "Upper clip range (None = epsilon; policy_loss clip only: CISPO's cap, "
                                              "TRL's epsilon_high for cispo, is cispo_max_ratio).", TRAIN,
                                        "algorithm")
    delta: Optional[float] = opt(None, "Dual-clip PPO (TRL's delta, verl's clip_ratio_c): a token with a negative "
                                       "advantage and ratio above delta (> 1 + epsilon_high) adds -delta*A and no "
                                       "gradient. Acts only with num_iterations > 1 (from a rollout's second pass "
                                       "on: the first is on-policy, ratio 1); None = off. policy_loss clip only.",
                                 TRAIN, "algorithm")
    cispo_max_ratio: Optional[float] = opt(
        None, f"CISPO's cap of the importance weight, > 0 (TRL's epsilon_high with loss_type cispo; ScaleRL's "
              f"ε_max); None = {CISPO_MAX_RATIO} (TRL's recommendation). policy_loss cispo only (refused with the "
              "others).", TRAIN, "algorithm")
    sapo_temperature_pos: Optional[float] = opt(
        None, f"SAPO's gate temperature for tokens with A > 0, > 0 (TRL's name); None = {SAPO_TEMPERATURE_POS} "
              "(TRL's default). policy_loss sapo only (refused with the others).", TRAIN, "algorithm")
    sapo_temperature_neg: Optional[float] = opt(
        None, f"SAPO's gate temperature for tokens with A <= 0, > 0 (TRL's name); None = {SAPO_TEMPERATURE_NEG} "
              "(TRL's default). policy_loss sapo only (refused with the others).", TRAIN, "algorithm")
    vespo_k_pos: Optional[float] = opt(
        None, f"VESPO's power k of w in phi for sequences with A >= 0, a finite number (TRL's name); None = "
              f"{VESPO_K_POS} (TRL's default). policy_loss vespo only (refused with the others).", TRAIN, "algorithm")
    vespo_lambda_pos: Optional[float] = opt(
        None, f"VESPO's decay rate l of phi in w for sequences with A >= 0, a finite number (at least 1e-4 is "
              f"used, as TRL; TRL's name); None = {VESPO_LAMBDA_POS} (TRL's default). policy_loss vespo only "
              "(refused with the others).", TRAIN, "algorithm")
    vespo_k_neg: Optional[float] = opt(
        None, f"VESPO's power k of w in phi for sequences with A < 0, a finite number (TRL's name); None = "
              f"{VESPO_K_NEG} (TRL's default). policy_loss vespo only (refused with the others).", TRAIN, "algorithm")
    vespo_lambda_neg: Optional[float] = opt(
        None, f"VESPO's decay rate l of phi in w for sequences with A < 0, a finite number (at least 1e-4 is used, "
              f"as TRL; TRL's name); None = {VESPO_LAMBDA_NEG} (TRL's default). policy_loss vespo only (refused "
              "with the others).", TRAIN, "algorithm")
    loss_type: str = opt("dapo", f"Token aggregation: one of {LOSS_TYPES} (TRL's names; luspo: the sum over each "
                                 "sequence's tokens, averaged over sequences).", TRAIN, "algorithm")
    importance_sampling_level: str = opt(
        "token", f"Ratio of the clipped objective: one of {IMPORTANCE_SAMPLING_LEVELS} (TRL's option). 'sequence' is "
                 "GSPO: every token shares its sequence's ratio exp(mean of its log-ratios), in place of the λ-trace "
                 "(needs algorithm grpo; with kl_bias_correction the KL is weighted by the sequence's ratio, as "
                 "TRL).", TRAIN, "algorithm")
    scale_rewards: str = opt("group", f"Advantage scaling: one of {SCALE_REWARDS}.", TRAIN, "algorithm")
    num_iterations: int = opt(1, "Optimisation passes over each rollout (1 = on-policy).", TRAIN, "algorithm")
    top_entropy_quantile: float = opt(1.0, "Train only the tokens whose entropy is in this top fraction of each "
                                           "micro-batch's (TRL's; 'Beyond the 80/20 rule': 0.2); 1.0 = all. Costs "
                                           "a log-prob pass per micro-batch.", TRAIN, "algorithm")
    entropy_coef: float = opt(
        0.0, "Entropy bonus c, a finite number (0 = off; < 0 penalises entropy): the loss minus c times the mean "
             "entropy of the tempered distribution over an update's trained tokens, a token mean whatever loss_type "
             "(TRL's entropy_coef, verl's entropy_coeff with token-mean aggregation). With top_entropy_quantile < 1: "
             "over each micro-batch's kept tokens, the micro-batches weighted by their loss tokens. Computed in the "
             "loss's own pass.", TRAIN, "algorithm")
    mask_truncated_completions: bool = opt(False, "Exclude completions cut at max_completion_length from the loss.",
                                           TRAIN, "algorithm")
    dynamic_sampling: bool = opt(False, "Drop groups whose rewards are all equal (no learning signal).", TRAIN,
                                 "algorithm")
    impl: str = opt("auto", f"Loss kernels: one of {IMPLS} ('auto' = Triton on GPU or under "
                            "TRITON_INTERPRET=1, PyTorch otherwise).", TRAIN, "algorithm")
    # ---- optimisation
    learning_rate: float = opt(3e-4, "AdamW learning rate of the RL phase (> 0).", TRAIN, "optimisation")
    lr_scheduler_type: str = opt("constant_with_warmup", f"One of {SCHEDULERS}.", TRAIN, "optimisation")
    warmup_ratio: float = opt(0.05, "Fraction of updates spent warming the learning rate up, in [0, 1).", TRAIN,
                              "optimisation")
    weight_decay: float = opt(0.0, "AdamW weight decay.", TRAIN, "optimisation")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0 = no clipping).", TRAIN, "optimisation")
    max_steps: int = opt(250, "RL steps (one rollout each, then num_iterations updates).", TRAIN, "optimisation")
    # ---- supervised warm-up
    sft_warmup_steps: int = opt(800, "Supervised steps on (prompt, answer) before RL (0 = none).", TRAIN, "warm-up")
    sft_learning_rate: float = opt(3e-3, "AdamW learning rate of the warm-up.", TRAIN, "warm-up")
    sft_batch_size: int = opt(64, "Examples per warm-up step.", TRAIN, "warm-up")
    # ---- evaluation
    eval_samples: int = opt(4, "pass@1 is averaged over this many samples per problem (0 = greedy only).",
                            group="evaluation")
    eval_temperature: float = opt(0.6, "Sampling temperature of pass@1.", group="evaluation")
    eval_top_p: float = opt(0.95, "Nucleus sampling of pass@1.", group="evaluation")
    eval_batch_size: int = opt(256, "Prompts per generate call in evaluation.", group="evaluation")
    # ---- run
    output_dir: str = opt("outputs/grpo-lambda", "Output folder (metrics, plot, checkpoints, final model). A new "
                                                  "run (no --resume) refuses a folder holding an earlier run's "
                                                  "checkpoints or metrics unless overwrite_output_dir is true.")
    overwrite_output_dir: bool = opt(False, "Let a new run replace the metrics.jsonl and checkpoints/ of an earlier "
                                            "run in output_dir.", TRAIN)
    seed: int = opt(42, "Seed of the model init, the data split and order, and sampling.")
    save_steps: int = opt(50, "Checkpoint every k steps (0 = never).", TRAIN)
    save_total_limit: int = opt(2, "Checkpoints kept (the oldest are deleted; 0 = keep all).", TRAIN)
    resume: Optional[str] = opt(None, "Resume from a checkpoint folder, or 'latest' in output_dir/checkpoints.",
                                TRAIN)
    logging_steps: int = opt(10, "With disable_tqdm, print a metrics line every k steps.", TRAIN)
    disable_tqdm: bool = opt(False, "Print plain lines instead of a progress bar.")
    num_threads: int = opt(0, "torch CPU threads (0 = torch's default).")
    device: str = opt("auto", "Where the model runs: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or "
                              "'cuda:N'.")
    model_dtype: str = opt("float32", f"Dtype of the model's weights: one of {MODEL_DTYPES} (bfloat16 for real "
                                      "models on GPUs; the loss computes in fp32 inside either way).", group="model")

    # ------------------------------------------------------------------ derived
    @property
    def effective_generation_batch_size(self) -> int:
        if self.generation_batch_size is not None:
            return self.generation_batch_size
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def prompts_per_step(self) -> int:
        return self.effective_generation_batch_size // self.num_generations

    @property
    def loss_trace(self) -> Optional[str]:
        return self.trace if self.algorithm == "grpo_lambda" else None

    @property
    def loss_adv_clamp_min(self) -> Optional[float]:
        return self.adv_clamp_min if self.algorithm == "grpo_lambda" else None

    @property
    def loss_cispo_max_ratio(self) -> float:
        return CISPO_MAX_RATIO if self.cispo_max_ratio is None else self.cispo_max_ratio

    @property
    def loss_sapo_temperatures(self) -> tuple:
        """(for A > 0, for A <= 0), the defaults where null."""
        return (SAPO_TEMPERATURE_POS if self.sapo_temperature_pos is None else self.sapo_temperature_pos,
                SAPO_TEMPERATURE_NEG if self.sapo_temperature_neg is None else self.sapo_temperature_neg)

    @property
    def loss_vespo_options(self) -> dict:
        """VESPO's k_pos, lambda_pos, k_neg, lambda_neg (lambda_kernels.VESPO's names), the defaults where null."""
        defaults = (VESPO_K_POS, VESPO_LAMBDA_POS, VESPO_K_NEG, VESPO_LAMBDA_NEG)
        return {name[len("vespo_"):]: default if getattr(self, name) is None else getattr(self, name)
                for name, default in zip(VESPO_OPTIONS, defaults)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path, **replace) -> None:
        Path(path).write_text(yaml.safe_dump({**self.to_dict(), **replace}, sort_keys=False))

    def torch_device(self):
        """The torch.device of `device` ("auto": CUDA when available); ConfigError if it cannot be used here."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {self.device!r}.") from None
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {self.device!r}.")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} needs CUDA, which this machine lacks; got no CUDA device. "
                              "Use --device cpu (or auto).")
        return dev

    # ------------------------------------------------------------------ validation
    def validate(self, command: str = TRAIN) -> "GRPOLambdaConfig":
        """Check every option once; raise ConfigError naming the option, what is valid, and what was given."""
        _choice("model_arch", self.model_arch, MODEL_ARCHS)
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_prompt_length", "max_completion_length", "eval_batch_size", "eval_size"):
            _positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size must be a multiple of num_attention_heads = {self.num_attention_heads}; "
                              f"got {self.hidden_size}.")
        _positive_int("arithmetic_max_operand", self.arithmetic_max_operand)
        if not self.arithmetic_ops or set(self.arithmetic_ops) - set("+-*"):
            raise ConfigError(f"arithmetic_ops must be a non-empty subset of '+-*'; got {self.arithmetic_ops!r}.")
        _non_negative_int("eval_samples", self.eval_samples)
        _positive_number("eval_temperature", self.eval_temperature)
        _unit_open_closed("eval_top_p", self.eval_top_p)
        _non_negative_int("num_threads", self.num_threads)
        _choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        if command == TRAIN and self.model_dtype == "float16":
            raise ConfigError("model_dtype must be float32 or bfloat16 to train; got float16. AdamW on fp16 weights "
                              "(no fp32 master weights, no loss scaling here) overflows to inf within a few steps. "
                              "Use bfloat16 on GPUs (float16 is fine for `evaluate`).")
        device = self.torch_device()
        if self.model_name_or_path is not None:
            p = str(self.model_name_or_path)
            # a hub id is "name" or "org/name": anything else (absolute, relative with a dot, deeper) is a folder
            if (p.startswith(("/", ".", "~")) or p.count("/") >= 2) and not Path(p).expanduser().exists():
                raise ConfigError(f"model_name_or_path must be an existing folder or a Hugging Face hub id "
                                  f"('org/name'); got {p!r}, which does not exist.")
        if command == EVAL:
            if self.model_name_or_path is None:
                raise ConfigError("model_name_or_path must name the checkpoint to evaluate; got None. "
                                  "Pass e.g. --model_name_or_path outputs/grpo-lambda/final")
            return self

        # rollout shape
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ConfigError(f"num_generations must be an integer >= 2 (group-relative advantages need at least "
                              f"two completions per prompt); got {self.num_generations!r}.")
        _positive_int("per_device_train_batch_size", self.per_device_train_batch_size)
        _positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        if self.generation_batch_size is not None:
            _positive_int("generation_batch_size", self.generation_batch_size)
        gbs = self.effective_generation_batch_size
        if gbs % self.num_generations:
            valid = [k * self.num_generations for k in range(1, 5)]
            raise ConfigError(
                f"generation batch size (per_device_train_batch_size x gradient_accumulation_steps, or "
                f"generation_batch_size) must be divisible by num_generations = {self.num_generations}; got {gbs}. "
                f"Valid sizes are multiples of {self.num_generations}, e.g. {valid}.")
        _positive_number("temperature", self.temperature)
        _unit_open_closed("top_p", self.top_p)
        self._validate_vllm_importance_sampling()
        # algorithm
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("trace", self.trace, TRACES)
        _unit_closed("lam", self.lam)
        _unit_closed("gamma", self.gamma)
        if self.adv_clamp_min is not None:
            _finite("adv_clamp_min", self.adv_clamp_min)
        _non_negative("beta", self.beta)
        _non_negative("epsilon", self.epsilon)
        if self.epsilon_high is not None:
            _non_negative("epsilon_high", self.epsilon_high)
        self._validate_policy_loss()
        if not _is_number(self.top_entropy_quantile) or not 0 < self.top_entropy_quantile <= 1:
            raise ConfigError(f"top_entropy_quantile must be in (0, 1]; got {self.top_entropy_quantile!r} (1.0 trains "
                              "every token, 0.2 the top 20% by entropy).")
        _finite("entropy_coef", self.entropy_coef, "It weighs the entropy bonus; 0 turns it off.")
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        self._validate_importance_sampling_level()
        _choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _positive_int("num_iterations", self.num_iterations)
        _choice("impl", self.impl, IMPLS)
        if self.impl == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ConfigError("impl must be 'auto' or 'torch' on the CPU; got 'triton', whose kernels run on CPU "
                              "tensors only in Triton's interpreter. Set TRITON_INTERPRET=1 (slow; for tests) or use "
                              "--device cuda.")
        # optimisation
        _positive_number("learning_rate", self.learning_rate,
                         "Typical values: 1e-6 to 1e-5 for pretrained models, 1e-4 to 1e-3 for the tiny default.")
        _choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio!r}.")
        _non_negative("weight_decay", self.weight_decay)
        _non_negative("max_grad_norm", self.max_grad_norm)
        _positive_int("max_steps", self.max_steps)
        _non_negative_int("sft_warmup_steps", self.sft_warmup_steps)
        _positive_number("sft_learning_rate", self.sft_learning_rate)
        _positive_int("sft_batch_size", self.sft_batch_size)
        _non_negative_int("save_steps", self.save_steps)
        _non_negative_int("save_total_limit", self.save_total_limit)
        _positive_int("logging_steps", self.logging_steps)
        # rewards
        if not isinstance(self.reward_funcs, list) or not self.reward_funcs:
            raise ConfigError(f"reward_funcs must be a non-empty list of reward names; got {self.reward_funcs!r}.")
        if self.reward_weights is not None:
            if not isinstance(self.reward_weights, list) or len(self.reward_weights) != len(self.reward_funcs):
                raise ConfigError(
                    f"reward_weights must have one weight per reward function ({len(self.reward_funcs)}: "
                    f"{self.reward_funcs}); got {self.reward_weights!r}. Pass None for all 1.0.")
            for w in self.reward_weights:
                _finite("reward_weights", w)
        if self.use_vllm:
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ConfigError("use_vllm must be false when vllm is not installed; got true. "
                                  "Install it with `pip install 'lambda-kernels[vllm]'` (GPU only).")
            if device.type == "cuda" and (device.index or 0) != 0:
                # vLLM's in-process engine (external_launcher) runs on cuda:$LOCAL_RANK, i.e. cuda:0 here
                raise ConfigError(f"device must be 'cuda' or 'cuda:0' with use_vllm; got {self.device!r}, and the "
                                  "vLLM engine would sit on cuda:0 apart from the policy. Choose the GPU with "
                                  f"CUDA_VISIBLE_DEVICES={device.index} and --device cuda instead.")
        return self

    def _validate_policy_loss(self):
        _choice("policy_loss", self.policy_loss, POLICY_LOSSES)
        if self.cispo_max_ratio is not None:
            _positive_number("cispo_max_ratio", self.cispo_max_ratio,
                             f"It caps CISPO's importance weight min(ratio, cispo_max_ratio); TRL recommends "
                             f"{CISPO_MAX_RATIO}.")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if getattr(self, name) is not None:
                _positive_number(name, getattr(self, name), f"It is SAPO's gate temperature (TRL's defaults: "
                                 f"{SAPO_TEMPERATURE_POS} for sapo_temperature_pos, {SAPO_TEMPERATURE_NEG} for "
                                 "sapo_temperature_neg).")
        for name in VESPO_OPTIONS:
            if getattr(self, name) is not None:
                _finite(name, getattr(self, name), f"It shapes VESPO's weight phi(w) = exp(l)*w^k*exp(-l*w) (TRL's "
                        f"defaults: k {VESPO_K_POS} and l {VESPO_LAMBDA_POS} where A >= 0, k {VESPO_K_NEG} and l "
                        f"{VESPO_LAMBDA_NEG} elsewhere).")
        for name, user in POLICY_LOSS_OPTIONS.items():
            if getattr(self, name) is not None and self.policy_loss != user:
                # (else silently unused: a cap, temperature or shape set for the wrong policy term)
                raise ConfigError(f"{name} must be null with policy_loss = {self.policy_loss!r}; got "
                                  f"{getattr(self, name)!r}. It is {_POLICY_OPTION_WHAT[user]}, used with policy_loss "
                                  f"{user} only: set --policy_loss {user}, or leave {name} null.")
        replaced_by = {  # what each other policy term has in place of the clipped ratio's options
            "cispo": ("CISPO does not use: its cap is cispo_max_ratio (TRL's epsilon_high for loss_type cispo), e.g. "
                      "--cispo_max_ratio 5.0", "CISPO replaces by its capped weight (cispo_max_ratio)"),
            "sapo": ("SAPO does not use (its gate has sapo_temperature_pos / _neg)", "SAPO replaces by its soft gate"),
            "vespo": ("VESPO does not use (its weight has vespo_k_* / vespo_lambda_*)",
                      "VESPO replaces by its sequence's weight phi"),
        }
        if self.policy_loss != "clip" and self.epsilon_high is not None:
            # (TRL's epsilon_high is CISPO's cap: a TRL config carried over would otherwise set an unused option)
            raise ConfigError(f"epsilon_high must be null with policy_loss = {self.policy_loss!r}; got "
                              f"{self.epsilon_high!r}. It is the clipped objective's upper clip range, which "
                              f"{replaced_by[self.policy_loss][0]}.")
        if self.policy_loss != "clip" and self.delta is not None:
            raise ConfigError(f"delta must be null with policy_loss = {self.policy_loss!r}; got {self.delta!r}. "
                              f"Dual clip caps the clipped objective's ratio, which {replaced_by[self.policy_loss][1]}"
                              ": set delta null, or use policy_loss clip.")
        _check_delta(self.delta, self.epsilon if self.epsilon_high is None else self.epsilon_high)
        if self.policy_loss == "vespo":
            # VESPO's weight is of its sequence's summed log-ratios (TRL's, with trace=None): no trace, token level
            if self.algorithm != "grpo":  # (grpo_lambda is the default: VESPO must ask for grpo explicitly)
                raise ConfigError(f"algorithm must be 'grpo' with policy_loss = 'vespo'; got {self.algorithm!r}. "
                                  "VESPO weighs each token's gradient by a function of its sequence's importance "
                                  "weight, which takes the place of the λ-trace: pass --algorithm grpo, or another "
                                  "policy_loss for GRPO-λ.")
            if self.importance_sampling_level != "token":
                raise ConfigError(f"importance_sampling_level must be 'token' with policy_loss = 'vespo'; got "
                                  f"{self.importance_sampling_level!r}. VESPO computes its own sequence-level weight "
                                  "from the token log-ratios (TRL's loss_type vespo asks for the token level): "
                                  "set importance_sampling_level token.")

    def _validate_importance_sampling_level(self):
        _choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        if self.importance_sampling_level != "sequence":
            return
        if self.algorithm != "grpo":  # (grpo_lambda is the default: GSPO must ask for grpo explicitly)
            raise ConfigError(f"algorithm must be 'grpo' with importance_sampling_level = 'sequence'; got "
                              f"{self.algorithm!r}. GSPO's sequence ratio takes the place of the λ-trace: pass "
                              "--algorithm grpo, or keep importance_sampling_level token for GRPO-λ.")

    def _validate_vllm_importance_sampling(self):
        if not isinstance(self.vllm_importance_sampling_correction, bool):
            raise ConfigError(f"vllm_importance_sampling_correction must be true or false; got "
                              f"{self.vllm_importance_sampling_correction!r}.")
        _choice("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, VLLM_IS_MODES)
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if hi is not None:
            _positive_number("vllm_importance_sampling_clip_max", hi, "Pass None for no upper bound.")
        if lo is not None:
            _non_negative("vllm_importance_sampling_clip_min", lo)
        if lo is not None and hi is not None and lo >= hi:
            raise ConfigError(f"vllm_importance_sampling_clip_min must be below vllm_importance_sampling_clip_max = "
                              f"{hi}; got {lo}.")
        if self.vllm_importance_sampling_mode.endswith("_truncate") and lo is None and hi is None:
            raise ConfigError(f"vllm_importance_sampling_clip_max or vllm_importance_sampling_clip_min must be set "
                              f"with vllm_importance_sampling_mode = {self.vllm_importance_sampling_mode!r}; got None "
                              "for both. A truncated ratio needs a bound (or use a *_mask mode, or "
                              "vllm_importance_sampling_correction false).")


# ---------------------------------------------------------------------- checks
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_delta(delta, epsilon_high: float) -> None:
    """TRL's `delta` (dual-clip PPO's cap of the ratio for negative advantages): None or finite > 1 + epsilon_high,
    where it caps only tokens with Â < 0 and TRL's clip metrics are unchanged by it (the fused loss's `dual_clip`;
    at or below 1 + epsilon_high TRL's formula also changes the positive side or its metrics)."""
    if delta is None:
        return
    upper = 1 + epsilon_high
    if not _is_number(delta) or not upper < delta < float("inf"):
        raise ConfigError(f"delta must be None or a finite number > 1 + epsilon_high = {upper:g}; got {delta!r}. It "
                          "caps the ratio of tokens with a negative advantage (dual-clip PPO; verl's clip_ratio_c, 3 "
                          "there).")


def _choice(name, v, options):
    if v not in options:
        close = difflib.get_close_matches(str(v), [str(o) for o in options], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name} must be one of {list(options)}; got {v!r}.{hint}")


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be an integer >= 1; got {v!r}.")


def _non_negative_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"{name} must be an integer >= 0; got {v!r}.")


def _finite(name, v, hint: str = ""):
    if not _is_number(v) or not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number; got {v!r}." + (f" {hint}" if hint else ""))


def _non_negative(name, v):
    if not _is_number(v) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be a finite number >= 0; got {v!r}.")


def _positive_number(name, v, hint: str = ""):
    if not _is_number(v) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be a finite number > 0; got {v!r}." + (f" {hint}" if hint else ""))


def _unit_closed(name, v):
    if not _is_number(v) or not 0 <= v <= 1:
        raise ConfigError(f"{name} must be in [0, 1]; got {v!r}.")


def _unit_open_closed(name, v):
    if not _is_number(v) or not 0 < v <= 1:
        raise ConfigError(f"{name} must be in (0, 1]; got {v!r}.")


# ---------------------------------------------------------------------- parsing
FIELDS = {f.name: f for f in dataclasses.fields(GRPOLambdaConfig)}
_HINTS = typing.get_type_hints(GRPOLambdaConfig)


def _base_type(name: str):
    """(type, optional) of a field: Optional[X] -> (X, True)."""
    tp = _HINTS[name]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the option's type; ConfigError if it cannot be."""
    if name not in FIELDS:
        close = difflib.get_close_matches(name, list(FIELDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else " Run `grpo-lambda train --help` for the list."
        raise ConfigError(f"unknown option {name!r}.{hint}")
    tp, optional = _base_type(name)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~"))):
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "yes", "1", "on"):
                return True
            if s in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is list:
            if isinstance(value, str):
                s = value.strip()
                value = yaml.safe_load(s) if s.startswith("[") else [v.strip() for v in s.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            value = list(value)
            if name == "reward_weights":
                value = [float(v) for v in value]
            else:
                value = [str(v) for v in value]
            return value
        return str(value)
    except (TypeError, ValueError):
        want = {bool: "true or false", int: "an integer", float: "a number", list: "a list (a,b or [a, b])",
                str: "a string"}[tp]
        raise ConfigError(f"{name} must be {want}{' or none' if optional else ''}; got {value!r}.") from None


def load_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config must be an existing YAML file; got {str(path)!r} (not found).")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config must hold a mapping of option: value; got {type(data).__name__} in {path}.")
    return data


def build_config(yaml_path=None, overrides: Optional[dict] = None, command: str = TRAIN) -> GRPOLambdaConfig:
    """Defaults <- YAML file <- overrides (keys may use dashes), coerced and validated."""
    values: dict = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    values.update(overrides or {})
    values = {k.replace("-", "_"): v for k, v in values.items()}  # keys may use dashes, in the file too
    if "reward_funcs" in values and "reward_weights" not in values:
        values["reward_weights"] = None  # the default weights are the default functions': others weigh 1.0 each
    kwargs = {k: coerce(k, v) for k, v in values.items()}
    return GRPOLambdaConfig(**kwargs).validate(command)
