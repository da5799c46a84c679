"""The functional solve :func:`fixed_point` and the module :class:`FixedPointLayer`.

Both find ``w* = Φ(w*, x; θ)`` with a forward solver and make ``w*`` differentiable with
respect to ``x`` and θ by the chosen backward mode (:class:`ITD`, :class:`AID`,
:class:`JacobianFree`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .backward import AID, ITD, BackwardMode, JacobianFree, Problem
from .errors import NonFiniteError
from .solvers import Anderson, FixedPointIteration, ForwardSolver, SolverStats

__all__ = ["fixed_point", "FixedPointLayer"]

Map = Callable[[Tensor, Tensor], Tensor]


def _check_options(solver: object, backward: object) -> None:
    if not isinstance(solver, (FixedPointIteration, Anderson)):
        raise ValueError(
            f"solver must be FixedPointIteration(...) or Anderson(...), got {solver!r}"
        )
    if not isinstance(backward, (ITD, AID, JacobianFree)):
        hint = ""
        if type(backward).__module__.endswith(".linear"):
            hint = f"; to use a linear solver write backward=AID({backward!r})"
        raise ValueError(f"backward must be ITD(...), AID(...) or JacobianFree(), got {backward!r}{hint}")


def _touch_parametrizations(module: nn.Module) -> None:
    """Evaluate every parametrized tensor once, with autograd on, inside ``cached()``.

    Otherwise the first evaluation may happen under the solver's ``no_grad`` and the cached
    weight would carry no graph: its parameters would silently get no gradient.
    """
    with torch.enable_grad() if torch.is_grad_enabled() else torch.no_grad():
        for sub in module.modules():
            if parametrize.is_parametrized(sub):
                for name in sub.parametrizations:
                    getattr(sub, name)


def _initial_state(f: Map, x: Tensor, z0: Tensor | None) -> Tensor:
    if z0 is None:
        init = getattr(f, "initial_state", None)
        z0 = init(x) if callable(init) else torch.zeros_like(x)
    if not isinstance(z0, Tensor):
        raise ValueError(f"z0 must be a tensor, got {type(z0).__name__}")
    if z0.dtype != x.dtype or z0.device != x.device:
        raise ValueError(
            f"z0 has dtype {z0.dtype} on {z0.device} but x has dtype {x.dtype} on {x.device}"
        )
    if not torch.isfinite(z0).all():
        raise NonFiniteError("z0 contains NaN or Inf")
    return z0.detach()


def fixed_point(
    f: Map,
    x: Tensor,
    *,
    solver: ForwardSolver,
    backward: BackwardMode,
    z0: Tensor | None = None,
) -> tuple[Tensor, SolverStats]:
    """Solve ``w = f(w, x)`` and return ``(w*, stats)``, ``w*`` differentiable by ``backward``.

    ``f`` is any callable ``f(w, x) -> w``.  If it has ``inject(x) -> u`` and
    ``step(w, u) -> w`` (like :class:`~implicitnets.maps.TanhMap`), the input term is
    computed once per solve.  ``z0`` defaults to ``f.initial_state(x)`` if ``f`` has one,
    else ``zeros_like(x)``.  Parametrized weights of an ``nn.Module`` map are evaluated once
    per solve (``parametrize.cached``), so forward and backward see the same weights.
    """
    _check_options(solver, backward)
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"the input x (shape {tuple(x.shape)}) contains NaN or Inf")
    module = f if isinstance(f, nn.Module) else None
    with parametrize.cached():
        if module is not None:
            _touch_parametrizations(module)
        inject, step = getattr(f, "inject", None), getattr(f, "step", None)
        if callable(inject) and callable(step):
            u = inject(x)
        else:
            u, step = x, f
        params = tuple(p for p in module.parameters() if p.requires_grad) if module is not None else ()
        needs_grad = torch.is_grad_enabled() and (
            module is None or x.requires_grad or u.requires_grad or bool(params)
        )
        problem = Problem(step, u, _initial_state(f, x, z0), solver, params, needs_grad, module)
        return backward.run(problem)


class FixedPointLayer(nn.Module):
    """An implicit layer: ``forward(x)`` returns ``w*`` with ``w* = cell(w*, x)``.

    ``solver`` runs the forward solve, ``backward`` chooses how gradients flow.  After each
    call ``self.stats`` holds the solve's :class:`SolverStats` (filled in by backward too);
    under ``torch.no_grad()`` no graph is built.
    """

    def __init__(self, cell: Map, *, solver: ForwardSolver, backward: BackwardMode) -> None:
        super().__init__()
        _check_options(solver, backward)
        self.cell = cell
        self.solver = solver
        self.backward = backward
        self.stats: SolverStats | None = None

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        z, self.stats = fixed_point(self.cell, x, solver=self.solver, backward=self.backward, z0=z0)
        return z

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, backward={self.backward!r}"
