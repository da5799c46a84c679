"""Linear operators: the closed-form Jacobians against the autograd ``GraphJacobian`` and the
dense Jacobian (float64), the algebra of ``Transposed``/``IdentityMinus``, and the linear
solvers' tol = 0 paths (no host synchronisation inside the loop)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import implicitnets as inn
from implicitnets import FunctionOperator, GraphJacobian, IdentityMinus, LinearOperator, Transposed, linear
from implicitnets.maps.protocol import step_parts

pytestmark = pytest.mark.usefixtures("float64")


def tanh_map(seed: int = 0) -> tuple[inn.maps.TanhMap, torch.Tensor]:
    torch.manual_seed(seed)
    cell = inn.maps.TanhMap(5, 6, contraction=None)
    with torch.no_grad():
        cell.A.weight.mul_(0.8 / torch.linalg.matrix_norm(cell.A.weight, 2))
    return cell, torch.randn(3, 5)


def conv_map(activation: str, seed: int = 0) -> tuple[inn.maps.ConvCell, torch.Tensor]:
    torch.manual_seed(seed)
    return inn.maps.ConvCell(2, 3, (5, 4), contraction=None, activation=activation), torch.randn(2, 2, 5, 4)


MAPS = {
    "tanh": lambda: tanh_map(),
    "conv-relu": lambda: conv_map("relu"),
    "conv-tanh": lambda: conv_map("tanh"),
}


def at_a_point(make):
    """A map, a generic point w (not a fixed point), u, and both forms of ``J = ∂₁Φ(w)``."""
    cell, x = make()
    u = cell.inject(x).detach()
    w = torch.randn_like(cell.step(cell.initial_state(x), u)).requires_grad_()
    out = cell.step(w, u)
    dense = torch.func.jacrev(lambda z: cell.step(z, u))(w.detach()).reshape(w.numel(), w.numel()).detach()
    return cell, w, u, cell.jacobian(w.detach(), u, out), GraphJacobian(out, w), dense


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.detach() - b.detach()) / torch.linalg.vector_norm(b.detach()))


@pytest.mark.parametrize("name", MAPS)
def test_fused_products_of_the_closed_form(name):
    """``c + α J x`` and ``c + α Jᵀ x`` (one fused product each) against the dense Jacobian;
    the graph operator's default forms too.  (mv/rmv themselves: test_closed_form_jacobians.)"""
    cell, w, _, J, G, dense = at_a_point(MAPS[name])
    assert step_parts(cell.step).jacobian is not None and not step_parts(cell.step).jacobian_needs_graph
    gen = torch.Generator().manual_seed(1)
    x, c = (torch.randn(w.shape, generator=gen) for _ in range(2))
    for op in (J, G):
        for alpha in (1.0, -1.0, 0.3):
            want_mv = c.reshape(-1) + alpha * dense @ x.reshape(-1)
            want_rmv = c.reshape(-1) + alpha * dense.T @ x.reshape(-1)
            assert op.mv_add(x, c, alpha).shape == w.shape
            assert rel(op.mv_add(x, c, alpha).reshape(-1), want_mv) <= 1e-13
            assert rel(op.rmv_add(x, c, alpha).reshape(-1), want_rmv) <= 1e-13
    c_before = c.clone()
    J.rmv_add(x, c, -1.0)
    J.mv_add(x, c, -1.0)
    assert torch.equal(c, c_before)  # c is not modified


@pytest.mark.parametrize("name", MAPS)
def test_adjoint_operator_is_identity_minus_jt(name):
    _, w, _, J, _, dense = at_a_point(MAPS[name])
    A = IdentityMinus(J).T  # what solve_adjoint hands the linear solver: (I − J)ᵀ
    eye = torch.eye(w.numel())
    x = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    assert rel(A.mv(x).reshape(-1), (eye - dense).T @ x.reshape(-1)) <= 1e-13
    assert rel(A.rmv(x).reshape(-1), (eye - dense) @ x.reshape(-1)) <= 1e-13
    M = A.identity_minus()  # I − (I − Jᵀ) = Jᵀ, without a wrapper per product
    assert isinstance(M, Transposed) and M.T is J
    assert rel(M.mv(x).reshape(-1), dense.T @ x.reshape(-1)) <= 1e-13
    assert rel(M.mv_add(x, x), x + J.rmv(x)) <= 1e-13


def test_identity_minus_of_a_plain_operator():
    D = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    op = FunctionOperator(lambda v: D @ v, like=torch.zeros(4), rmv=lambda v: D.T @ v)
    v = torch.randn(4, generator=torch.Generator().manual_seed(4))
    M = op.identity_minus()
    assert isinstance(M, IdentityMinus)
    assert rel(M.mv(v), v - D @ v) <= 1e-15 and rel(M.rmv(v), v - D.T @ v) <= 1e-15
    assert M.identity_minus() is op
    assert rel(M.T.mv(v), v - D.T @ v) <= 1e-15


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize(
    "solver",
    [linear.Neumann(max_iter=7, tol=0.0), linear.GMRES(max_iter=9, tol=0.0, restart=4),
     linear.NormalCG(max_iter=6, tol=0.0), linear.Neumann(max_iter=300, tol=1e-13),
     linear.GMRES(max_iter=60, tol=1e-13)],
    ids=repr,
)
def test_adjoint_solve_closed_form_equals_graph(name, solver):
    """Same solver, same iterations: the closed-form operator and the autograd one agree."""
    _, w, _, J, G, dense = at_a_point(MAPS[name])
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    v_closed, info_closed, ok_closed = inn.backward.solve_adjoint(J, g, solver)
    v_graph, info_graph, ok_graph = inn.backward.solve_adjoint(G, g, solver)
    assert ok_closed and ok_graph and info_closed.iterations == info_graph.iterations
    assert rel(v_closed, v_graph) <= 1e-12
    assert info_closed.residual == pytest.approx(info_graph.residual, rel=1e-9, abs=1e-15)
    true = torch.linalg.vector_norm(g.reshape(-1) - (torch.eye(w.numel()) - dense).T @ v_closed.reshape(-1))
    assert info_closed.residual == pytest.approx(float(true / torch.linalg.vector_norm(g)), rel=1e-9, abs=1e-15)
    if solver.tol > 0:
        exact = torch.linalg.solve((torch.eye(w.numel()) - dense).T, g.reshape(-1))
        assert rel(v_closed.reshape(-1), exact) <= 1e-11


def _as_graph_map(cell):
    """The same map as a plain callable: no ``jacobian``, so AID builds a GraphJacobian."""
    return lambda w, x: cell(w, x)


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize(
    "backward",
    [inn.AID(linear.Neumann(max_iter=15, tol=0.0)), inn.AID(linear.GMRES(max_iter=12, tol=0.0, restart=5))],
    ids=repr,
)
def test_aid_gradients_closed_form_equal_graph(name, backward):
    cell, x = MAPS[name]()
    solver = inn.FixedPointIteration(max_iter=25, tol=0.0)
    params = list(cell.parameters())
    R = torch.randn_like(cell(cell.initial_state(x), x))

    def grads(f):
        xr = x.clone().requires_grad_()
        w, stats = inn.fixed_point(f, xr, solver=solver, backward=backward, z0=cell.initial_state(x))
        return torch.autograd.grad((R * w).sum(), [*params, xr]), stats

    closed, s1 = grads(cell)
    graph, s2 = grads(_as_graph_map(cell))
    assert s1.backward.iterations == s2.backward.iterations and s1.backward.converged and s2.backward.converged
    assert s1.backward.residual == pytest.approx(s2.backward.residual, rel=1e-9)
    for a, b in zip(closed, graph):
        assert rel(a, b) <= 1e-12


class _GraphBackedTanh(torch.nn.Module):
    """TanhMap's map with a closed form built on the recorded graph (like a map whose J needs
    autograd): it does not declare ``jacobian_needs_graph = False``, so AID keeps ``w`` a leaf."""

    def __init__(self, cell: inn.maps.TanhMap):
        super().__init__()
        self.cell = cell

    def inject(self, x):
        return self.cell.inject(x)

    def step(self, w, u):
        return self.cell.step(w, u)

    def initial_state(self, x):
        return self.cell.initial_state(x)

    def jacobian(self, w, u, out):
        assert w.requires_grad  # the documented protocol: out recorded from leaves w
        return GraphJacobian(out, w)


def test_aid_keeps_the_graph_for_a_closed_form_that_needs_it():
    cell, x = tanh_map(1)
    other = _GraphBackedTanh(cell)
    assert step_parts(other.step).jacobian is not None and step_parts(other.step).jacobian_needs_graph
    backward = inn.AID(linear.Neumann(max_iter=12, tol=0.0))
    solver = inn.FixedPointIteration(max_iter=20, tol=0.0)
    R = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
    grads = [torch.autograd.grad((R * inn.fixed_point(f, x, solver=solver, backward=backward)[0]).sum(),
                                 list(cell.parameters())) for f in (cell, other)]
    for a, b in zip(*grads):
        assert rel(a, b) <= 1e-13


class _SyncCounter:
    """Counts the tensor → host reads (``item``, ``tolist``, ``bool``, ``float``)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist", "__bool__", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):
                self.count += 1
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize(
    "solver, syncs",
    [(linear.Neumann(max_iter=30, tol=0.0), 1), (linear.GMRES(max_iter=30, tol=0.0, restart=10), 3 + 1),
     (linear.NormalCG(max_iter=30, tol=0.0), 1)],
    ids=repr,
)
def test_tol_zero_reads_the_device_once_per_solve(monkeypatch, solver, syncs):
    """With tol = 0 nothing is read inside the loop: Neumann and NormalCG read once at the
    end, GMRES once per restart cycle (its small least-squares problem) and once at the end."""
    _, w, _, J, _, _ = at_a_point(MAPS["tanh"])
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(6))
    A = IdentityMinus(J).T
    counter = _SyncCounter(monkeypatch)
    with torch.no_grad():
        _, info = solver.solve(A, g)
    assert counter.count == syncs
    assert info.iterations == 30 and info.converged and math.isfinite(info.residual)


@pytest.mark.parametrize("backward", [inn.ITD(), inn.JacobianFree(), inn.AID(linear.Neumann(max_iter=1, tol=0.0)),
                                      inn.AID(linear.NormalCG(max_iter=1, tol=0.0)),
                                      inn.AID(linear.GMRES(max_iter=1, tol=0.0, restart=100))], ids=repr)
@pytest.mark.parametrize("solver_cls", [inn.FixedPointIteration, inn.Anderson, inn.Broyden], ids=lambda c: c.__name__)
def test_tol_zero_training_step_reads_the_device_as_often_at_any_iteration_count(monkeypatch, solver_cls, backward):
    """A forward and backward pass through a layer with tol = 0 everywhere: the host reads are
    a fixed few per pass, the same at t = k = 5 and 25 (on a GPU each read waits for every
    queued kernel)."""
    counts = []
    for t in (5, 25):
        cell, x = tanh_map()
        mode = backward
        if isinstance(backward, inn.AID):
            mode = inn.AID(dataclasses.replace(backward.linear_solver, max_iter=t))
        layer = inn.FixedPointLayer(cell, solver=solver_cls(max_iter=t, tol=0.0), backward=mode)
        with monkeypatch.context() as patch:
            counter = _SyncCounter(patch)
            layer(x).square().sum().backward()
        assert layer.stats.iterations == t
        counts.append(counter.count)
    # the input's NaN check and the forward statistics; AID adds the adjoint's final residual and
    # its finiteness check, GMRES one read per restart cycle (its small least-squares problem)
    expected = 2 if not isinstance(backward, inn.AID) else 5 if isinstance(mode.linear_solver, linear.GMRES) else 4
    assert counts == [expected, expected]


@pytest.mark.parametrize("solver", [linear.Neumann(max_iter=5, tol=0.0), linear.GMRES(max_iter=5, tol=0.0),
                                    linear.NormalCG(max_iter=5, tol=0.0)], ids=repr)
def test_tol_zero_zero_rhs_and_nonfinite_rhs(solver):
    """Without the up-front read of ‖b‖, b = 0 still gives x = 0 and a NaN b a failure."""
    _, w, _, J, _, _ = at_a_point(MAPS["tanh"])
    A = IdentityMinus(J).T
    x, info = solver.solve(A, torch.zeros(w.shape))
    assert torch.equal(x, torch.zeros(w.shape)) and info.residual == 0.0 and info.converged
    b = torch.ones(w.shape)
    b[0, 0] = math.nan
    x, info = solver.solve(A, b)
    assert not info.converged and info.residual == math.inf


def test_neumann_does_not_return_the_callers_b():
    _, w, _, J, _, _ = at_a_point(MAPS["tanh"])
    b = torch.randn(w.shape)
    x, info = linear.Neumann(max_iter=1, tol=0.0).solve(IdentityMinus(J).T, b)
    assert torch.equal(x, b) and x.data_ptr() != b.data_ptr() and info.iterations == 1


def test_operator_shape_mismatch_is_named():
    class Wrong(LinearOperator):
        like = torch.zeros(4)

        def mv(self, x):
            return torch.zeros(5)

        def rmv(self, y):
            return torch.zeros(5)

    for solver in (linear.Neumann(max_iter=3, tol=0.0), linear.GMRES(max_iter=3, tol=0.0)):
        with pytest.raises(ValueError, match="shape"):
            solver.solve(Wrong(), torch.ones(4))


def test_inf_in_the_input_raises_even_when_the_map_saturates():
    """tanh(±inf) is finite, so the solve itself succeeds: the input check must catch it."""
    cell, x = tanh_map()
    x[0, 1] = math.inf
    layer = inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(max_iter=5, tol=0.0),
                                backward=inn.AID(linear.Neumann(max_iter=5, tol=0.0)))
    with pytest.raises(inn.NonFiniteError, match="input x"):
        layer(x)
    with torch.no_grad(), pytest.raises(inn.NonFiniteError, match="input x"):
        layer(x)


def test_nan_in_z0_raises():
    cell, x = tanh_map()
    z0 = cell.initial_state(x)
    z0[1, 2] = math.nan
    with pytest.raises(inn.NonFiniteError, match="z0"):
        inn.fixed_point(cell, x, solver=inn.FixedPointIteration(max_iter=5, tol=1e-6), backward=inn.ITD(), z0=z0)


def test_a_huge_finite_input_is_not_an_error():
    """A sum that overflows is not a NaN: the check confirms element-wise."""
    cell, _ = tanh_map()
    x = torch.full((2, 5), 1e308)
    z, stats = inn.fixed_point(cell, x, solver=inn.FixedPointIteration(max_iter=3, tol=0.0), backward=inn.ITD())
    assert torch.isfinite(z).all() and stats.iterations == 3


def test_graph_jacobian_products_without_the_engine_entry_point(monkeypatch):
    """The products fall back to ``torch.autograd.grad`` where PyTorch lacks the engine's
    entry point, with the same values."""
    torch.manual_seed(0)
    A = torch.randn(4, 4, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = torch.tanh(w @ A.T)
    y = torch.randn(3, 4, dtype=torch.float64)
    expected = GraphJacobian(out, w).rmv(y)
    monkeypatch.setattr(inn.operator, "_ENGINE_RUN", None)
    fallback = GraphJacobian(out, w)
    torch.testing.assert_close(fallback.rmv(y), expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(fallback.mv(y), torch.func.jvp(lambda z: torch.tanh(z @ A.T), (w.detach(),), (y,))[1])
