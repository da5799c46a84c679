"""The compiled path (``Compile``) and ``torch.compile(fullgraph=True)`` of a model with a layer.

Compiled code fuses and reorders floating-point operations, so it agrees with eager mode to
rounding: in float64 to 1e-12 here.  Compilation is slow, so the cases are few and small.
"""

from __future__ import annotations

import math

import pytest
import torch

import implicitnets as inn
from implicitnets import linear

RTOL, ATOL = 1e-12, 1e-14


def _cell(seed: int = 0) -> inn.maps.TanhMap:
    """The FC tanh map with a plain weight of spectral norm 0.8, in float64."""
    torch.manual_seed(seed)
    cell = inn.maps.TanhMap(12, 10, contraction=None).double()
    with torch.no_grad():
        cell.A.weight.mul_(0.8 / torch.linalg.matrix_norm(cell.A.weight, 2))
    return cell


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _run(layer, x):
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    out = layer(xr)
    (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).sum().backward()
    return out.detach(), [p.grad.clone() for p in layer.parameters()] + [xr.grad], layer.stats


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "bad",
    [dict(cuda_graphs=1), dict(dynamic="yes"), dict(fullgraph=None)],
    ids=str,
)
def test_compile_options_are_validated(bad):
    with pytest.raises(ValueError, match="Compile"):
        inn.Compile(**bad)


def test_compile_option_is_validated_on_the_solvers():
    with pytest.raises(ValueError, match="compile must be"):
        inn.FixedPointIteration(10, compile="inductor")
    with pytest.raises(ValueError, match="compile must be"):
        linear.Neumann(10, compile=True)
    with pytest.raises(ValueError, match="freeze_converged or return_best"):
        inn.FixedPointIteration(10, tol=1e-6, freeze_converged=True, compile=inn.Compile())


C = inn.Compile()
EAGER_AND_COMPILED = [
    (inn.AID(linear.Neumann(12, tol=0.0)), inn.AID(linear.Neumann(12, tol=0.0, compile=C))),
    (inn.ITD(), inn.ITD()),
]


@pytest.mark.parametrize("eager,compiled", EAGER_AND_COMPILED, ids=lambda m: type(m).__name__)
def test_compiled_path_matches_eager_float64(eager, compiled):
    """The compiled forward loop (and, for AID, the compiled Neumann loop) gives eager's
    values, parameter and input gradients and statistics to 1e-12 in float64."""
    cell, x = _cell(), _x()
    ref = _run(inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(12, tol=0.0), backward=eager), x)
    layer = inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(12, tol=0.0, compile=C), backward=compiled)
    for _ in range(2):  # the second call reuses the compiled code
        out, grads, stats = _run(layer, x)
        _close(out, ref[0])
        for g, r in zip(grads, ref[1]):
            _close(g, r)
        assert stats.iterations == 12 and stats.converged
        assert math.isclose(stats.residual, ref[2].residual, rel_tol=1e-9)
        if isinstance(eager, inn.AID):
            assert stats.backward.iterations == 12 and stats.backward.converged
            assert math.isclose(stats.backward.residual, ref[2].backward.residual, rel_tol=1e-9)


def test_chunked_convergence_checks_every_m():
    """With tol > 0 the compiled loop tests convergence every m = check_every evaluations:
    the result is eager's with the same check_every, and stops at the first multiple of m
    at or after the evaluation where per-iteration checks stop."""
    cell, x, m, tol = _cell(), _x(), 4, 1e-6
    g = inn.BoundMap(cell.step, cell.inject(x).detach())
    z0 = cell.initial_state(x)
    with torch.no_grad():
        every, s1 = inn.FixedPointIteration(60, tol=tol).solve(g, z0)
        chunk_eager, sm = inn.FixedPointIteration(60, tol=tol, check_every=m).solve(g, z0)
        chunked, sc = inn.FixedPointIteration(60, tol=tol, check_every=m, compile=C).solve(g, z0)
    assert s1.converged and sm.converged and sc.converged
    assert sc.iterations == sm.iterations == m * math.ceil(s1.iterations / m)
    _close(chunked, chunk_eager)
    torch.testing.assert_close(torch.tensor(sc.trace), torch.tensor(sm.trace), rtol=1e-9, atol=0)
    assert len(sc.trace) == sc.iterations // m
    # up to the chunk: the chunked iterate is m·⌈t/m⌉ − t further iterations along the same sequence
    with torch.no_grad():
        more, _ = inn.FixedPointIteration(sc.iterations, tol=0.0).solve(g, z0)
    _close(chunked, more)
    assert float(torch.linalg.vector_norm(chunked - every) / torch.linalg.vector_norm(every)) <= 2 * tol


def _fc_model(backward) -> torch.nn.Module:
    return torch.nn.Sequential(
        inn.FixedPointLayer(_cell(), solver=inn.FixedPointIteration(12, tol=0.0), backward=backward),
        torch.nn.Linear(10, 3, dtype=torch.float64),
    )


@pytest.mark.parametrize("backward", [inn.AID(linear.Neumann(12, tol=0.0)), inn.ITD()], ids=repr)
def test_fullgraph_compiles_the_fc_model_with_tol_zero(backward):
    """``torch.compile(model, fullgraph=True)`` of the FC model with tol = 0: one graph, no
    break (no host read, statistics as tensors), and eager's values and gradients."""
    model, x = _fc_model(backward), _x()

    def loss(x):
        return model(x).square().sum()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    params = list(model.parameters())
    ref = torch.autograd.grad(loss(x), params)
    ref_stats = model[0].stats
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")  # AOT autograd: forward and backward graphs
    value = compiled(x)
    stats = model[0].stats
    grads = torch.autograd.grad(value, params)
    _close(value, loss(x))
    for g, r in zip(grads, ref):
        _close(g, r)
    assert isinstance(stats.residual, torch.Tensor) and stats.iterations == 12
    assert math.isclose(float(stats.residual), ref_stats.residual, rel_tol=1e-9)


def test_a_compiled_model_compiles_once():
    """The layer's own statistics of the previous call are not a guard: a compiled training
    step compiles once and is reused from the second call on (AID without warm start)."""
    from torch._dynamo.testing import CompileCounter

    model, x = _fc_model(inn.AID(linear.Neumann(12, tol=0.0))), _x()
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: model(x).square().sum(), backend=counter, fullgraph=True)
    for _ in range(3):
        compiled(x).backward()
    assert counter.frame_count == 1


def test_fullgraph_with_the_compiled_path_inside():
    """A layer whose solvers carry ``Compile()`` also compiles whole under an outer
    ``torch.compile(fullgraph=True)``: the outer compiler traces the eager loops."""
    solver = inn.FixedPointIteration(12, tol=0.0, compile=C)
    model = torch.nn.Sequential(
        inn.FixedPointLayer(_cell(), solver=solver, backward=inn.AID(linear.Neumann(12, tol=0.0, compile=C))),
        torch.nn.Linear(10, 3, dtype=torch.float64),
    )
    x = _x()
    explained = torch._dynamo.explain(lambda x: model(x).square().sum())(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# --------------------------------------------------------------------------- maps.activation.tanh


def _forward_graphs(fn, *args):
    """The AOT forward graphs of ``fn`` compiled with ``fullgraph=True`` (eager kernels)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep))
    return compiled(*args), graphs


def _targets(graphs) -> set:
    return {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}


def test_tanh_is_torch_tanh_in_eager_mode():
    """Eager (and inside ``torch.func``): ``torch.tanh`` itself, bit for bit."""
    from implicitnets.maps.activation import tanh

    x = torch.randn(5, 7, dtype=torch.float64)
    assert torch.equal(tanh(x), torch.tanh(x))
    assert torch.equal(torch.func.vmap(tanh)(x), torch.tanh(x))


def test_tanh_under_compile_on_cpu_is_the_opaque_aten_kernel():
    """Traced on a CPU tensor, the map's ``tanh`` is the operator ``implicitnets::tanh`` (inductor
    leaves it to ATen), never ``aten.tanh``; inductor's output equals eager ``torch.tanh``
    bit for bit (the same kernel)."""
    from implicitnets.maps.activation import tanh

    x = torch.randn(64, 33)
    _, graphs = _forward_graphs(lambda x: tanh(2 * x) + 1, x)
    targets = _targets(graphs)
    assert torch.ops.implicitnets.tanh.default in targets and torch.ops.aten.tanh.default not in targets
    torch._dynamo.reset()
    assert torch.equal(torch.compile(lambda x: tanh(x), fullgraph=True)(x), torch.tanh(x))
    # the built-in map's step goes through it too
    cell = _cell()
    w, u = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    _, graphs = _forward_graphs(cell.step, w, u)
    assert torch.ops.implicitnets.tanh.default in _targets(graphs)


def test_tanh_under_compile_derivatives_float64():
    """The derivative of the compiled ``tanh`` is that of ``torch.tanh``: ``gradcheck`` and the
    closed form ``1 − y²`` to 1e-12.  Its rule is itself differentiable (checked on the rule
    outside the compiler: ``torch.compile`` has no double backward)."""
    from implicitnets.maps.activation import _Tanh, tanh

    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    f = torch.compile(lambda x: tanh(x), fullgraph=True, backend="aot_eager")
    assert torch.autograd.gradcheck(f, (x,))
    (g,) = torch.autograd.grad(f(x).sum(), x)
    y = torch.tanh(x.detach())
    _close(g, 1 - y**2)
    assert torch.autograd.gradgradcheck(_Tanh.apply, (x,))
    (gg,) = torch.autograd.grad(torch.autograd.grad(_Tanh.apply(x).sum(), x, create_graph=True)[0].sum(), x)
    _close(gg, -2 * y * (1 - y**2))


def test_tanh_operator_rules():
    """``implicitnets::tanh`` passes ``torch.library.opcheck`` (schema, fake tensor) and maps
    under ``vmap``."""
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.implicitnets.tanh.default, (x,), test_utils=("test_schema", "test_faketensor"))
    assert torch.equal(torch.func.vmap(torch.ops.implicitnets.tanh)(x), torch.tanh(x))


def test_fullgraph_inductor_matches_eager_float64():
    """The FC model compiled by inductor (``fullgraph=True``; ``tanh`` through ATen) gives eager's
    values and gradients to 1e-12 in float64."""
    model, x = _fc_model(inn.AID(linear.Neumann(12, tol=0.0))), _x()

    def loss(x):
        return model(x).square().sum()

    params = list(model.parameters())
    ref_value = loss(x)
    ref = torch.autograd.grad(ref_value, params)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    for _ in range(2):
        value = compiled(x)
        grads = torch.autograd.grad(value, params)
        _close(value, ref_value)
        for g, r in zip(grads, ref):
            _close(g, r)


def test_conv_cell_tanh_under_compile_matches_eager_float64():
    """The conv cell with ``activation="tanh"`` uses the same operator when compiled and agrees
    with eager to 1e-12 in float64 (values and gradients)."""
    torch.manual_seed(0)
    cell = inn.maps.ConvCell(2, 3, (5, 5), contraction=None, activation="tanh").double()
    z = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    u = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    _, graphs = _forward_graphs(cell.step, z, u)
    assert torch.ops.implicitnets.tanh.default in _targets(graphs)
    torch._dynamo.reset()
    step = torch.compile(cell.step, fullgraph=True)
    params = list(cell.A.parameters())  # step(z, u) sees B only through u
    value = step(z, u)
    ref = cell.step(z, u)
    _close(value, ref)
    for g, r in zip(torch.autograd.grad(value.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        _close(g, r)


def test_export_keeps_aten_tanh():
    """``torch.export`` of the map step holds ``aten.tanh``: an exported program needs nothing of
    this library's operators."""
    cell = _cell()
    w, u = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, w, u):
            return self.cell.step(w, u)

    exported = torch.export.export(Step(), (w, u))
    targets = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    assert torch.ops.aten.tanh.default in targets and torch.ops.implicitnets.tanh.default not in targets
    _close(exported.module()(w, u), cell.step(w, u))
