"""Frozen option bundles that travel through autograd as one argument (backward returns `(*grads, None)`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..policy_losses import Clip

# trace style codes as the kernels see them (tl.constexpr); SEQUENCE_STYLE is not a trace a user names but
# `importance_sampling_level="sequence"` (GSPO): every token's z is its sequence's mean m·(ℓ − ℓ_old), a weight
# w(t, j) = m_j / max(Σ m, 1) for every j of the row (non-causal, so the kernels reduce the row first)
TRACE_CODES = {None: 0, "recent": 1, "both": 2}
SEQUENCE_STYLE = 3


def _log2(a: float) -> float:
    # finite stand-in for log2(0): 2^(−1000·k) underflows to 0 in fp32 for k ≥ 1, and 0·(−1000) avoids inf·0 = NaN
    return max(math.log2(a), -1000.0) if a > 0 else -1000.0


@dataclass(frozen=True)
class TraceParams:
    """Decay a = γ·λ of the trace and its style code (0 none, 1 recent, 2 both, 3 the sequence mean)."""

    a: float
    style: int

    @property
    def log2a(self) -> float:
        return _log2(self.a)


@dataclass(frozen=True)
class ObjectiveParams:
    """Every non-tensor option of the clipped GRPO-λ objective, as plain Python floats (fp32 in kernels)."""

    trace: TraceParams
    adv_clamp_min: float | None
    epsilon_low: float
    epsilon_high: float
    beta: float
    loss_type: str = "dapo"
    max_completion_length: int | None = None
    kl_bias_correction: bool = False  # the KL term weighted by the token's ratio π/π_old (TRL's use_bias_correction_kl)
    dual_clip: float | None = None  # the ratio's cap c > 1 for Â < 0 (dual-clip PPO: verl's clip_ratio_c, TRL's
    # delta): such a token's policy term is at most −c·Â
    policy: object = Clip()  # the policy term (lambda_kernels.policy_losses: Clip, CISPO, SAPO)

    @property
    def kl_needs_whole_rows(self) -> bool:
        """Whether a token's KL gradient depends on the other tokens of its row: the KL weighted by the sequence's
        ratio (TRL's use_bias_correction_kl at the sequence level), which the on-policy pass cannot form as it goes."""
        return self.beta > 0 and self.kl_bias_correction and self.trace.style == SEQUENCE_STYLE
