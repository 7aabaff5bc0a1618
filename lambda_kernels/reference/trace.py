"""λ-trace z_t = Σ_{j≤t} w(t, j) · m_j · x_j, as a sequential O(T) scan (the spec's closed forms, §4)."""
import torch

from ._dtype import compute_dtype, zero_where_masked


def trace_weight_matrix(T: int, a: float, style: str, dtype=torch.float64) -> torch.Tensor:
    """The O(T²) lower-triangular weight matrix w(t, j) of the spec (§3.5): the ground truth for tests."""
    t = torch.arange(T, dtype=dtype).unsqueeze(1)
    j = torch.arange(T, dtype=dtype).unsqueeze(0)
    recent = torch.where(j <= t, torch.as_tensor(a, dtype=dtype) ** (t - j).clamp(min=0), torch.zeros((), dtype=dtype))
    if style == "recent":
        return recent
    both = torch.maximum(recent, torch.as_tensor(a, dtype=dtype) ** j)
    return torch.where(j <= t, both, torch.zeros((), dtype=dtype))


def _forward_scan(d: torch.Tensor, a: float) -> torch.Tensor:
    """y_t = d_t + a·y_{t−1}, y_{−1} = 0, per row."""
    if d.shape[1] == 0:
        return d.clone()
    out, state = [], torch.zeros_like(d[:, 0])
    for t in range(d.shape[1]):
        state = d[:, t] + a * state
        out.append(state)
    return torch.stack(out, dim=1)


def trace_scan(d: torch.Tensor, a: float, style: str) -> torch.Tensor:
    """z = W d per row, for already-masked d [B, T] (differentiable through autograd)."""
    if style == "recent":
        return _forward_scan(d, a)
    T = d.shape[1]
    # both: z_t = F_t − a^(t−m+1)·F_{m−1} + P_{m−1}, m = ceil(t/2), with F the recent scan and P_k = Σ_{j≤k} a^j d_j
    F = _forward_scan(d, a)
    powers = a ** torch.arange(T, dtype=d.dtype, device=d.device)
    P = _forward_scan(d * powers, 1.0)
    t = torch.arange(T, device=d.device)
    prev = (t + 1) // 2 - 1  # m − 1
    has_prev = prev >= 0
    idx = prev.clamp(min=0)
    F_prev = torch.where(has_prev, F[:, idx], torch.zeros((), dtype=d.dtype))
    P_prev = torch.where(has_prev, P[:, idx], torch.zeros((), dtype=d.dtype))
    decay = a ** (t - (prev + 1) + 1).to(d.dtype)
    return F - decay * F_prev + P_prev


def lambda_trace(x: torch.Tensor, mask: torch.Tensor, *, lam: float, gamma: float = 1.0, style: str = "both"):
    """z [B, T] fp32 (fp64 for fp64 input) with z_t = Σ_{j≤t} w(t, j)·m_j·x_j, a = γλ; see grpo_lambda.md §3–4."""
    dt = compute_dtype(x)
    m = mask.to(dt)
    d = zero_where_masked(x.to(dt) * m, m != 0)  # (masked x never read)
    return trace_scan(d, gamma * lam, style)
