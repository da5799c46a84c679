"""Derivatives of every order and every torch.func transform through every backward mode.

References, in float64: ITD unrolled through 400 steps of a 0.5-contraction (exact to
rounding: 0.5⁴⁰⁰ is far below it), and the dense implicit-function-theorem Jacobian
``(I − ∂₁Φ)⁻¹ ∂₂Φ`` from ``torch.linalg.solve``.  Three maps: the built-in ``TanhMap`` (a
closed-form Jacobian and a spectral-norm parametrization), the same map written by a user
(no closed form) and a map with a tuple state.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from user_maps import UserTanh

import implicitnets as inn
from implicitnets import linear

DT = torch.float64
T = 400  # forward iterations of every solve
RTOL = 1e-8


class TupleMap(nn.Module):
    """A two-part state ``(a, b)``: ``a ← tanh(A a + C b + u)``, ``b ← sin(D a) / 2``."""

    def __init__(self, n_in: int, width: int) -> None:
        super().__init__()
        self.A = nn.Linear(width, width, bias=False, dtype=DT)
        self.C = nn.Linear(3, width, bias=False, dtype=DT)
        self.D = nn.Linear(width, 3, bias=False, dtype=DT)
        self.B = nn.Linear(n_in, width, dtype=DT)
        with torch.no_grad():
            for lin in (self.A, self.C, self.D):
                lin.weight.mul_(0.3 / torch.linalg.matrix_norm(lin.weight, 2))

    row_separable = True

    def inject(self, x):
        return self.B(x)

    def step(self, w, u):
        a, b = w
        return torch.tanh(self.A(a) + self.C(b) + u), torch.sin(self.D(a)) / 2

    def initial_state(self, x):
        return x.new_zeros(x.shape[0], self.A.weight.shape[0]), x.new_zeros(x.shape[0], 3)


def make_map(kind: str, device: torch.device, seed: int = 0) -> nn.Module:
    """The map of ``kind``, initialised on the CPU (the same weights on every device), on ``device``."""
    torch.manual_seed(seed)
    if kind == "tanh":
        return inn.maps.TanhMap(5, 4, contraction=0.5, exact=True).to(DT).to(device)
    return (UserTanh(5, 4, norm=0.5, dtype=DT) if kind == "user" else TupleMap(5, 4)).to(device)


MAPS = ["tanh", "user", "tuple"]
AID_MODES = [
    inn.AID(linear.GMRES(max_iter=60, tol=1e-13)),
    inn.AID(linear.Neumann(max_iter=200, tol=0.0)),
    inn.AID(linear.NormalCG(max_iter=200, tol=1e-14)),
    inn.AID(linear.Exact()),
]
SOLVER = inn.FixedPointIteration(max_iter=T, tol=0.0)


def layer(cell: nn.Module, backward: inn.BackwardMode, solver: inn.ForwardSolver = SOLVER) -> inn.FixedPointLayer:
    return inn.FixedPointLayer(cell, solver=solver, backward=backward)


def flat(w) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in inn.state.parts(w)], 1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def inputs(device: torch.device, seed: int = 1, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 5, dtype=DT, generator=torch.Generator().manual_seed(seed)).to(device)


def loss_of(out) -> torch.Tensor:
    w = flat(out)
    return (w.square() * torch.linspace(0.5, 1.5, w.shape[1], dtype=DT, device=w.device)).sum() + w.sum()


def hvp(lay: inn.FixedPointLayer, x: torch.Tensor) -> list[torch.Tensor]:
    """Hessian–vector product of the loss with respect to (parameters, x)."""
    x = x.clone().requires_grad_()
    wrt = [*lay.parameters(), x]
    grads = torch.autograd.grad(loss_of(lay(x)), wrt, create_graph=True)
    gen = torch.Generator().manual_seed(7)
    vs = [torch.randn(t.shape, dtype=DT, generator=gen).to(t.device) for t in wrt]
    return list(torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), wrt))


@pytest.mark.parametrize("backward", AID_MODES, ids=repr)
@pytest.mark.parametrize("kind", MAPS)
def test_hessian_vector_product_matches_unrolled_itd(kind, backward, device):
    cell, x = make_map(kind, device), inputs(device)
    reference = hvp(layer(cell, inn.ITD()), x)
    got = hvp(layer(cell, backward), x)
    for a, b in zip(got, reference):
        assert rel(a, b) < RTOL


def test_unrolled_reference_matches_finite_differences(device):
    cell, x = make_map("tanh", device), inputs(device)
    lay = layer(cell, inn.ITD())
    p = cell.B.weight
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(p.shape, dtype=DT, generator=gen).to(device)

    def grad_at(delta: float) -> torch.Tensor:
        with torch.no_grad():
            p.add_(delta * v)
        try:
            return torch.autograd.grad(loss_of(lay(x)), p)[0]
        finally:
            with torch.no_grad():
                p.sub_(delta * v)

    eps = 1e-5
    fd = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    g = torch.autograd.grad(loss_of(lay(x)), p, create_graph=True)[0]
    exact = torch.autograd.grad((g * v).sum(), p)[0]
    assert rel(exact, fd) < 1e-7


def maml_outer_gradient(lay: inn.FixedPointLayer, x_train, x_val, lr: float = 0.3) -> list[torch.Tensor]:
    """One inner SGD step with ``create_graph=True``, then the gradient of the outer loss."""
    params = dict(lay.named_parameters())
    inner = loss_of(functional_call(lay, params, (x_train,)))
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    adapted = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
    outer = loss_of(functional_call(lay, adapted, (x_val,)))
    return list(torch.autograd.grad(outer, list(params.values())))


@pytest.mark.parametrize("backward", AID_MODES[:2], ids=repr)
@pytest.mark.parametrize("kind", MAPS)
def test_maml_step_matches_unrolled_itd(kind, backward, device):
    cell = make_map(kind, device)
    x_train, x_val = inputs(device, 1), inputs(device, 2)
    reference = maml_outer_gradient(layer(cell, inn.ITD()), x_train, x_val)
    got = maml_outer_gradient(layer(cell, backward), x_train, x_val)
    for a, b in zip(got, reference):
        assert rel(a, b) < RTOL


EVERY_MODE = [inn.ITD(), inn.JacobianFree(), *AID_MODES]
# a loop and vmap run the same iterations, converged or not; Anderson and Broyden stop short
# of rounding, where ITD through their extrapolation is well conditioned
SOLVERS = [
    inn.FixedPointIteration(max_iter=80, tol=0.0),
    inn.Anderson(max_iter=10, tol=0.0),
    inn.Broyden(max_iter=10, tol=0.0),
]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("backward", EVERY_MODE, ids=repr)
@pytest.mark.parametrize("kind", ["tanh", "tuple"])
def test_vmap_of_grad_matches_a_loop_of_backward_passes(kind, backward, solver, device):
    cell = make_map(kind, device)
    lay = layer(cell, backward, solver)
    params = {k: v.detach() for k, v in lay.named_parameters()}
    X = inputs(device, batch=4)

    def sample_loss(p, xi):
        return loss_of(functional_call(lay, p, (xi[None],)))

    batched = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0))(params, X)
    for i in range(X.shape[0]):
        lay.zero_grad()
        loss_of(lay(X[i : i + 1])).backward()
        for name, p in lay.named_parameters():
            assert rel(batched[name][i], p.grad) < RTOL, name


def dense_input_jacobian(cell: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``dw*/dx = (I − ∂₁Φ)⁻¹ ∂₂Φ`` at the converged ``w*``, dense over the whole batch."""
    w = layer(cell, inn.ITD())(x)
    w = tuple(t.detach() for t in inn.state.parts(w))
    single = len(w) == 1

    def phi(wf: torch.Tensor, xf: torch.Tensor) -> torch.Tensor:
        sizes = [t[0].numel() for t in w]
        chunks = torch.split(wf.reshape(x.shape[0], -1), sizes, 1)
        state = chunks[0] if single else tuple(c.reshape(t.shape) for c, t in zip(chunks, w))
        return flat(cell.step(state, cell.inject(xf.reshape(x.shape)))).reshape(-1)

    wf = flat(w if not single else w[0]).reshape(-1)
    Jw = torch.func.jacrev(phi, 0)(wf, x.reshape(-1))
    Jx = torch.func.jacrev(phi, 1)(wf, x.reshape(-1))
    return torch.linalg.solve(torch.eye(wf.numel(), dtype=DT, device=wf.device) - Jw, Jx)


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
@pytest.mark.parametrize("backward", EVERY_MODE[:1] + AID_MODES, ids=repr)
@pytest.mark.parametrize("kind", MAPS)
def test_jacobians_match_the_dense_implicit_jacobian(kind, backward, transform, device):
    cell, x = make_map(kind, device), inputs(device)
    reference = dense_input_jacobian(cell, x)
    lay = layer(cell, backward)
    jac = getattr(torch.func, transform)(lambda xi: flat(lay(xi)).reshape(-1))(x)
    assert rel(jac.reshape(reference.shape), reference) < RTOL


@pytest.mark.parametrize("backward", EVERY_MODE[:1] + AID_MODES, ids=repr)
@pytest.mark.parametrize("kind", MAPS)
def test_dual_tensors_give_the_implicit_tangent(kind, backward, device):
    cell, x = make_map(kind, device), inputs(device)
    reference = dense_input_jacobian(cell, x)
    tangent = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(5)).to(device)
    lay = layer(cell, backward)
    with fwAD.dual_level():
        out = lay(fwAD.make_dual(x, tangent))
        got = flat(tuple(fwAD.unpack_dual(t).tangent for t in inn.state.parts(out)))
    assert rel(got.reshape(-1), reference @ tangent.reshape(-1)) < RTOL


@pytest.mark.parametrize("backward", EVERY_MODE[:1] + AID_MODES, ids=repr)
@pytest.mark.parametrize("kind", MAPS)
def test_torch_func_hessian_of_a_small_scalar_function(kind, backward, device):
    cell, x = make_map(kind, device), inputs(device, batch=2)

    def scalar(lay):
        return lambda xi: loss_of(lay(xi))

    reference = torch.func.hessian(scalar(layer(cell, inn.ITD())))(x)
    got = torch.func.hessian(scalar(layer(cell, backward)))(x)
    assert rel(got, reference) < RTOL


def test_torch_func_jvp_solves_one_tangent_system_instead_of_unrolling(device):
    cell, x = make_map("tanh", device), inputs(device)
    counts = []

    class Counting(linear.GMRES):
        def solve(self, op, b, x0=None):
            counts.append(1)
            return super().solve(op, b, x0)

    lay = layer(cell, inn.AID(Counting(max_iter=60, tol=1e-13)))
    tangent = torch.ones_like(x)
    _, jvp = torch.func.jvp(lambda xi: lay(xi), (x,), (tangent,))
    assert counts == [1]
    reference = dense_input_jacobian(cell, x) @ tangent.reshape(-1)
    assert rel(jvp.reshape(-1), reference) < RTOL


def jfb_one_step_hvp(cell: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The JacobianFree definition: the one step at the converged w*, w* held constant."""
    with torch.no_grad():
        w = layer(cell, inn.ITD())(x)
    x = x.clone().requires_grad_()
    wrt = [*cell.parameters(), x]
    grads = torch.autograd.grad(loss_of(cell.step(w, cell.inject(x))), wrt, create_graph=True)
    gen = torch.Generator().manual_seed(7)
    vs = [torch.randn(t.shape, dtype=DT, generator=gen).to(t.device) for t in wrt]
    return list(torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), wrt))


def gradient_step_map(device: torch.device) -> inn.maps.GradientStep:
    """A gradient step on a strongly convex quadratic: a symmetric ∂₁Φ (CG applies)."""
    torch.manual_seed(0)

    class Quadratic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.M = nn.Parameter(torch.randn(4, 4, dtype=DT) * 0.3)

        def forward(self, w, x):
            H = self.M @ self.M.T + torch.eye(4, dtype=DT, device=w.device)
            return 0.5 * ((w @ H) * w).sum() - (w * x.tanh()).sum()

    return inn.maps.GradientStep(Quadratic().to(device), step_size=0.3)


BUILT_IN = [
    inn.ITD(),
    inn.ITD(truncate=150),
    inn.JacobianFree(),
    *AID_MODES,
    inn.AID(linear.GMRES(max_iter=60, tol=1e-13), on_failure=inn.Raise()),
    inn.AID(linear.GMRES(max_iter=60, tol=1e-13), on_failure=inn.FallbackITD()),
    inn.AID(linear.GMRES(max_iter=60, tol=1e-13), on_failure=inn.FallbackJacobianFree()),
    inn.AID(linear.CG(max_iter=100, tol=1e-14)),
]


@pytest.mark.parametrize("backward", BUILT_IN, ids=repr)
def test_every_built_in_mode_gives_its_exact_higher_order_derivative_or_raises(backward, device):
    symmetric = isinstance(backward, inn.AID) and type(backward.linear_solver) is linear.CG
    cell = gradient_step_map(device) if symmetric else make_map("tanh", device)
    x = torch.randn(3, 4 if symmetric else 5, dtype=DT, generator=torch.Generator().manual_seed(1)).to(device)
    if isinstance(backward, inn.JacobianFree):
        reference = jfb_one_step_hvp(cell, x)
    else:
        reference = hvp(layer(cell, inn.ITD()), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged solve gives its answer without a warning
        got = hvp(layer(cell, backward), x)
    for a, b in zip(got, reference):
        assert rel(a, b) < RTOL


@pytest.mark.parametrize("policy", [inn.Warn(), inn.Raise(), inn.FallbackITD(), inn.FallbackJacobianFree()], ids=repr)
def test_a_failed_adjoint_solve_in_a_higher_order_backward_is_never_silent(policy, device):
    cell, x = make_map("tanh", device), inputs(device)
    lay = layer(cell, inn.AID(linear.Neumann(max_iter=2, tol=1e-12), on_failure=policy))
    if isinstance(policy, inn.Raise):
        with pytest.raises(inn.ConvergenceError):
            hvp(lay, x)
    elif isinstance(policy, inn.FallbackITD):
        with pytest.raises(NotImplementedError, match="FallbackITD"), warnings.catch_warnings():
            warnings.simplefilter("ignore", inn.ConvergenceWarning)
            hvp(lay, x)
    else:
        with pytest.warns(inn.ConvergenceWarning):
            hvp(lay, x)
    assert lay.stats.backward.converged is False


def test_a_closure_captured_tensor_gets_its_first_order_gradient_and_a_higher_order_one_raises(device):
    torch.manual_seed(0)
    A = (0.4 * torch.linalg.qr(torch.randn(4, 4, dtype=DT))[0]).to(device).requires_grad_()

    def f(w, x):
        return torch.tanh(w @ A.T + x)

    x = inputs(device)[:, :4]
    aid = inn.AID(linear.GMRES(max_iter=60, tol=1e-13))
    (g_aid,) = torch.autograd.grad(loss_of(inn.fixed_point(f, x, solver=SOLVER, backward=aid)[0]), A)
    (g_itd,) = torch.autograd.grad(loss_of(inn.fixed_point(f, x, solver=SOLVER, backward=inn.ITD())[0]), A)
    assert rel(g_aid, g_itd) < RTOL
    w, _ = inn.fixed_point(f, x, solver=SOLVER, backward=aid)
    with pytest.raises(NotImplementedError, match="captured by a closure"):
        torch.autograd.grad(loss_of(w), A, create_graph=True)


class Halving(inn.ForwardSolver):
    """A user's solver: ``z ← (z + g(z)) / 2`` (reads a host value to stop)."""

    max_iter = 2000
    tol = 1e-15

    def solve(self, g, z0):
        z, k = z0, 0
        while k < self.max_iter:
            z_new = inn.state.map_parts(lambda a, b: 0.5 * (a + b), z, g(z))
            change = max(float((a - b).detach().abs().max()) for a, b in zip(*map(inn.state.parts, (z_new, z))))
            z, k = z_new, k + 1
            if change <= self.tol:
                break
        return z, inn.SolverStats(iterations=k, residual=change, converged=change <= self.tol)


class Richardson(linear.LinearSolver):
    """A user's linear solver: ``x ← x + (b − A x)`` until the relative residual is tiny."""

    def solve(self, op, b, x0=None):
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        iterations = 0
        while True:
            r = b - op.mv(x)
            residual = float(torch.linalg.vector_norm(r) / torch.linalg.vector_norm(b))
            if residual < 1e-14 or iterations == 500:
                return x, linear.LinearInfo(iterations, residual, residual < 1e-12)
            x, iterations = x + r, iterations + 1


@pytest.mark.parametrize("kind", ["tanh", "tuple"])
def test_user_defined_solvers_under_every_transform(kind, device):
    cell, x = make_map(kind, device), inputs(device)
    lay = layer(cell, inn.AID(Richardson()), Halving())
    reference_layer = layer(cell, inn.ITD())
    for a, b in zip(hvp(lay, x), hvp(reference_layer, x)):
        assert rel(a, b) < RTOL
    jac = torch.func.jacfwd(lambda xi: flat(lay(xi)).reshape(-1))(x)
    assert rel(jac.reshape(-1), dense_input_jacobian(cell, x).reshape(-1)) < RTOL
    per_sample = torch.func.vmap(lambda xi: flat(lay(xi[None])))(x)
    assert rel(per_sample.squeeze(1), flat(reference_layer(x))) < RTOL


def test_vmap_solves_the_mapped_problems_as_one_batch(device):
    cell, x = make_map("tanh", device), inputs(device, batch=6)
    sizes = []

    class Recording(inn.FixedPointIteration):
        def solve(self, g, z0):
            sizes.append(z0.shape[0])
            return super().solve(g, z0)

    lay = layer(cell, inn.AID(linear.GMRES(max_iter=60, tol=1e-13)), Recording(max_iter=T, tol=0.0))
    out = torch.func.vmap(lambda xi: lay(xi[None]))(x)
    assert sizes == [6]  # one solve of the six problems, not six solves
    assert lay.stats.iterations == T
    assert rel(out.squeeze(1), layer(cell, inn.ITD())(x)) < RTOL


def test_torch_func_grad_through_a_parametrized_map_matches_autograd(device):
    cell, x = make_map("tanh", device), inputs(device)
    lay = layer(cell, inn.AID(linear.GMRES(max_iter=60, tol=1e-13)))
    params = {k: v.detach() for k, v in lay.named_parameters()}
    grads = torch.func.grad(lambda p: loss_of(functional_call(lay, p, (x,))))(params)
    lay.zero_grad()
    loss_of(lay(x)).backward()
    for name, p in lay.named_parameters():
        assert rel(grads[name], p.grad) < RTOL, name


@pytest.mark.parametrize("backward", [inn.JacobianFree(), inn.ITD(), inn.ITD(truncate=50)], ids=repr)
def test_forward_mode_agrees_with_reverse_mode_in_the_approximate_modes(backward, device):
    """JacobianFree and truncated ITD define their own derivatives; forward mode must give the
    same ones as reverse mode (not a zero tangent), for the input and for a parameter."""
    cell, x = make_map("tanh", device), inputs(device)
    lay = layer(cell, backward, inn.FixedPointIteration(max_iter=100, tol=0.0))
    rev, fwd = torch.func.jacrev(lay)(x), torch.func.jacfwd(lay)(x)
    assert float(rev.abs().max()) > 0.1 and rel(fwd, rev) < 1e-12
    params = {k: v.detach() for k, v in lay.named_parameters()}

    def of_bias(b):
        return functional_call(lay, {**params, "cell.B.bias": b}, (x,))

    rev, fwd = torch.func.jacrev(of_bias)(params["cell.B.bias"]), torch.func.jacfwd(of_bias)(params["cell.B.bias"])
    assert float(rev.abs().max()) > 0.1 and rel(fwd, rev) < 1e-12
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(lay(fwAD.make_dual(x, torch.ones_like(x)))).tangent
    assert rel(tangent, torch.func.jvp(lay, (x,), (torch.ones_like(x),))[1]) < 1e-12
