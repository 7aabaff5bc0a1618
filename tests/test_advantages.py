import pytest
import torch

import lambda_kernels as lk


def test_group_scaling():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0])
    adv = lk.group_advantages(r, 3)
    g = r.view(2, 3)
    expected = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)
    torch.testing.assert_close(adv, expected)
    assert adv.dtype == torch.float32


def test_batch_and_none_scaling():
    r = torch.tensor([1.0, 0.0, 3.0, 5.0], dtype=torch.float64)
    g = r.view(2, 2).float()
    centred = (g - g.mean(1, keepdim=True)).view(-1)
    torch.testing.assert_close(lk.group_advantages(r, 2, scale="none"), centred)
    torch.testing.assert_close(lk.group_advantages(r, 2, scale="batch"), centred / (r.float().std() + 1e-4))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_std_group_is_exactly_zero(scale):
    r = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 1.0])
    adv = lk.group_advantages(r, 3, scale=scale)
    assert torch.isfinite(adv).all()
    assert (adv[:3] == 0).all() and (adv[3:] != 0).all()


def test_fp64_rewards_are_centred_in_fp64():
    """Large rewards with small spreads (e.g. raw scores): fp32 centring would round them to equal values."""
    r = torch.tensor([1e8, 1e8 + 4, 1e8 + 1, 1e8 + 3], dtype=torch.float64)
    adv = lk.group_advantages(r, 2, scale="none")
    assert adv.dtype == torch.float32 and adv.tolist() == [-2.0, 2.0, -1.0, 1.0]


def test_group_size_one_gives_zero():
    assert (lk.group_advantages(torch.tensor([1.0, 2.0]), 1) == 0).all()


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((torch.ones(5), 2), {}, ValueError, r"`rewards` length must be a multiple of `group_size` = 2; got 5"),
    ((torch.ones(4, 1), 2), {}, ValueError, r"`rewards` must be 1-D"),
    ((torch.ones(4, dtype=torch.long), 2), {}, TypeError, r"`rewards` must be a floating tensor"),
    ((torch.ones(4), 0), {}, ValueError, r"`group_size` must be a positive integer"),
    ((torch.ones(4), 2), {"scale": "std"}, ValueError, r"`scale` must be one of \('group', 'batch', 'none'\)"),
    ((torch.tensor([1.0, float("nan")]), 2), {}, ValueError, r"`rewards` must be finite"),
])
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lk.group_advantages(*args, **kwargs)
