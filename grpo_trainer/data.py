"""Datasets (rows of {prompt, answer, ...}) and the seeded prompt sampler whose state a checkpoint stores.

Sources: the shipped arithmetic generator ("arithmetic"), JSONL files, and Hugging Face datasets ("hf:NAME...").
A dataset is a plain list of dicts; every column is handed to the reward functions as a keyword (TRL's convention).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import ConfigError, GRPOLambdaConfig


# ---------------------------------------------------------------------- arithmetic task
def arithmetic_problems(max_operand: int, ops: str) -> list[dict]:
    """Every problem `a op b =` with a, b in 0..max_operand, in a fixed order (a − b only for a ≥ b)."""
    rows = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and a < b:
                    continue
                value = a + b if op == "+" else a - b if op == "-" else a * b
                rows.append({"prompt": f"{a}{op}{b}=", "answer": str(value)})
    return rows


def arithmetic_split(max_operand: int, ops: str, eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out): a seeded permutation of all problems; the first `eval_size` are never trained on."""
    rows = arithmetic_problems(max_operand, ops)
    if eval_size >= len(rows):
        raise ConfigError(f"eval_size must be smaller than the {len(rows)} arithmetic problems of "
                          f"arithmetic_max_operand={max_operand}, arithmetic_ops={ops!r}; got {eval_size}.")
    return _split(rows, eval_size, seed)


def _split(rows: list[dict], n_held: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out): a seeded permutation, the first `n_held` rows held out."""
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order[n_held:]], [rows[i] for i in order[:n_held]]


# ---------------------------------------------------------------------- files and hub
def load_jsonl(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"dataset must be 'arithmetic', an existing .jsonl file or 'hf:NAME'; got {path!r} "
                          "(file not found).")
    rows = []
    with p.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"dataset {path!r} line {i} must be one JSON object; "
                                  f"got invalid JSON ({e}).") from None
            if not isinstance(row, dict):
                raise ConfigError(f"dataset {path!r} line {i} must be a JSON object; got {type(row).__name__}.")
            rows.append(row)
    if not rows:
        raise ConfigError(f"dataset {path!r} must contain at least one row; got an empty file.")
    return rows


def load_hf(spec: str) -> list[dict]:
    """'hf:NAME[:CONFIG][@SPLIT]' via `datasets.load_dataset` (split defaults to 'train')."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"dataset {spec!r} needs the `datasets` library: pip install 'lambda-kernels[datasets]'. "
                          "Or export the data to JSONL with prompt/answer columns.") from None
    body = spec[3:]
    body, _, split = body.partition("@")
    name, _, subset = body.partition(":")
    ds = datasets.load_dataset(name, subset or None, split=split or "train")
    return [dict(r) for r in ds]


def load_rows(spec: str) -> list[dict]:
    if spec.startswith("hf:"):
        return load_hf(spec)
    if spec.endswith(".jsonl") or Path(spec).exists():
        return load_jsonl(spec)
    raise ConfigError(f"dataset must be 'arithmetic', a .jsonl file or 'hf:NAME[:CONFIG][@SPLIT]'; got {spec!r}.")


def _normalise(rows: list[dict], cfg: GRPOLambdaConfig, spec: str) -> list[dict]:
    """Check the prompt/answer columns exist and rename them to 'prompt'/'answer'."""
    cols = sorted(rows[0].keys())
    for opt_name, col in (("prompt_column", cfg.prompt_column), ("answer_column", cfg.answer_column)):
        missing = [i for i, r in enumerate(rows) if col not in r]
        if missing:
            raise ConfigError(f"{opt_name} must name a column of dataset {spec!r}; got {col!r}, missing in row "
                              f"{missing[0]} (columns: {cols}). Set --{opt_name} to one of them.")
    out = []
    for r in rows:
        r = dict(r)
        prompt, answer = r.pop(cfg.prompt_column), r.pop(cfg.answer_column)
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt_column {cfg.prompt_column!r} must hold strings in {spec!r}; "
                              f"got {type(prompt).__name__}.")
        r["prompt"], r["answer"] = prompt, str(answer)
        out.append(r)
    return out


def load_datasets(cfg: GRPOLambdaConfig, *, need_train: bool = True) -> tuple[list[dict], list[dict]]:
    """(train_rows, eval_rows) as configured; column and file errors surface here, at start-up."""
    if cfg.dataset == "arithmetic":
        train, held = arithmetic_split(cfg.arithmetic_max_operand, cfg.arithmetic_ops, cfg.eval_size, cfg.seed)
    else:
        rows = _normalise(load_rows(cfg.dataset), cfg, cfg.dataset)
        if cfg.eval_dataset is None:  # the same split in `train` and `evaluate`
            train, held = _split(rows, min(cfg.eval_size, len(rows) // 5), cfg.seed)
        else:
            train, held = rows, []
    already_held = cfg.dataset == cfg.eval_dataset == "arithmetic"  # the split above is that held-out set
    if cfg.eval_dataset is not None and not already_held:
        if cfg.eval_dataset == "arithmetic":
            _, held = arithmetic_split(cfg.arithmetic_max_operand, cfg.arithmetic_ops, cfg.eval_size, cfg.seed)
        else:
            held = _normalise(load_rows(cfg.eval_dataset), cfg, cfg.eval_dataset)[: cfg.eval_size]
    if not held:
        raise ConfigError(f"the held-out split must hold at least one problem; got none from {cfg.dataset!r} "
                          f"(min(eval_size, rows // 5) of its rows are held out). Use a dataset of at least 5 rows "
                          "or pass --eval_dataset.")
    if need_train and not train:
        raise ConfigError(f"dataset must leave at least one training row after the held-out split; got "
                          f"{cfg.dataset!r}. Lower --eval_size or pass --eval_dataset.")
    return train, held


# ---------------------------------------------------------------------- sampler
class PromptSampler:
    """Draws prompts epoch by epoch from seeded permutations; `state_dict()` makes a resume exact."""

    def __init__(self, n_rows: int, seed: int):
        self.n_rows, self.seed = n_rows, seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def next_indices(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.position == self.n_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(k - len(out), self.n_rows - self.position)
            out.extend(int(i) for i in self._perm[self.position:self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"n_rows": self.n_rows, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["n_rows"] != self.n_rows or state["seed"] != self.seed:
            raise ValueError(f"checkpoint sampler state is for {state['n_rows']} rows / seed {state['seed']}; "
                             f"this run has {self.n_rows} rows / seed {self.seed}. Resume with the same data and seed.")
        self.epoch, self.position = state["epoch"], state["position"]
        self._perm = self._permutation(self.epoch)
