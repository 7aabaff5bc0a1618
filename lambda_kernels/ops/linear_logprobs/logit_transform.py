"""How the LM head's outputs become the logits of the sampling distribution, as one object the passes hand on."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap·tanh(x / softcap) / temperature for the head's output x = h·Wᵀ + b (z = x / temperature without a
    softcap): Gemma 2/3's final-logit soft-capping, then the sampler's temperature, in the order HF and vLLM apply
    them. inv_t = 1 / temperature; softcap None or finite > 0.

    The kernels take `kernel_args()`: (inv_t, cap) as fp32 scalars (cap 1.0 unused without a softcap) and the
    constexpr SOFTCAP, so the plain case compiles without the tanh."""

    inv_t: float
    softcap: float | None = None

    def kernel_args(self) -> tuple[float, float]:
        return self.inv_t, 1.0 if self.softcap is None else self.softcap

    @property
    def capped(self) -> bool:
        return self.softcap is not None
