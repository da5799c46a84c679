"""The convolution *operator* norm bound, checked against the dense operator's SVD (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from implicitnets.parametrizations.conv import ConvOperatorBound, conv_operator_norm, conv_spectral_norm

GEOMETRIES = [
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, seed=3),  # seed 0: σ₂/σ₁ = 0.9999
    dict(in_channels=2, out_channels=5, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2, groups=2),
    dict(in_channels=2, out_channels=3, kernel_size=(1, 3), padding="same"),
    dict(in_channels=2, out_channels=2, kernel_size=5, padding="valid"),
]
SIZE = (7, 6)


def dense(conv: nn.Conv2d, size: tuple[int, int]) -> torch.Tensor:
    """The matrix of ``z ↦ conv(z)`` (no bias) on (C_in, H, W) inputs, built column by column."""
    n = conv.in_channels * size[0] * size[1]
    basis = torch.eye(n, dtype=conv.weight.dtype).reshape(n, conv.in_channels, *size)
    with torch.no_grad():
        out = nn.functional.conv2d(basis, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.reshape(n, -1).T


def make(spec: dict, seed: int | None = None) -> nn.Conv2d:
    """A random float64 conv; ``spec["seed"]`` picks a kernel whose top two singular values are
    either equal or ≥ 1% apart (power iteration converges like (σ₂/σ₁)²ᵏ)."""
    spec = dict(spec)
    default = spec.pop("seed", 0)
    torch.manual_seed(default if seed is None else seed)
    return nn.Conv2d(**spec, bias=False).double()


@pytest.mark.parametrize("spec", GEOMETRIES)
def test_operator_norm_matches_dense_svd(spec):
    conv = make(spec)
    exact = float(torch.linalg.matrix_norm(dense(conv, SIZE), 2))
    estimate = conv_operator_norm(conv, SIZE, max_iter=20000, tol=1e-15)
    assert abs(estimate - exact) <= 1e-8 * exact


@pytest.mark.parametrize("spec", GEOMETRIES)
def test_adjoint_is_conv_transpose(spec):
    conv = make(spec)
    bound = ConvOperatorBound(conv.weight.detach(), 1.0, (conv.in_channels, *SIZE), **_options(conv))
    K = dense(conv, SIZE)
    y = torch.randn(1, *bound._u.shape[1:], dtype=torch.float64)
    got = bound.geometry.adjoint(y, conv.weight.detach()).reshape(-1)
    torch.testing.assert_close(got, K.T @ y.reshape(-1), rtol=1e-12, atol=1e-12)


def _options(conv: nn.Conv2d) -> dict:
    from implicitnets.parametrizations.conv import conv_options

    return conv_options(conv)


@pytest.mark.parametrize("spec", GEOMETRIES[:3])
def test_parametrization_enforces_the_bound_on_the_operator(spec):
    conv = make(spec)
    with torch.no_grad():
        conv.weight.mul_(3.0)  # well above the bound
    conv_spectral_norm(conv, bound=0.5, input_shape=SIZE, tol=0.0, max_iter=20000)  # to convergence
    sigma = float(torch.linalg.matrix_norm(dense(conv, SIZE), 2))
    assert abs(sigma - 0.5) <= 1e-8 * 0.5
    # a weight already inside the bound is left alone
    small = make(spec, seed=1)
    with torch.no_grad():
        small.weight.mul_(0.01)
    before = small.weight.detach().clone()
    conv_spectral_norm(small, bound=0.5, input_shape=SIZE)
    torch.testing.assert_close(small.weight, before, rtol=0, atol=0)


def test_reshaped_kernel_norm_is_not_the_operator_norm():
    """torch's ``spectral_norm`` on a Conv2d bounds σ(W reshaped to (out, in·k·k)) — for an
    averaging kernel that is 3, while the operator norm approaches 9 (its zero-frequency gain)."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    reshaped = float(torch.linalg.matrix_norm(conv.weight.detach().reshape(1, -1), 2))
    operator = conv_operator_norm(conv, (16, 16), max_iter=5000, tol=1e-13)
    exact = float(torch.linalg.matrix_norm(dense(conv, (16, 16)), 2))
    assert reshaped == pytest.approx(3.0, rel=1e-12)
    assert operator == pytest.approx(exact, rel=1e-8) and operator > 2.8 * reshaped


def test_gradients_flow_through_the_parametrization():
    conv = conv_spectral_norm(make(GEOMETRIES[0]), bound=0.3, input_shape=SIZE, max_iter=200)
    conv.eval()
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64)
    original = conv.parametrizations.weight.original

    def f(w):
        return conv.parametrizations.weight[0](w).sum() + nn.functional.conv2d(
            x, conv.parametrizations.weight[0](w), padding=1).pow(2).sum()

    assert torch.autograd.gradcheck(f, (original.detach().clone().requires_grad_(),))
    conv(x).pow(2).sum().backward()
    assert original.grad is not None and torch.isfinite(original.grad).all() and original.grad.abs().max() > 0


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda: conv_spectral_norm(nn.Linear(3, 3), bound=0.5, input_shape=SIZE), "expected an nn.Conv2d"),
        (lambda: conv_spectral_norm(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), bound=0.5,
                                    input_shape=SIZE), "padding_mode"),
        (lambda: conv_spectral_norm(nn.Conv2d(2, 2, 3), bound=0.0, input_shape=SIZE),
         "bound must be a finite number > 0"),
        (lambda: conv_spectral_norm(nn.Conv2d(2, 2, 3), bound=0.5, input_shape=(3, 7, 6)), "input_shape"),
        (lambda: conv_spectral_norm(nn.Conv2d(2, 2, 3), bound=0.5, input_shape=SIZE, max_iter=0), "max_iter"),
        (lambda: conv_spectral_norm(nn.Conv2d(2, 2, 3), bound=0.5, input_shape=SIZE, tol=1.5), "tol must be"),
        (lambda: conv_spectral_norm(nn.Conv2d(2, 2, 2, padding="same"), bound=0.5, input_shape=SIZE),
         "odd effective kernel"),
    ],
)
def test_bad_arguments_raise(make_bad, message):
    with pytest.raises(ValueError, match=message):
        make_bad()
