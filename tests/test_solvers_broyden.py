"""The Broyden forward solver: fixed points, iteration counts, every backward mode, tuple
states, autocast (float64 where numerical)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import implicitnets as inn
from implicitnets import linear


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _tanh_cell(seed: int = 0, q: float = 0.9, in_features: int = 5, width: int = 7) -> inn.maps.TanhMap:
    torch.manual_seed(seed)
    cell = inn.maps.TanhMap(in_features, width, contraction=None)
    with torch.no_grad():
        A = torch.randn(width, width)
        cell.A.weight.copy_(q * A / torch.linalg.matrix_norm(A, 2))
        cell.B.bias.normal_()
    return cell


@pytest.mark.usefixtures("float64")
def test_fixed_point_equals_fixed_point_iteration_on_a_contraction():
    cell = _tanh_cell()
    x = torch.randn(4, 5)
    g = lambda z: cell(z, x)  # noqa: E731
    with torch.no_grad():
        ref, s_fp = inn.FixedPointIteration(max_iter=2000, tol=1e-15).solve(g, torch.zeros(4, 7))
        z, s_b = inn.Broyden(max_iter=200, tol=1e-13).solve(g, torch.zeros(4, 7))
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
def test_fewer_iterations_than_fixed_point_iteration_on_a_hard_linear_contraction(spectrum):
    M = _symmetric(100, 0.99, spectrum)
    b = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    g = lambda z: z @ M + b  # noqa: E731
    with torch.no_grad():
        _, fp = inn.FixedPointIteration(max_iter=5000, tol=1e-8).solve(g, torch.zeros_like(b))
        z, br = inn.Broyden(max_iter=5000, tol=1e-8, memory=10).solve(g, torch.zeros_like(b))
    exact = torch.linalg.solve(torch.eye(100) - M.T, b.T).T
    assert fp.converged and br.converged
    assert 3 * br.iterations <= fp.iterations, (fp.iterations, br.iterations)
    assert _rel(z, exact) <= 1e-8 / (1 - 0.99)


@pytest.mark.usefixtures("float64")
def test_in_place_history_equals_the_autograd_path():
    cell = _tanh_cell(q=0.95)
    x = torch.randn(5, 5)
    solver = inn.Broyden(max_iter=30, tol=0.0, memory=4)  # restarts along the way
    with torch.no_grad():
        fast, s_fast = solver.solve(lambda z: cell(z, x), torch.zeros(5, 7))
    slow, s_slow = solver.solve(lambda z: cell(z, x), torch.zeros(5, 7))
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-14)
    assert s_fast.residual == pytest.approx(s_slow.residual, rel=1e-9)


@pytest.mark.parametrize("grad", [False, True], ids=["in-place", "autograd"])
def test_samples_that_converge_exactly_take_plain_steps(grad):
    """Residuals that become exactly zero (float32, a fast contraction) make the update's
    denominator zero: no NaN, the fixed point is reached."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float32)
    f = lambda w, x: torch.tanh(0.5 * w + x)  # noqa: E731
    with torch.set_grad_enabled(grad):
        z, stats = inn.fixed_point(f, x, solver=inn.Broyden(max_iter=60, tol=1e-12, memory=5),
                                   backward=inn.ITD() if grad else inn.JacobianFree())
    assert torch.isfinite(z).all()
    assert torch.linalg.vector_norm(f(z, x) - z) <= 1e-6 * torch.linalg.vector_norm(z)


def _dense_reference(cell, x, R):
    with torch.no_grad():
        w, _ = inn.FixedPointIteration(max_iter=2000, tol=1e-15).solve(lambda z: cell(z, x), torch.zeros(x.shape[0], 7))
    J = torch.func.jacrev(lambda z: cell(z, x))(w).reshape(w.numel(), w.numel()).detach()
    v = torch.linalg.solve((torch.eye(w.numel()) - J).T, R.reshape(-1)).reshape(w.shape)
    xr = x.detach().requires_grad_()
    return list(torch.autograd.grad((v * cell(w, xr)).sum(), [cell.A.weight, cell.B.weight, cell.B.bias, xr]))


MODES = [
    inn.ITD(),
    inn.ITD(truncate=40),
    inn.AID(linear.Neumann(max_iter=400, tol=1e-14)),
    inn.AID(linear.NormalCG(max_iter=200, tol=1e-14)),
    inn.AID(linear.GMRES(max_iter=100, tol=1e-14, restart=30)),
    inn.AID(linear.Exact()),
]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("backward", MODES, ids=repr)
def test_every_backward_mode_through_a_layer_matches_the_dense_gradient(backward):
    cell = _tanh_cell(q=0.8)
    x, R = torch.randn(3, 5), torch.randn(3, 7)
    layer = inn.FixedPointLayer(cell, solver=inn.Broyden(max_iter=200, tol=1e-14), backward=backward)
    xr = x.clone().requires_grad_()
    grads = torch.autograd.grad((R * layer(xr)).sum(), [cell.A.weight, cell.B.weight, cell.B.bias, xr])
    assert layer.stats.converged
    for g, r in zip(grads, _dense_reference(cell, x, R)):
        assert _rel(g, r) <= 1e-8


def test_jacobian_free_gradient_is_one_step():
    cell = _tanh_cell()
    x = torch.randn(3, 5)
    layer = inn.FixedPointLayer(cell, solver=inn.Broyden(max_iter=100, tol=1e-6), backward=inn.JacobianFree())
    out = layer(x)
    assert out.requires_grad and layer.stats.converged
    (out.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())


class Coupled(nn.Module):
    """A two-part state ``(a, b)``: ``a`` (n, 3) and ``b`` (n, 2, 2), coupled both ways."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        r = lambda *s: nn.Parameter(0.4 * torch.randn(*s, generator=g, dtype=torch.float64))  # noqa: E731
        self.A, self.P, self.U, self.Q, self.V = r(3, 3), r(3, 4), r(3, 4), r(4, 3), r(4, 4)

    def forward(self, w, x):
        a, b = w
        n = a.shape[0]
        a_new = torch.tanh(a @ self.A.T + b.reshape(n, 4) @ self.P.T + x @ self.U.T)
        b_new = torch.tanh((a @ self.Q.T).reshape(n, 2, 2) + 0.3 * b + (x @ self.V.T).reshape(n, 2, 2))
        return a_new, b_new

    def initial_state(self, x):
        return x.new_zeros(x.shape[0], 3), x.new_zeros(x.shape[0], 2, 2)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("backward", [inn.ITD(), inn.AID(linear.GMRES(max_iter=60, tol=1e-14))], ids=repr)
def test_tuple_state_matches_the_dense_gradient(backward):
    f = Coupled()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    R = (torch.randn(3, 3), torch.randn(3, 2, 2))
    xr = x.clone().requires_grad_()
    w, stats = inn.fixed_point(f, xr, solver=inn.Broyden(max_iter=200, tol=1e-14), backward=backward)
    assert isinstance(w, tuple) and stats.converged
    grads = torch.autograd.grad(sum((r * t).sum() for r, t in zip(R, w)), [*f.parameters(), xr])
    flat = lambda s: torch.cat([t.reshape(-1) for t in s])  # noqa: E731
    with torch.no_grad():
        ws, _ = inn.FixedPointIteration(max_iter=2000, tol=1e-15).solve(lambda z: f(z, x), f.initial_state(x))

    def unflat(v):
        a, b = torch.split(v, [9, 12])
        return a.reshape(3, 3), b.reshape(3, 2, 2)

    J = torch.func.jacrev(lambda v: flat(f(unflat(v), x)))(flat(ws)).detach()
    v = torch.linalg.solve((torch.eye(J.shape[0]) - J).T, flat(R))
    x2 = x.detach().requires_grad_()
    ref = torch.autograd.grad((v * flat(f(ws, x2))).sum(), [*f.parameters(), x2])
    for g, r in zip(grads, ref):
        assert _rel(g, r) <= 1e-9


@pytest.mark.parametrize("backward", [inn.ITD(), inn.JacobianFree(), inn.AID(linear.GMRES(max_iter=20, tol=0.0))],
                         ids=repr)
def test_bfloat16_autocast(backward):
    torch.manual_seed(0)
    cell = inn.maps.TanhMap(16, 24, contraction=0.7)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    solver = inn.Broyden(max_iter=20, tol=0.0)
    weights = torch.linspace(-1, 1, 24)
    x32 = x.clone().requires_grad_()
    ref = inn.FixedPointLayer(cell, solver=solver, backward=backward)(x32)
    (ref * weights).sum().backward()
    layer = inn.FixedPointLayer(cell, solver=solver, backward=backward)
    xr = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(xr)
    assert out.dtype == torch.bfloat16 and layer.stats.iterations == 20
    assert _rel(out, ref) < 0.03
    (out.float() * weights).sum().backward()
    assert xr.grad.dtype == torch.float32 and torch.isfinite(xr.grad).all()
    # ITD differentiates the quasi-Newton updates, built from residuals at bfloat16's rounding
    # level: finite, not accurate (as for Anderson); the other modes keep bfloat16 accuracy
    if not isinstance(backward, inn.ITD):
        assert _rel(xr.grad, x32.grad) < 0.06


def test_bookkeeping_is_float32_under_autocast():
    torch.manual_seed(0)
    cell = inn.maps.TanhMap(16, 24, contraction=0.7)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        w, stats = inn.fixed_point(cell, torch.randn(4, 16), solver=inn.Broyden(max_iter=40, tol=1e-2),
                                   backward=inn.JacobianFree())
    assert w.dtype == torch.bfloat16 and stats.converged and stats.residual <= 1e-2


def test_non_convergence_warns_and_raise_policy_raises():
    cell = _tanh_cell(q=0.9)
    x = torch.randn(3, 5)
    with pytest.warns(inn.ConvergenceWarning, match="Broyden did not converge"):
        inn.Broyden(max_iter=2, tol=1e-12).solve(lambda z: cell(z, x), torch.zeros(3, 7))
    with pytest.raises(inn.ConvergenceError, match="Broyden did not converge"):
        inn.Broyden(max_iter=2, tol=1e-12, on_failure=inn.Raise()).solve(lambda z: cell(z, x), torch.zeros(3, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inn.Broyden(max_iter=100, tol=1e-5).solve(lambda z: cell(z, x), torch.zeros(3, 7))


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
