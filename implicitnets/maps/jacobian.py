"""``J = ∂₁Φ`` of a map at a point: the map's closed form when it has one, else a graph.

A map's closed form is its ``jacobian(w, u, out)`` (:mod:`implicitnets.maps.protocol`),
called with ``out = step(w, u)`` recorded from leaves ``w``; :class:`~implicitnets.GraphJacobian`
builds ``J`` from that graph otherwise.  AID, the diagnostics and the hypergradient methods
all take ``J`` from here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..operator import GraphJacobian, LinearOperator
from ..state import State, map_parts
from .protocol import parts_of, step_parts

__all__ = ["state_jacobian", "linearize"]


def state_jacobian(step: Callable[[State, Tensor], State], w: State, u: Tensor, out: State) -> LinearOperator:
    """``J = ∂₁ step(w, u)`` at ``w``, with ``out = step(w, u)`` recorded from leaves ``w``:
    the map's closed form when it has one, otherwise the graph of ``out``."""
    closed = step_parts(step).jacobian
    return closed(w, u, out) if closed is not None else GraphJacobian(out, w)


def linearize(f: Callable[[State, Tensor], State], z: State, x: Tensor) -> LinearOperator:
    """``J = ∂₁f(z, x)`` at ``z``, for a map ``f(w, x) -> w``.

    A map with ``inject(x)`` and ``step(w, u)`` is linearised through ``step`` (and its
    closed-form ``jacobian`` when it has one); any other callable through the graph of one
    evaluation.  Vectors are shaped like ``z`` (flat for a tuple state).
    """
    parts = parts_of(f)
    with torch.enable_grad():
        w = map_parts(lambda t: t.detach().requires_grad_(), z)
        u = parts.inject(x) if parts.inject is not None else x
        return state_jacobian(parts.step, w, u, parts.step(w, u))
