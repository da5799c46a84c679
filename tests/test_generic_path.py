"""AID's generic path (a map without a closed-form Jacobian) against the dense implicit gradient.

The step is recorded once per solve from leaves ``w*`` and ``u`` (:class:`LeafStep`); every
adjoint product walks that graph alone.  References in float64: ``(I − ∂₁Φ)⁻ᵀ`` from
``torch.linalg.solve`` with ``∂₁Φ`` by ``torch.func.jacrev``, and ITD unrolled through 400 steps
of a contraction for the derivatives of higher order.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from user_maps import UserTanh

import implicitnets as inn
from implicitnets import linear
from implicitnets.backward.leaf_step import LeafStep

pytestmark = pytest.mark.usefixtures("float64")

RTOL = 1e-8
TIGHT = inn.FixedPointIteration(max_iter=400, tol=1e-15)
MODES = [
    inn.AID(linear.Neumann(max_iter=400, tol=1e-14)),
    inn.AID(linear.GMRES(max_iter=60, tol=1e-14, restart=30)),
    inn.AID(linear.NormalCG(max_iter=200, tol=1e-14)),
]


def scaled(lin: nn.Linear, norm: float) -> nn.Linear:
    with torch.no_grad():
        lin.weight.mul_(norm / torch.linalg.matrix_norm(lin.weight, 2))
    return lin


class TupleMap(nn.Module):
    """A two-part state ``(a, b)``: ``a ← tanh(A a + C b + u)``, ``b ← sin(D a) / 2``."""

    def __init__(self, n_in: int = 5, width: int = 6) -> None:
        super().__init__()
        self.A = scaled(nn.Linear(width, width, bias=False), 0.3)
        self.C = scaled(nn.Linear(3, width, bias=False), 0.3)
        self.D = scaled(nn.Linear(width, 3, bias=False), 0.3)
        self.B = nn.Linear(n_in, width)

    def inject(self, x):
        return self.B(x)

    def step(self, w, u):
        a, b = w
        return torch.tanh(self.A(a) + self.C(b) + u), 0.5 * torch.sin(self.D(a))

    def initial_state(self, x):
        return x.new_zeros(x.shape[0], 6), x.new_zeros(x.shape[0], 3)


def flat(state) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in inn.state.parts(state)])


def dense_grads(cell: nn.Module, x: torch.Tensor, R, wrt: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of ``E = <R, w*>`` with respect to ``wrt`` by the implicit function theorem."""
    with torch.no_grad():
        u = cell.inject(x)
        w, _ = TIGHT.solve(lambda z: cell.step(z, u), cell.initial_state(x))
    parts = inn.state.parts(w)
    sizes = [t.numel() for t in parts]

    def step_flat(v: torch.Tensor) -> torch.Tensor:
        chunks = [c.reshape(t.shape) for c, t in zip(torch.split(v, sizes), parts)]
        return flat(cell.step(chunks[0] if isinstance(w, torch.Tensor) else tuple(chunks), u))

    J = torch.func.jacrev(step_flat)(flat(w).detach()).detach()
    v = torch.linalg.solve((torch.eye(J.shape[0]) - J).T, flat(R))
    out = (v * flat(cell.step(w, cell.inject(x)))).sum()
    return list(torch.autograd.grad(out, wrt, allow_unused=True))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def loss_of(w, R) -> torch.Tensor:
    return sum((r * t).sum() for r, t in zip(inn.state.parts(R), inn.state.parts(w)))


@pytest.fixture
def recorded(monkeypatch):
    """The :class:`LeafStep` s AID recorded (``None`` where it kept the caller's graph)."""
    seen: list = []
    original = LeafStep.record.__func__

    def record(cls, problem, z):
        step = original(cls, problem, z)
        seen.append(step)
        return step

    monkeypatch.setattr(LeafStep, "record", classmethod(record))
    return seen


@pytest.mark.parametrize("backward", MODES, ids=repr)
@pytest.mark.parametrize("make", [UserTanh, TupleMap], ids=["tensor-state", "tuple-state"])
def test_generic_path_matches_the_dense_implicit_gradient(make, backward, recorded):
    torch.manual_seed(0)
    cell = make()
    x = torch.randn(3, 5, requires_grad=True)
    R = tuple(torch.randn_like(t) for t in inn.state.parts(cell.initial_state(x)))
    R = R[0] if len(R) == 1 else R
    wrt = [*cell.parameters(), x]
    w, stats = inn.fixed_point(cell, x, solver=TIGHT, backward=backward)
    got = torch.autograd.grad(loss_of(w, R), wrt)
    assert len(recorded) == 1 and recorded[0] is not None  # the generic path ran
    assert stats.backward.converged
    for g, r in zip(got, dense_grads(cell, x, R, wrt)):
        assert rel(g, r) <= RTOL


def test_the_graph_behind_x_and_a_parametrized_weight_get_their_gradients(recorded):
    """The step is cut from the graph that produced ``x``: gradients still reach an encoder
    before the layer and the trainable tensor behind a parametrized weight."""
    torch.manual_seed(1)
    cell = UserTanh()
    inn.spectral_norm(cell.A, "weight", bound=0.6, exact=True)
    encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5))
    x0, R = torch.randn(3, 4), torch.randn(3, 6)
    wrt = [*encoder.parameters(), cell.A.parametrizations.weight.original, cell.B.weight, cell.B.bias]
    aid = inn.AID(linear.GMRES(max_iter=60, tol=1e-14, restart=30))
    got = torch.autograd.grad(loss_of(inn.fixed_point(cell, encoder(x0), solver=TIGHT, backward=aid)[0], R), wrt)
    assert recorded[0] is not None
    ref = torch.autograd.grad(loss_of(inn.fixed_point(cell, encoder(x0), solver=TIGHT, backward=inn.ITD())[0], R), wrt)
    for g, r in zip(got, ref):
        assert rel(g, r) <= RTOL


def test_a_parameter_the_step_does_not_use_gets_no_gradient(recorded):
    torch.manual_seed(2)
    cell = UserTanh()
    cell.unused = nn.Linear(2, 2)
    x = torch.randn(3, 5)
    w, _ = inn.fixed_point(cell, x, solver=TIGHT, backward=MODES[0])
    loss_of(w, torch.randn(3, 6)).backward()
    assert recorded[0] is not None
    assert cell.unused.weight.grad is None and cell.unused.bias.grad is None
    assert all(p.grad is not None for p in (cell.A.weight, cell.B.weight, cell.B.bias))


def test_a_frozen_parameter_and_a_second_backward(recorded):
    """A parameter that needs no gradient is a constant; the kept graph serves a second backward."""
    torch.manual_seed(3)
    cell = UserTanh()
    cell.A.weight.requires_grad_(False)
    x = torch.randn(3, 5, requires_grad=True)
    R = torch.randn(3, 6)
    w, _ = inn.fixed_point(cell, x, solver=TIGHT, backward=MODES[1])
    first = torch.autograd.grad(loss_of(w, R), [x, cell.B.weight], retain_graph=True)
    second = torch.autograd.grad(loss_of(w, R), [x, cell.B.weight])
    ref = dense_grads(cell, x, R, [x, cell.B.weight])
    for a, b, r in zip(first, second, ref):
        assert torch.equal(a, b) and rel(a, r) <= RTOL


def test_a_closure_keeps_the_callers_graph(recorded):
    """A step that reads a tensor needing a gradient that is not one of the map's (a closure)
    is not recorded from leaves: that tensor gets its first-order gradient through the
    caller's graph, and a higher-order derivative is refused."""
    torch.manual_seed(4)
    scale = torch.tensor(0.7, requires_grad=True)
    cell = UserTanh()
    step = cell.step

    class Closure(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = cell

        def inject(self, x):
            return cell.inject(x)

        def step(self, w, u):
            return scale * step(w, u)

        def initial_state(self, x):
            return cell.initial_state(x)

    x, R = torch.randn(3, 5), torch.randn(3, 6)
    aid = MODES[1]
    w, _ = inn.fixed_point(Closure(), x, solver=TIGHT, backward=aid)
    (g,) = torch.autograd.grad(loss_of(w, R), scale)
    assert recorded[-1] is None
    (ref,) = torch.autograd.grad(loss_of(inn.fixed_point(Closure(), x, solver=TIGHT, backward=inn.ITD())[0], R), scale)
    assert rel(g, ref) <= RTOL
    w, _ = inn.fixed_point(Closure(), x, solver=TIGHT, backward=aid)
    with pytest.raises(NotImplementedError, match="captured by a closure"):
        torch.autograd.grad(loss_of(w, R), scale, create_graph=True)


@pytest.mark.parametrize("make", [UserTanh, TupleMap], ids=["tensor-state", "tuple-state"])
def test_second_derivatives_through_the_generic_path_are_exact(make, recorded):
    """A Hessian–vector product (``create_graph=True``) through AID equals ITD's, unrolled
    through 400 steps of the contraction."""
    torch.manual_seed(5)
    cell = make()
    x = torch.randn(3, 5, requires_grad=True)
    R = tuple(torch.randn_like(t) for t in inn.state.parts(cell.initial_state(x)))
    params = list(cell.parameters())
    direction = [torch.randn_like(p) for p in params]

    def hvp(backward) -> list[torch.Tensor]:
        w, _ = inn.fixed_point(cell, x, solver=TIGHT, backward=backward)
        loss = loss_of(w, R) + sum((t ** 3).sum() for t in inn.state.parts(w))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        inner = sum((g * d).sum() for g, d in zip(grads, direction))
        return list(torch.autograd.grad(inner, [*params, x]))

    got = hvp(MODES[1])
    assert recorded[0] is not None
    for g, r in zip(got, hvp(inn.ITD())):
        assert rel(g, r) <= RTOL
