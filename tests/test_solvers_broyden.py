"""The Broyden forward solver: fixed points, iteration counts, every backward mode, tuple
states, autocast (float64 where numerical)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_gradients import EXACT_MODES, dense_reference, make_cell
from test_open_core import MODES as TUPLE_MODES
from test_open_core import Coupled, coupled_reference

import implicitnets as inn
from implicitnets import linear


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.usefixtures("float64")
def test_fixed_point_equals_fixed_point_iteration_on_a_contraction(device):
    cell = make_cell(q=0.9).to(device)
    x = torch.randn(4, 5).to(device)
    g = lambda z: cell(z, x)
    with torch.no_grad():
        ref, s_fp = inn.FixedPointIteration(max_iter=2000, tol=1e-15).solve(g, torch.zeros(4, 6, device=device))
        z, s_b = inn.Broyden(max_iter=200, tol=1e-13).solve(g, torch.zeros(4, 6, device=device))
    assert s_fp.converged and s_b.converged and s_b.residual <= 1e-13
    assert _rel(z, ref) <= 1e-10
    assert s_b.iterations < s_fp.iterations


def _symmetric(n: int, q: float, spectrum: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if spectrum == "[-q, q]":
        G = torch.randn(n, n, generator=g)
        M = (G + G.T) / 2
        return M * (q / torch.linalg.matrix_norm(M, 2))
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return (Q * torch.linspace(0.0, q, n)) @ Q.T


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("spectrum", ["[-q, q]", "[0, q]"])
def test_fewer_iterations_than_fixed_point_iteration_on_a_hard_linear_contraction(spectrum, device):
    M = _symmetric(100, 0.99, spectrum).to(device)
    b = torch.randn(8, 100, generator=torch.Generator().manual_seed(1)).to(device)
    g = lambda z: z @ M + b
    with torch.no_grad():
        _, fp = inn.FixedPointIteration(max_iter=5000, tol=1e-8).solve(g, torch.zeros_like(b))
        z, br = inn.Broyden(max_iter=5000, tol=1e-8, memory=10).solve(g, torch.zeros_like(b))
    exact = torch.linalg.solve(torch.eye(100, device=device) - M.T, b.T).T
    assert fp.converged and br.converged
    assert 3 * br.iterations <= fp.iterations, (fp.iterations, br.iterations)
    assert _rel(z, exact) <= 1e-8 / (1 - 0.99)


@pytest.mark.usefixtures("float64")
def test_in_place_history_equals_the_autograd_path(device):
    cell = make_cell(q=0.95).to(device)
    x = torch.randn(5, 5).to(device)
    solver = inn.Broyden(max_iter=30, tol=0.0, memory=4)  # restarts along the way
    with torch.no_grad():
        fast, s_fast = solver.solve(lambda z: cell(z, x), torch.zeros(5, 6, device=device))
    slow, s_slow = solver.solve(lambda z: cell(z, x), torch.zeros(5, 6, device=device))
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-14)
    assert s_fast.residual == pytest.approx(s_slow.residual, rel=1e-9)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("grad", [False, True], ids=["in-place", "autograd"])
def test_a_sample_at_its_fixed_point_takes_plain_steps(grad, device):
    """Sample 0 starts at its exact fixed point: its residual, residual change and the
    update's denominator are exactly zero.  It stays there, without NaN, and the others
    converge as they would alone."""
    x = torch.randn(4, 3).to(device)
    x[0] = 0.0
    f = lambda z: torch.tanh(0.5 * z + x)
    with torch.set_grad_enabled(grad):
        z, stats = inn.Broyden(max_iter=60, tol=1e-13, memory=5).solve(f, torch.zeros(4, 3, device=device))
        alone, _ = inn.Broyden(max_iter=60, tol=1e-13, memory=5).solve(lambda w: f(torch.cat([w[:1] * 0, w]))[1:],
                                                                        torch.zeros(3, 3, device=device))
    assert torch.isfinite(z).all() and stats.converged
    assert bool((z[0] == 0).all())
    torch.testing.assert_close(z[1:], alone, rtol=1e-12, atol=1e-14)


MODES = [*EXACT_MODES, inn.ITD(truncate=40)]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("backward", MODES, ids=repr)
def test_every_backward_mode_through_a_layer_matches_the_dense_gradient(backward, device):
    cell = make_cell().to(device)
    x, R = torch.randn(3, 5).to(device), torch.randn(3, 6).to(device)
    layer = inn.FixedPointLayer(cell, solver=inn.Broyden(max_iter=200, tol=1e-14), backward=backward)
    xr = x.clone().requires_grad_()
    grads = torch.autograd.grad((R * layer(xr)).sum(), [cell.A.weight, cell.B.weight, cell.B.bias, xr])
    assert layer.stats.converged
    for g, r in zip(grads, dense_reference(cell, x, R)):
        assert _rel(g, r) <= 1e-8


def test_jacobian_free_gradient_is_one_step(device):
    cell = make_cell(q=0.9).to(device)
    x = torch.randn(3, 5).to(device)
    layer = inn.FixedPointLayer(cell, solver=inn.Broyden(max_iter=100, tol=1e-6), backward=inn.JacobianFree())
    out = layer(x)
    assert out.requires_grad and layer.stats.converged
    (out.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("backward", TUPLE_MODES, ids=repr)
def test_tuple_state_matches_the_dense_gradient(backward, device):
    f = Coupled().to(device)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(device)
    R = (torch.randn(3, 3).to(device), torch.randn(3, 2, 2).to(device))
    xr = x.clone().requires_grad_()
    w, stats = inn.fixed_point(f, xr, solver=inn.Broyden(max_iter=200, tol=1e-14), backward=backward)
    assert isinstance(w, tuple) and [t.shape for t in w] == [r.shape for r in R] and stats.converged
    grads = torch.autograd.grad(sum((r * t).sum() for r, t in zip(R, w)), [*f.parameters(), xr])
    for g, r in zip(grads, coupled_reference(f, x, R)):
        assert _rel(g, r) <= 1e-9


@pytest.mark.parametrize("backward", [inn.ITD(), inn.JacobianFree(), inn.AID(linear.GMRES(max_iter=20, tol=0.0))],
                         ids=repr)
def test_bfloat16_autocast(backward, device):
    torch.manual_seed(0)
    cell = inn.maps.TanhMap(16, 24, contraction=0.7).to(device)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(device)
    solver = inn.Broyden(max_iter=20, tol=0.0)
    weights = torch.linspace(-1, 1, 24, device=device)
    x32 = x.clone().requires_grad_()
    ref = inn.FixedPointLayer(cell, solver=solver, backward=backward)(x32)
    (ref * weights).sum().backward()
    layer = inn.FixedPointLayer(cell, solver=solver, backward=backward)
    xr = x.clone().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = layer(xr)
    assert out.dtype == torch.bfloat16 and layer.stats.iterations == 20
    assert _rel(out, ref) < 0.03
    (out.float() * weights).sum().backward()
    assert xr.grad.dtype == torch.float32 and torch.isfinite(xr.grad).all()
    # ITD differentiates the quasi-Newton updates, built from residuals at bfloat16's rounding
    # level: finite, not accurate (as for Anderson); the other modes keep bfloat16 accuracy
    if not isinstance(backward, inn.ITD):
        assert _rel(xr.grad, x32.grad) < 0.06


def test_bookkeeping_is_float32_under_autocast(device):
    torch.manual_seed(0)
    cell = inn.maps.TanhMap(16, 24, contraction=0.7).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16), torch.no_grad():
        w, stats = inn.fixed_point(cell, torch.randn(4, 16).to(device), solver=inn.Broyden(max_iter=40, tol=1e-2),
                                   backward=inn.JacobianFree())
    assert w.dtype == torch.bfloat16 and stats.converged and stats.residual <= 1e-2


def test_non_convergence_warns_and_raise_policy_raises(device):
    cell = make_cell(q=0.9).to(device)
    x = torch.randn(3, 5).to(device)
    with pytest.warns(inn.ConvergenceWarning, match="Broyden did not converge"):
        inn.Broyden(max_iter=2, tol=1e-12).solve(lambda z: cell(z, x), torch.zeros(3, 6, device=device))
    with pytest.raises(inn.ConvergenceError, match="Broyden did not converge"):
        inn.Broyden(max_iter=2, tol=1e-12, on_failure=inn.Raise()).solve(lambda z: cell(z, x),
                                                                          torch.zeros(3, 6, device=device))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inn.Broyden(max_iter=100, tol=1e-5).solve(lambda z: cell(z, x), torch.zeros(3, 6, device=device))


def test_exported():
    assert "Broyden" in inn.__all__ and inn.Broyden is inn.solvers.Broyden
    assert isinstance(inn.Broyden(), inn.ForwardSolver)


@pytest.mark.parametrize(
    "kwargs",
    [dict(memory=0), dict(memory=2.5), dict(memory=True), dict(max_iter=0), dict(tol=-1.0), dict(check_every=0),
     dict(on_failure="warn"), dict(freeze_converged="no"), dict(return_best=1)],
    ids=repr,
)
def test_invalid_options_raise(kwargs):
    with pytest.raises(ValueError, match="Broyden: "):
        inn.Broyden(**kwargs)
