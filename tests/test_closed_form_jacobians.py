"""The maps' closed-form ``J = ∂₁Φ`` against autograd's graph operator and the dense Jacobian
(float64), and AID through them against the dense implicit gradient."""

from __future__ import annotations

import pytest
import torch

import implicitnets as inn
from implicitnets.maps.jacobian import state_jacobian
from implicitnets.operator import GraphJacobian

pytestmark = pytest.mark.usefixtures("float64")


def _tanh():
    torch.manual_seed(0)
    return inn.maps.TanhMap(7, 6, contraction=0.8), torch.randn(4, 7)


def _conv():
    torch.manual_seed(1)
    return inn.maps.ConvCell(2, 3, (5, 5), contraction=0.8, activation="tanh"), torch.randn(2, 2, 5, 5)


def _gradient_step():
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(30, 5, generator=g), torch.randn(30, generator=g)
    loss = lambda w, hp: 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (hp[0] * w * w).sum()
    return inn.maps.GradientStep(loss, 0.2), (torch.rand(5, generator=g) + 0.1,)


MAPS = {"TanhMap": _tanh, "ConvCell": _conv, "GradientStep": _gradient_step}


@pytest.mark.parametrize("build", MAPS.values(), ids=MAPS.keys())
def test_closed_form_jacobian_equals_graph_and_dense(build):
    f, x = build()
    u = f.inject(x)
    w = f.initial_state(x) if hasattr(f, "initial_state") else torch.zeros(5)
    w = w + 0.3 * torch.randn(w.shape)
    with torch.enable_grad():
        leaf = w.detach().requires_grad_()
        out = f.step(leaf, u)
    closed, graph = state_jacobian(f.step, leaf, u, out), GraphJacobian(out, leaf)
    assert type(closed) is not GraphJacobian  # the map's own operator is the one used
    dense = torch.func.jacrev(lambda v: f.step(v.reshape(w.shape), u).reshape(-1))(w.reshape(-1)).detach()
    for _ in range(3):
        y = torch.randn(w.shape)
        torch.testing.assert_close(closed.mv(y), graph.mv(y), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(closed.rmv(y), graph.rmv(y), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(closed.mv(y).reshape(-1), dense @ y.reshape(-1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(closed.rmv(y).reshape(-1), dense.T @ y.reshape(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("build", MAPS.values(), ids=MAPS.keys())
def test_aid_through_the_closed_form_equals_the_dense_implicit_gradient(build):
    f, x = build()
    solver = inn.FixedPointIteration(max_iter=2000, tol=1e-15)
    z0 = f.initial_state(x) if hasattr(f, "initial_state") else torch.zeros(5)
    xs = tuple(t.clone().requires_grad_() for t in inn.state.parts(x))
    x_in = xs[0] if isinstance(x, torch.Tensor) else xs
    with torch.no_grad():
        w, _ = solver.solve(lambda z: f(z, x), z0)
    R = torch.randn(w.shape)
    dense = torch.func.jacrev(lambda v: f(v.reshape(w.shape), x).reshape(-1))(w.reshape(-1)).detach()
    v = torch.linalg.solve(torch.eye(w.numel()) - dense.T, R.reshape(-1)).reshape(w.shape)
    params = [p for p in f.parameters() if p.requires_grad]
    want = torch.autograd.grad((v * f(w, x_in)).sum(), (*xs, *params))
    out, _ = inn.fixed_point(f, x_in, solver=solver, z0=z0,
                             backward=inn.AID(inn.linear.GMRES(max_iter=200, tol=1e-14)))
    got = torch.autograd.grad((R * out).sum(), (*xs, *params))
    for a, b in zip(got, want):
        assert float((a - b).norm()) <= 1e-9 * float(b.norm()) + 1e-14
