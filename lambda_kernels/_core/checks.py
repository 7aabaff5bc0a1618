"""Validation of user input, done once in functional.py before any kernel runs.

Messages follow ``<op>: `<arg>` <expectation>; got <actual>. [hint]``: ValueError for shapes and values,
TypeError for dtypes, RuntimeError for the environment.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def tensor(op: str, name: str, t, *, ndim: Sequence[int] | int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor; got {type(t).__name__}.")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{op}: `{name}` must be {want}; got shape {_shape(t)}.")
    return t


def float_tensor(op: str, name: str, t, *, ndim=None) -> torch.Tensor:
    tensor(op, name, t, ndim=ndim)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: `{name}` must be a floating tensor (float16, bfloat16, float32, float64); got {t.dtype}."
        )
    return t


def mask_tensor(op: str, name: str, t, shape: Sequence[int]) -> torch.Tensor:
    tensor(op, name, t)
    if t.dtype not in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + FLOAT_DTYPES:
        raise TypeError(f"{op}: `{name}` must be bool, integer or floating; got {t.dtype}.")
    same_shape(op, name, t, shape)
    return t


def same_shape(op: str, name: str, t: torch.Tensor, shape: Sequence[int], hint: str = "") -> None:
    if list(t.shape) != list(shape):
        raise ValueError(f"{op}: `{name}` must have shape {list(shape)}; got {_shape(t)}."
                         + (f" {hint}" if hint else ""))


def same_device(op: str, named: Iterable[tuple[str, torch.Tensor | None]]) -> torch.device:
    items = [(n, t) for n, t in named if t is not None]
    dev = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev:
            raise ValueError(
                f"{op}: all tensors must be on one device; `{items[0][0]}` is on {dev} but `{n}` is on {t.device}. "
                "Move them with .to(device) first."
            )
    return dev


def is_finite_real(v) -> bool:
    """A finite int or float, not a bool."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))


def unit_interval(op: str, name: str, v) -> float:
    if not is_finite_real(v) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"{op}: `{name}` must be a number in [0, 1]; got {v!r}.")
    return float(v)


def non_negative(op: str, name: str, v) -> float:
    if not is_finite_real(v) or float(v) < 0:
        raise ValueError(f"{op}: `{name}` must be a finite number >= 0; got {v!r}.")
    return float(v)


def positive_number(op: str, name: str, v) -> float:
    if not is_finite_real(v) or not float(v) > 0:
        raise ValueError(f"{op}: `{name}` must be a finite number > 0; got {v!r}.")
    return float(v)


def flag(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{op}: `{name}` must be a bool; got {type(v).__name__}.")
    return v


def finite_number(op: str, name: str, v, *, allow_none: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    if not is_finite_real(v):
        raise ValueError(f"{op}: `{name}` must be a finite number{' or None' if allow_none else ''}; got {v!r}.")
    return float(v)


def positive_int(op: str, name: str, v, *, allow_none: bool = False) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{op}: `{name}` must be a positive integer{' or None' if allow_none else ''}; got {v!r}.")
    return v


def choice(op: str, name: str, v, options: Sequence) -> None:
    if v not in options:
        raise ValueError(f"{op}: `{name}` must be one of {tuple(options)}; got {v!r}.")
