"""The map a forward solver iterates: ``z ↦ Φ(z, u)`` at a fixed (injected) input ``u``.

A :class:`~implicitnets.ForwardSolver` receives a callable ``g`` with ``g(z) = Φ(z, u)``.
The layer hands it a :class:`BoundMap`, which is such a callable and also says where it
came from: ``g.map`` is the fixed-point map object (for a structure-aware solver, e.g.
operator splitting on a monotone map, which needs more of the map than its value) and
``g.u`` the injected input.  :meth:`BoundMap.rows` restricts the map to some samples of the
batch, for solvers that stop updating converged samples.  A solver must also accept a
plain callable (a user's ``lambda z: ...``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .state import State, map_parts

__all__ = ["BoundMap"]


class BoundMap:
    """``g(z) = step(z, u)``; ``map`` is the object that owns ``step`` (or ``step`` itself).

    ``u`` is a tensor or a tuple of tensors whose first axis is the batch.

    Args:
        step: The map ``step(z, u) -> z``.
        u: The injected input, a tensor or a tuple of tensors whose first axis is the batch.
        map: The object that owns ``step`` (e.g. a :class:`~implicitnets.maps.MonotoneMap`),
            or ``None`` for ``step`` itself.
    """

    __slots__ = ("step", "u", "map")

    def __init__(self, step: Callable[[State, State], State], u: State, map: object | None = None) -> None:
        self.step, self.u = step, u
        self.map = step if map is None else map

    def __call__(self, z: State) -> State:
        return self.step(z, self.u)

    def rows(self, index: Tensor) -> BoundMap:
        """The same map on the samples ``index`` (a 1-D index or boolean mask over the batch).

        Valid for *row-separable* maps, whose output for a sample depends only on that
        sample's rows of ``z`` and ``u`` (every shipped map; not a map that mixes the batch,
        e.g. batch normalisation).

        Args:
            index: A 1-D index tensor or boolean mask over the batch.

        Returns:
            A :class:`BoundMap` of the same ``step`` and ``map`` with ``u`` restricted to
            ``index``.
        """
        return BoundMap(self.step, map_parts(lambda t: t[index], self.u), self.map)

    def __repr__(self) -> str:
        return f"BoundMap({self.map!r})"
