"""What the operator-splitting solvers share: the map they need and their step size.

:class:`~implicitnets.solvers.ForwardBackward` and
:class:`~implicitnets.solvers.PeacemanRachford` solve ``0 ∈ (I − W) z − u + ∂f(z)``, the
fixed-point problem ``z = prox_f(W z + u)`` of a :class:`~implicitnets.maps.MonotoneMap`.
They use more of the map than its value, so they accept only a
:class:`~implicitnets.BoundMap` (what :func:`~implicitnets.fixed_point` and
:class:`~implicitnets.FixedPointLayer` hand a solver) whose ``map`` is a ``MonotoneMap``,
and tensor states.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..bound_map import BoundMap
from ..maps.monotone import MonotoneMap

__all__ = ["monotone_map_of", "check_step_size"]


def monotone_map_of(name: str, g: object, z0: object) -> MonotoneMap:
    """``g.map`` if ``g`` is a :class:`BoundMap` of a :class:`MonotoneMap` and ``z0`` a tensor;
    ``ValueError`` otherwise."""
    if not (isinstance(g, BoundMap) and isinstance(g.map, MonotoneMap)):
        got = f"BoundMap of {type(g.map).__name__}" if isinstance(g, BoundMap) else type(g).__name__
        raise ValueError(
            f"{name} is an operator-splitting solver: it needs a monotone map, i.e. g must be an "
            f"implicitnets.BoundMap whose map is an implicitnets.maps.MonotoneMap (e.g. maps.MonotoneFC), "
            f"got {got}; pass such a map to fixed_point / FixedPointLayer, or use FixedPointIteration or "
            "Anderson for other maps"
        )
    if not isinstance(z0, Tensor):
        raise ValueError(f"{name}: the state must be a tensor, got {type(z0).__name__}")
    return g.map


def check_step_size(name: str, alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{name}: alpha must be a finite number > 0, got {alpha!r}")
