import pytest
import torch

import lambda_kernels as lk
from lambda_kernels import reference as R

from ._helpers import IMPLS, poisoned_outputs, random_mask

STYLES = ["recent", "both"]


def matrix_trace(x, m, a, style):
    """The O(T²) definition z = W·(m·x), in float64."""
    W = R.trace_weight_matrix(x.shape[1], a, style).to(x.device)
    return (x.double() * m.double()) @ W.T


@pytest.mark.parametrize("style, z_expected, g_expected", [
    ("recent", [1, 2.5, 4.25, 6.125], [1.875, 1.75, 1.5, 1]),
    ("both", [1, 3, 5, 7.5], [4, 2, 1.5, 1]),
])
@pytest.mark.parametrize("impl", IMPLS)
def test_spec_vectors(style, z_expected, g_expected, impl, device):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], device=device, requires_grad=True)
    z = lk.lambda_trace(x, torch.ones(1, 4, device=device), lam=0.5, style=style, impl=impl)
    torch.testing.assert_close(z.cpu(), torch.tensor([z_expected]))
    (g,) = torch.autograd.grad(z, x, torch.ones_like(z))
    torch.testing.assert_close(g.cpu(), torch.tensor([g_expected]))


def test_both_weight_rows():
    W = R.trace_weight_matrix(4, 0.5, "both")
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0.5, 1, 0], [1, 0.5, 0.5, 1]], dtype=torch.float64)
    torch.testing.assert_close(W, expected)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("T", [1, 2, 17, 259, 700])
@pytest.mark.parametrize("lam, gamma", [(0.99, 1.0), (0.7, 0.9), (0.0, 1.0), (1.0, 1.0)])
def test_matches_matrix_form_fwd_bwd(style, T, lam, gamma, device):
    B = 3
    g = torch.Generator().manual_seed(T)
    x = torch.randn(B, T, generator=g, dtype=torch.float64).to(device).requires_grad_()
    m = random_mask(B, T, seed=T).to(device)
    gz = torch.randn(B, T, generator=g, dtype=torch.float64).to(device)
    with poisoned_outputs():
        z = lk.lambda_trace(x, m, lam=lam, gamma=gamma, style=style, impl="triton")
        (gx,) = torch.autograd.grad(z, x, gz.float())
    x_ref = x.detach().clone().requires_grad_()
    z_ref = matrix_trace(x_ref, m, gamma * lam, style)
    (gx_ref,) = torch.autograd.grad(z_ref, x_ref, gz)
    assert z.dtype == torch.float32 and gx.dtype == torch.float64
    scale = max(1.0, T / 10 if lam == 1.0 else 1.0)
    torch.testing.assert_close(z.double(), z_ref, atol=2e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=2e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_reference_matches_matrix_form(style):
    x = torch.randn(2, 50, dtype=torch.float64)
    m = random_mask(2, 50)
    torch.testing.assert_close(R.lambda_trace(x, m, lam=0.9, gamma=0.95, style=style),
                               matrix_trace(x, m, 0.9 * 0.95, style))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("chunked", ["0", "1"])
def test_long_row_blocked_scan(style, chunked, device, monkeypatch):
    """A few thousand tokens: one program walking blocks with carried state, or one program per chunk with the
    carries folded from chunk summaries (block is 256 in the interpreter)."""
    monkeypatch.setenv("LAMBDA_KERNELS_CHUNKED_SCAN", chunked)
    B, T = 2, 3001
    x = torch.randn(B, T, dtype=torch.float64, device=device, requires_grad=True)
    m = random_mask(B, T, seed=1).to(device)
    z = lk.lambda_trace(x, m, lam=0.99, style=style, impl="triton")
    gz = torch.randn(B, T, dtype=torch.float64, device=device)
    (gx,) = torch.autograd.grad(z, x, gz.float())
    x_ref = x.detach().clone().requires_grad_()
    z_ref = matrix_trace(x_ref, m, 0.99, style)
    (gx_ref,) = torch.autograd.grad(z_ref, x_ref, gz)
    torch.testing.assert_close(z.double(), z_ref, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_all_masked_row_is_zero(style, device):
    x = torch.randn(3, 20, device=device, requires_grad=True)
    m = torch.ones(3, 20, dtype=torch.bool, device=device)
    m[1] = False
    z = lk.lambda_trace(x, m, lam=0.9, style=style, impl="triton")
    (gx,) = torch.autograd.grad(z.sum(), x)
    assert torch.isfinite(z).all() and torch.isfinite(gx).all()
    assert (z[1] == 0).all() and (gx[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_dtypes(dtype, mask_dtype, device):
    x = torch.randn(2, 33, device=device).to(dtype).requires_grad_()
    m = random_mask(2, 33).to(device).to(mask_dtype)
    z = lk.lambda_trace(x, m, lam=0.95, style="both", impl="triton")
    (gx,) = torch.autograd.grad(z.sum(), x)
    assert z.dtype == torch.float32 and gx.dtype == dtype
    x_ref = x.detach().double().requires_grad_()
    z_ref = matrix_trace(x_ref, m, 0.95, "both")
    (gx_ref,) = torch.autograd.grad(z_ref.sum(), x_ref)
    torch.testing.assert_close(z.double(), z_ref, atol=1e-4, rtol=1e-5)
    # the gradient is computed in fp32 and rounded once to x's dtype
    torch.testing.assert_close(gx.double(), gx_ref, **{torch.float32: dict(atol=1e-5, rtol=1e-5),
                                                       torch.float16: dict(atol=1e-3, rtol=1e-3),
                                                       torch.bfloat16: dict(atol=1e-2, rtol=8e-3)}[dtype])


def test_impl_torch_matches_triton(device):
    x = torch.randn(3, 40, device=device)
    m = random_mask(3, 40).to(device)
    torch.testing.assert_close(lk.lambda_trace(x, m, lam=0.9, impl="torch"),
                               lk.lambda_trace(x, m, lam=0.9, impl="triton"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lam=1.5), ValueError, r"`lam` must be a number in \[0, 1\]; got 1.5"),
    (dict(lam=0.9, gamma=-0.1), ValueError, r"`gamma` must be a number in \[0, 1\]"),
    (dict(lam=0.9, style="forward"), ValueError, r"`style` must be one of \('recent', 'both'\); got 'forward'"),
    (dict(lam=0.9, impl="cuda"), ValueError, r"`impl` must be one of"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lk.lambda_trace(torch.randn(2, 5), torch.ones(2, 5), **kwargs)


def test_bad_tensors():
    with pytest.raises(ValueError, match=r"lambda_trace: `x` must be 2-D; got shape \[5\]"):
        lk.lambda_trace(torch.randn(5), torch.ones(5), lam=0.9)
    with pytest.raises(ValueError, match=r"`mask` must have shape \[2, 5\]; got \[2, 4\]"):
        lk.lambda_trace(torch.randn(2, 5), torch.ones(2, 4), lam=0.9)
    with pytest.raises(TypeError, match=r"`x` must be a floating tensor.*got torch.int64"):
        lk.lambda_trace(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5), lam=0.9)
    with pytest.raises(ValueError, match=r"all tensors must be on one device"):
        lk.lambda_trace(torch.randn(2, 5), torch.ones(2, 5, device="meta"), lam=0.9)


@pytest.mark.gpu
@pytest.mark.parametrize("style", STYLES)
def test_65536_token_row_on_gpu(style):
    """One 65,536-token sequence (32 blocks of carried state) against the float64 loop reference on the CPU."""
    T = 65536
    x = torch.randn(2, T, dtype=torch.float64)
    m = random_mask(2, T, seed=5)
    xg = x.cuda().requires_grad_()
    z = lk.lambda_trace(xg, m.cuda(), lam=0.999, style=style)
    gz = torch.randn(2, T, dtype=torch.float64)
    (gx,) = torch.autograd.grad(z, xg, gz.float().cuda())
    x_ref = x.clone().requires_grad_()
    z_ref = R.lambda_trace(x_ref, m, lam=0.999, style=style)
    (gx_ref,) = torch.autograd.grad(z_ref, x_ref, gz)
    torch.testing.assert_close(z.cpu().double(), z_ref.detach(), atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(gx.cpu(), gx_ref, atol=2e-3, rtol=1e-4)
