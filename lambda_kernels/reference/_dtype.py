import torch


def zero_where_masked(values: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """values [...] or [..., H] with 0 where real [...] is False: a select, not a product, so that NaN/±inf there
    reach no result and no gradient flows there (0·inf would be NaN)."""
    if real is None:
        return values
    real = real.reshape(real.shape + (1,) * (values.dim() - real.dim()))
    return torch.where(real, values, torch.zeros((), dtype=values.dtype, device=values.device))


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32: references never compute in half precision."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
