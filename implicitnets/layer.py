"""The functional solve :func:`fixed_point` and the module :class:`FixedPointLayer`.

Both find ``w* = Φ(w*, x; θ)`` with a forward solver and make ``w*`` differentiable with
respect to ``x`` and θ by the chosen backward mode (:class:`ITD`, :class:`AID`,
:class:`JacobianFree`, or any :class:`BackwardMode`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .backward import BackwardMode, Problem
from .backward.functional_step import map_tensors
from .errors import NonFiniteError
from .maps.protocol import parts_of
from .solvers import ForwardSolver, SolverStats
from .state import State, parts
from .transforms import host_read, physical

__all__ = ["fixed_point", "FixedPointLayer"]

MapFn = Callable[[State, State], State]


def _check_options(solver: object, backward: object) -> None:
    if not isinstance(solver, ForwardSolver):
        raise ValueError(
            f"solver must be an implicitnets.ForwardSolver (e.g. FixedPointIteration(), Anderson()), got {solver!r}"
        )
    if not isinstance(backward, BackwardMode):
        hint = ""
        if type(backward).__module__.startswith("implicitnets.linear"):
            hint = f"; to use a linear solver write backward=AID({backward!r})"
        raise ValueError(
            "backward must be an implicitnets.BackwardMode (e.g. ITD(), AID(...), JacobianFree()), "
            f"got {backward!r}{hint}"
        )


def _as_state(value: object, name: str) -> State:
    """``value`` as a tensor or a tuple of tensors (a list becomes a tuple)."""
    if isinstance(value, list):
        value = tuple(value)
    tensors = isinstance(value, (Tensor, tuple)) and all(isinstance(t, Tensor) for t in parts(value))
    if not tensors or not parts(value):
        raise ValueError(f"{name} must be a tensor or a tuple/list of tensors, got {type(value).__name__}")
    return value


def _check_input(x: State, module: nn.Module | None) -> None:
    weight = None if module is None else next((p for p in module.parameters() if p.is_floating_point()), None)
    for t in parts(x):
        if not (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"x must be a floating-point tensor, got dtype {t.dtype} (convert it, e.g. x.float())")
        if weight is not None and weight.device != t.device:
            raise ValueError(f"x is on {t.device} but the map's parameters are on {weight.device}")
        if weight is not None and weight.dtype != t.dtype and not torch.is_autocast_enabled(t.device.type):
            raise ValueError(
                f"x has dtype {t.dtype} but the map's parameters have dtype {weight.dtype}; "
                f"convert one of them (e.g. x.to({weight.dtype}))"
            )


class _FiniteInputs:
    """The NaN/Inf check of ``x`` and a given ``z0``, without a host sync of its own.

    One sum per tensor is queued before the solve and their total read after it (the
    solve's statistics synchronise anyway); a non-finite total is confirmed element-wise
    (finite tensors whose sums overflow are not an error).
    """

    def __init__(self, named: list[tuple[str, Tensor]]) -> None:
        self.named = [(name, physical(t)) for name, t in named]  # inside vmap: every mapped problem
        self.sums = [t.sum(dtype=torch.promote_types(t.dtype, torch.float32)) for _, t in self.named]

    @host_read
    def check(self) -> None:
        """Raise :class:`NonFiniteError` naming the first input that holds NaN or Inf."""
        total = self.sums[0] if len(self.sums) == 1 else torch.stack(self.sums).sum()
        if math.isfinite(total.item()):  # the one read
            return
        for name, t in self.named:
            if not torch.isfinite(t).all():
                raise NonFiniteError(f"{name} (shape {tuple(t.shape)}) contains NaN or Inf")


def _initial_state(init: Callable[[State], State] | None, x: State, z0: State | None) -> State:
    if z0 is not None:
        z0 = _as_state(z0, "z0")
    if z0 is None:
        if not callable(init) and not isinstance(x, Tensor):
            raise ValueError("pass z0: with a tuple input x there is no default initial state")
        z0 = init(x) if callable(init) else torch.zeros_like(x)
    elif callable(init):
        want, got = [tuple(t.shape) for t in parts(init(x))], [tuple(t.shape) for t in parts(z0)]
        if want != got:
            raise ValueError(f"z0 has shape {got} but the map's state for this x has shape {want}")
    first = parts(x)[0]
    for t in parts(z0):
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"z0 has dtype {t.dtype} on {t.device} but x has dtype {first.dtype} on {first.device}")
        if t.numel() == 0:
            raise ValueError(
                f"the state has no entries (shapes {[tuple(p.shape) for p in parts(z0)]}; x has shapes "
                f"{[tuple(p.shape) for p in parts(x)]}): an empty batch has no fixed point to solve for, skip it"
            )
    return tuple(t.detach() for t in z0) if isinstance(z0, tuple) else z0.detach()


def fixed_point(
    f: MapFn,
    x: State,
    *,
    solver: ForwardSolver,
    backward: BackwardMode,
    z0: State | None = None,
    adjoint_x0: Tensor | None = None,
) -> tuple[State, SolverStats]:
    """Solve ``w = f(w, x)`` and return ``(w*, stats)``, ``w*`` differentiable by ``backward``.

    ``f`` is any callable ``f(w, x) -> w``; the state ``w`` is a tensor or a tuple of
    tensors (e.g. one per resolution), and so is the input ``x`` (e.g. the tuple of
    hyperparameters of a bilevel problem, :mod:`implicitnets.hypergrad`).  If ``f`` has
    ``inject(x) -> u`` and ``step(w, u) -> w`` (like :class:`~implicitnets.maps.TanhMap`), the
    input term is computed once per solve.  ``z0`` defaults to ``f.initial_state(x)`` if ``f``
    has one, else ``zeros_like(x)`` (a tuple ``x`` needs one of the two).  ``adjoint_x0``
    warm-starts an AID adjoint solve.
    Parametrized weights of an ``nn.Module`` map are evaluated once per solve
    (``parametrize.cached``), so forward and backward see the same weights.

    Args:
        f: The map, a callable ``f(w, x) -> w`` returning a state shaped like ``w``; an
            ``nn.Module`` map's parameters are differentiated.
        x: The input, a floating-point tensor or a tuple (or list) of tensors, on the
            device and of the dtype of the map's parameters.
        solver: Keyword only.  The :class:`ForwardSolver` of the forward solve.
        backward: Keyword only.  The :class:`BackwardMode` that makes ``w*`` differentiable.
        z0: Keyword only.  The start, a state of the map's state shape on ``x``'s dtype and
            device (detached), or ``None`` for the default.
        adjoint_x0: Keyword only.  A warm start of an AID adjoint solve, or ``None``.

    Returns:
        ``(w*, stats)``: the solution (a state like ``z0``) and the :class:`SolverStats`.

    Raises:
        ValueError: ``solver`` or ``backward`` is of the wrong type, or ``x`` or ``z0`` has
            the wrong type, dtype, device or shape.
        NonFiniteError: ``x`` or ``z0`` holds NaN or Inf, or the map produced NaN or Inf.
        ConvergenceError: The solve failed and the failure policy is ``Raise()``.
    """
    _check_options(solver, backward)
    module = f if isinstance(f, nn.Module) else None
    x = _as_state(x, "x")
    _check_input(x, module)
    if torch.compiler.is_compiling():  # traced by Dynamo: the NaN/Inf check of the inputs would read the host
        return _solve(f, x, solver, backward, module, z0, adjoint_x0)
    given = [] if z0 is None else [t for t in (z0 if isinstance(z0, (tuple, list)) else (z0,)) if isinstance(t, Tensor)]
    finite = _FiniteInputs([*(("the input x", t) for t in parts(x)), *(("z0", t) for t in given)])
    try:
        result = _solve(f, x, solver, backward, module, z0, adjoint_x0)
    except Exception:
        finite.check()  # NaN/Inf inputs make any solve fail: name them
        raise
    finite.check()
    return result


def _solve(
    f: MapFn, x: State, solver: ForwardSolver, backward: BackwardMode, module: nn.Module | None,
    z0: State | None, adjoint_x0: Tensor | None,
) -> tuple[State, SolverStats]:
    with parametrize.cached():
        form = parts_of(f)
        step = form.step
        u = form.inject(x) if form.inject is not None else x
        # every parametrized tensor is evaluated here, inside cached(), with autograd as the
        # caller has it: were its first evaluation under the solver's no_grad, the cached
        # weight would carry no graph and its parameters would silently get no gradient
        names, params = map_tensors(module)
        needs_grad = torch.is_grad_enabled() and (
            module is None or any(t.requires_grad for t in (*parts(x), *parts(u), *params))
        )
        z0 = _initial_state(form.initial_state, x, z0)
        problem = Problem(step, u, z0, solver, params, needs_grad, module, adjoint_x0, names)
        return backward.run(problem)


class FixedPointLayer(nn.Module):
    """An implicit layer: ``forward(x)`` returns ``w*`` with ``w* = cell(w*, x)``.

    ``solver`` runs the forward solve, ``backward`` chooses how gradients flow.  After each
    call ``self.stats`` holds the solve's :class:`SolverStats` (``stats.backward``: the backward pass's);
    under ``torch.no_grad()`` no graph is built.  Each call's backward solve starts where the
    backward mode says (:meth:`BackwardMode.next_start`): with ``AID(..., warm_start=True)``,
    from the previous call's adjoint solution.

    ``forward(x, z0=None)`` takes ``x`` and ``z0`` as :func:`fixed_point` does.

    Args:
        cell: The map, a callable ``cell(w, x) -> w`` (typically an ``nn.Module``, whose
            parameters become the layer's).
        solver: Keyword only.  The :class:`ForwardSolver` of the forward solve.
        backward: Keyword only.  The :class:`BackwardMode` of the backward pass.

    Raises:
        ValueError: ``solver`` or ``backward`` is of the wrong type.
    """

    def __init__(self, cell: MapFn, *, solver: ForwardSolver, backward: BackwardMode) -> None:
        super().__init__()
        _check_options(solver, backward)
        self.cell = cell
        self.solver = solver
        self.backward = backward
        self.stats: SolverStats | None = None

    def forward(self, x: State, z0: State | None = None, adjoint_x0: Tensor | None = None) -> State:
        """``w*`` for the input ``x``, solved from ``z0`` (default: the map's initial state);
        ``adjoint_x0`` starts the backward solve (default: ``backward.next_start``), e.g. rows
        of a :class:`~implicitnets.SampleCache`."""
        # only the mode reads the previous call's statistics: torch.compile guards on what is read
        if adjoint_x0 is None:
            adjoint_x0 = self.backward.next_start(self.stats)
        z, self.stats = fixed_point(
            self.cell, x, solver=self.solver, backward=self.backward, z0=z0, adjoint_x0=adjoint_x0
        )
        return z

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, backward={self.backward!r}"
