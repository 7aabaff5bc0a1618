"""Log-probs (and entropy) of target tokens from hidden states and an LM head, with full logits (the oracle)."""
import torch

from ._dtype import compute_dtype, zero_where_masked
from .objective import grpo_lambda_loss


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False,
                    process_group=None, mask=None, softcap=None):
    """log softmax((hidden·weightᵀ + bias) / temperature)[targets], fp32 (fp64 for fp64 input), shape of targets;
    with a softcap c the logits are c·tanh((hidden·weightᵀ + bias) / c) before the temperature (Gemma 2/3, as HF).

    process_group: weight/bias are this rank's block of vocabulary rows; the logits of all ranks are gathered
    (Megatron's column-parallel head: hidden's gradient summed over the group, each rank's rows its own).
    mask: where it is 0 the log-prob and entropy are 0 (no gradient), and neither the hidden state nor the target
    is used (NaN or -100 there change nothing).
    """
    real = None if mask is None else mask != 0
    targets, hidden = zero_where_masked(targets, real), zero_where_masked(hidden, real)
    dt = compute_dtype(hidden, weight)
    if process_group is not None:
        hidden = _SumGradOverGroup.apply(hidden, process_group)
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    if process_group is not None:
        logits = _GatherVocab.apply(logits, process_group)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = zero_where_masked(logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1), real)
    if not return_entropy:
        return logp
    # p·log p is 0 at a −inf logit (a banned token): a finite stand-in for log p keeps value and gradient NaN-free
    finite_logp = torch.where(torch.isfinite(logp_all), logp_all, torch.zeros((), dtype=logp_all.dtype))
    entropy = -(logp_all.exp() * finite_logp).sum(-1)
    return logp, zero_where_masked(entropy, real)


def fused_grpo_lambda_loss(
    hidden, weight, completion_ids, completion_mask, advantages, *, old_logprobs=None, ref_logprobs=None, bias=None,
    temperature=1.0, trace="both", lam=0.99, gamma=1.0, adv_clamp_min=None, epsilon_low=0.2, epsilon_high=None,
    beta=0.0, loss_type="dapo", max_completion_length=None, num_items_in_batch=None, return_entropy=False,
    kl_bias_correction=False, dual_clip=None, policy_weights=None, importance_sampling_level="token",
    policy_loss="clip", process_group=None, softcap=None, entropy_coef=0.0, entropy_weights=None,
):
    """grpo_lambda_loss(linear_logprobs(hidden, weight, completion_ids), ...) with materialised logits; the
    padding's hidden states and ids are not used (as the library's). With entropy_coef c the loss less
    c·Σ m·w·H / max(Σ m·w, 1), w the entropy_weights (1 when None; not read where the mask is 0)."""
    with_entropy = return_entropy or entropy_coef != 0
    out = linear_logprobs(hidden, weight, completion_ids, bias=bias, temperature=temperature,
                          return_entropy=with_entropy, process_group=process_group, mask=completion_mask,
                          softcap=softcap)
    logp, entropy = out if with_entropy else (out, None)
    loss, metrics = grpo_lambda_loss(
        logp, old_logprobs, advantages, completion_mask, ref_logprobs=ref_logprobs, trace=trace, lam=lam,
        gamma=gamma, adv_clamp_min=adv_clamp_min, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
        loss_type=loss_type, max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        kl_bias_correction=kl_bias_correction, dual_clip=dual_clip, policy_weights=policy_weights,
        importance_sampling_level=importance_sampling_level, policy_loss=policy_loss)
    if return_entropy:
        m = completion_mask.to(entropy.dtype)
        metrics["entropy"] = ((m * entropy.detach()).sum() / m.sum().clamp(min=1.0)).to(torch.float32)
    if entropy_coef != 0:
        loss = loss - entropy_coef * entropy_bonus_mean(entropy, completion_mask, entropy_weights).to(loss.dtype)
    return loss, metrics


def entropy_bonus_mean(entropy, mask, weights=None):
    """Σ m·w·H / max(Σ m·w, 1) (w = 1 when None): the entropy the bonus raises; w is not read where m is 0."""
    m = mask.to(entropy.dtype)
    if weights is not None:
        m = torch.where(mask != 0, m * weights.to(entropy.dtype), torch.zeros((), dtype=entropy.dtype))
    return (m * entropy).sum() / m.sum().clamp(min=1.0)


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; the gradient summed over the group (each rank's logits see only its vocabulary rows)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherVocab(torch.autograd.Function):
    """[..., V_r] on each rank → [..., V] in rank order (blocks may differ in size); backward: this rank's block."""

    @staticmethod
    def forward(ctx, logits, group):
        import torch.distributed as dist

        world = dist.get_world_size(group)
        sizes = [torch.zeros((), dtype=torch.int64, device=logits.device) for _ in range(world)]  # NCCL: on device
        dist.all_gather(sizes, torch.tensor(logits.shape[-1], dtype=torch.int64, device=logits.device), group=group)
        sizes = [int(s) for s in sizes]
        padded = torch.nn.functional.pad(logits, (0, max(sizes) - logits.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        rank = dist.get_rank(group)
        ctx.block = (sum(sizes[:rank]), sizes[rank])
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start, size = ctx.block
        return grad[..., start:start + size], None
