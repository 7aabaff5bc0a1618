"""The embedded default, in full, exactly as a user runs it: `python -m grpo_trainer train` (≈ 2 min on 2 cores).

Marked slow (not in CI; run with `pytest -m slow tests/test_trainer_slow.py`).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_run_improves_held_out_accuracy(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's CPU run: impl auto -> torch
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "grpo_trainer", "train", "--output_dir", str(out),
                        "--disable_tqdm", "true"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    before, after = results["before_rl"], results["after_rl"]
    assert before["n_problems"] >= 200
    assert 0.10 <= before["accuracy_greedy"] <= 0.60, before  # the warm-up lands in the intended range
    assert after["accuracy_greedy"] >= before["accuracy_greedy"] + 0.10, (before, after)
    assert after["pass@1"] >= before["pass@1"] + 0.05, (before, after)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 250 and all(json.loads(ln)["skipped"] == 0 for ln in lines)
    for name in ("reward_curve.png", "config.yaml", "final/model.safetensors", "final/tokenizer.json"):
        assert (out / name).is_file(), name
