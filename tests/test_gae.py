import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R

from ._helpers import poisoned_outputs, random_mask


def classic_gae(r, v, gamma, lam):
    """Textbook GAE on a fully valid row (the loop verl runs), float64."""
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    last = torch.zeros(B, dtype=torch.float64)
    for t in reversed(range(T)):
        nxt = v[:, t + 1] if t + 1 < T else torch.zeros(B, dtype=torch.float64)
        last = r[:, t] + gamma * nxt - v[:, t] + gamma * lam * last
        adv[:, t] = last
    return adv


def make(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("T", [1, 2, 31, 300, 700])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
def test_matches_reference_with_holes(T, gamma, lam, device):
    r, v = make(4, T, seed=T)
    m = random_mask(4, T, seed=T)
    with poisoned_outputs():
        adv, ret = lk.gae(r.to(device), v.to(device), m.to(device), gamma=gamma, lam=lam, impl="triton")
    adv_ref, ret_ref = R.gae(r, v, m, gamma=gamma, lam=lam)
    assert adv.dtype == ret.dtype == torch.float32
    torch.testing.assert_close(adv.cpu().double(), adv_ref, atol=2e-5 * max(1, T * (lam == 1.0) / 10), rtol=1e-5)
    torch.testing.assert_close(ret.cpu().double(), ret_ref, atol=2e-5 * max(1, T * (lam == 1.0) / 10), rtol=1e-5)


def test_full_mask_is_classic_gae(device):
    r, v = make(3, 50)
    adv, ret = lk.gae(r.to(device), v.to(device), torch.ones(3, 50, device=device), gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv.cpu().double(), classic_gae(r, v, 0.99, 0.95), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.cpu().double(), classic_gae(r, v, 0.99, 0.95) + v, atol=1e-5, rtol=1e-5)


def test_lambda_one_gives_discounted_returns_minus_values(device):
    r, v = make(2, 40)
    gamma = 0.9
    adv, ret = lk.gae(r.to(device), v.to(device), torch.ones(2, 40, device=device), gamma=gamma, lam=1.0)
    discounts = gamma ** torch.arange(40, dtype=torch.float64)
    G = torch.stack([(r[:, t:] * discounts[: 40 - t]).sum(1) for t in range(40)], dim=1)
    torch.testing.assert_close(adv.cpu().double(), G - v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.cpu().double(), G, atol=1e-5, rtol=1e-5)


def test_lambda_zero_gives_one_step_td_errors(device):
    r, v = make(2, 40)
    adv, _ = lk.gae(r.to(device), v.to(device), torch.ones(2, 40, device=device), gamma=0.8, lam=0.0)
    v_next = torch.cat([v[:, 1:], torch.zeros(2, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(adv.cpu().double(), r + 0.8 * v_next - v, atol=1e-6, rtol=1e-6)


def test_masked_positions_pass_state_through(device):
    """A hole inside a row is skipped: the result equals GAE on the row with the hole removed."""
    r, v = make(1, 12)
    m = torch.ones(1, 12, dtype=torch.bool)
    m[0, [3, 4, 9]] = False
    adv, ret = lk.gae(r.to(device), v.to(device), m.to(device), gamma=0.97, lam=0.9)
    keep = m[0]
    compact = classic_gae(r[:, keep], v[:, keep], 0.97, 0.9)
    torch.testing.assert_close(adv.cpu().double()[:, keep], compact, atol=1e-6, rtol=1e-6)
    assert (adv[0, ~keep] == 0).all() and (ret[0, ~keep] == 0).all()


@pytest.mark.parametrize("chunked", ["0", "1"])
def test_all_masked_row_and_long_row(chunked, device, monkeypatch):
    monkeypatch.setenv("LAMBDA_KERNELS_CHUNKED_SCAN", chunked)
    r, v = make(2, 3001)
    m = random_mask(2, 3001, seed=3)
    m[1] = False
    adv, ret = lk.gae(r.to(device), v.to(device), m.to(device), gamma=1.0, lam=0.99)
    adv_ref, _ = R.gae(r, v, m, gamma=1.0, lam=0.99)
    assert (adv[1] == 0).all() and (ret[1] == 0).all()
    torch.testing.assert_close(adv.cpu().double(), adv_ref, atol=2e-4, rtol=1e-5)


def test_half_precision_inputs(device):
    r, v = make(2, 64)
    m = random_mask(2, 64)
    adv, _ = lk.gae(r.half().to(device), v.half().to(device), m.to(device), gamma=0.99, lam=0.95)
    adv_ref, _ = R.gae(r.half().double(), v.half().double(), m, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv.cpu().double(), adv_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(gamma=1.2, lam=0.9), ValueError, r"gae: `gamma` must be a number in \[0, 1\]; got 1.2"),
    (dict(gamma=0.9, lam=float("nan")), ValueError, r"gae: `lam` must be a number in \[0, 1\]"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lk.gae(torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5), **kwargs)


def test_bad_tensors():
    with pytest.raises(ValueError, match=r"gae: `values` must have shape \[2, 5\]; got \[2, 6\]"):
        lk.gae(torch.randn(2, 5), torch.randn(2, 6), torch.ones(2, 5), gamma=1.0, lam=0.9)
    with pytest.raises(TypeError, match=r"gae: `rewards` must be a floating tensor"):
        lk.gae(torch.ones(2, 5, dtype=torch.int32), torch.randn(2, 5), torch.ones(2, 5), gamma=1.0, lam=0.9)
    with pytest.raises(ValueError, match=r"one device"):
        lk.gae(torch.randn(2, 5), torch.randn(2, 5, device="meta"), torch.ones(2, 5), gamma=1.0, lam=0.9)
