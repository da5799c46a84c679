"""Property-based tests (hypothesis): invalid options and inputs raise the library's named errors.

Every option of every solver, linear solver, backward mode and map meets random invalid
values (wrong type, out of range, NaN/Inf, bool for a number, ...) and must raise
``ValueError``; random invalid inputs to :func:`~implicitnets.fixed_point` and
:class:`~implicitnets.FixedPointLayer` (wrong dtype, shape, structure, NaN/Inf, a wrong
``z0``) must raise ``ValueError`` or :class:`~implicitnets.NonFiniteError`, never a raw
``RuntimeError``, ``TypeError`` or ``IndexError`` from deep inside a solve.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import implicitnets as inn
from implicitnets import linear, maps

NAN, INF = math.nan, math.inf
# no subnormal floats: a test elsewhere in the run may set flush-to-zero (torch.set_flush_denormal),
# under which hypothesis cannot draw them
floats = functools.partial(st.floats, allow_subnormal=False)
junk = st.one_of(st.none(), st.text(max_size=3), st.just([1]), st.just(inn.Warn))  # never a number or bool

# an int >= 1 is required
bad_count = st.one_of(junk, st.integers(max_value=0), floats(allow_nan=True), st.booleans())
# a finite number >= 0
bad_tol = st.one_of(junk, floats(max_value=-1e-300), st.sampled_from([NAN, INF, -INF]), st.booleans())
# a number in (0, 1]
bad_fraction = st.one_of(junk, floats(max_value=0.0), floats(min_value=1.0, exclude_min=True),
                         st.sampled_from([NAN, INF, -INF]), st.booleans())
# a finite number > 0
bad_positive = st.one_of(junk, floats(max_value=0.0), st.sampled_from([NAN, INF, -INF]), st.booleans())
bad_bool = st.one_of(junk, st.integers(), floats(allow_nan=True))
bad_policy = st.one_of(junk, st.integers(), st.just(inn.ITD()), st.just(linear.GMRES()))

SOLVERS = [inn.FixedPointIteration, inn.Anderson, inn.Broyden, inn.ForwardBackward, inn.PeacemanRachford]
OPTIONS = [
    *[(s, "max_iter", bad_count) for s in SOLVERS],
    *[(s, "tol", bad_tol) for s in SOLVERS],
    *[(s, "check_every", bad_count.filter(lambda v: v is not None)) for s in SOLVERS],
    *[(s, "on_failure", bad_policy) for s in SOLVERS],
    *[(s, flag, bad_bool) for s in SOLVERS for flag in ("freeze_converged", "return_best")],
    (inn.FixedPointIteration, "damping", bad_fraction),
    (inn.Anderson, "memory", bad_count),
    (inn.Anderson, "mixing", bad_fraction),
    (inn.Anderson, "regularization", bad_tol),
    (inn.Broyden, "memory", bad_count),
    (inn.ForwardBackward, "alpha", bad_positive),
    (inn.PeacemanRachford, "alpha", bad_positive),
    *[(s, "max_iter", bad_count) for s in (linear.Neumann, linear.CG, linear.NormalCG, linear.GMRES)],
    *[(s, "tol", bad_tol) for s in (linear.Neumann, linear.CG, linear.NormalCG, linear.GMRES)],
    (linear.GMRES, "restart", bad_count),
    (linear.CG, "check_symmetry", bad_bool),
    (inn.ITD, "truncate", bad_count.filter(lambda v: v is not None)),
]


@pytest.mark.parametrize("cls, option, values", OPTIONS, ids=lambda v: getattr(v, "__name__", v)
                         if not isinstance(v, st.SearchStrategy) else "")
@given(data=st.data())
def test_an_invalid_option_raises_value_error(cls, option, values, data):
    value = data.draw(values, label=option)
    with pytest.raises(ValueError, match=option):
        cls(**{option: value})


@given(linear_solver=st.one_of(junk, st.integers(), st.just(inn.Raise()), st.just(inn.ITD())), on_failure=bad_policy,
       warm_start=bad_bool, which=st.integers(0, 2))
def test_invalid_aid_options_raise_value_error(linear_solver, on_failure, warm_start, which):
    options = [dict(linear_solver=linear_solver), dict(linear_solver=linear.GMRES(), on_failure=on_failure),
               dict(linear_solver=linear.GMRES(), warm_start=warm_start)][which]
    with pytest.raises(ValueError):
        inn.AID(**options)


@given(solver=bad_policy, backward=st.one_of(junk, st.integers(), st.just(inn.Anderson()), st.just(linear.GMRES())))
def test_a_layer_with_an_invalid_solver_or_backward_raises_value_error(solver, backward):
    cell = maps.TanhMap(3, 4)
    with pytest.raises(ValueError, match="solver"):
        inn.FixedPointLayer(cell, solver=solver, backward=inn.ITD())
    with pytest.raises(ValueError, match="backward"):
        inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(), backward=backward)


@given(in_features=bad_count, width=bad_count, which=st.integers(0, 1))
def test_invalid_map_sizes_raise_value_error(in_features, width, which):
    sizes = [dict(in_features=in_features, width=4), dict(in_features=3, width=width)][which]
    with pytest.raises(ValueError):
        maps.TanhMap(**sizes)
    with pytest.raises(ValueError):
        maps.MonotoneFC(**sizes)


@given(in_channels=bad_count, channels=bad_count, side=bad_count,
       size=st.sampled_from([5, (5,), (5, 5, 1), "55", None]), which=st.integers(0, 3))
def test_invalid_conv_cell_sizes_raise_value_error(in_channels, channels, side, size, which):
    options = [dict(in_channels=in_channels, channels=3, size=(5, 5)),
               dict(in_channels=2, channels=channels, size=(5, 5)),
               dict(in_channels=2, channels=3, size=(5, side)),
               dict(in_channels=2, channels=3, size=size)][which]
    with pytest.raises(ValueError):
        maps.ConvCell(**options)


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=5).filter(lambda s: s[1:] != [2, 5, 4]),
       mode=st.sampled_from([inn.ITD(), inn.AID(linear.GMRES(max_iter=5)), inn.JacobianFree()]))
def test_a_wrongly_shaped_image_raises_value_error(shape, mode):
    layer = inn.FixedPointLayer(maps.ConvCell(2, 3, (5, 4), contraction=0.8),
                                solver=inn.FixedPointIteration(max_iter=5), backward=mode)
    with pytest.raises(ValueError, match="ConvCell expects x of shape"):
        layer(torch.randn(*shape))


@given(contraction=st.one_of(junk.filter(lambda v: v is not None), floats(max_value=0.0),
                             st.sampled_from([NAN, INF]), st.booleans()))
def test_an_invalid_contraction_bound_raises_value_error(contraction):
    with pytest.raises(ValueError):
        maps.TanhMap(3, 4, contraction=contraction)


@given(m=bad_positive)
def test_an_invalid_monotone_margin_raises_value_error(m):
    with pytest.raises(ValueError):
        maps.MonotoneFC(3, 4, m=m)


def _layer(solver: str, mode: str, dtype: torch.dtype = torch.float32) -> inn.FixedPointLayer:
    torch.manual_seed(0)
    solvers = {"fp": inn.FixedPointIteration(max_iter=30, tol=1e-6), "anderson": inn.Anderson(max_iter=30, tol=1e-6),
               "broyden": inn.Broyden(max_iter=30, tol=1e-6)}
    modes = {"itd": inn.ITD(), "aid": inn.AID(linear.GMRES(max_iter=20, tol=1e-8)), "jfb": inn.JacobianFree()}
    return inn.FixedPointLayer(maps.TanhMap(3, 4, contraction=0.5, dtype=dtype), solver=solvers[solver],
                               backward=modes[mode])


layers = st.tuples(st.sampled_from(["fp", "anderson", "broyden"]), st.sampled_from(["itd", "aid", "jfb"]))


@st.composite
def invalid_inputs(draw):
    """An input x that TanhMap(3, 4) in float32 cannot take."""
    batch = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["dtype", "ndim", "features", "type", "float64", "empty tuple", "tuple junk", "empty"]))
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool]))
        return torch.zeros(batch, 3, dtype=dtype)
    if kind == "ndim":
        shape = draw(st.sampled_from([(), (3,), (batch, 3, 1), (batch, 1, 3), (1, batch, 3, 2)]))
        return torch.zeros(shape)
    if kind == "features":
        return torch.zeros(batch, draw(st.integers(0, 6).filter(lambda n: n != 3)))
    if kind == "type":
        return draw(st.sampled_from([None, 1.0, "x", [[1.0, 2.0, 3.0]], np.zeros((batch, 3), dtype=np.float32)]))
    if kind == "float64":
        return torch.zeros(batch, 3, dtype=torch.float64)
    if kind == "empty tuple":
        return ()
    if kind == "empty":  # a batch of 0 samples
        return torch.zeros(0, 3)
    return (torch.zeros(batch, 3), draw(st.sampled_from([None, 1.0, "x"])))


@given(x=invalid_inputs(), layer=layers, grad=st.booleans())
def test_an_invalid_input_raises_value_error(x, layer, grad):
    model = _layer(*layer)
    with pytest.raises(ValueError), torch.set_grad_enabled(grad):
        model(x)


@given(batch=st.integers(1, 3), where=st.integers(0, 8), bad=st.sampled_from([NAN, INF, -INF]), layer=layers,
       in_z0=st.booleans())
def test_nan_or_inf_in_x_or_z0_raises_non_finite_error_naming_it(batch, where, bad, layer, in_z0):
    model = _layer(*layer)
    x, z0 = torch.randn(batch, 3), torch.zeros(batch, 4)
    target = z0 if in_z0 else x
    target.view(-1)[where % target.numel()] = bad
    with pytest.raises(inn.NonFiniteError, match="z0" if in_z0 else "the input x"):
        model(x, z0=z0)


@st.composite
def invalid_starts(draw):
    """A z0 that does not fit TanhMap(3, 4) in float32 for a batch of 2."""
    kind = draw(st.sampled_from(["shape", "dtype", "type", "tuple"]))
    if kind == "shape":
        return torch.zeros(draw(st.sampled_from([(2,), (2, 3), (1, 4), (3, 4), (2, 4, 1), ()])))
    if kind == "dtype":
        return torch.zeros(2, 4, dtype=draw(st.sampled_from([torch.float64, torch.int64, torch.bool])))
    if kind == "type":
        return draw(st.sampled_from([1.0, "z", [[0.0] * 4] * 2, np.zeros((2, 4), dtype=np.float32)]))
    return (torch.zeros(2, 4), torch.zeros(2, 4))


@given(z0=invalid_starts(), layer=layers, grad=st.booleans())
def test_an_invalid_start_raises_value_error(z0, layer, grad):
    model = _layer(*layer)
    with pytest.raises(ValueError), torch.set_grad_enabled(grad):
        model(torch.randn(2, 3), z0=z0)
