"""The map protocol: what the library asks of a fixed-point map, asked in one place.

A map is any callable ``f(w, x) -> w``.  A map may also split into ``inject(x) -> u`` (the
input term, computed once per solve) and ``step(w, u) -> w``, and offer optional parts:
``initial_state(x)`` (the default ``w₀``), ``jacobian(w, u, out)`` (a closed-form
``J = ∂₁Φ`` as a :class:`~implicitnets.LinearOperator`), ``jacobian_needs_graph`` (False when
that closed form reads only values), ``row_separable`` (True when each sample's output
depends only on its own rows of ``w`` and ``x``: solvers may then drop converged samples and
``vmap`` may solve mapped problems as one batch).  :class:`Map` is the base class that
declares them; :func:`parts_of` reads them from any map, subclass or not, and is the only
place in the library that does.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..state import State

__all__ = ["Map", "MapParts", "parts_of", "step_parts"]


class Map(nn.Module, abc.ABC):
    """Base class of a fixed-point map ``Φ(w, x) = step(w, inject(x))``.

    Subclasses implement :meth:`inject` and :meth:`step`, and may define
    ``initial_state(x)`` and a closed-form ``jacobian(w, u, out)`` (see the module
    docstring).  ``forward(w, x)`` is ``step(w, inject(x))``.
    """

    #: whether a closed-form :meth:`jacobian` needs ``out`` recorded from leaves ``w``
    jacobian_needs_graph: bool = True
    #: whether each sample's output depends only on its own rows of ``w`` and ``x``
    row_separable: bool = False

    @abc.abstractmethod
    def inject(self, x: State) -> State:
        """The input term ``u``, computed once per solve.

        Args:
            x: The map's input, a tensor or a tuple of tensors.

        Returns:
            ``u``, as :meth:`step` takes it.
        """

    @abc.abstractmethod
    def step(self, w: State, u: State) -> State:
        """One map evaluation ``Φ(w, x)`` from ``u = inject(x)``.

        Args:
            w: The state, a tensor or a tuple of tensors.
            u: The input term ``inject(x)``.

        Returns:
            The next state, of ``w``'s structure and shapes.
        """

    def forward(self, w: State, x: State) -> State:
        return self.step(w, self.inject(x))


@dataclass(frozen=True)
class MapParts:
    """The parts of a map: ``step(w, u)`` with ``u = inject(x)`` (``inject`` is ``None`` for
    a plain callable, whose ``step`` is the map itself and ``u = x``), and the optional
    parts (``None``/defaults when absent).

    Args:
        owner: The map object (or the plain callable).
        step: ``step(w, u) -> w``.
        inject: ``inject(x) -> u``, or ``None`` (then ``u = x``).
        initial_state: ``initial_state(x) -> w₀``, or ``None``.
        jacobian: The closed form ``jacobian(w, u, out)`` of ``J = ∂₁Φ``, or ``None``.
        jacobian_needs_graph: Whether ``jacobian`` needs ``out`` recorded from leaves ``w``
            (``True`` when there is no closed form).
        row_separable: Whether each sample's output depends only on its own rows of ``w``
            and ``x``.
    """

    owner: Any
    step: Callable[[State, State], State]
    inject: Callable[[State], State] | None
    initial_state: Callable[[State], State] | None
    jacobian: Callable[..., Any] | None
    jacobian_needs_graph: bool
    row_separable: bool


def parts_of(f: Callable[[State, State], State]) -> MapParts:
    """The parts of the map ``f`` (any callable; a :class:`Map` or a duck-typed object).

    Args:
        f: The map; it splits into ``inject``/``step`` when it has both as callables.

    Returns:
        Its :class:`MapParts`.
    """
    inject, step = getattr(f, "inject", None), getattr(f, "step", None)
    split = callable(inject) and callable(step)
    return _parts(f, step if split else f, inject if split else None)


def step_parts(step: Callable[[State, State], State]) -> MapParts:
    """The parts of the map that owns ``step`` (a bound method), or of ``step`` itself."""
    owner = getattr(step, "__self__", step)
    inject = getattr(owner, "inject", None) if owner is not step else None
    return _parts(owner, step, inject if callable(inject) else None)


def _parts(owner: Any, step: Callable, inject: Callable | None) -> MapParts:
    initial = getattr(owner, "initial_state", None)
    jacobian = getattr(owner, "jacobian", None) if step is not owner else None
    closed = jacobian if callable(jacobian) else None
    return MapParts(
        owner=owner,
        step=step,
        inject=inject,
        initial_state=initial if callable(initial) else None,
        jacobian=closed,
        jacobian_needs_graph=closed is None or bool(getattr(owner, "jacobian_needs_graph", True)),
        row_separable=bool(getattr(owner, "row_separable", False)),
    )
