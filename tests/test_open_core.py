"""The open protocols, tuple states, input errors and truncated-ITD statistics (float64)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import implicitnets as inn
from implicitnets import linear

pytestmark = pytest.mark.usefixtures("float64")

TIGHT = inn.FixedPointIteration(max_iter=500, tol=1e-14)


class Coupled(nn.Module):
    """A two-part state ``(a, b)``, ``a`` of shape (n, 3) and ``b`` of shape (n, 2, 2):

    ``a ← tanh(A a + P vec(b) + U x)``, ``b ← tanh(reshape(Q a) + 0.3 b + V x)``; the
    parts are coupled both ways, the whole map is a contraction (small weights)."""

    def __init__(self, seed: int = 0, features: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: nn.Parameter(0.3 * torch.randn(*s, generator=g))
        self.A, self.P, self.U = r(3, 3), r(3, 4), r(3, features)
        self.Q, self.V = r(4, 3), r(4, features)

    def forward(self, w: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = w
        n = a.shape[0]
        a_new = torch.tanh(a @ self.A.T + b.reshape(n, 4) @ self.P.T + x @ self.U.T)
        b_new = torch.tanh((a @ self.Q.T).reshape(n, 2, 2) + 0.3 * b + (x @ self.V.T).reshape(n, 2, 2))
        return a_new, b_new

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_zeros(x.shape[0], 3), x.new_zeros(x.shape[0], 2, 2)


def _flat(w):
    return torch.cat([t.reshape(-1) for t in w])


def _unflat(v, like):
    sizes = [t.numel() for t in like]
    return tuple(c.reshape(t.shape) for c, t in zip(torch.split(v, sizes), like))


def coupled_reference(f: Coupled, x: torch.Tensor, R: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Gradients of ``E = Σ <R_i, w*_i>`` w.r.t. the parameters and ``x`` by the IFT."""
    with torch.no_grad():
        w, _ = TIGHT.solve(lambda z: f(z, x), f.initial_state(x))
    J = torch.func.jacrev(lambda v: _flat(f(_unflat(v, w), x)))(_flat(w)).detach()
    v = torch.linalg.solve((torch.eye(J.shape[0], device=J.device) - J).T, _flat(R))
    xr = x.detach().requires_grad_()
    out = (v * _flat(f(w, xr))).sum()
    return list(torch.autograd.grad(out, [*f.parameters(), xr]))


def _grads(f, x, R, solver, backward):
    xr = x.detach().requires_grad_()
    w, stats = inn.fixed_point(f, xr, solver=solver, backward=backward)
    assert isinstance(w, tuple) and [t.shape for t in w] == [r.shape for r in R]
    E = sum((r * t).sum() for r, t in zip(R, w))
    return list(torch.autograd.grad(E, [*f.parameters(), xr])), stats


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


MODES = [
    inn.ITD(),
    inn.ITD(truncate=200),
    inn.AID(linear.Neumann(max_iter=300, tol=1e-14)),
    inn.AID(linear.NormalCG(max_iter=200, tol=1e-14)),
    inn.AID(linear.GMRES(max_iter=100, tol=1e-14, restart=30)),
    inn.AID(linear.Exact()),
]
SOLVERS = [TIGHT, inn.Anderson(max_iter=200, tol=1e-14, memory=5)]


@pytest.mark.parametrize("backward", MODES, ids=repr)
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_tuple_state_matches_dense_implicit_gradient(solver, backward):
    f = Coupled()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    R = (torch.randn(3, 3), torch.randn(3, 2, 2))
    grads, stats = _grads(f, x, R, solver, backward)
    ref = coupled_reference(f, x, R)
    assert stats.converged
    for g, r in zip(grads, ref):
        assert _rel(g, r) < 1e-9


def test_tuple_state_jacobian_free_is_one_step():
    f = Coupled()
    x = torch.randn(2, 4)
    R = (torch.randn(2, 3), torch.randn(2, 2, 2))
    grads, _ = _grads(f, x, R, TIGHT, inn.JacobianFree())
    with torch.no_grad():
        w, _ = TIGHT.solve(lambda z: f(z, x), f.initial_state(x))
    xr = x.detach().requires_grad_()
    out = sum((r * t).sum() for r, t in zip(R, f(w, xr)))  # v = R: one step through Φ
    for g, r in zip(grads, torch.autograd.grad(out, [*f.parameters(), xr])):
        assert _rel(g, r) < 1e-12


def test_tuple_state_list_z0_and_mismatched_batch():
    f = Coupled()
    x = torch.randn(2, 4)
    w, _ = inn.fixed_point(f, x, solver=TIGHT, backward=inn.ITD(), z0=list(f.initial_state(x)))
    assert isinstance(w, tuple)
    bad = (x.new_zeros(2, 3), x.new_zeros(3, 2, 2))
    with pytest.raises(ValueError, match="z0 has shape"):
        inn.fixed_point(f, x, solver=inn.Anderson(), backward=inn.ITD(), z0=bad)
    with pytest.raises(ValueError, match="batch"):  # a plain callable: Anderson's per-sample rows
        inn.fixed_point(lambda w, x: w, x, solver=inn.Anderson(), backward=inn.ITD(), z0=bad)


# --- user-defined extensions -------------------------------------------------------------


@dataclass(frozen=True)
class Halving(inn.ForwardSolver):
    """A user's solver: z ← (z + g(z)) / 2, stopping on the largest absolute change."""

    max_iter: int = 2000
    tol: float = 1e-15

    def solve(self, g, z0):
        z, k = z0, 0
        while k < self.max_iter:
            z_new = 0.5 * (z + g(z))
            change = float((z_new - z).detach().abs().max())
            z, k = z_new, k + 1
            if self.tol > 0 and change <= self.tol:
                break
        return z, inn.SolverStats(iterations=k, residual=change, converged=change <= self.tol)


class DenseSolve(linear.LinearSolver):
    """A user's linear solver: build A from op.mv on the basis vectors, solve densely."""

    def __init__(self) -> None:
        self.calls = 0

    def solve(self, op, b, x0=None):
        self.calls += 1
        n = b.numel()
        eye = torch.eye(n, dtype=b.dtype)
        A = torch.stack([op.mv(eye[i].reshape(b.shape)).reshape(-1) for i in range(n)], 1)
        x = torch.linalg.solve(A, b.reshape(-1)).reshape(b.shape)
        residual = float(torch.linalg.vector_norm(b - op.mv(x)) / torch.linalg.vector_norm(b))
        return x, linear.LinearInfo(n, residual, residual < 1e-10)


@dataclass(frozen=True)
class ZeroGradient(inn.FailurePolicy):
    """A user's policy: a failed adjoint solve contributes no gradient, and says so."""

    def adjoint_failed(self, failure):
        return inn.Resolution(torch.zeros_like(failure.g), fallback="zero")


def _tanh_problem():
    from test_gradients import dense_reference, make_cell

    cell = make_cell()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    R = torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    return cell, x, R, dense_reference(cell, x, R)


def _layer_grads(cell, x, R, solver, backward):
    layer = inn.FixedPointLayer(cell, solver=solver, backward=backward)
    xr = x.detach().requires_grad_()
    (R * layer(xr)).sum().backward()
    grads = [cell.A.weight.grad, cell.B.weight.grad, cell.B.bias.grad, xr.grad]
    return grads, layer


def test_user_forward_solver_in_a_layer():
    cell, x, R, ref = _tanh_problem()
    for backward in (inn.ITD(), inn.AID(linear.GMRES(max_iter=60, tol=1e-14))):
        cell.zero_grad()
        grads, layer = _layer_grads(cell, x, R, Halving(), backward)
        assert layer.stats.converged
        for g, r in zip(grads, ref):
            assert _rel(g, r) < 1e-9


def test_user_dataclass_solver_with_truncated_itd():
    cell, x, R, ref = _tanh_problem()
    grads, layer = _layer_grads(cell, x, R, Halving(max_iter=400, tol=0.0), inn.ITD(truncate=300))
    assert layer.stats.iterations == 400
    assert _rel(grads[0], ref[0]) < 1e-8


def test_user_linear_solver_in_aid():
    cell, x, R, ref = _tanh_problem()
    solver = DenseSolve()
    grads, layer = _layer_grads(cell, x, R, TIGHT, inn.AID(solver))
    assert solver.calls == 1 and layer.stats.backward.converged
    for g, r in zip(grads, ref):
        assert _rel(g, r) < 1e-9


def test_user_failure_policy_in_aid():
    cell, x, R, _ = _tanh_problem()
    starved = inn.AID(linear.Neumann(max_iter=1, tol=1e-14), on_failure=ZeroGradient())
    grads, layer = _layer_grads(cell, x, R, TIGHT, starved)
    assert layer.stats.backward.fallback == "zero" and layer.stats.backward.converged is False
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_user_failure_policy_on_forward():
    class Loud(ZeroGradient):
        def forward_failed(self, message):
            raise KeyError(message)

    cell, x, _, _ = _tanh_problem()
    with pytest.raises(KeyError, match="did not converge"):
        inn.fixed_point(cell, x, solver=inn.FixedPointIteration(max_iter=2, tol=1e-14, on_failure=Loud()),
                        backward=inn.ITD())


def test_options_are_checked_by_base_class():
    cell = inn.maps.TanhMap(5, 6)
    with pytest.raises(ValueError, match="ForwardSolver"):
        inn.FixedPointLayer(cell, solver=object(), backward=inn.ITD())
    with pytest.raises(ValueError, match="BackwardMode"):
        inn.FixedPointLayer(cell, solver=TIGHT, backward=linear.GMRES())
    with pytest.raises(ValueError, match="LinearSolver"):
        inn.AID(lambda op, b: b)
    with pytest.raises(ValueError, match="FailurePolicy"):
        inn.AID(linear.GMRES(), on_failure="raise")
    with pytest.raises(ValueError, match="FailurePolicy"):
        inn.Anderson(on_failure=True)
    with pytest.raises(TypeError):
        inn.ForwardSolver()  # abstract


# --- warm start, errors, statistics ------------------------------------------------------


def test_aid_warm_start_reuses_previous_adjoint():
    cell, x, R, ref = _tanh_problem()
    backward = inn.AID(linear.GMRES(max_iter=60, tol=1e-12), warm_start=True)
    layer = inn.FixedPointLayer(cell, solver=TIGHT, backward=backward)
    iterations = []
    for _ in range(2):
        cell.zero_grad()
        (R * layer(x)).sum().backward()
        iterations.append(layer.stats.backward.iterations)
        assert layer.stats.backward.adjoint is not None
    assert iterations[1] < iterations[0]
    assert _rel(cell.A.weight.grad, ref[0]) < 1e-9


def test_input_errors_name_both_sides():
    cell = inn.maps.TanhMap(5, 6)  # float64 weights (default dtype)
    solver, mode = inn.FixedPointIteration(), inn.ITD()
    with pytest.raises(ValueError, match=r"float32.*float64"):
        inn.fixed_point(cell, torch.randn(2, 5, dtype=torch.float32), solver=solver, backward=mode)
    with pytest.raises(ValueError, match="floating-point"):
        inn.fixed_point(cell, torch.ones(2, 5, dtype=torch.int64), solver=solver, backward=mode)
    with pytest.raises(ValueError, match=r"z0 has shape \[\(2, 7\)\].*\[\(2, 6\)\]"):
        inn.fixed_point(cell, torch.randn(2, 5), solver=solver, backward=mode, z0=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="tensor or a tuple"):
        inn.fixed_point(cell, torch.randn(2, 5), solver=solver, backward=mode, z0="zeros")


def test_truncated_itd_reports_whole_solve():
    torch.manual_seed(0)
    cell = inn.maps.TanhMap(5, 6, contraction=None)
    with torch.no_grad():
        cell.A.weight.copy_(-3.0 * torch.eye(6))  # expansive at its fixed point: FP ends in a 2-cycle
        cell.B.weight.zero_()
        cell.B.bias.fill_(0.01)
    x = torch.randn(2, 5, requires_grad=True)
    solver = inn.FixedPointIteration(max_iter=30, tol=1e-10)
    with pytest.warns(inn.ConvergenceWarning, match="did not converge"):
        _, stats = inn.fixed_point(cell, x, solver=solver, backward=inn.ITD(truncate=5))
    assert stats.converged is False and stats.iterations == 30
    assert stats.sample_converged.tolist() == [False, False] and stats.sample_iterations.tolist() == [30, 30]
    with pytest.raises(inn.ConvergenceError):
        inn.fixed_point(cell, x, solver=inn.FixedPointIteration(max_iter=30, tol=1e-10, on_failure=inn.Raise()),
                        backward=inn.ITD(truncate=5))
    # a converging problem: the tail of 5 exact steps keeps converged True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, ok = inn.fixed_point(inn.maps.TanhMap(5, 6), x, solver=inn.FixedPointIteration(max_iter=200, tol=1e-8),
                                backward=inn.ITD(truncate=5))
    assert ok.converged and bool(ok.sample_converged.all()) and bool((ok.sample_residual <= 1e-8).all())


def test_tuple_input_matches_dense_implicit_gradient_in_every_mode():
    """An input made of two tensors (x, s): w = tanh(A w + U x + s); gradients w.r.t. both
    parts and the parameters against the implicit function theorem."""
    g = torch.Generator().manual_seed(3)
    A = 0.4 * torch.randn(5, 5, generator=g) / 5**0.5
    U = torch.randn(5, 4, generator=g)
    f = lambda w, xs: torch.tanh(w @ A.T + xs[0] @ U.T + xs[1])
    x, s = torch.randn(3, 4, generator=g), torch.randn(3, 5, generator=g)
    R = torch.randn(3, 5, generator=g)
    with torch.no_grad():
        w, _ = TIGHT.solve(lambda z: f(z, (x, s)), torch.zeros(3, 5))
    J = torch.func.jacrev(lambda v: f(v.reshape(3, 5), (x, s)).reshape(-1))(w.reshape(-1))
    v = torch.linalg.solve((torch.eye(15) - J).T, R.reshape(-1))
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
    want = torch.autograd.grad((v * f(w, (xr, sr)).reshape(-1)).sum(), (xr, sr))
    for backward in (inn.ITD(), inn.AID(linear.GMRES(max_iter=60, tol=1e-13)), inn.AID(linear.Exact())):
        xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
        out, _ = inn.fixed_point(f, [xr, sr], solver=TIGHT, backward=backward, z0=torch.zeros(3, 5))
        got = torch.autograd.grad((R * out).sum(), (xr, sr))
        for a, b in zip(got, want):
            assert _rel(a, b) < 1e-9, backward
    with pytest.raises(ValueError, match="pass z0"):
        inn.fixed_point(f, (x, s), solver=TIGHT, backward=inn.ITD())
    with pytest.raises(ValueError, match="floating-point"):
        inn.fixed_point(f, (x, s.long()), solver=TIGHT, backward=inn.ITD(), z0=torch.zeros(3, 5))


@pytest.mark.parametrize("solver", [inn.FixedPointIteration(max_iter=7, tol=0.0), inn.Anderson(max_iter=7, tol=0.0)],
                         ids=lambda s: type(s).__name__)
def test_forward_value_does_not_depend_on_the_backward_mode(solver):
    """Unconverged on purpose (7 steps): every mode returns the same w_t, the solver's.
    (Truncated ITD splits the solve in two, which restarts Anderson's history: it is the
    same computation only for the memoryless fixed-point iteration.)"""
    cell, x, _, _ = _tanh_problem()
    with torch.no_grad():
        want, _ = solver.solve(lambda z: cell.step(z, cell.inject(x)), cell.initial_state(x))
    modes = [inn.ITD(), inn.AID(linear.GMRES()), inn.JacobianFree()]
    if isinstance(solver, inn.FixedPointIteration):
        modes.append(inn.ITD(truncate=3))
    for backward in modes:
        out, _ = inn.fixed_point(cell, x.clone().requires_grad_(), solver=solver, backward=backward)
        assert torch.allclose(out, want, rtol=0, atol=1e-15), backward
