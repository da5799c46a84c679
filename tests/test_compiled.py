"""The compiled path (``Compile``) and ``torch.compile(fullgraph=True)`` of a model with a layer.

Compiled code fuses and reorders floating-point operations, so it agrees with eager mode to
rounding: in float64 to 1e-12 here.  Compilation is slow, so the cases are few and small.
"""

from __future__ import annotations

import math

import pytest
import torch
from user_maps import UserTanh

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


def test_fullgraph_compiles_a_user_map_without_closed_form():
    """A map written by a user (no closed-form Jacobian) compiles whole too: the traced AID
    takes ``Jᵀv`` from ``torch.func.vjp`` of the step; one graph, no break, and eager's loss
    and gradients to 1e-12 in float64."""
    torch.manual_seed(0)
    cell = UserTanh(12, 10, norm=0.8, dtype=torch.float64)
    layer = inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(30, tol=0.0),
                                backward=inn.AID(linear.Neumann(30, tol=0.0)))
    head = torch.nn.Linear(10, 3, dtype=torch.float64)
    x = _x()

    def loss(x):
        return head(layer(x)).square().sum()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    params = [*cell.parameters(), *head.parameters()]
    ref = torch.autograd.grad(loss(x), params)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(x)
    grads = torch.autograd.grad(value, params)
    _close(value, loss(x))
    for g, r in zip(grads, ref):
        _close(g, r)


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


# --------------------------------------------------------------------------- parametrizations


def _bounded_model(width: int = 10) -> torch.nn.Module:
    """The FC model with the default ``TanhMap`` (``contraction=0.9``: a ``SpectralBound`` on
    ``A``), its raw weight scaled to ``‖W‖₂ = 1.5`` so that the bound is active, and evaluated
    once eagerly so that the bound's vectors are converged for that weight."""
    torch.manual_seed(0)
    cell = inn.maps.TanhMap(6, width, dtype=torch.float64)
    with torch.no_grad():
        raw = cell.A.parametrizations.weight.original
        raw.mul_(1.5 / torch.linalg.matrix_norm(raw, 2))
    model = torch.nn.Sequential(
        inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(12, tol=0.0),
                            backward=inn.AID(linear.Neumann(12, tol=0.0))),
        torch.nn.Linear(width, 3, dtype=torch.float64),
    )
    model(_x6())
    return model


def _x6() -> torch.Tensor:
    return torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _bound_of(model) -> inn.parametrizations.SpectralBound:
    return model[0].cell.A.parametrizations.weight[0]


def _sigma_hat(model) -> torch.Tensor:
    """``σ̂ = uᵀ W v`` from the bound's buffers (no refresh)."""
    bound = _bound_of(model)
    return bound._u @ model[0].cell.A.parametrizations.weight.original.detach() @ bound._v


def test_fullgraph_compiles_the_default_spectrally_bounded_map():
    """The default ``TanhMap`` (``contraction=0.9``) compiles whole: the bound's refresh is
    traced with no host read (no storage pointer, no ``torch.equal``, no ``float``)."""
    model, x = _bounded_model(), _x6()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x: model(x).square().sum())(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("width", [10, 24])
def test_compiled_spectral_bound_matches_eager_under_adam_float64(width):
    """Two copies of the bounded FC model, one trained eagerly and one through
    ``torch.compile(fullgraph=True)``, over Adam steps: the same losses, gradients and σ̂ to
    1e-10 (the traced refresh's one subspace step from the warm block is what the eager
    refresh does on a slowly moving weight), and the bound holds at every step."""
    import copy

    eager = _bounded_model(width)
    compiled_model = copy.deepcopy(eager)
    x = _x6()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: compiled_model(x).square().sum(), backend="aot_eager", fullgraph=True)
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3)
    opt_c = torch.optim.Adam(compiled_model.parameters(), lr=1e-3)
    for _ in range(4):
        opt_e.zero_grad()
        opt_c.zero_grad()
        loss_e = eager(x).square().sum()
        loss_e.backward()
        loss_c = compiled(x)
        loss_c.backward()
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-10, atol=0)
        for pc, pe in zip(compiled_model.parameters(), eager.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(_sigma_hat(compiled_model), _sigma_hat(eager), rtol=1e-10, atol=0)
        assert _sigma_hat(compiled_model) > 0.9  # the bound is active
        # the effective weight; an eager read after the compiled evaluation does not iterate
        effective = compiled_model[0].cell.A.weight.detach()
        assert _bound_of(compiled_model).last_iterations == 0
        assert torch.linalg.matrix_norm(effective, 2) <= 0.9 * (1 + 1e-8)
        opt_e.step()
        opt_c.step()


def test_compiled_evaluations_of_an_unchanged_weight_are_identical():
    """A compiled evaluation refreshes the bound's buffers after a weight change and leaves
    them bit for bit as they are when the weight has not changed since: two compiled
    evaluations with no optimiser step between give identical outputs and σ̂."""
    model, x = _bounded_model(24), _x6()
    bound = _bound_of(model)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: model(x), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        model[0].cell.A.parametrizations.weight.original.add_(
            1e-3 * torch.randn(24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    before = [b.clone() for b in (bound._u, bound._v, bound._block)]
    first = compiled(x)
    after_first = [b.clone() for b in (bound._u, bound._v, bound._block)]
    sigma_first = _sigma_hat(model)
    assert all(not torch.equal(a, b) for a, b in zip(after_first, before))  # the weight changed: refreshed
    second = compiled(x)
    assert torch.equal(second, first) and torch.equal(_sigma_hat(model), sigma_first)
    assert all(torch.equal(a, b) for a, b in zip((bound._u, bound._v, bound._block), after_first))
    _ = model[0].cell.A.weight  # eager: the weight was seen by the compiled evaluation
    assert bound.last_iterations == 0
    assert all(torch.equal(a, b) for a, b in zip((bound._u, bound._v, bound._block), after_first))


def test_compiled_spectral_bound_lets_a_nan_weight_propagate():
    """Traced, a NaN in the weight cannot raise (that needs a host read): it propagates into
    the bounded weight.  Eagerly it raises (``test_nan_in_a_spectrally_bounded_weight_raises``)."""
    module = inn.spectral_norm(torch.nn.Linear(4, 4, dtype=torch.float64), bound=0.5)
    with torch.no_grad():
        module.parametrizations.weight.original[0, 0] = math.nan
    torch._dynamo.reset()
    weight = torch.compile(lambda: module.weight, backend="aot_eager", fullgraph=True)()
    assert torch.isnan(weight).all()


@pytest.mark.parametrize("norm_bound", [inn.conv_circulant_norm, inn.conv_spectral_norm])
def test_fullgraph_compiles_the_conv_cell_with_its_operator_bound(norm_bound):
    """``ConvCell``'s ``contraction=0.9`` with either bound (the circulant one by default,
    or the subspace iteration's); the model compiles whole, and for a weight already seen it
    gives eager's loss."""
    torch.manual_seed(0)
    cell = inn.maps.ConvCell(2, 3, (5, 5), norm_bound=norm_bound).double()
    model = torch.nn.Sequential(
        inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(6, tol=0.0),
                            backward=inn.AID(linear.Neumann(6, tol=0.0))),
        torch.nn.Flatten(),
        torch.nn.Linear(75, 3, dtype=torch.float64),
    )
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def loss(x):
        return model(x).square().sum()

    ref = loss(x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    _close(torch.compile(loss, backend="aot_eager", fullgraph=True)(x), ref)
