"""Generalised advantage estimation as a reverse scan, with the mask semantics of lambda_kernels.gae.

Masked positions neither emit (advantage and return 0 there) nor break the recursion: the state passes through
them unchanged, and "the next value" of a valid token is the value of the next *valid* token, 0 after the last.
"""
import torch

from ._dtype import compute_dtype


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float):
    """(advantages, returns) [B, T] fp32 (fp64 for fp64 input); returns = advantages + values on valid tokens."""
    dt = compute_dtype(rewards, values)
    r, v, m = rewards.to(dt), values.to(dt), mask.to(torch.bool)
    B, T = r.shape
    next_value = torch.zeros(B, dtype=dt, device=r.device)  # value of the next valid token (0 after the last)
    last_adv = torch.zeros(B, dtype=dt, device=r.device)  # advantage of the next valid token
    adv = torch.zeros(B, T, dtype=dt, device=r.device)
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * last_adv
        valid = m[:, t]
        last_adv = torch.where(valid, a_t, last_adv)
        next_value = torch.where(valid, v[:, t], next_value)
        adv[:, t] = torch.where(valid, a_t, torch.zeros((), dtype=dt))
    returns = torch.where(m, adv + v, torch.zeros((), dtype=dt))
    return adv, returns
