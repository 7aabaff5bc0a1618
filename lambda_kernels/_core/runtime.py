"""Where kernels run: compiled Triton on CUDA, the Triton interpreter on CPU, or plain PyTorch."""
from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 before `import triton`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of environment variable `name` (case-insensitive), `default` when unset, one of `choices`."""
    raw = os.environ.get(name, "").strip().lower() or default
    if raw not in choices:
        raise RuntimeError(f"{name} must be one of {', '.join(choices)}; got {raw!r}.")
    return raw


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # triton is Linux-only; macOS/Windows users get the torch path
        return False
    return True


def resolve_impl(op: str, impl: str, device: torch.device) -> str:
    """Map `impl` to "triton" or "torch" for tensors on `device`.

    "auto" picks Triton for CUDA tensors (compiled) or CPU tensors under the interpreter, torch otherwise.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: `impl` must be one of {IMPLS}; got {impl!r}.")
    if impl == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    usable = triton_available() and (on_cuda or (device.type == "cpu" and interpreter_enabled()))
    if impl == "auto":
        return "triton" if usable else "torch"
    if not usable:
        raise RuntimeError(
            f"{op}: impl='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"the first `import triton`; got device {device} (interpreter "
            f"{'on' if interpreter_enabled() else 'off'}, triton {'found' if triton_available() else 'missing'}). "
            "Use impl='auto' or impl='torch' to fall back to PyTorch."
        )
    return "triton"
