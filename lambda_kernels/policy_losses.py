"""The policy term of the objective, per token, as a function of the (traced) ratio ρ̃ and the advantage Â.

`grpo_lambda_loss(..., policy_loss=...)` takes one of these, or its name ("clip", "cispo", "sapo", "vespo") for the
defaults.
Each is a frozen dataclass of plain floats: it travels to the kernels as fp32 scalars and one constexpr.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Clip:
    """PPO's clipped surrogate, GRPO's and DAPO's: `−min(ρ̃·Â, clip(ρ̃, 1 − ε_low, 1 + ε_high)·Â)` with the clip range
    of `epsilon_low` / `epsilon_high` (and optionally `dual_clip`). The default."""

    name = "clip"
    code = 0


@dataclass(frozen=True)
class CISPO:
    """CISPO (MiniMax-M1; ScaleRL's choice; TRL's `loss_type="cispo"`): REINFORCE with a capped importance weight,
    `−sg(min(ρ̃, max_ratio))·Â·ℓ`. Every token keeps a gradient, `−min(ρ̃, max_ratio)·Â` on its own log-prob ℓ; the
    ratio (traced, or the sequence's) only sets the weight. `max_ratio` is TRL's `epsilon_high` for this loss (ε_max
    in ScaleRL, 5 recommended there). The metric "cispo_clip_ratio" is TRL's: the fraction of the loss tokens (of
    the sequences, at the sequence level) that have Â > 0 and a capped weight."""

    max_ratio: float = 5.0
    name = "cispo"
    code = 1

    def __post_init__(self):
        _set_checked_floats(self, {"max_ratio": "the cap of the importance weight, e.g. 5.0"}, positive=True)


@dataclass(frozen=True)
class SAPO:
    """SAPO (Soft Adaptive Policy Optimization, Qwen; TRL's `loss_type="sapo"`): a smooth gate instead of the clip,
    `−(4/τ)·σ(τ·(ρ̃ − 1))·Â`, with τ = `temperature_pos` where Â > 0 and `temperature_neg` elsewhere (TRL's
    `sapo_temperature_pos` / `_neg`). Its gradient `−4·σ(1 − σ)·ρ̃·Â` is GRPO's at ρ̃ = 1 and fades away from it;
    it flows through the trace as the clipped objective's does. No clip metrics (nothing is clipped)."""

    temperature_pos: float = 1.0
    temperature_neg: float = 1.05
    name = "sapo"
    code = 2

    def __post_init__(self):
        hint = "the gate's temperature, e.g. 1.0"
        _set_checked_floats(self, {"temperature_pos": hint, "temperature_neg": hint}, positive=True)


@dataclass(frozen=True)
class VESPO:
    """VESPO (TRL's `loss_type="vespo"`): REINFORCE weighted by a gamma-shaped function of the sequence's importance
    weight, `−sg(φ(w))·Â·ℓ` with `log w = clamp(Σ_t m_t·clamp(ℓ_t − ℓ_old,t, −20, 20), log 1e-8, 20)` (a sum over
    the sequence, not a mean) and `φ(w) = e^λ·w^k·e^(−λw)` (so φ(1) = 1: on-policy it is plain REINFORCE), with
    (k, λ) = (`k_pos`, `lambda_pos`) where Â ≥ 0 and (`k_neg`, `lambda_neg`) elsewhere (λ at least 1e-4; an
    overflowing φ counts 0), TRL's `get_gamma_weights`. The ratio only weighs each token's gradient, which is on its
    own log-prob; it takes the trace's place (trace=None, importance_sampling_level="token", as TRL requires). Its
    metric is TRL's "vespo/phi_seq_mean": the mean φ over the sequences (over the tokens with per-token Â)."""

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0
    name = "vespo"
    code = 3

    def __post_init__(self):
        power, rate = "the power of w in φ, e.g. 2.0", "the rate of φ's decay in w, e.g. 3.0"
        _set_checked_floats(self, {"k_pos": power, "lambda_pos": rate, "k_neg": power, "lambda_neg": rate},
                            positive=False)


POLICY_LOSSES = {"clip": Clip, "cispo": CISPO, "sapo": SAPO, "vespo": VESPO}
# the terms whose gradient is on each token's own log-prob (the ratio only weighs it): their backward does not scan
UNSCANNED = (CISPO, VESPO)


def _set_checked_floats(term, hints: dict[str, str], positive: bool) -> None:
    """Each field of `hints` of the frozen dataclass `term` checked (a finite number, > 0 where `positive`; the hint
    in the error) and stored as a float (an int would compile a kernel variant of its own)."""
    for field, hint in hints.items():
        value = getattr(term, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            raise ValueError(f"{type(term).__name__}: `{field}` must be a finite number{' > 0' if positive else ''}; "
                             f"got {value!r} ({hint}).")
        object.__setattr__(term, field, float(value))


def resolve_policy_loss(op: str, policy_loss) -> Clip | CISPO | SAPO | VESPO:
    """The policy term's object from a name or an instance; a clear error otherwise."""
    if isinstance(policy_loss, tuple(POLICY_LOSSES.values())):
        return policy_loss
    if isinstance(policy_loss, str) and policy_loss in POLICY_LOSSES:
        return POLICY_LOSSES[policy_loss]()
    raise ValueError(f"{op}: `policy_loss` must be one of {tuple(POLICY_LOSSES)} or an instance of "
                     f"lambda_kernels.Clip / CISPO / SAPO / VESPO (for other settings, e.g. CISPO(max_ratio=4.0)); "
                     f"got {policy_loss!r}.")
