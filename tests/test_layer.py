"""FixedPointLayer as a module, forward solvers, bad input, contraction parametrizations."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

import implicitnets as inn
from implicitnets import linear

pytestmark = pytest.mark.usefixtures("float64")


def make_layer(backward=None, solver=None, contraction=0.9, device=None):
    """The same layer at every call (seed 0), initialised on the CPU and moved to ``device``."""
    torch.manual_seed(0)
    cell = inn.maps.TanhMap(4, 8, contraction=contraction)
    return inn.FixedPointLayer(
        cell,
        solver=solver or inn.FixedPointIteration(max_iter=100, tol=1e-10),
        backward=backward or inn.AID(linear.GMRES(max_iter=50, tol=1e-10)),
    ).to(device)


# ---------------------------------------------------------------- the layer as a module
def test_sequential_state_dict_and_dtype_round_trip(device):
    model = nn.Sequential(make_layer(), nn.Linear(8, 3)).to(device)
    x = torch.randn(5, 4).to(device)
    model(x)  # the first call runs the power iteration: its vectors are part of the state
    model.eval()
    out = model(x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    clone = nn.Sequential(make_layer(), nn.Linear(8, 3)).to(device)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    buffer.seek(0)
    clone.load_state_dict(torch.load(buffer))
    clone.eval()
    assert torch.equal(clone(x), out)
    model32 = model.to(torch.float32)
    out32 = model32(x.float())
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), out, rtol=0, atol=1e-5)


def test_no_grad_builds_no_graph_and_eval_keeps_stats(device):
    for backward in (inn.ITD(), inn.ITD(truncate=3), inn.JacobianFree(), inn.AID(linear.Neumann())):
        layer = make_layer(backward, device=device).eval()
        with torch.no_grad():
            w = layer(torch.randn(3, 4).to(device))
        assert w.grad_fn is None and not w.requires_grad
        assert layer.stats.converged and layer.stats.iterations > 1
        assert layer.stats.trace[-1] == layer.stats.residual <= 1e-10


def test_stats_after_backward(device):
    layer = make_layer(inn.AID(linear.GMRES(max_iter=40, tol=1e-9)), device=device)
    layer(torch.randn(3, 4).to(device)).sum().backward()
    s = layer.stats
    assert s.converged and s.backward.converged and s.backward.fallback is None
    assert 1 <= s.backward.iterations <= 40 and s.backward.residual <= 1e-9
    assert len(s.trace) == s.iterations


def test_tol_zero_runs_exactly_max_iter(device):
    for solver in (inn.FixedPointIteration(max_iter=7, tol=0.0), inn.Anderson(max_iter=7, tol=0.0)):
        layer = make_layer(inn.ITD(), solver, device=device)
        layer(torch.randn(2, 4).to(device))
        assert layer.stats.iterations == 7 and len(layer.stats.trace) == 1  # checked after the last only
    full = make_layer(inn.ITD(), inn.FixedPointIteration(max_iter=7, tol=0.0, check_every=1), device=device)
    full(torch.randn(2, 4).to(device))
    assert full.stats.iterations == 7 and len(full.stats.trace) == 7


def test_anderson_reaches_the_same_fixed_point_with_fewer_iterations(device):
    x = torch.randn(6, 4).to(device)
    fp = make_layer(inn.JacobianFree(), inn.FixedPointIteration(max_iter=500, tol=1e-12), contraction=0.99,
                    device=device)
    aa = make_layer(inn.JacobianFree(), inn.Anderson(max_iter=500, tol=1e-12, memory=6), contraction=0.99,
                    device=device)
    with torch.no_grad():
        a, b = fp(x), aa(x)
    assert torch.linalg.vector_norm(a - b) <= 1e-10 * torch.linalg.vector_norm(a)
    assert aa.stats.iterations < fp.stats.iterations


@pytest.mark.parametrize("solver_cls", [inn.FixedPointIteration, inn.Anderson], ids=repr)
def test_check_every_sparse_trace_and_stops_on_a_check(solver_cls, device):
    """The residual is computed every ``check_every`` evaluations and after the last one;
    the stopping test happens only there, so a solve stops on a multiple of check_every."""
    x = torch.randn(3, 4).to(device)
    every = make_layer(inn.JacobianFree(), solver_cls(max_iter=200, tol=1e-10, check_every=1), device=device)
    sparse = make_layer(inn.JacobianFree(), solver_cls(max_iter=200, tol=1e-10, check_every=4), device=device)
    sparse.load_state_dict(every.state_dict())
    with torch.no_grad():
        a, b = every(x), sparse(x)
    n1, n4 = every.stats.iterations, sparse.stats.iterations
    assert len(every.stats.trace) == n1 and n4 % 4 == 0 and n1 <= n4 < n1 + 4
    assert len(sparse.stats.trace) == n4 // 4 and sparse.stats.residual <= 1e-10
    assert torch.linalg.vector_norm(a - b) <= 1e-9 * torch.linalg.vector_norm(a)
    # tol = 0: exactly max_iter evaluations, a check every 3 and one after the last
    exact = make_layer(inn.JacobianFree(), solver_cls(max_iter=10, tol=0.0, check_every=3), device=device)
    with torch.no_grad():
        exact(x)
    assert exact.stats.iterations == 10 and len(exact.stats.trace) == 4


@pytest.mark.parametrize("grad", [False, True], ids=["in-place", "autograd"])
def test_anderson_survives_samples_that_converge_exactly(grad, device):
    """Residuals that become exactly zero (float32, a fast contraction) must not make the
    Anderson least-squares system singular: no NaN, the fixed point is reached."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float32).to(device)
    f = lambda w, x: torch.tanh(0.5 * w + x)
    with torch.set_grad_enabled(grad):
        z, stats = inn.fixed_point(f, x, solver=inn.Anderson(max_iter=60, tol=1e-12, memory=5),
                                   backward=inn.ITD() if grad else inn.JacobianFree())
    assert torch.isfinite(z).all()
    assert torch.linalg.vector_norm(f(z, x) - z) <= 1e-6 * torch.linalg.vector_norm(z)


def test_anderson_in_place_history_equals_the_autograd_path(device, monkeypatch):
    """Without autograd Anderson keeps its history in preallocated buffers (incremental Gram
    matrix); with autograd it rebuilds it out of place.  Same iterates, same answer.  The
    buffers are not initialised: filled with NaN here, no slot is read before it is written."""
    x = torch.randn(5, 4).to(device)
    solver = inn.Anderson(max_iter=40, tol=0.0, memory=4, mixing=0.7)
    layer = make_layer(inn.ITD(), solver, contraction=0.95, device=device)
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: new_empty(t, *a, **k).fill_(math.nan))
    with torch.no_grad():
        fast = layer(x)
        trace_fast = layer.stats.trace
    monkeypatch.undo()
    slow = layer(x)
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.tensor(trace_fast), torch.tensor(layer.stats.trace), rtol=1e-9, atol=1e-14)


def test_damped_iteration_converges_where_plain_oscillates(device):
    g = lambda z, x: -1.5 * z + x
    x = torch.ones(3, device=device)
    z, stats = inn.fixed_point(g, x, solver=inn.FixedPointIteration(200, 1e-12, damping=0.5), backward=inn.ITD())
    assert stats.converged and torch.allclose(z, x / 2.5, rtol=1e-10, atol=0)


# ---------------------------------------------------------------- bad input
def test_nan_in_input_raises(device):
    with pytest.raises(inn.NonFiniteError, match="input x"):
        make_layer(device=device)(torch.tensor([[1.0, math.nan, 0.0, 0.0]], device=device))


def test_nan_from_the_map_raises(device):
    f = lambda w, x: w * math.inf + x
    with pytest.raises(inn.NonFiniteError, match="NaN/Inf"):
        inn.fixed_point(f, torch.ones(3, device=device), solver=inn.FixedPointIteration(10, 1e-6),
                        backward=inn.ITD(), z0=torch.ones(3, device=device))
    with pytest.raises(inn.NonFiniteError, match="NaN/Inf"):
        inn.fixed_point(f, torch.ones(3, device=device), solver=inn.FixedPointIteration(10, 0.0),
                        backward=inn.ITD(), z0=torch.ones(3, device=device))


def test_map_output_shape_mismatch_raises(device):
    f = lambda w, x: torch.cat([w, w])
    with pytest.raises(ValueError, match="shape"):
        inn.fixed_point(f, torch.ones(3, device=device), solver=inn.FixedPointIteration(), backward=inn.ITD())


def test_input_shape_and_z0_dtype_errors(device):
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        make_layer(device=device)(torch.randn(3, 5).to(device))
    with pytest.raises(ValueError, match="dtype"):
        make_layer(device=device)(torch.randn(3, 4).to(device),
                                  z0=torch.zeros(3, 8, dtype=torch.float32, device=device))


@pytest.mark.parametrize(
    "build",
    [
        lambda: inn.FixedPointIteration(max_iter=0),
        lambda: inn.FixedPointIteration(tol=-1e-3),
        lambda: inn.FixedPointIteration(damping=1.5),
        lambda: inn.Anderson(memory=0),
        lambda: inn.Anderson(tol=math.nan),
        lambda: inn.ITD(truncate=0),
        lambda: inn.AID("gmres"),
        lambda: inn.AID(linear.GMRES(), on_failure="raise"),
        lambda: inn.spectral_norm(nn.Linear(3, 3), bound=-1.0),
        lambda: inn.maps.GradientStep(lambda w, x: w.sum(), step_size=0.0),
        lambda: inn.maps.TanhMap(0, 3),
    ],
)
def test_invalid_options_raise_value_error(build):
    with pytest.raises(ValueError):
        build()


def test_linear_solver_where_backward_mode_expected():
    with pytest.raises(ValueError, match=r"AID\(GMRES"):
        make_layer(backward=linear.GMRES())
    with pytest.raises(ValueError, match="solver must be"):
        make_layer(solver=linear.CG())


def test_non_convergence_warns_and_raise_policy_raises(device):
    layer = make_layer(solver=inn.FixedPointIteration(max_iter=3, tol=1e-12), device=device)
    with pytest.warns(inn.ConvergenceWarning, match="did not converge"):
        layer(torch.randn(2, 4).to(device))
    assert not layer.stats.converged and layer.stats.residual > 1e-12
    strict = make_layer(solver=inn.Anderson(max_iter=3, tol=1e-12, on_failure=inn.Raise()), device=device)
    with pytest.raises(inn.ConvergenceError):
        strict(torch.randn(2, 4).to(device))


def test_aid_non_convergence_reported_and_warned(device):
    layer = make_layer(inn.AID(linear.Neumann(max_iter=2, tol=1e-12)), device=device)
    out = layer(torch.randn(2, 4).to(device)).sum()
    with pytest.warns(inn.ConvergenceWarning, match="Neumann"):
        out.backward()
    assert layer.stats.backward.converged is False and layer.stats.backward.iterations == 2


def test_cg_on_a_non_symmetric_map_warns(device):
    layer = make_layer(inn.AID(linear.CG(max_iter=20, tol=1e-10)), device=device)
    out = layer(torch.randn(2, 4).to(device)).sum()
    with pytest.warns(UserWarning, match="symmetric"):
        out.backward()


# ---------------------------------------------------------------- contraction
@pytest.mark.parametrize(
    "exact, tol, slack",
    [(True, None, 1e-12), (False, None, 1e-5), (False, 1e-14, 1e-8)],
    ids=["exact", "power-default-tol", "power-tol-1e-14"],
)
def test_spectral_bound_holds_after_optimiser_steps(exact, tol, slack, device):
    """After every Adam step that pushes ‖A‖ up, the weight the next solve uses satisfies
    ‖A‖₂ ≤ γ up to the power iteration's tolerance (exactly with ``exact=True``)."""
    torch.manual_seed(1)
    cell = inn.maps.TanhMap(4, 10, contraction=0.9, exact=exact).to(device)
    if tol is not None:
        cell.A.parametrizations.weight[0].tol = tol
    layer = inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(60, 1e-8), backward=inn.JacobianFree())
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.2)
    x = torch.randn(16, 4).to(device)
    for _ in range(10):
        optimiser.zero_grad()
        (-layer(x).square().sum()).backward()  # pushes ‖A‖ up
        optimiser.step()
        raw = cell.A.parametrizations.weight.original
        assert torch.linalg.matrix_norm(raw.detach(), 2) > 0.9
        sigma = float(torch.linalg.matrix_norm(cell.A.weight.detach(), 2))
        assert 0.9 * (1 - slack) <= sigma <= 0.9 * (1 + slack)


def test_power_iteration_tracks_a_fast_moving_weight_in_eval_mode_too(device):
    """One power step per optimiser step lags behind a weight that Adam moves quickly (the
    top singular values of A cluster as they are pushed up); the bound must hold at every
    step, in eval mode as well, and re-evaluating an unchanged weight must not iterate."""
    torch.manual_seed(0)
    cell = inn.maps.TanhMap(6, 60, contraction=0.9).to(device)
    bound = cell.A.parametrizations.weight[0]
    layer = inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(30, 0.0), backward=inn.JacobianFree())
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(32, 6).to(device)
    worst = 0.0
    for step in range(40):
        optimiser.zero_grad()
        (-layer(x).square().sum()).backward()
        optimiser.step()
        layer.eval() if step % 2 else layer.train()
        worst = max(worst, float(torch.linalg.matrix_norm(cell.A.weight.detach(), 2)))
        assert bound.last_iterations > 0
        _ = cell.A.weight
        assert bound.last_iterations == 0
    assert worst <= 0.9 * (1 + 1e-4), worst


def test_spectral_norm_leaves_small_weights_alone_and_iterates_only_when_the_weight_changes(device):
    linear_module = nn.Linear(5, 5).to(device)
    with torch.no_grad():
        linear_module.weight.mul_(0.01)
    before = linear_module.weight.detach().clone()
    inn.spectral_norm(linear_module, bound=0.9)
    assert torch.allclose(linear_module.weight, before, rtol=1e-12, atol=0)
    bound = linear_module.parametrizations.weight[0]
    with torch.no_grad():  # make the stored vectors stale, so that a power iteration would show
        bound._u.mul_(-1.0)
    u = bound._u.clone()
    _ = linear_module.weight  # same weight as at the last read: no iteration, in train mode too
    assert linear_module.training and torch.equal(u, bound._u)
    with torch.no_grad():
        linear_module.parametrizations.weight.original.add_(0.01 * torch.randn(5, 5).to(device))
    _ = linear_module.weight  # the weight changed: the power iteration runs again
    assert not torch.equal(u, bound._u)


@pytest.mark.parametrize("shape", [(60, 24), (24, 60), (40, 40)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("scale", [1.0, 1e18], ids=["unit", "huge"])
def test_subspace_iteration_finds_the_largest_singular_value_of_a_clustered_spectrum(shape, scale, device):
    """A top cluster of 8 singular values within 1e-4 of each other (where the plain power
    iteration crawls at (σ₂/σ₁)² ≈ 1 − 2e-5 per step): the block iteration on the smaller Gram
    matrix finds ``‖W‖₂`` and its singular vectors in float64 in a few steps, warm-started or
    not, and also for a float32 weight whose Gram matrix would overflow."""
    torch.manual_seed(3)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, dtype=torch.float64))
    S = torch.linspace(0.1, 0.8, k, dtype=torch.float64).flip(0)
    S[:8] = 1.0 - 1e-4 * torch.arange(8, dtype=torch.float64)
    W, S = ((U * S) @ V.t()).to(device), S.to(device)
    bound = inn.parametrizations.SpectralBound(W, 0.5, tol=1e-14)
    assert bound.power_iterate_(W) <= 40
    torch.testing.assert_close(bound.sigma(W).detach(), S[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(W.t() @ bound._u, S[0] * bound._v, rtol=0, atol=1e-6)
    nudged = W + 1e-3 * torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    assert bound.power_iterate_(nudged) <= 8  # warm-started from the block of W
    torch.testing.assert_close(bound.sigma(nudged).detach(), torch.linalg.matrix_norm(nudged, 2), rtol=1e-12, atol=0)
    big = (W * scale).float()  # entries ~1e18: ‖W‖² overflows float32
    bound32 = inn.parametrizations.SpectralBound(big, 0.5)
    bound32.power_iterate_(big)
    torch.testing.assert_close(float(bound32.sigma(big)), float(S[0]) * scale, rtol=1e-5, atol=0)


def test_the_subspace_block_is_saved_and_a_state_saved_without_it_still_loads():
    layer = nn.Linear(6, 9)
    inn.spectral_norm(layer, bound=0.5)
    state = layer.state_dict()
    assert "parametrizations.weight.0._block" in state
    del state["parametrizations.weight.0._block"]
    other = inn.spectral_norm(nn.Linear(6, 9), bound=0.5)
    other.load_state_dict(state)
    torch.testing.assert_close(other.weight, layer.weight, rtol=0, atol=0)


def test_project_spectral_clips_singular_values(device):
    torch.manual_seed(2)
    W = nn.Parameter(torch.randn(7, 5).to(device) * 3)
    _, S_before, _ = torch.linalg.svd(W.detach())
    optimiser = torch.optim.SGD([W], lr=0.5)
    for _ in range(3):
        optimiser.zero_grad()
        (W.sum() ** 2).backward()
        optimiser.step()
        inn.project_spectral_(W, 0.99)
        assert float(torch.linalg.matrix_norm(W.detach(), 2)) <= 0.99 * (1 + 1e-12)
    small = torch.diag(torch.tensor([0.5, 0.2], device=device))
    assert torch.equal(inn.project_spectral_(small.clone(), 0.99), small)


def test_parametrized_weight_gets_gradient_when_solve_runs_without_grad(device):
    """The parametrize.cached() trap: the solve runs under no_grad, A must still learn."""
    for backward in (inn.AID(linear.Neumann(max_iter=50)), inn.JacobianFree(), inn.ITD(truncate=2)):
        layer = make_layer(backward, device=device)
        layer(torch.randn(3, 4).to(device)).square().sum().backward()
        grad = layer.cell.A.parametrizations.weight.original.grad
        assert grad is not None and grad.abs().sum() > 0


def test_no_warnings_on_a_healthy_solve(device):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_layer(device=device)(torch.randn(3, 4).to(device)).sum().backward()


def test_nan_in_a_spectrally_bounded_weight_raises(device):
    linear_module = nn.Linear(4, 4).to(device)
    inn.spectral_norm(linear_module, bound=0.5)
    with torch.no_grad():
        linear_module.parametrizations.weight.original[0, 0] = math.nan
    with pytest.raises(inn.NonFiniteError, match="weight contains NaN"):
        _ = linear_module.weight
