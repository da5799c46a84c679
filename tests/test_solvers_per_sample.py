"""Per-sample control of the forward solvers: per-sample statistics, ``freeze_converged``,
``return_best`` (float64 against per-sample solves and the dense implicit gradient)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_gradients import dense_reference, make_cell

import implicitnets as inn

pytestmark = pytest.mark.usefixtures("float64")

SOLVERS = [inn.FixedPointIteration, inn.Anderson, inn.Broyden]
TOL = 1e-11
N = 5  # state width


def _weights(device):
    """``A`` (‖A‖₂ = 1) and six input rows, drawn on the CPU and moved to ``device``."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(N, N, generator=g)
    return (A / torch.linalg.matrix_norm(A, 2)).to(device), torch.randn(6, N, generator=g).to(device)


class Rows:
    """A row-separable map ``z_b ↦ tanh(s_b A z_b + u_b)``; a sample with ``flip_b`` maps
    to ``−sign(z_b)`` instead, which has no fixed point (its relative residual stays ≥ 1).
    Counts the samples it is evaluated on."""

    def __init__(self, gains, flip=None, device=None):
        self.A, u = _weights(device)
        gains = torch.as_tensor(gains, dtype=torch.float64, device=device)
        flip = torch.zeros_like(gains) if flip is None else torch.as_tensor(flip, dtype=torch.float64, device=device)
        self.u = torch.cat([gains[:, None], flip[:, None], u[: len(gains)]], 1)
        self.rows = 0

    def step(self, z, v):
        self.rows += z.shape[0]
        smooth = torch.tanh(v[:, :1] * (z @ self.A.T) + v[:, 2:])
        return torch.where(v[:, 1:2] > 0, torch.where(z >= 0, -1.0, 1.0), smooth)

    def bound(self):
        return inn.BoundMap(self.step, self.u, self)

    def sample(self, b):
        """The map of sample ``b`` alone."""
        return inn.BoundMap(self.step, self.u[b : b + 1], self)


def _solve(solver, g, batch, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", inn.ConvergenceWarning)
        return solver.solve(g, torch.zeros(batch, N, device=device))


def _reference(rows: Rows, b: int) -> torch.Tensor:
    """Sample ``b`` solved on its own to machine precision."""
    z, stats = inn.FixedPointIteration(max_iter=5000, tol=1e-15).solve(rows.sample(b),
                                                                        torch.zeros(1, N, device=rows.u.device))
    assert stats.converged
    return z[0]


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ---------------------------------------------------------------- one bad sample
@pytest.mark.parametrize("freeze", [False, True], ids=["all", "freeze"])
@pytest.mark.parametrize("solver_cls", SOLVERS, ids=lambda c: c.__name__)
def test_a_sample_without_fixed_point_leaves_the_others_converged(solver_cls, freeze, device):
    gains = [0.3, 0.6, 0.9, 0.5, 0.95, 0.5]
    rows = Rows(gains, flip=[0, 0, 0, 1, 0, 0], device=device)
    solver = solver_cls(max_iter=200, tol=TOL, freeze_converged=freeze)
    with pytest.warns(inn.ConvergenceWarning, match="1 of 6 samples did not converge"):
        z, stats = solver.solve(rows.bound(), torch.zeros(6, N, device=device))
    assert stats.converged is False and stats.iterations == 200
    assert stats.sample_converged.tolist() == [True, True, True, False, True, True]
    assert stats.sample_residual[3] >= 1.0 and bool((stats.sample_residual[[0, 1, 2, 4, 5]] <= TOL).all())
    for b in (0, 1, 2, 4, 5):  # a q-contraction: error ≤ residual / (1 − q)
        assert _rel(z[b], _reference(rows, b)) <= 30 * TOL
    if freeze:
        assert stats.sample_iterations[3] == 200 and bool((stats.sample_iterations[[0, 1, 2, 4, 5]] < 200).all())
    else:
        assert stats.sample_iterations.tolist() == [200] * 6


def test_an_expansive_sample_oscillates_and_fails_alone(device):
    """Fixed-point iteration on a gain-3 tanh sample ends in a 2-cycle; the others converge."""
    rows = Rows([0.3, 0.6, 3.0, 0.9], device=device)
    rows.A = -torch.eye(N, device=device)  # tanh(−3 z + u): expansive at its fixed point
    z, stats = _solve(inn.FixedPointIteration(max_iter=300, tol=TOL, freeze_converged=True), rows.bound(), 4, device)
    assert stats.sample_converged.tolist() == [True, True, False, True]
    assert stats.sample_residual[2] > 0.1
    for b in (0, 1, 3):
        assert _rel(z[b], _reference(rows, b)) <= 10 * TOL


@pytest.mark.parametrize("solver_cls", SOLVERS, ids=lambda c: c.__name__)
def test_global_converged_keeps_its_meaning_without_the_options(solver_cls, device):
    rows = Rows([0.3, 0.6, 0.9, 0.5], device=device)
    z, stats = solver_cls(max_iter=300, tol=TOL).solve(rows.bound(), torch.zeros(4, N, device=device))
    assert stats.converged and stats.residual <= TOL and stats.residual == stats.trace[-1]
    for t in (stats.sample_residual, stats.sample_converged, stats.sample_iterations):
        assert t.shape == (4,) and not t.requires_grad and t.device == z.device
    assert stats.sample_residual.dtype == torch.float64 and stats.sample_iterations.dtype == torch.long
    assert stats.sample_converged.tolist() == (stats.sample_residual <= TOL).tolist()
    assert stats.sample_iterations.tolist() == [stats.iterations] * 4


def test_per_sample_and_whole_batch_residuals_of_the_last_step(device):
    """Replay fixed-point iteration: the statistics are the residuals of its last step."""
    rows = Rows([0.3, 0.6, 0.9, 0.5], device=device)
    g = rows.bound()
    z, stats = inn.FixedPointIteration(max_iter=7, tol=0.0).solve(g, torch.zeros(4, N, device=device))
    w = torch.zeros(4, N, device=device)
    for _ in range(6):
        w = g(w)
    fw = g(w)
    torch.testing.assert_close(z, fw, rtol=0, atol=0)
    whole = torch.linalg.vector_norm(fw - w) / torch.linalg.vector_norm(fw)
    each = torch.linalg.vector_norm(fw - w, dim=1) / torch.linalg.vector_norm(fw, dim=1)
    assert stats.residual == pytest.approx(float(whole), rel=1e-13)
    torch.testing.assert_close(stats.sample_residual, each, rtol=1e-13, atol=0)


# ---------------------------------------------------------------- freezing
@pytest.mark.parametrize("solver_cls", SOLVERS, ids=lambda c: c.__name__)
def test_freezing_gives_the_same_fixed_points_with_fewer_evaluations(solver_cls, device):
    gains = [0.3, 0.5, 0.7, 0.8, 0.9, 0.97]
    dense, frozen = Rows(gains, device=device), Rows(gains, device=device)
    z0 = torch.zeros(6, N, device=device)
    z_all, s_all = solver_cls(max_iter=2000, tol=TOL).solve(dense.bound(), z0)
    z_frz, s_frz = solver_cls(max_iter=2000, tol=TOL, freeze_converged=True).solve(frozen.bound(), z0.clone())
    assert s_all.converged and s_frz.converged
    # through BoundMap.rows the map is evaluated on the active samples only
    assert frozen.rows == int(s_frz.sample_iterations.sum())
    assert dense.rows == 6 * s_all.iterations
    assert bool(s_frz.sample_converged.all()) and bool((s_frz.sample_residual <= TOL).all())
    for b in range(6):
        ref = _reference(dense, b)
        assert _rel(z_all[b], ref) <= 40 * TOL and _rel(z_frz[b], ref) <= 40 * TOL
    # the slow samples set the pace; the fast ones stop early
    assert s_frz.iterations == int(s_frz.sample_iterations.max())
    assert int(s_frz.sample_iterations.min()) < s_frz.iterations
    assert int(s_frz.sample_iterations.sum()) < int(s_all.sample_iterations.sum())


def test_a_plain_callable_is_evaluated_on_the_whole_batch_and_gives_the_same_answer(device):
    bound_rows, plain_rows = (Rows([0.3, 0.6, 0.9, 0.95], device=device) for _ in range(2))
    solver = inn.Anderson(max_iter=300, tol=TOL, freeze_converged=True)
    z_b, s_b = solver.solve(bound_rows.bound(), torch.zeros(4, N, device=device))
    z_p, s_p = solver.solve(lambda z: plain_rows.step(z, plain_rows.u), torch.zeros(4, N, device=device))
    # the same iterates up to rounding: a matmul over 4 rows and one over the active rows may
    # round differently in the last bit
    torch.testing.assert_close(z_p, z_b, rtol=1e-13, atol=1e-15)
    assert s_p.sample_iterations.tolist() == s_b.sample_iterations.tolist()
    assert plain_rows.rows == 4 * s_p.iterations and bound_rows.rows < plain_rows.rows


def test_freezing_happens_at_the_checks(device):
    rows = Rows([0.3, 0.6, 0.9, 0.95], device=device)
    z, stats = inn.FixedPointIteration(max_iter=500, tol=TOL, check_every=4, freeze_converged=True).solve(
        rows.bound(), torch.zeros(4, N, device=device)
    )
    assert stats.converged and all(k % 4 == 0 for k in stats.sample_iterations.tolist())
    assert len(stats.trace) == stats.iterations // 4


@pytest.mark.parametrize("solver_cls", SOLVERS, ids=lambda c: c.__name__)
def test_tol_zero_runs_every_sample_max_iter_times(solver_cls, device):
    rows = Rows([0.3, 0.6, 0.9], device=device)
    z0 = torch.zeros(3, N, device=device)
    z, stats = solver_cls(max_iter=9, tol=0.0, freeze_converged=True).solve(rows.bound(), z0)
    assert stats.converged and stats.iterations == 9 and len(stats.trace) == 1
    assert stats.sample_iterations.tolist() == [9, 9, 9] and bool(stats.sample_converged.all())
    assert rows.rows == 27


def test_tuple_state_freezes_part_by_part(device):
    A, u = _weights(device)

    def step(w, v):
        a, b = w
        return torch.tanh(v[:, :1] * (a @ A[:3, :3].T) + v[:, 1:4]), 0.5 * torch.tanh(b + a[:, :2, None])

    gains = torch.tensor([0.2, 0.9, 0.6], device=device)[:, None]
    g = inn.BoundMap(step, torch.cat([gains, u[:3, :3]], 1))
    z0 = (torch.zeros(3, 3, device=device), torch.zeros(3, 2, 2, device=device))
    for solver_cls in SOLVERS:
        w_all, _ = solver_cls(max_iter=500, tol=TOL).solve(g, z0)
        w_frz, stats = solver_cls(max_iter=500, tol=TOL, freeze_converged=True).solve(g, z0)
        assert isinstance(w_frz, tuple) and [t.shape for t in w_frz] == [(3, 3), (3, 2, 2)]
        assert bool(stats.sample_converged.all()) and int(stats.sample_iterations.min()) < stats.iterations
        for a, b in zip(w_frz, w_all):
            assert _rel(a, b) <= 40 * TOL


# ---------------------------------------------------------------- return_best
def test_return_best_returns_the_lowest_residual_iterate(device):
    rows = Rows([0.3, 3.0], device=device)
    rows.A = -torch.eye(N, device=device)
    g = rows.bound()
    z, stats = _solve(inn.FixedPointIteration(max_iter=40, tol=TOL, return_best=True), g, 2, device)
    # replay the iteration and find sample 1's lowest residual and its iterate
    w, best, best_res = torch.zeros(2, N, device=device), None, math.inf
    for _ in range(40):
        fw = g(w)
        res = float(torch.linalg.vector_norm(fw[1] - w[1]) / torch.linalg.vector_norm(fw[1]))
        if res < best_res:
            best, best_res = fw[1].clone(), res
        w = fw
    assert stats.sample_converged.tolist() == [True, False]
    assert float(stats.sample_residual[1]) == pytest.approx(best_res, rel=1e-12)
    torch.testing.assert_close(z[1], best, rtol=0, atol=0)
    assert best_res < float(torch.linalg.vector_norm(g(w)[1] - w[1]) / torch.linalg.vector_norm(g(w)[1]))
    assert _rel(z[0], _reference(rows, 0)) <= 10 * TOL


class Blowup:
    """Sample 1 of ``z ↦ tanh(A z + u)`` is multiplied by 1e200 per step from step 3 on: it
    turns Inf, then NaN."""

    def __init__(self, device):
        self.A, u = _weights(device)
        self.u, self.calls = u[:3] * 0.5, 0

    def __call__(self, z):
        self.calls += 1
        out = torch.tanh(z @ (0.5 * self.A).T + self.u)
        if self.calls >= 3:
            out = torch.cat([out[:1], (z[1:2] + 1) * 1e200, out[2:]])
        return out


@pytest.mark.parametrize("freeze", [False, True], ids=["all", "freeze"])
@pytest.mark.parametrize("solver_cls", SOLVERS, ids=lambda c: c.__name__)
def test_return_best_sets_aside_a_sample_that_turns_non_finite(solver_cls, freeze, device):
    z0 = torch.zeros(3, N, device=device)
    with pytest.raises(inn.NonFiniteError, match="NaN/Inf"):
        solver_cls(max_iter=100, tol=TOL, freeze_converged=freeze).solve(Blowup(device), z0)
    solver = solver_cls(max_iter=100, tol=TOL, freeze_converged=freeze, return_best=True)
    with pytest.warns(inn.ConvergenceWarning, match=r"1 of 3 samples did not converge \(1 turned NaN/Inf"):
        z, stats = solver.solve(Blowup(device), torch.zeros(3, N, device=device))
    assert torch.isfinite(z).all() and stats.converged is False
    assert stats.sample_converged.tolist() == [True, False, True]
    assert math.isfinite(stats.sample_residual[1]) and stats.sample_iterations[1] <= 4
    m = Blowup(device)
    m.calls = -(10**9)  # never blows up
    ref, _ = inn.FixedPointIteration(max_iter=500, tol=1e-15).solve(m, torch.zeros(3, N, device=device))
    for b in (0, 2):
        assert _rel(z[b], ref[b]) <= 10 * TOL
    # the sample set aside is returned at an iterate of its own, finite and bounded by tanh
    assert bool((z[1].abs() <= 1).all())


def test_return_best_with_tol_zero_still_sets_aside_non_finite_samples(device):
    z, stats = _solve(inn.Anderson(max_iter=12, tol=0.0, return_best=True), Blowup(device), 3, device)
    assert torch.isfinite(z).all() and stats.sample_converged.tolist() == [True, False, True]
    assert stats.iterations == 12 and stats.sample_iterations.tolist()[0] == 12


# ---------------------------------------------------------------- gradients through a frozen solve
@pytest.mark.parametrize("solver_cls", SOLVERS, ids=lambda c: c.__name__)
def test_itd_through_a_frozen_solve_matches_the_dense_implicit_gradient(solver_cls, device):
    cell = make_cell().to(device)
    speeds = torch.tensor([[0.1], [1.0], [3.0], [10.0]], device=device)  # samples converge at different speeds
    x = torch.randn(4, 5).to(device) * speeds
    R = torch.randn(4, 6).to(device)
    xr = x.clone().requires_grad_()
    w, stats = inn.fixed_point(
        cell, xr, solver=solver_cls(max_iter=300, tol=1e-14, freeze_converged=True, return_best=True),
        backward=inn.ITD(),
    )
    assert stats.converged and len(set(stats.sample_iterations.tolist())) > 1
    assert w.requires_grad and not stats.sample_residual.requires_grad
    grads = torch.autograd.grad((R * w).sum(), [cell.A.weight, cell.B.weight, cell.B.bias, xr])
    for g, r in zip(grads, dense_reference(cell, x, R)):
        assert _rel(g, r) <= 1e-8


def test_itd_through_a_frozen_solve_of_a_plain_callable(device):
    cell = make_cell().to(device)
    x = torch.randn(3, 5).to(device) * torch.tensor([[0.1], [1.0], [5.0]], device=device)
    R = torch.randn(3, 6).to(device)
    xr = x.clone().requires_grad_()
    solver = inn.FixedPointIteration(max_iter=300, tol=1e-14, freeze_converged=True)
    w, stats = solver.solve(lambda z: cell(z, xr), torch.zeros(3, 6, device=device))
    assert stats.converged and len(set(stats.sample_iterations.tolist())) > 1
    grads = torch.autograd.grad((R * w).sum(), [cell.A.weight, cell.B.weight, cell.B.bias, xr])
    for g, r in zip(grads, dense_reference(cell, x, R)):
        assert _rel(g, r) <= 1e-8


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("solver_cls", SOLVERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("option", ["freeze_converged", "return_best"])
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_invalid_option_values_raise(solver_cls, option, value):
    with pytest.raises(ValueError, match=f"{solver_cls.__name__}: {option} must be a bool"):
        solver_cls(**{option: value})


def test_options_survive_with_budget():
    solver = inn.Anderson(freeze_converged=True, return_best=True).with_budget(7, 0.0)
    assert solver.freeze_converged and solver.return_best and solver.max_iter == 7
