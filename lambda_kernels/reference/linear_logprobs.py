"""Log-probs (and entropy) of target tokens from hidden states and an LM head, with full logits (the oracle)."""
import torch

from ._dtype import compute_dtype
from .objective import grpo_lambda_loss


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False):
    """log softmax((hidden·weightᵀ + bias) / temperature)[targets], fp32 (fp64 for fp64 input), shape of targets."""
    dt = compute_dtype(hidden, weight)
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    # p·log p is 0 at a −inf logit (a banned token): a finite stand-in for log p keeps value and gradient NaN-free
    finite_logp = torch.where(torch.isfinite(logp_all), logp_all, torch.zeros((), dtype=logp_all.dtype))
    entropy = -(logp_all.exp() * finite_logp).sum(-1)
    return logp, entropy


def fused_grpo_lambda_loss(
    hidden, weight, completion_ids, completion_mask, advantages, *, old_logprobs=None, ref_logprobs=None, bias=None,
    temperature=1.0, trace="both", lam=0.99, gamma=1.0, adv_clamp_min=None, epsilon_low=0.2, epsilon_high=None,
    beta=0.0, loss_type="dapo", max_completion_length=None, num_items_in_batch=None, return_entropy=False,
):
    """grpo_lambda_loss(linear_logprobs(hidden, weight, completion_ids), ...) with materialised logits."""
    out = linear_logprobs(hidden, weight, completion_ids, bias=bias, temperature=temperature,
                          return_entropy=return_entropy)
    logp, entropy = out if return_entropy else (out, None)
    loss, metrics = grpo_lambda_loss(
        logp, old_logprobs, advantages, completion_mask, ref_logprobs=ref_logprobs, trace=trace, lam=lam,
        gamma=gamma, adv_clamp_min=adv_clamp_min, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
        loss_type=loss_type, max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch)
    if return_entropy:
        m = completion_mask.to(entropy.dtype)
        metrics["entropy"] = ((m * entropy.detach()).sum() / m.sum().clamp(min=1.0)).to(torch.float32)
    return loss, metrics
