"""The fused loss's entropy bonus: −c·Σ_t m_t·w_t·H_t / max(Σ_t m_t·w_t, 1), linear in the entropies H.

Being linear, its gradient w.r.t. each H_t is a constant known before any logit, g_ent_t = −c·m_t·w_t / max(Σ m·w, 1),
and the row kernels fold it into the same dlogits as the log-prob's gradient (`row_dlogits_store`:
−g_ent·p·(log p + H)): the bonus costs no matmul, in every pass of the fused loss, and its value is Σ_t g_ent_t·H_t.
"""
from __future__ import annotations

import torch


class EntropyBonus:
    """coef c (finite), the [B, T] fp32 mask m and optional [B, T] weights w (not read where m is 0)."""

    def __init__(self, coef: float, mask_f: torch.Tensor, weights: torch.Tensor | None):
        self.coef = coef
        eff = mask_f if weights is None else torch.where(mask_f != 0, mask_f * weights.to(torch.float32), 0.0)
        # ∂loss/∂H_t of every token [B, T] fp32 (a weight of 0 — padding — gets exactly 0)
        self.token_grad = eff * (-coef / eff.sum().clamp(min=1.0))

    def loss(self, g_ent_rows: torch.Tensor, ent_rows: torch.Tensor) -> torch.Tensor:
        """The bonus term from the computed rows' g_ent and H (every row with a weight, all others 0)."""
        return (g_ent_rows.to(ent_rows.dtype) * ent_rows).sum()
