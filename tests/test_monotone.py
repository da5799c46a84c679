"""Monotone operator equilibria (monDEQ): parametrization, maps, splitting solvers, gradients.

The test problems are monotone (I − W ⪰ mI) but far from contractions: ‖W‖₂ > 1 and plain
fixed-point iteration diverges on them, which each test asserts before using them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import implicitnets as inn
from implicitnets import linear
from implicitnets.maps import MonotoneConv, MonotoneFC, MonotoneMap
from implicitnets.parametrizations import MonotoneWeight, monotone_weight

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

PR = inn.PeacemanRachford(max_iter=400, tol=1e-14)
FB = inn.ForwardBackward(max_iter=2000, tol=1e-14, alpha=0.2)
GMRES = inn.AID(linear.GMRES(max_iter=200, tol=1e-14, restart=100))


def make_fc(seed: int = 0, d: int = 5, n: int = 8) -> MonotoneFC:
    torch.manual_seed(seed)
    cell = MonotoneFC(d, n, m=0.5)
    P = cell.linear.parametrizations.weight
    with torch.no_grad():
        P.original0.normal_(0, 0.3)
        P.original1.normal_(0, 0.4)  # a large skew part: ‖W‖₂ > 1, Picard diverges
        cell.U.bias.fill_(1.0)
    return cell


def make_conv(seed: int = 0) -> MonotoneConv:
    torch.manual_seed(seed)
    cell = MonotoneConv(2, 3, (5, 5), m=0.5)
    with torch.no_grad():
        cell.A.weight.normal_(0, 0.15)
        cell.B.weight.normal_(0, 0.2)
        cell.U.bias.fill_(1.0)
    return cell


def dense(fn, like: Tensor) -> Tensor:
    """The matrix of the linear map ``fn`` on tensors shaped like ``like``."""
    n = like.numel()
    return torch.func.jacrev(fn)(torch.zeros_like(like)).reshape(n, n)


def circular_conv(z: Tensor, kernel: Tensor) -> Tensor:
    r = kernel.shape[-1] // 2
    return F.conv2d(F.pad(z, (r, r, r, r), mode="circular"), kernel)


def circular_conv_t(z: Tensor, kernel: Tensor) -> Tensor:
    return circular_conv(z, kernel.flip(2, 3).transpose(0, 1))


def rel(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


ITD = inn.ITD()


def solve(cell, x, solver, backward=ITD):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", inn.ConvergenceWarning)
        return inn.fixed_point(cell, x, solver=solver, backward=backward)


CASES = {"fc": (make_fc, (3, 5)), "conv": (make_conv, (2, 2, 5, 5))}


@pytest.fixture(params=list(CASES))
def problem(request, device):
    make, shape = CASES[request.param]
    cell = make().to(device)
    torch.manual_seed(1)
    return cell, torch.randn(*shape).to(device)


# -- the parametrization -----------------------------------------------------------------


@pytest.mark.parametrize("m", [0.05, 1.0, 3.0])
@pytest.mark.parametrize("rows", [4, 7, 12])
def test_parametrization_is_m_monotone_for_random_weights(m, rows, device):
    torch.manual_seed(rows)
    A, B = 3 * torch.randn(rows, 7).to(device), 3 * torch.randn(7, 7).to(device)
    W = MonotoneWeight(m)(A, B)
    sym = torch.eye(7, device=device) - 0.5 * (W + W.T)
    assert float(torch.linalg.eigvalsh(sym).min()) >= m - 1e-12
    assert torch.linalg.matrix_norm(W, 2) > 1  # no contraction implied


def test_right_inverse_is_exact_on_monotone_weights_and_projects_the_others(device):
    P = MonotoneWeight(0.2)
    torch.manual_seed(0)
    W = P(torch.randn(6, 6).to(device), torch.randn(6, 6).to(device))
    torch.testing.assert_close(P(*P.right_inverse(W)), W, rtol=0, atol=1e-12)
    V = 3 * torch.randn(6, 6).to(device)  # far from monotone
    projected = P(*P.right_inverse(V))
    torch.testing.assert_close(projected - projected.T, V - V.T, rtol=0, atol=1e-12)  # skew part kept
    sym = torch.eye(6, device=device) - 0.5 * (projected + projected.T)
    assert abs(float(torch.linalg.eigvalsh(sym).min()) - 0.2) < 1e-12


def test_registered_parametrization_trains_both_factors(device):
    layer = monotone_weight(torch.nn.Linear(5, 5, bias=False).to(device), m=0.3)
    assert layer.parametrizations.weight.original0.shape == (5, 5)
    (layer.weight * torch.randn(5, 5).to(device)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize("m", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_margin_raises(m):
    with pytest.raises(ValueError, match="margin m"):
        MonotoneWeight(m)
    with pytest.raises(ValueError, match="margin m"):
        MonotoneFC(3, 4, m=m)
    with pytest.raises(ValueError, match="margin m"):
        MonotoneConv(1, 2, (4, 4), m=m)


# -- the maps ----------------------------------------------------------------------------


def test_conv_weight_is_the_circular_convolution_formula(device):
    cell = make_conv().to(device)
    z, y = torch.randn(2, 3, 5, 5).to(device), torch.randn(2, 3, 5, 5).to(device)
    A, B = cell.A.weight, cell.B.weight
    expected = (1 - cell.m) * z - circular_conv_t(circular_conv(z, A), A) + circular_conv(z, B) - circular_conv_t(z, B)
    torch.testing.assert_close(cell.weight_mv(z), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close((cell.weight_mv(z) * y).sum(), (z * cell.weight_rmv(y)).sum(), rtol=1e-12, atol=0)


def test_conv_weight_has_exact_derivatives_of_every_order_and_mode():
    """The FFT products pass their gradients on contiguous (``_ContiguousGradient``): reverse
    mode, second order, forward mode and ``vmap`` all check against finite differences or
    the unbatched product (float64)."""
    cell = make_conv().double()
    z = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    kernel = cell.A.weight.detach().clone().requires_grad_()

    def mv(z, kernel):
        return torch.func.functional_call(_WeightMV(cell), {"cell.A.weight": kernel}, (z,))

    assert torch.autograd.gradcheck(mv, (z, kernel))
    assert torch.autograd.gradgradcheck(mv, (z, kernel))
    assert torch.autograd.gradcheck(mv, (z, kernel), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)
    batched = torch.func.vmap(lambda zi: mv(zi[None], kernel)[0])(z.detach())
    torch.testing.assert_close(batched, mv(z.detach(), kernel).detach(), rtol=0, atol=1e-12)


class _WeightMV(torch.nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, z):
        return self.cell.weight_mv(z)


def test_maps_are_monotone_but_not_contractions(problem, device):
    cell, x = problem
    like = cell.initial_state(x)[:1]
    W = dense(cell.weight_mv, like).detach()
    n = W.shape[0]
    assert float(torch.linalg.eigvalsh(torch.eye(n, device=device) - 0.5 * (W + W.T)).min()) >= cell.m - 1e-12
    assert abs(cell.lipschitz_bound() - float(torch.linalg.matrix_norm(W, 2))) <= 1e-10 * cell.lipschitz_bound()
    assert cell.lipschitz_bound() > 2
    assert float(torch.linalg.eigvals(W).abs().max()) > 1  # spectral radius > 1 as well


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.5])
def test_resolvent_is_exact(problem, alpha):
    cell, x = problem
    v = torch.randn_like(cell.initial_state(x))
    r = cell.resolvent(alpha)(v)
    torch.testing.assert_close(r + alpha * (r - cell.weight_mv(r)), v, rtol=0, atol=1e-12)


def test_closed_form_jacobian_matches_autograd(problem):
    cell, x = problem
    u = cell.inject(x).detach()
    w = torch.randn_like(cell.initial_state(x))
    J = cell.jacobian(w, u, cell.step(w, u))
    reference = dense(lambda z: torch.func.jvp(lambda a: cell.step(a, u), (w,), (z,))[1], w)
    y = torch.randn_like(w)
    torch.testing.assert_close(J.mv(y).reshape(-1), reference @ y.reshape(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(J.rmv(y).reshape(-1), reference.T @ y.reshape(-1), rtol=1e-12, atol=1e-12)


# -- the splitting solvers ---------------------------------------------------------------


def reference_equilibrium(cell, x: Tensor, z: Tensor) -> Tensor:
    """The exact equilibrium on the active set S of ``z``: z_S = (I − W_SS)⁻¹ u_S, zero
    elsewhere, checked against the complementarity conditions (then unique by monotonicity)."""
    u = cell.inject(x).detach().reshape(x.shape[0], -1)
    W = dense(cell.weight_mv, z[:1]).detach()
    out = torch.zeros_like(u)
    for i in range(x.shape[0]):
        S = z.reshape(x.shape[0], -1)[i] > 1e-9
        out[i, S] = torch.linalg.solve(torch.eye(int(S.sum()), device=u.device) - W[S][:, S], u[i, S])
        pre = W @ out[i] + u[i]
        assert bool((out[i, S] > 0).all()) and bool((pre[~S] < 0).all())  # z = ReLU(W z + u), strictly
    return out.reshape(z.shape)


def test_plain_fixed_point_iteration_diverges(problem):
    cell, x = problem
    _, stats = solve(cell, x, inn.FixedPointIteration(max_iter=300, tol=1e-10))
    assert not stats.converged and stats.residual > 0.1


def test_splitting_solvers_agree_with_each_other_and_a_dense_solve(problem):
    cell, x = problem
    with torch.no_grad():
        z_pr, s_pr = solve(cell, x, PR)
        z_fb, s_fb = solve(cell, x, FB)
    assert s_pr.converged and s_fb.converged and s_pr.residual <= 1e-14 and s_fb.residual <= 1e-14
    assert s_pr.iterations < 200 < s_fb.iterations  # PR needs far fewer iterations here
    reference = reference_equilibrium(cell, x, z_pr)
    assert rel(z_pr, reference) <= 1e-12 and rel(z_fb, reference) <= 1e-12


@pytest.mark.parametrize("solver", [PR, FB], ids=["PR", "FB"])
@pytest.mark.parametrize("backward", [GMRES, inn.ITD()], ids=repr)
def test_gradients_match_the_dense_implicit_gradient(problem, solver, backward, device):
    cell, x = problem
    params = [p for p in cell.parameters()]
    R = torch.randn_like(cell.initial_state(x))
    with torch.no_grad():
        z, _ = solve(cell, x, PR)
    J = dense(lambda y: torch.func.jvp(lambda a: cell(a, x), (z,), (y,))[1], z).detach()
    v = torch.linalg.solve((torch.eye(J.shape[0], device=device) - J).T, R.reshape(-1)).reshape(z.shape)
    xr = x.clone().requires_grad_()
    reference = torch.autograd.grad((v * cell(z, xr)).sum(), [*params, xr])

    xr = x.clone().requires_grad_()
    w, stats = solve(cell, xr, solver, backward)
    grads = torch.autograd.grad((R * w).sum(), [*params, xr])
    assert stats.converged
    for g, r in zip(grads, reference):
        assert rel(g, r) <= 1e-8, rel(g, r)
    if backward is GMRES:
        assert stats.backward.converged and stats.backward.residual <= 1e-12


@pytest.mark.parametrize("backward", [GMRES, inn.ITD(), inn.ITD(truncate=5), inn.JacobianFree()], ids=repr)
@pytest.mark.parametrize("solver", [PR, FB], ids=["PR", "FB"])
def test_every_parameter_gets_a_finite_gradient(backward, solver, device):
    cell, x = make_fc().to(device), torch.randn(3, 5).to(device)
    layer = inn.FixedPointLayer(cell, solver=solver, backward=backward)
    # (‖z*‖² would make the JFB gradient of the skew part exactly zero: z* z*ᵀ is symmetric)
    R = torch.randn(3, 8).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", inn.ConvergenceWarning)
        (R * layer(x)).sum().backward()
    for name, p in cell.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_warm_start_at_the_equilibrium_stays_there(device):
    cell, x = make_fc().to(device), torch.randn(3, 5).to(device)
    with torch.no_grad():
        z, _ = solve(cell, x, PR)
        _, stats = inn.fixed_point(cell, x, solver=inn.PeacemanRachford(max_iter=6, tol=0.0, check_every=1),
                                   backward=inn.ITD(), z0=z)
    assert stats.iterations == 6 and max(stats.trace) <= 1e-13


def _record_points(cell, monkeypatch, solver: type) -> list[Tensor]:
    """The points at which ``solver`` evaluates the map: its ``W z`` products for forward–backward,
    the resolvent's outputs z½ for Peaceman–Rachford (after ``z₀``)."""
    seen: list[Tensor] = []
    if solver is inn.ForwardBackward:
        weight_mv = cell.weight_mv
        monkeypatch.setattr(cell, "weight_mv", lambda z: seen.append(z.detach()) or weight_mv(z))
    else:
        resolvent = cell.resolvent

        def recording(alpha):
            solve = resolvent(alpha)
            return lambda v: seen.append(solve(v).detach()) or seen[-1]

        monkeypatch.setattr(cell, "resolvent", recording)
    return seen


@pytest.mark.parametrize("make", [inn.PeacemanRachford, inn.ForwardBackward])
@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_residual_is_that_of_the_map_at_the_last_point(make, alpha, monkeypatch, device):
    """``tol = 0``: exactly ``max_iter`` map evaluations, one residual; the solver returns
    Φ(z) at its last point z and reports ‖Φ(z) − z‖ / ‖Φ(z)‖ (Φ evaluated here directly)."""
    cell, x = make_fc().to(device), torch.randn(3, 5).to(device)
    seen = _record_points(cell, monkeypatch, make)
    with torch.no_grad():
        out, stats = inn.fixed_point(cell, x, solver=make(max_iter=7, tol=0.0, alpha=alpha), backward=inn.ITD())
    assert len(seen) == (7 if make is inn.ForwardBackward else 6)
    z = seen[-1]
    fz = cell.step(z, cell.inject(x))
    assert stats.iterations == 7 and stats.converged and len(stats.trace) == 1
    torch.testing.assert_close(out, fz, rtol=0, atol=1e-12)
    assert abs(stats.residual - float(torch.linalg.vector_norm(fz - z) / torch.linalg.vector_norm(fz))) <= 1e-12
    assert stats.residual > 1e-6  # not converged yet: the check is not vacuous


def test_forward_backward_with_unit_step_is_picard_iteration(device):
    cell, x = make_fc().to(device), torch.randn(3, 5).to(device)
    a, sa = solve(cell, x, inn.ForwardBackward(max_iter=9, tol=0.0, alpha=1.0, check_every=1))
    b, sb = solve(cell, x, inn.FixedPointIteration(max_iter=9, tol=0.0, check_every=1))
    torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    assert sa.trace == pytest.approx(sb.trace, rel=1e-12) and len(sa.trace) == 9


def test_non_convergence_goes_to_the_failure_policy(device):
    cell, x = make_fc().to(device), torch.randn(3, 5).to(device)
    with pytest.warns(inn.ConvergenceWarning, match="PeacemanRachford did not converge"):
        _, stats = inn.fixed_point(cell, x, solver=inn.PeacemanRachford(max_iter=3, tol=1e-12), backward=inn.ITD())
    assert not stats.converged and stats.iterations == 3
    with pytest.raises(inn.ConvergenceError, match="ForwardBackward did not converge"):
        inn.fixed_point(cell, x, solver=inn.ForwardBackward(max_iter=3, tol=1e-12, on_failure=inn.Raise()),
                        backward=inn.ITD())


class DiagonalMonotone(MonotoneMap):
    """A user's own monotone map: ``W = diag(w)`` with ``w ≤ 1 − m``, ``u = x``."""

    def __init__(self, w: Tensor, m: float) -> None:
        super().__init__()
        self.w, self.m = torch.nn.Parameter(w), m

    def inject(self, x: Tensor) -> Tensor:
        return x

    def initial_state(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def weight_mv(self, z: Tensor) -> Tensor:
        return self.w * z

    def weight_rmv(self, z: Tensor) -> Tensor:
        return self.w * z

    def resolvent(self, alpha: float):
        return lambda v: v / (1 + alpha * (1 - self.w))


def test_a_users_monotone_map_works_with_both_solvers(device):
    cell = DiagonalMonotone(torch.tensor([-3.0, 0.5, -1.0], device=device), m=0.5)
    x = torch.tensor([[1.0, 2.0, -1.0]], device=device)
    expected = torch.relu(x / (1 - cell.w.detach()))  # z = ReLU(w z + x): z = x / (1 − w) where positive
    for solver in (PR, inn.ForwardBackward(max_iter=500, tol=1e-14, alpha=0.2)):
        z, stats = inn.fixed_point(cell, x, solver=solver, backward=GMRES)
        assert stats.converged and rel(z.detach(), expected) <= 1e-12


@pytest.mark.parametrize("make", [inn.PeacemanRachford, inn.ForwardBackward])
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(alpha=0), "alpha must be"),
        (dict(alpha=-1.0), "alpha must be"),
        (dict(alpha=float("nan")), "alpha must be"),
        (dict(alpha=True), "alpha must be"),
        (dict(max_iter=0), "max_iter"),
        (dict(tol=-1.0), "tol"),
        (dict(check_every=0), "check_every"),
        (dict(on_failure="warn"), "on_failure"),
    ],
)
def test_bad_options_raise(make, options, message):
    with pytest.raises(ValueError, match=message):
        make(**options)


@pytest.mark.parametrize("solver", [PR, FB], ids=["PR", "FB"])
def test_non_monotone_maps_and_tuple_states_are_rejected(solver):
    tanh = inn.maps.TanhMap(5, 4)
    with pytest.raises(ValueError, match="needs a monotone map.*MonotoneMap.*got BoundMap of TanhMap"):
        inn.fixed_point(tanh, torch.randn(2, 5), solver=solver, backward=inn.ITD())
    with pytest.raises(ValueError, match="needs a monotone map.*got function"):
        solver.solve(lambda z: z, torch.zeros(2, 3))
    cell = make_fc()
    g = inn.BoundMap(cell.step, cell.inject(torch.randn(2, 5)), cell)
    with pytest.raises(ValueError, match="state must be a tensor"):
        solver.solve(g, (torch.zeros(2, 8),))


def test_bad_map_options_raise():
    with pytest.raises(ValueError, match="width"):
        MonotoneFC(3, 0)
    with pytest.raises(ValueError, match="kernel_size"):
        MonotoneConv(1, 2, (4, 4), kernel_size=2)
    with pytest.raises(ValueError, match="size"):
        MonotoneConv(1, 2, (2, 4))
    with pytest.raises(ValueError, match="expects x of shape"):
        make_conv().inject(torch.randn(1, 2, 6, 6))


# -- per-sample control ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [inn.PeacemanRachford, inn.ForwardBackward], ids=lambda c: c.__name__)
def test_freezing_converged_samples_gives_the_same_equilibria_with_fewer_evaluations(problem, cls):
    cell, x = problem
    x = torch.cat([x, 5 * x])  # the scaled half converges at another speed
    options = dict(max_iter=3000, tol=1e-12, alpha=0.2 if cls is inn.ForwardBackward else 1.0)
    with torch.no_grad():
        z_all, s_all = solve(cell, x, cls(**options))
        z_frz, s_frz = solve(cell, x, cls(**options, freeze_converged=True))
    assert s_all.converged and s_frz.converged and bool(s_frz.sample_converged.all())
    assert bool((s_frz.sample_residual <= 1e-12).all())
    assert len(set(s_frz.sample_iterations.tolist())) > 1  # the samples left at different checks
    assert int(s_frz.sample_iterations.sum()) < x.shape[0] * s_frz.iterations
    reference = reference_equilibrium(cell, x, z_all)
    assert rel(z_frz, reference) <= 1e-10 and rel(z_all, reference) <= 1e-10


def test_itd_through_a_frozen_splitting_solve_matches_the_dense_implicit_gradient(device):
    cell = make_fc().to(device)
    torch.manual_seed(1)
    x = torch.cat([torch.randn(3, 5).to(device), 4 * torch.randn(3, 5).to(device)])
    R = torch.randn(6, 8).to(device)
    with torch.no_grad():
        z, _ = solve(cell, x, PR)
    J = dense(lambda y: torch.func.jvp(lambda a: cell(a, x), (z,), (y,))[1], z).detach()
    v = torch.linalg.solve((torch.eye(J.shape[0], device=device) - J).T, R.reshape(-1)).reshape(z.shape)
    xr = x.clone().requires_grad_()
    reference = torch.autograd.grad((v * cell(z, xr)).sum(), xr)[0]
    xr = x.clone().requires_grad_()
    w, stats = solve(cell, xr, inn.PeacemanRachford(max_iter=400, tol=1e-14, freeze_converged=True))
    assert stats.converged and len(set(stats.sample_iterations.tolist())) > 1
    assert rel(torch.autograd.grad((R * w).sum(), xr)[0], reference) <= 1e-8


def test_return_best_keeps_each_samples_lowest_residual_point(device):
    """Forward–backward with a step far too large oscillates; each sample comes back at the
    best point it visited, never worse than where the iteration stopped."""
    cell, x = make_fc().to(device), torch.randn(4, 5).to(device)
    solver = dict(max_iter=30, tol=1e-12, alpha=3.0)
    with torch.no_grad():
        _, last = solve(cell, x, inn.ForwardBackward(**solver))
        z, best = solve(cell, x, inn.ForwardBackward(**solver, return_best=True))
    assert not best.converged and torch.isfinite(z).all()
    assert bool((best.sample_residual <= last.sample_residual + 1e-15).all())
    assert bool((best.sample_residual < last.sample_residual).any())
    # the residual of every sample's best point: the minimum over the runs cut at 1..30 iterations
    with torch.no_grad():
        history = torch.stack([solve(cell, x, inn.ForwardBackward(**{**solver, "max_iter": k}))[1].sample_residual
                               for k in range(1, 31)])
    torch.testing.assert_close(best.sample_residual, history.min(0).values, rtol=1e-12, atol=0)
