"""GRPO / GRPO-λ token objective in plain PyTorch, written from grpo_lambda.md §2–3 (autograd does the backward)."""
import math

import torch

from ..policy_losses import CISPO, SAPO, VESPO, Clip, resolve_policy_loss
from ._dtype import compute_dtype, zero_where_masked
from .trace import trace_scan


def _token_weights(m: torch.Tensor, loss_type: str, max_completion_length, num_items_in_batch) -> torch.Tensor:
    """n_{i,t}: the weight of token (i, t) in the aggregated loss (TRL's loss types)."""
    B, T = m.shape
    if loss_type == "dapo":
        n_items = m.sum() if num_items_in_batch is None else torch.as_tensor(  # (a [1] CPU count, too)
            num_items_in_batch, dtype=m.dtype, device=m.device).reshape(())
        return m / n_items.clamp(min=1.0 if num_items_in_batch is None else 1e-12)
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "grpo":
        return m / m.sum(dim=1, keepdim=True).clamp(min=1.0) / B
    if loss_type == "dr_grpo":
        return m / (B * (T if max_completion_length is None else max_completion_length))
    if loss_type == "luspo":
        return m / B
    raise ValueError(f"unknown loss_type {loss_type!r}")


def _unclipped(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("clip_ratio/")}


def _clip_term(z, ratio, adv, w, epsilon_low, eps_high, dual_clip):
    """PPO's −min(ρ̃Â, clip(ρ̃)Â) per token, and its low/high-clipped tokens (before the mask); ratio = exp(z),
    detached."""
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        # dual clip (verl's clip_ratio_c): a token with Â < 0 pays at most −c·Â; for c ≥ 1 + ε_high this is TRL's
        # −min(min(ρ̃, c)·Â, clip(ρ̃)·Â) (delta)
        dual = (ratio > dual_clip) & (adv < 0) if dual_clip is not None else torch.zeros_like(low)
    # −min(ρ̃Â, clip(ρ̃)Â) is −ρ̃Â where the ratio is not clipped, and the constant −clip(ρ̃)Â where it is (−c·Â where
    # the dual clip caps it); written so, a token with Â = 0, a clipped one or one of weight 0 adds no inf·0 (NaN) to
    # the value or the gradient where exp(z) overflows
    active = (adv != 0) & ~(low | high | dual)
    if w is not None:
        active = active & (w != 0)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    ratio_active = torch.exp(torch.where(active, z, zero))
    constant = torch.where(adv != 0, -ratio.clamp(1 - epsilon_low, 1 + eps_high) * adv, zero)
    if dual_clip is not None:
        constant = torch.where(dual, -dual_clip * adv, constant)
    return torch.where(active, -ratio_active * adv, constant), low, high


def _cispo_term(ratio, adv, lp, max_ratio):
    """CISPO's −sg(min(ρ̃, c))·Â·ℓ (TRL's value; the gradient is on ℓ itself, the ratio only weighs it), and its
    capped tokens with Â > 0 (TRL's cispo_clip_ratio) in the high slot."""
    weight = ratio.clamp(max=max_ratio)
    high = (ratio > max_ratio) & (adv > 0)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return torch.where(adv != 0, -weight * adv * lp, zero), torch.zeros_like(high), high


def _sapo_term(z, ratio, adv, temperature_pos, temperature_neg):
    """SAPO's −(4/τ)·σ(τ·(ρ̃ − 1))·Â, τ by the sign of Â; nothing clipped. Where exp(z) overflows the gate is 1:
    the constant −(4/τ)·Â, no gradient (σ' = 0 there, and inf·0 would be NaN)."""
    full = lambda v: torch.full((), v, dtype=z.dtype, device=z.device)  # noqa: E731
    tau = torch.where(adv > 0, full(temperature_pos), full(temperature_neg))
    zero = full(0.0)
    saturated = torch.isinf(ratio)
    gate = torch.sigmoid(tau * (torch.exp(torch.where(saturated, zero, z)) - 1))
    per_token = torch.where(saturated, -(4 / tau) * adv, -(4 / tau) * gate * adv)
    none = torch.zeros_like(saturated)
    return torch.where(adv != 0, per_token, zero), none, none


def _vespo_phi(log_w, adv, policy: VESPO):
    """VESPO's φ(w) = exp(λ + k·log w − λ·w) (TRL's `get_gamma_weights`): (k, λ) by the sign of Â, Â ≥ 0 the
    positive pair; λ at least 1e-4; an overflow counts 0."""
    full = lambda v: torch.full((), v, dtype=log_w.dtype, device=log_w.device)  # noqa: E731
    pos = adv >= 0
    k = torch.where(pos, full(policy.k_pos), full(policy.k_neg))
    lam = torch.where(pos, full(policy.lambda_pos), full(policy.lambda_neg)).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _vespo_term(lp, old, m, adv, policy: VESPO):
    """VESPO's −sg(φ)·Â·ℓ per token, with log w = clamp(Σ_t m·clamp(ℓ − ℓ_old, ±20), log 1e-8, 20) of the row (a
    sum, TRL's), nothing clipped; and the log-weight [B, 1]."""
    with torch.no_grad():
        log_w = (m * (lp - old).clamp(-20.0, 20.0)).sum(dim=1, keepdim=True).clamp(math.log(1e-8), 20.0)
        phi = _vespo_phi(log_w, adv, policy)
    none = torch.zeros(lp.shape, dtype=torch.bool, device=lp.device)
    return torch.where(adv != 0, -phi * adv * lp, torch.zeros((), dtype=lp.dtype, device=lp.device)), none, none, \
        log_w


def grpo_lambda_loss(
    logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, trace="both", lam=0.99, gamma=1.0,
    adv_clamp_min=None, epsilon_low=0.2, epsilon_high=None, beta=0.0, loss_type="dapo",
    max_completion_length=None, num_items_in_batch=None, kl_bias_correction=False, dual_clip=None,
    policy_weights=None, importance_sampling_level="token", policy_loss="clip",
):
    """(loss, metrics); see lambda_kernels.grpo_lambda_loss for the contract."""
    dt = compute_dtype(logprobs, old_logprobs, ref_logprobs)
    m = mask.to(dt)
    # masked tokens' values are never used (padding may hold ±inf or NaN); ℓ_old, ℓ_ref and the advantages are
    # constants of the loss (no gradient flows to them)
    lp = zero_where_masked(logprobs.to(dt), m != 0)
    old = lp.detach() if old_logprobs is None else zero_where_masked(old_logprobs.detach().to(dt), m != 0)
    B, T = lp.shape
    adv = advantages.detach().to(dt)
    # each row's own advantage (advantages [B]), for the per-sequence metrics of rows that may have no tokens
    adv_row = adv if adv_clamp_min is None or adv.dim() == 2 else adv.clamp(min=adv_clamp_min)
    adv = zero_where_masked(adv.unsqueeze(1).expand(B, T) if adv.dim() == 1 else adv, m != 0)
    if adv_clamp_min is not None:
        adv = adv.clamp(min=adv_clamp_min)
    eps_high = epsilon_low if epsilon_high is None else epsilon_high

    delta = m * (lp - old)
    sequence_level = importance_sampling_level == "sequence"
    if sequence_level:
        # GSPO: every token of a sequence shares its length-normalised log-ratio Σ_t m·(ℓ − ℓ_old) / max(Σ_t m, 1)
        z = (delta.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)).expand(B, T)
    else:
        z = delta if trace is None else trace_scan(delta, gamma * lam, trace)
    w = None if policy_weights is None else zero_where_masked(policy_weights.detach().to(dt), m != 0)
    ratio = torch.exp(z.detach())
    policy = resolve_policy_loss("grpo_lambda_loss", policy_loss)
    if isinstance(policy, Clip):
        per_token, low, high = _clip_term(z, ratio, adv, w, epsilon_low, eps_high, dual_clip)
    elif isinstance(policy, CISPO):
        per_token, low, high = _cispo_term(ratio, adv, lp, policy.max_ratio)
    elif isinstance(policy, VESPO):
        per_token, low, high, log_w = _vespo_term(lp, old, m, adv, policy)
    else:
        per_token, low, high = _sapo_term(z, ratio, adv, policy.temperature_pos, policy.temperature_neg)
    zero = torch.zeros((), dtype=dt, device=z.device)
    if w is not None:  # the policy term weighted per token (a weight of 0 adds exactly 0)
        per_token = torch.where(w != 0, w * per_token, zero)
    if beta > 0:
        d_ref = zero_where_masked(ref_logprobs.detach().to(dt), m != 0) - lp
        kl = torch.exp(d_ref) - d_ref - 1
        if kl_bias_correction:
            # weighted by the token's own ratio π/π_old (untraced, unclipped, differentiable: 1 on-policy, with
            # gradient), which makes the KL gradient the unbiased reverse-KL one (TRL's use_bias_correction_kl)
            log_r = z if sequence_level else lp - old  # (TRL: the sequence's ratio at the sequence level)
            # a zero KL (ℓ = ℓ_ref) where the ratio overflows stays 0, value and gradient (no 0·inf = NaN)
            with torch.no_grad():
                overflow = (kl == 0) & torch.isinf(torch.exp(log_r))
            kl = torch.where(overflow, zero, kl * torch.exp(torch.where(overflow, zero, log_r)))
        per_token = per_token + beta * kl
    loss = (_token_weights(m, loss_type, max_completion_length, num_items_in_batch) * per_token).sum()

    with torch.no_grad():
        count = m.sum().clamp(min=1.0)
        low, high = low.to(dt), high.to(dt)
        metrics = {
            "clip_ratio/low_mean": (m * low).sum() / count,
            "clip_ratio/high_mean": (m * high).sum() / count,
            "clip_ratio/region_mean": (m * torch.maximum(low, high)).sum() / count,
            "ratio_mean": torch.where(m != 0, m * ratio, zero).sum() / count,
        }
        # TRL's per-sequence extremes: the least low-clipped and the most high-clipped fraction of a sequence with
        # tokens (0 when none has)
        seq_count = m.sum(dim=1)
        has = seq_count > 0
        seq_low = (m * low).sum(dim=1) / seq_count.clamp(min=1e-30)
        seq_high = (m * high).sum(dim=1) / seq_count.clamp(min=1e-30)
        if sequence_level and advantages.dim() == 1:
            # TRL's sequence-level metrics: the clipped fractions are means over sequences, every sequence counted
            # (one without tokens has ratio 1: never clipped), and the extremes range over every sequence too (with
            # per-token advantages TRL's clip masks would be [B, T]: token means, as at the token level)
            n_seq = max(B, 1)
            if isinstance(policy, CISPO):  # a sequence without tokens has ratio 1: capped by a cap below 1, Â > 0
                seq_high = torch.where(has, seq_high, ((policy.max_ratio < 1.0) & (adv_row > 0)).to(dt))
            metrics["clip_ratio/low_mean"] = seq_low.sum() / n_seq
            metrics["clip_ratio/high_mean"] = seq_high.sum() / n_seq
            metrics["clip_ratio/region_mean"] = (seq_low + seq_high).sum() / n_seq
            has = torch.ones_like(has)
        inf = torch.full((1,), torch.inf, dtype=dt, device=m.device)
        low_min = torch.cat([torch.where(has, seq_low, inf), inf]).amin()  # (no host sync; B may be 0)
        metrics["clip_ratio/low_min"] = torch.where(torch.isinf(low_min), zero, low_min)
        metrics["clip_ratio/high_max"] = torch.cat([torch.where(has, seq_high, zero), zero.reshape(1)]).amax()
        if beta > 0:
            metrics["kl"] = (m * kl).sum() / count
        if isinstance(policy, CISPO):  # TRL's one clip metric there: the fraction capped with Â > 0
            metrics = {"cispo_clip_ratio": metrics["clip_ratio/high_mean"], **_unclipped(metrics)}
        elif isinstance(policy, SAPO):  # nothing is clipped
            metrics = _unclipped(metrics)
        elif isinstance(policy, VESPO):  # TRL's mean φ: over the sequences with advantages [B], else the tokens
            if advantages.dim() == 1:
                phi_mean = _vespo_phi(log_w, adv_row.unsqueeze(1), policy).sum() / max(B, 1)
            else:
                phi_mean = (m * _vespo_phi(log_w, adv, policy)).sum() / count
            metrics = {"vespo/phi_seq_mean": phi_mean, **_unclipped(metrics)}
        metrics = {k: v.detach().to(torch.float32) for k, v in metrics.items()}
    return loss.to(torch.float32) if dt != torch.float64 else loss, metrics
