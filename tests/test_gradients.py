"""Every backward mode against the dense implicit-function gradient (float64)."""

from __future__ import annotations

import pytest
import torch

import implicitnets as inn
from implicitnets import linear

pytestmark = pytest.mark.usefixtures("float64")


Q = 0.8  # ‖A‖₂
TIGHT = inn.FixedPointIteration(max_iter=400, tol=1e-14)


def make_cell(seed: int = 0, in_features: int = 5, width: int = 6, q: float = Q) -> inn.maps.TanhMap:
    torch.manual_seed(seed)
    cell = inn.maps.TanhMap(in_features, width, contraction=None)
    with torch.no_grad():
        A = torch.randn(width, width)
        cell.A.weight.copy_(q * A / torch.linalg.matrix_norm(A, 2))
        cell.B.weight.normal_()
        cell.B.bias.normal_()
    return cell


def dense_reference(cell: inn.maps.TanhMap, x: torch.Tensor, R: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of E = <R, w*> w.r.t. (A, B, c, x) by the implicit function theorem."""
    with torch.no_grad():
        w, _ = TIGHT.solve(lambda z: cell(z, x), cell.initial_state(x))
    J = torch.func.jacrev(lambda z: cell(z, x))(w).reshape(w.numel(), w.numel()).detach()
    eye = torch.eye(w.numel(), device=w.device)
    v = torch.linalg.solve((eye - J).T, R.reshape(-1)).reshape(w.shape)
    xr = x.detach().requires_grad_()
    out = (v * cell(w, xr)).sum()
    return list(torch.autograd.grad(out, [cell.A.weight, cell.B.weight, cell.B.bias, xr]))


def grads_of(cell, x, R, backward, solver=TIGHT, z0=None):
    xr = x.detach().requires_grad_()
    w, stats = inn.fixed_point(cell, xr, solver=solver, backward=backward, z0=z0)
    params = [cell.A.weight, cell.B.weight, cell.B.bias, xr]
    return list(torch.autograd.grad((R * w).sum(), params)), stats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


EXACT_MODES = [
    inn.ITD(),
    inn.AID(linear.Neumann(max_iter=400, tol=1e-14)),
    inn.AID(linear.NormalCG(max_iter=200, tol=1e-14)),
    inn.AID(linear.GMRES(max_iter=100, tol=1e-14, restart=30)),
    inn.AID(linear.Exact()),
]


@pytest.mark.parametrize("backward", EXACT_MODES, ids=repr)
@pytest.mark.parametrize("solver", [TIGHT, inn.Anderson(max_iter=200, tol=1e-14, memory=5)], ids=repr)
def test_matches_dense_implicit_gradient(backward, solver, device):
    cell = make_cell().to(device)
    x, R = torch.randn(3, 5).to(device), torch.randn(3, 6).to(device)
    reference = dense_reference(cell, x, R)
    grads, stats = grads_of(cell, x, R, backward, solver)
    assert stats.converged
    for name, g, r in zip(["A", "B", "c", "x"], grads, reference):
        assert rel(g, r) <= 1e-8, (name, rel(g, r))
    if isinstance(backward, inn.AID):
        assert stats.backward.converged and stats.backward.iterations >= 1
        assert stats.backward.residual <= 1e-12


ALL_MODES = EXACT_MODES + [inn.ITD(truncate=5), inn.JacobianFree()]


@pytest.mark.parametrize("backward", ALL_MODES, ids=repr)
def test_every_parameter_gets_a_gradient(backward, device):
    cell = inn.maps.TanhMap(4, 7, contraction=0.9).to(device)
    layer = inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(max_iter=100, tol=1e-10), backward=backward)
    layer(torch.randn(2, 4).to(device)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradcheck_through_layer(device):
    cell = make_cell(1).to(device)
    layer = inn.FixedPointLayer(
        cell, solver=TIGHT, backward=inn.AID(linear.GMRES(max_iter=60, tol=1e-13, restart=60))
    )
    x = torch.randn(2, 5).to(device).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))
    params = (cell.A.weight, cell.B.weight, cell.B.bias)

    def from_params(A, B, c):
        return inn.fixed_point(
            lambda w, xx: torch.tanh(w @ A.T + xx @ B.T + c),
            x.detach(),
            solver=TIGHT,
            backward=inn.AID(linear.GMRES(max_iter=60, tol=1e-13, restart=60)),
            z0=torch.zeros(2, 6, device=device),
        )[0]

    assert torch.autograd.gradcheck(from_params, tuple(p.detach().requires_grad_() for p in params))


@pytest.mark.parametrize("K", [1, 3, 10])
def test_truncated_itd_from_fixed_point_equals_aid_fp(K, device):
    cell = make_cell(2).to(device)
    x, R = torch.randn(3, 5).to(device), torch.randn(3, 6).to(device)
    with torch.no_grad():
        w_star, _ = TIGHT.solve(lambda z: cell(z, x), cell.initial_state(x))
    solver = inn.FixedPointIteration(max_iter=K + 7, tol=0.0)
    itd, _ = grads_of(cell, x, R, inn.ITD(truncate=K), solver, z0=w_star)
    aid, _ = grads_of(cell, x, R, inn.AID(linear.Neumann(max_iter=K, tol=0.0)), solver, z0=w_star)
    for a, b in zip(itd, aid):
        assert rel(a, b) <= 1e-10


def test_errors_fall_geometrically_with_t_equal_k(device):
    cell = make_cell(3).to(device)
    x, R = torch.randn(3, 5).to(device), torch.randn(3, 6).to(device)
    reference = torch.cat([g.reshape(-1) for g in dense_reference(cell, x, R)])
    ts = [5, 10, 15, 20, 25, 30]
    for make_mode in (lambda t: inn.ITD(), lambda t: inn.AID(linear.Neumann(max_iter=t, tol=0.0))):
        errors = []
        for t in ts:
            solver = inn.FixedPointIteration(max_iter=t, tol=0.0)
            grads, _ = grads_of(cell, x, R, make_mode(t), solver)
            errors.append(rel(torch.cat([g.reshape(-1) for g in grads]), reference))
        ratios = [b / a for a, b in zip(errors, errors[1:])]
        assert all(r < 1 for r in ratios), errors
        rate = (errors[-1] / errors[0]) ** (1 / (ts[-1] - ts[0]))
        assert rate <= Q + 0.05, (rate, errors)


@pytest.mark.parametrize("backward", ALL_MODES, ids=repr)
def test_second_backward_with_retain_graph_is_identical(backward, device):
    cell = make_cell(4).to(device)
    layer = inn.FixedPointLayer(cell, solver=TIGHT, backward=backward)
    loss = layer(torch.randn(3, 5).to(device)).sin().sum()
    first = torch.autograd.grad(loss, list(layer.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(layer.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backward", EXACT_MODES[1:], ids=repr)
def test_weight_tying_two_applications_in_one_graph(backward, device):
    cell = make_cell(5, in_features=6, width=6).to(device)
    x = torch.randn(2, 6).to(device)

    def loss_with(mode):
        layer = inn.FixedPointLayer(cell, solver=TIGHT, backward=mode)
        return layer(layer(x).cos()).square().sum()

    params = list(cell.parameters())
    reference = torch.autograd.grad(loss_with(inn.ITD()), params)
    grads = torch.autograd.grad(loss_with(backward), params)
    for a, b in zip(grads, reference):
        assert rel(a, b) <= 1e-8


def test_ridge_regression_gradient_step_cg_matches_closed_form(device):
    torch.manual_seed(6)
    n, p = 40, 8
    X, y = torch.randn(n, p).to(device), torch.randn(n).to(device)
    Xv, yv = torch.randn(n, p).to(device), torch.randn(n).to(device)
    lam = torch.tensor(0.7, device=device, requires_grad=True)

    def inner(w, lam):
        return 0.5 * (X @ w - y).square().sum() + 0.5 * lam * w.square().sum()

    L = float(torch.linalg.eigvalsh(X.T @ X).max()) + 0.7
    phi = inn.maps.GradientStep(inner, step_size=1.0 / L)
    w, stats = inn.fixed_point(
        phi, lam, solver=inn.Anderson(max_iter=500, tol=1e-14, memory=8),
        backward=inn.AID(linear.CG(max_iter=100, tol=1e-14)), z0=torch.zeros(p, device=device),
    )
    outer = 0.5 * (Xv @ w - yv).square().sum()
    (grad,) = torch.autograd.grad(outer, lam)
    with torch.no_grad():
        H = X.T @ X + lam * torch.eye(p, device=device)
        w_star = torch.linalg.solve(H, X.T @ y)
        g_w = Xv.T @ (Xv @ w_star - yv)
        exact = -g_w @ torch.linalg.solve(H, w_star)
    assert rel(w.detach(), w_star) <= 1e-10
    assert abs(float(grad - exact)) <= 1e-8 * abs(float(exact))
    assert stats.backward.converged


def test_jacobian_free_gradient_is_its_definition(device):
    """JFB replaces the adjoint v of (I − ∂₁Φᵀ) v = ∇E by v = ∇E, so its gradient is
    ∂Φ/∂θᵀ ∇E at w*.  For Φ = tanh(A w + B x + c) and E = <R, w>, with δ = R ⊙ (1 − w*²):
    ∇A = δᵀ w*, ∇B = δᵀ x, ∇c = Σ δ, ∇x = δ B — written out here without autograd."""
    cell = make_cell(seed=3).to(device)
    x, R = torch.randn(4, 5).to(device), torch.randn(4, 6).to(device)
    grads, stats = grads_of(cell, x, R, inn.JacobianFree())
    assert stats.converged
    with torch.no_grad():
        w, _ = TIGHT.solve(lambda z: cell(z, x), cell.initial_state(x))
        delta = R * (1 - w * w)
        explicit = [delta.T @ w, delta.T @ x, delta.sum(0), delta @ cell.B.weight]
    for name, g, e in zip(["A", "B", "c", "x"], grads, explicit):
        assert rel(g, e) <= 1e-12, (name, rel(g, e))
    # and it is not the implicit gradient: ‖A‖₂ = 0.8 makes the two differ by far more than 1e-12
    reference = dense_reference(cell, x, R)
    assert min(rel(g, r) for g, r in zip(grads, reference)) > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_phantom_gradient_of_k_undamped_steps_is_aid_with_k_neumann_iterations(steps, device):
    """From the converged w*, K differentiable steps w ← Φ(w) give Σ_{j<K} ∂₂Φᵀ (Jᵀ)ʲ ∇E: the
    truncated Neumann series of AID-FP with K iterations, to rounding."""
    cell = make_cell(seed=4).to(device)
    x, R = torch.randn(3, 5).to(device), torch.randn(3, 6).to(device)
    phantom, stats = grads_of(cell, x, R, inn.JacobianFree(steps=steps))
    neumann, _ = grads_of(cell, x, R, inn.AID(linear.Neumann(max_iter=steps, tol=0.0)))
    assert stats.converged
    for name, g, n in zip(["A", "B", "c", "x"], phantom, neumann):
        assert rel(g, n) <= 1e-12, (name, rel(g, n))


@pytest.mark.parametrize("damping", [1.0, 0.6])
def test_phantom_gradient_converges_to_the_implicit_gradient_as_steps_grow(damping, device):
    """The damped steps w ← w + λ(Φ(w) − w) contract the error of the implicit gradient by
    ‖1 − λ + λJ‖ per step: 300 steps reach the dense reference to 1e-10; 3 do not."""
    cell = make_cell(seed=5).to(device)
    x, R = torch.randn(3, 5).to(device), torch.randn(3, 6).to(device)
    reference = dense_reference(cell, x, R)
    many, _ = grads_of(cell, x, R, inn.JacobianFree(steps=300, damping=damping))
    few, _ = grads_of(cell, x, R, inn.JacobianFree(steps=3, damping=damping))
    for name, g, r in zip(["A", "B", "c", "x"], many, reference):
        assert rel(g, r) <= 1e-10, (name, rel(g, r))
    assert max(rel(g, r) for g, r in zip(few, reference)) > 1e-3


def test_phantom_gradient_keeps_the_solver_value():
    cell = make_cell(seed=6)
    x = torch.randn(3, 5)
    w0, _ = inn.fixed_point(cell, x.requires_grad_(), solver=TIGHT, backward=inn.JacobianFree())
    w3, _ = inn.fixed_point(cell, x, solver=TIGHT, backward=inn.JacobianFree(steps=3, damping=0.5))
    assert torch.equal(w0, w3) and w3.requires_grad
