"""The circulant-extension bound on a convolution's operator norm, checked in float64 against
the dense matrices of the zero-padded convolution and of its circular extension."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_conv_spectral import GEOMETRIES, SIZE, dense, make
from torch import nn

import implicitnets as inn
from implicitnets.errors import NonFiniteError
from implicitnets.parametrizations import CirculantConvBound, ConvOperatorBound, circulant_norm, conv_circulant_norm
from implicitnets.parametrizations.conv import conv_options


def dense_circular(conv: nn.Conv2d, grid: tuple[int, int]) -> torch.Tensor:
    """The matrix of ``y[i] = Σ_a W_a x[(i − p + d·a) mod N]`` on the N₁ × N₂ grid (stride 1),
    from a circularly padded input: the circular extension of ``conv``."""
    options = conv_options(conv)
    (p1, p2), (d1, d2) = options["padding"], options["dilation"]
    e1, e2 = (d * (k - 1) + 1 for d, k in zip((d1, d2), conv.kernel_size))
    n = conv.in_channels * grid[0] * grid[1]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, conv.in_channels, *grid)
    padded = F.pad(basis, (p2, e2 - 1 - p2, p1, e1 - 1 - p1), mode="circular")
    with torch.no_grad():
        out = F.conv2d(padded, conv.weight, None, 1, 0, options["dilation"], options["groups"])
    return out.reshape(n, -1).T


def _bound(conv: nn.Conv2d, gamma: float = 1.0, size: tuple[int, int] = SIZE) -> CirculantConvBound:
    return CirculantConvBound(conv.weight.detach(), gamma, (conv.in_channels, *size), **conv_options(conv))


@pytest.mark.parametrize("spec", GEOMETRIES)
def test_sigma_is_the_circular_operator_norm_and_bounds_the_convolution(spec):
    """σ equals the dense circular operator's largest singular value to 1e-12 and is at least
    the zero-padded operator's (strided, dilated, grouped, 'same' and 'valid' geometries)."""
    conv = make(spec)
    bound = _bound(conv)
    sigma = circulant_norm(conv, SIZE)
    circular = float(torch.linalg.matrix_norm(dense_circular(conv, bound.grid), 2))
    exact = float(torch.linalg.matrix_norm(dense(conv, SIZE), 2))
    assert abs(sigma - circular) <= 1e-12 * circular
    assert exact <= sigma * (1 + 1e-12)


def test_the_grid_is_the_smallest_with_no_wrap_around():
    """``K = Eᵀ C E`` with ``E`` the zero embedding of the H × W image into the grid (per
    channel): exact on ``grid``, wrong on a grid one row smaller (a tap wraps around)."""
    conv = make(GEOMETRIES[0])  # 3 × 3, padding 1: the output has the input's size
    grid = _bound(conv).grid
    assert grid == (SIZE[0] + 1, SIZE[1] + 1)

    def restricted(grid):
        E = torch.zeros(grid[0], grid[1], SIZE[0], SIZE[1], dtype=torch.float64)
        for i in range(SIZE[0]):
            for j in range(SIZE[1]):
                E[i, j, i, j] = 1
        E = E.reshape(grid[0] * grid[1], SIZE[0] * SIZE[1])
        E_in, E_out = torch.block_diag(*[E] * conv.in_channels), torch.block_diag(*[E] * conv.out_channels)
        return E_out.T @ dense_circular(conv, grid) @ E_in

    torch.testing.assert_close(restricted(grid), dense(conv, SIZE), rtol=0, atol=1e-14)
    assert not torch.allclose(restricted((grid[0] - 1, grid[1])), dense(conv, SIZE))


@pytest.mark.parametrize("spec", GEOMETRIES)
def test_gradient_of_the_bounded_weight_passes_gradcheck(spec):
    """``W ↦ W γ / max(σ(W), γ)`` with the bound active: every perturbed weight refreshes σ,
    and the analytic gradient (σ linear in W with the direction held) matches."""
    conv = make(spec)
    bound = _bound(conv, gamma=0.5 * circulant_norm(conv, SIZE))
    W = conv.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: bound(w), (W,))


def test_a_trained_cell_keeps_the_operator_norm_below_the_bound():
    """Adam steps that push ``‖A ⋆ ·‖₂`` up: after every step the dense operator's norm is at
    most γ (the bound is never violated, not only at convergence of an iteration)."""
    torch.manual_seed(0)
    cell = inn.maps.ConvCell(2, 3, (5, 5), contraction=0.8).double()
    assert isinstance(cell.A.parametrizations.weight[0], CirculantConvBound)
    opt = torch.optim.Adam(cell.parameters(), lr=5e-2)
    z = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for _ in range(20):
        opt.zero_grad()
        (-F.conv2d(z, cell.A.weight, padding=1).square().sum()).backward()
        opt.step()
        with torch.no_grad():
            probe = nn.Conv2d(3, 3, 3, padding=1, bias=False).double()
            probe.weight.copy_(cell.A.weight)
        assert float(torch.linalg.matrix_norm(dense(probe, (5, 5)), 2)) <= 0.8 * (1 + 1e-12)
    assert circulant_norm(probe, (5, 5)) == pytest.approx(0.8, rel=1e-12)  # the bound is active


def test_a_refresh_checks_the_last_maximiser_and_falls_back_to_the_eigensolve(monkeypatch):
    """After a small step the last maximising frequency is certified by Cholesky factorisations
    (no batched eigensolve); after a jump to another kernel the certificate fails and the
    eigensolve finds the new maximiser.  Both give the σ of a fresh bound to 1e-12.  (A tie,
    e.g. the aliased frequencies of a dilated kernel, fails the certificate every time.)"""
    conv = conv_circulant_norm(make(GEOMETRIES[0]), bound=0.1, input_shape=SIZE)
    bound, original = conv.parametrizations.weight[0], conv.parametrizations.weight.original

    def sigma():
        return float(bound.estimate(original.detach()))

    def fresh():
        return float(_bound(_plain(conv)).sigma(original.detach()))

    calls = []
    top = CirculantConvBound._top
    monkeypatch.setattr(CirculantConvBound, "_top", staticmethod(lambda gram: calls.append(1) or top(gram)))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        original.add_(1e-3 * torch.randn(original.shape, dtype=torch.float64, generator=generator))
    _ = conv.weight
    assert calls == []  # certified
    assert sigma() == pytest.approx(fresh(), rel=1e-12)
    calls.clear()
    with torch.no_grad():
        original.copy_(make(GEOMETRIES[0], seed=11).weight)
    _ = conv.weight
    assert calls == [1]  # not certified: the eigensolve
    assert sigma() == pytest.approx(fresh(), rel=1e-12)


def _plain(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain copy of ``conv`` whose weight is the parametrized one's unconstrained value."""
    plain = make(GEOMETRIES[0])
    with torch.no_grad():
        plain.weight.copy_(conv.parametrizations.weight.original)
    return plain


def test_conjugate_twins_are_dropped():
    """Ŵ(−ω) = conj Ŵ(ω): of rfft2's half plane only the frequencies without a twin in it are
    kept (on a 7 × 7 grid: 7 × 4 − 3 per group)."""
    conv = make(GEOMETRIES[3])  # 'same' 1 × 3 kernel on 7 × 6 maps: a 7 × 7 grid
    bound = _bound(conv)
    assert bound.grid == (7, 7) and bound._frequencies.numel() == 7 * 4 - 3


def test_an_unchanged_weight_is_not_refreshed_and_a_saved_one_loads_exactly():
    conv = conv_circulant_norm(make(GEOMETRIES[0]), bound=0.5, input_shape=SIZE)
    bound = conv.parametrizations.weight[0]
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(1.5)
    first = conv.weight
    assert bound.last_iterations == 1  # one eigensolve
    assert torch.equal(conv.weight, first) and bound.last_iterations == 0
    clone = conv_circulant_norm(make(GEOMETRIES[0], seed=7), bound=0.5, input_shape=SIZE)
    clone.load_state_dict(conv.state_dict())
    assert torch.equal(clone.weight, first)


def test_the_compiled_refresh_is_the_eager_one():
    """Traced by ``torch.compile(fullgraph=True)`` the refresh always runs the eigensolve (no
    host read), eagerly it certifies the last maximiser: after a weight change the compiled
    bounded weight equals the eager one, and an unchanged weight keeps the buffer bit for bit."""
    eager = conv_circulant_norm(make(GEOMETRIES[2]), bound=0.5, input_shape=SIZE)
    compiled_conv = conv_circulant_norm(make(GEOMETRIES[2]), bound=0.5, input_shape=SIZE)
    torch._dynamo.reset()
    weight = torch.compile(lambda: compiled_conv.weight, backend="aot_eager", fullgraph=True)
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        nudge = 0.1 * torch.randn(eager.weight.shape, dtype=torch.float64, generator=generator)
        with torch.no_grad():
            eager.parametrizations.weight.original.add_(nudge)
            compiled_conv.parametrizations.weight.original.add_(nudge)
        torch.testing.assert_close(weight(), eager.weight, rtol=1e-13, atol=0)
        direction = compiled_conv.parametrizations.weight[0]._direction.clone()
        weight()
        assert torch.equal(compiled_conv.parametrizations.weight[0]._direction, direction)


def test_float32_matches_float64():
    conv = make(GEOMETRIES[0])
    sigma64 = circulant_norm(conv, SIZE)
    assert circulant_norm(conv.float(), SIZE) == pytest.approx(sigma64, rel=1e-6)


def test_a_nan_weight_raises_eagerly_and_propagates_when_compiled():
    conv = conv_circulant_norm(make(GEOMETRIES[0]), bound=0.5, input_shape=SIZE)
    with torch.no_grad():
        conv.parametrizations.weight.original[0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        _ = conv.weight
    torch._dynamo.reset()
    weight = torch.compile(lambda: conv.weight, backend="aot_eager", fullgraph=True)()
    assert torch.isnan(weight).all()


@pytest.mark.parametrize("norm_bound, kind", [(inn.conv_circulant_norm, CirculantConvBound),
                                              (inn.conv_spectral_norm, ConvOperatorBound)])
def test_conv_cell_registers_the_bound_it_is_given(norm_bound, kind):
    cell = inn.maps.ConvCell(2, 3, (5, 5), norm_bound=norm_bound)
    assert isinstance(cell.A.parametrizations.weight[0], kind)


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda: conv_circulant_norm(nn.Linear(3, 3), input_shape=SIZE), "conv_circulant_norm: expected an nn.Conv2d"),
        (lambda: conv_circulant_norm(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), input_shape=SIZE),
         "padding_mode"),
        (lambda: conv_circulant_norm(nn.Conv2d(2, 2, 3), bound=-1.0, input_shape=SIZE),
         "bound must be a finite number > 0"),
        (lambda: conv_circulant_norm(nn.Conv2d(2, 2, 3), input_shape=(3, 7, 6)), "input_shape"),
        (lambda: conv_circulant_norm(nn.Conv2d(2, 2, 5), input_shape=(3, 3)), "too small for the kernel"),
        (lambda: conv_circulant_norm(nn.Conv2d(2, 2, 3), "bias", input_shape=SIZE), "4-d"),
        (lambda: inn.maps.ConvCell(2, 3, (5, 5), norm_bound="circulant"), "norm_bound must be a function"),
    ],
)
def test_bad_arguments_raise(make_bad, message):
    with pytest.raises(ValueError, match=message):
        make_bad()
