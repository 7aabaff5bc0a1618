"""Reward functions (TRL's convention) and the code that calls them safely.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`, one value per completion; every
dataset column (e.g. `answer`) arrives as a keyword holding one value per completion. `None` means "not
applicable to this sample": it is skipped (NaN in the per-function table, ignored by the weighted sum), as in TRL.
Functions are named by registry name ("arithmetic", "math", "format") or by dotted path
("package.module:func" or "package.module.func").
"""
from __future__ import annotations

import importlib
import math
import re
from typing import Callable

import torch

from .config import ConfigError

RewardFunc = Callable[..., list]
REGISTRY: dict[str, RewardFunc] = {}


def register(name: str):
    def deco(fn):
        REGISTRY[name] = fn
        return fn
    return deco


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something invalid; the message names the function and the sample."""


# ---------------------------------------------------------------------- built-in rewards
_INT = re.compile(r"^\s*(-?\d+)\s*$")


@register("arithmetic")
def arithmetic_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion is exactly the reference integer (surrounding spaces ignored), else 0.0."""
    out = []
    for completion, gold in zip(completions, answer):
        m = _INT.match(completion)
        out.append(1.0 if m is not None and int(m.group(1)) == int(str(gold).strip()) else 0.0)
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _as_latex(s: str) -> str:
    s = s.strip()
    return s if s.startswith("$") or s.startswith("\\(") or s.startswith("\\[") else f"${s}$"


@register("math")
def math_reward(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the last \\boxed{} of the completion equals the reference by `math-verify`, 0.0 otherwise.

    Returns None for a sample whose reference cannot be parsed (skipped, like TRL's accuracy_reward).
    """
    try:
        from math_verify import parse, verify
    except ImportError:
        raise RuntimeError("the 'math' reward needs math-verify: pip install 'lambda-kernels[trainer]'") from None
    out: list[float | None] = []
    for completion, gold in zip(completions, answer):
        gold_text = str(gold)
        boxed = last_boxed(gold_text)
        gold_parsed = parse(_as_latex(boxed if boxed is not None else gold_text), parsing_timeout=None)
        if not gold_parsed:
            out.append(None)
            continue
        pred = last_boxed(completion)
        if pred is None:
            out.append(0.0)
            continue
        pred_parsed = parse(_as_latex(pred), parsing_timeout=None)
        ok = bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=None)
        out.append(1.0 if ok else 0.0)
    return out


_NUMBER = re.compile(r"^\s*-?\d+(\.\d+)?\s*$")


@register("format")
def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion is a well-formed answer: a bare number, or text ending in one \\boxed{...}."""
    out = []
    for c in completions:
        ok = _NUMBER.match(c) is not None or (last_boxed(c) is not None and c.rstrip().endswith("}"))
        out.append(1.0 if ok else 0.0)
    return out


# ---------------------------------------------------------------------- lookup
def resolve(name: str, option: str = "reward_funcs") -> RewardFunc:
    """A reward function by registry name or dotted path; ConfigError naming `option` and the valid names otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    if "." in name or ":" in name:
        module_name, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{option} entry {name!r} must be importable as 'module:function' or "
                              f"'module.function'; got {type(e).__name__}: {e}.") from None
        if not callable(fn):
            raise ConfigError(f"{option} entry {name!r} must be callable; got {type(fn).__name__}.")
        return fn
    raise ConfigError(f"{option} entries must be one of {sorted(REGISTRY)} or a dotted path "
                      f"'module:function'; got {name!r}.")


def reward_name(name: str) -> str:
    """Short name for metrics: the registry name, or the function name of a dotted path."""
    return name if name in REGISTRY else re.split(r"[.:]", name)[-1]


# ---------------------------------------------------------------------- calling
def _describe(i, prompts, completions) -> str:
    return f"sample {i} (prompt={prompts[i]!r}, completion={completions[i]!r})"


def call_reward(name: str, fn: RewardFunc, prompts: list[str], completions: list[str], columns: dict) -> list:
    """Call one reward function on the batch; on failure, find and name the first failing sample."""
    n = len(completions)
    try:
        values = fn(prompts=prompts, completions=completions, **columns)
    except Exception as batch_error:
        for i in range(n):  # find the sample that triggers it
            try:
                fn(prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()})
            except Exception as e:
                raise RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e} on "
                                          f"{_describe(i, prompts, completions)}") from e
        raise RewardFunctionError(f"reward function {name!r} raised {type(batch_error).__name__}: {batch_error} "
                                  f"on the batch of {n} samples (no single sample reproduces it)") from batch_error
    try:
        values = list(values)
    except TypeError:
        raise RewardFunctionError(f"reward function {name!r} must return a list of {n} floats or None; "
                                  f"got {type(values).__name__}") from None
    if len(values) != n:
        raise RewardFunctionError(f"reward function {name!r} must return one value per completion ({n}); "
                                  f"got {len(values)}")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardFunctionError(f"reward function {name!r} returned {v!r} (must be a float or None) on "
                                      f"{_describe(i, prompts, completions)}") from None
        if not math.isfinite(f):
            raise RewardFunctionError(f"reward function {name!r} returned non-finite {f} on "
                                      f"{_describe(i, prompts, completions)}; return None to skip a sample")
        out.append(f)
    return out


class RewardSet:
    """The configured reward functions and weights: per-function table and the weighted sum, NaN-aware like TRL."""

    def __init__(self, names: list[str], weights: list[float] | None, option: str = "reward_funcs"):
        self.names = list(names)
        self.short_names = [reward_name(n) for n in names]
        self.funcs = [resolve(n, option) for n in names]
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(names), dtype=torch.float32)

    def __call__(self, prompts: list[str], completions: list[str],
                 rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(total [B], per_function [B, F] with NaN where a function returned None)."""
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
        table = torch.full((len(completions), len(self.funcs)), float("nan"), dtype=torch.float32)
        for j, (name, fn) in enumerate(zip(self.names, self.funcs)):
            values = call_reward(name, fn, prompts, completions, columns)
            table[:, j] = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float32)
        total = torch.nansum(table * self.weights, dim=1)  # None-only rows sum to 0 (TRL's behaviour)
        return total, table
