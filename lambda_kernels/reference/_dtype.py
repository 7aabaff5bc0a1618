import torch


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32: references never compute in half precision."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
