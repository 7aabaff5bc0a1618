"""Atomic checkpoints: everything a resumed run needs to continue exactly where the interrupted one stopped.

A checkpoint is a folder `output_dir/checkpoints/checkpoint-<step>/` holding the model and tokenizer
(safetensors, so a checkpoint can be evaluated directly), `optimizer.pt`, `scheduler.pt`, `rng_state.pt`
(python, numpy, torch) and `trainer_state.json` (step, prompt-sampler position, accuracy before RL). It is written
into a temporary folder first and renamed into place with `os.replace`, so a crash never leaves a half checkpoint
under a final name.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .model import save_pretrained

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return sorted(found)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # sampling on the GPU draws from the CUDA generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(output_dir, step: int, model, tokenizer, optimizer, scheduler, trainer_state: dict,
                    save_total_limit: int = 0) -> Path:
    """Write checkpoint-<step> atomically, then delete the oldest beyond `save_total_limit` (0 keeps all)."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(model, tokenizer, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # a re-run of the same step: move the old one aside first so the rename stays atomic
        old = root / f".old-checkpoint-{step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if save_total_limit > 0:
        for _, p in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def remove_partial_saves(output_dir) -> None:
    """Delete the temporary folders of saves that a kill interrupted (never a complete checkpoint)."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith((".tmp-checkpoint-", ".old-checkpoint-")):
                shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(output_dir, resume: str) -> Path:
    """'latest' -> the newest complete checkpoint in output_dir; otherwise `resume` must be a checkpoint folder."""
    from .config import ConfigError

    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"resume must point to a checkpoint; got 'latest' but {checkpoint_root(output_dir)} "
                              "holds none (a run stopped before its first checkpoint has nothing to resume). Start "
                              "over without --resume and with --overwrite_output_dir true.")
        return found[-1][1]
    p = Path(resume)
    if not (p / "trainer_state.json").is_file():
        raise ConfigError(f"resume must be 'latest' or a checkpoint folder containing trainer_state.json; "
                          f"got {resume!r}.")
    return p


def load_training_state(path: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG states from checkpoint `path`; return its trainer_state."""
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())
