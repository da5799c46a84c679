"""AID failure policies on a deliberately expansive map (‖A‖₂ = 1.5, no contraction).

Φ(w, x) = tanh(A w + B x + c) with A = 1.5·Q (Q orthogonal: ‖A‖₂ = ρ(A) = 1.5) and a tiny
input term u = B x + c, so that near w = 0 the Jacobian ∂₁Φ ≈ A has spectral radius ≈ 1.5:

* ``ANDERSON`` finds the (unstable) fixed point w* ≈ (I − A)⁻¹u ≈ 0 to 1e-12 — the forward
  succeeds — but there the Neumann series of AID-FP diverges;
* ``FPI`` (10 plain iterations from 0, tol = 0) stays in the expansive region (‖w₁₀‖ ≲ 0.1),
  so the adjoint solve diverges too, and ITD through its steps is well conditioned.

Either way the adjoint solve fails deterministically and the policy decides what happens.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import implicitnets as inn
from implicitnets.diagnostics import jacobian_spectral_radius

WIDTH, IN = 6, 4
ANDERSON = inn.Anderson(max_iter=100, tol=1e-12, memory=WIDTH)
T = 10
FPI = inn.FixedPointIteration(max_iter=T, tol=0.0)
DIVERGING = inn.linear.Neumann(max_iter=30, tol=1e-10)  # Neumann series: grows like 1.5^k


pytestmark = pytest.mark.usefixtures("float64")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _expansive_map() -> inn.maps.TanhMap:
    torch.manual_seed(0)
    f = inn.maps.TanhMap(IN, WIDTH, contraction=None)
    Q, _ = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=_gen(1)))
    with torch.no_grad():
        f.A.weight.copy_(1.5 * Q)
        f.B.weight.mul_(1e-3)
        f.B.bias.mul_(1e-3)
    return f


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(5, IN, generator=_gen(2)), torch.randn(5, WIDTH, generator=_gen(3))


def _grads(f: torch.nn.Module, backward, x: torch.Tensor, y: torch.Tensor, solver=FPI):
    """Gradients of a squared loss w.r.t. (x, *parameters) and the solve's stats."""
    x = x.clone().requires_grad_(True)
    w, stats = inn.fixed_point(f, x, solver=solver, backward=backward)
    loss = (w - y).pow(2).sum()
    grads = torch.autograd.grad(loss, [x, *f.parameters()])
    return grads, stats


def _close(grads, reference, rtol: float = 1e-10) -> None:
    for g, r in zip(grads, reference):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=rtol, atol=rtol * float(r.abs().max()))


@pytest.mark.parametrize("solver", [ANDERSON, FPI], ids=["anderson", "fpi"])
def test_setup_is_expansive_where_the_adjoint_is_solved(solver):
    f = _expansive_map()
    x, _ = _data()
    assert float(torch.linalg.matrix_norm(f.A.weight.detach(), 2)) == pytest.approx(1.5, rel=1e-12)
    with torch.no_grad():
        w, stats = inn.fixed_point(f, x, solver=solver, backward=inn.ITD())
    if solver is ANDERSON:
        assert stats.converged and stats.residual < 1e-12  # an unstable fixed point, found
    rho = jacobian_spectral_radius(f, w, x, krylov_dim=WIDTH, generator=_gen(4))
    assert rho.worst > 1.4  # the adjoint Neumann series cannot converge


@pytest.mark.parametrize("solver", [ANDERSON, FPI], ids=["anderson", "fpi"])
def test_raise_raises_a_clear_error(solver):
    f = _expansive_map()
    x, y = _data()
    message = r"Neumann solve of \(I - J\^T\) v = g did not converge.*contraction"
    with pytest.raises(inn.ConvergenceError, match=message):
        _grads(f, inn.AID(DIVERGING, on_failure=inn.Raise()), x, y, solver=solver)


def test_warn_warns_and_keeps_the_finite_gradient():
    f = _expansive_map()
    x, y = _data()
    with pytest.warns(inn.ConvergenceWarning, match="did not converge"):
        grads, stats = _grads(f, inn.AID(DIVERGING, on_failure=inn.Warn()), x, y)
    assert stats.backward.converged is False and stats.backward.fallback is None
    assert all(torch.isfinite(g).all() for g in grads)


def test_warn_raises_on_nonfinite_solution():
    """tol = 0 runs all 3000 Richardson steps: 1.5^3000 overflows to Inf/NaN, which must raise."""
    f = _expansive_map()
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", inn.ConvergenceWarning)
        with pytest.raises(inn.NonFiniteError, match="NaN/Inf"):
            _grads(f, inn.AID(inn.linear.Neumann(max_iter=3000, tol=0.0), on_failure=inn.Warn()), x, y)


def test_warn_raises_when_the_solver_reports_a_nonfinite_residual():
    f = _expansive_map()
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", inn.ConvergenceWarning)
        with pytest.raises(inn.NonFiniteError):
            _grads(f, inn.AID(inn.linear.Neumann(max_iter=5000, tol=1e-10), on_failure=inn.Warn()), x, y)


def test_fallback_jacobian_free_equals_jacobian_free():
    f = _expansive_map()
    x, y = _data()
    reference, _ = _grads(copy.deepcopy(f), inn.JacobianFree(), x, y)
    with pytest.warns(inn.ConvergenceWarning, match="falling back to the Jacobian-free gradient"):
        grads, stats = _grads(f, inn.AID(DIVERGING, on_failure=inn.FallbackJacobianFree()), x, y)
    assert stats.backward.fallback == "JacobianFree" and stats.backward.converged is False
    _close(grads, reference, rtol=1e-13)


def test_fallback_itd_equals_itd_through_the_same_computation():
    """AID's output has the value w_t of the t solver steps (as ITD's does); unrolling that
    computation is ITD with the same t plain iterations, exactly."""
    f = _expansive_map()
    x, y = _data()
    reference, _ = _grads(copy.deepcopy(f), inn.ITD(), x, y, solver=inn.FixedPointIteration(max_iter=T, tol=0.0))
    with pytest.warns(inn.ConvergenceWarning, match="falling back to ITD"):
        grads, stats = _grads(f, inn.AID(DIVERGING, on_failure=inn.FallbackITD()), x, y)
    assert stats.backward.fallback == "ITD" and stats.backward.converged is False
    _close(grads, reference)


def test_fallback_itd_is_finite_and_reported():
    f = _expansive_map()
    x, y = _data()
    with pytest.warns(inn.ConvergenceWarning, match="falling back to ITD"):
        grads, stats = _grads(f, inn.AID(DIVERGING, on_failure=inn.FallbackITD()), x, y)
    assert stats.backward.fallback == "ITD"
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "exact",
    [True, False],
    ids=lambda e: f"exact={e}",
)
def test_fallback_itd_sees_the_forward_weights_under_spectral_norm(exact):
    """Converged forward (so the last-step question above does not matter): the fallback must
    equal ITD run directly from the same module state, also for a power-iteration σ."""
    torch.manual_seed(5)
    f = inn.maps.TanhMap(IN, WIDTH, contraction=0.9, exact=exact)
    with torch.no_grad():  # σ(A) > 0.9, so that the bound is active
        f.A.parametrizations.weight.original.mul_(3.0)
    f.train()
    x, y = _data()
    tight = inn.FixedPointIteration(max_iter=400, tol=1e-14)
    starved = inn.linear.Neumann(max_iter=1, tol=1e-12)  # fails on any map
    reference, _ = _grads(copy.deepcopy(f), inn.ITD(), x, y, solver=tight)
    with pytest.warns(inn.ConvergenceWarning, match="falling back to ITD"):
        grads, stats = _grads(f, inn.AID(starved, on_failure=inn.FallbackITD()), x, y, solver=tight)
    assert stats.backward.fallback == "ITD"
    _close(grads, reference, rtol=1e-9)


@pytest.mark.parametrize("policy", [inn.FallbackITD(), inn.FallbackJacobianFree(), inn.Warn()], ids=repr)
def test_no_nan_in_parameters_after_optimiser_steps(policy):
    f = _expansive_map()
    head = torch.nn.Linear(WIDTH, 3)
    x, _ = _data()
    labels = torch.tensor([0, 1, 2, 0, 1])
    layer = inn.FixedPointLayer(f, solver=FPI, backward=inn.AID(DIVERGING, on_failure=policy))
    opt = torch.optim.SGD([*f.parameters(), *head.parameters()], lr=1e-3)
    failures = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", inn.ConvergenceWarning)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(layer(x)), labels).backward()
            failures += layer.stats.backward.converged is False
            opt.step()
            for p in [*f.parameters(), *head.parameters()]:
                assert torch.isfinite(p).all()
    assert failures >= 1


def test_raise_leaves_parameters_untouched_and_the_step_can_be_skipped():
    f = _expansive_map()
    head = torch.nn.Linear(WIDTH, 3)
    x, _ = _data()
    labels = torch.tensor([0, 1, 2, 0, 1])
    layer = inn.FixedPointLayer(f, solver=FPI, backward=inn.AID(DIVERGING, on_failure=inn.Raise()))
    opt = torch.optim.SGD([*f.parameters(), *head.parameters()], lr=1e-2)
    before = [p.detach().clone() for p in [*f.parameters(), *head.parameters()]]
    opt.zero_grad()
    with pytest.raises(inn.ConvergenceError):
        torch.nn.functional.cross_entropy(head(layer(x)), labels).backward()
    for p in f.parameters():  # nothing upstream of the failed solve got a gradient
        assert p.grad is None
    opt.zero_grad()  # skipping the step drops the head's partial gradients
    opt.step()
    for p, b in zip([*f.parameters(), *head.parameters()], before):
        assert torch.equal(p, b)


def test_converged_solve_does_not_trigger_the_policy():
    torch.manual_seed(6)
    f = inn.maps.TanhMap(IN, WIDTH, contraction=0.5, exact=True)
    x, y = _data()
    tight = inn.FixedPointIteration(max_iter=200, tol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads, stats = _grads(f, inn.AID(inn.linear.GMRES(max_iter=50, tol=1e-12), on_failure=inn.Raise()), x, y, tight)
    assert stats.backward.converged is True and stats.backward.fallback is None
    exact, _ = _grads(f, inn.AID(inn.linear.Exact()), x, y, tight)
    _close(grads, exact, rtol=1e-9)
