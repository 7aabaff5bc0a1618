import torch

from ._dtype import compute_dtype


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages Â_i = (r_i − mean_group r) / (std + eps), fp32 [B].

    Groups are consecutive blocks of `group_size` rows (TRL's layout). std is unbiased (torch.std). `scale`:
    "group" divides by the group's std, "batch" by the std of the whole batch, "none" does not divide (Dr.GRPO).
    A group whose rewards are all equal gets advantage exactly 0 (not NaN, not rounding noise).
    """
    r = rewards.to(compute_dtype(rewards)).reshape(-1, group_size)  # (fp64 rewards are centred in fp64)
    centred = r - r.mean(dim=1, keepdim=True)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = centred / (std + eps)
    elif scale == "batch":
        std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        adv = centred / (std + eps)
    else:
        adv = centred
    return torch.where(same, torch.zeros_like(adv), adv).reshape(-1).to(torch.float32)
