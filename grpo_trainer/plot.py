"""The reward-curve PNG (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import json
from pathlib import Path


def _moving_average(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_reward_curve(metrics_path, png_path, title: str = "GRPO-λ") -> None:
    """Reward per step (raw and moving average) and each reward function's mean, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if rows:
        reward = [r["reward"] for r in rows]
        k = max(1, len(rows) // 20)
        ax.plot(steps, reward, color="tab:blue", alpha=0.3, lw=1, label="reward")
        ax.plot(steps, _moving_average(reward, k), color="tab:blue", lw=2, label=f"reward ({k}-step mean)")
        for key in sorted(k for k in rows[0] if k.startswith("rewards/") and k.endswith("/mean")):
            vals = [r.get(key) for r in rows]
            if all(v is not None for v in vals):
                ax.plot(steps, _moving_average(vals, k), lw=1.2, ls="--", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
