"""Shared test utilities: NaN poisoning of kernel outputs, seeded inputs."""
import contextlib
import math

import torch


@contextlib.contextmanager
def poisoned_outputs():
    """Every floating torch.empty/empty_like made inside the block starts as NaN, so an unwritten element shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def random_mask(B, T, *, p_hole=0.2, seed=0, right_pad=True):
    """A mask with random holes and right padding of random length (row 0 keeps its full length)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) > p_hole
    if right_pad and T > 1:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        m &= torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return m
