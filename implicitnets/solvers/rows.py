"""Samples (rows) of a batched state, for solvers that stop updating some samples.

A solver that freezes a sample keeps iterating a *compact* state holding only the samples
still active; these functions select rows, write them back into a full-batch state, and
restrict the map to the active samples.  A :class:`~implicitnets.BoundMap` is restricted
with :meth:`~implicitnets.BoundMap.rows`, so the map is evaluated on the active samples
only: this is valid for *row-separable* maps, whose output for a sample depends only on
that sample (every shipped map; not a map that mixes the batch, e.g. batch normalisation).
A plain callable is evaluated on the full batch, the frozen samples held at their values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..bound_map import BoundMap
from ..state import State, map_parts

__all__ = ["take_rows", "put_rows", "where_rows", "restrict"]


def take_rows(state: State, index: Tensor) -> State:
    """The samples ``index`` (a 1-D long tensor) of every part."""
    return map_parts(lambda t: t.index_select(0, index), state)


def put_rows(state: State, index: Tensor, rows: State, *, in_place: bool = False) -> State:
    """``state`` with its samples ``index`` replaced by ``rows`` (out of place unless asked)."""
    if in_place:
        return map_parts(lambda t, r: t.index_copy_(0, index, r.to(t.dtype)), state, rows)
    return map_parts(lambda t, r: t.index_copy(0, index, r.to(t.dtype)), state, rows)


def row_mask(mask: Tensor, t: Tensor) -> Tensor:
    """A per-sample boolean ``mask`` shaped to broadcast over the part ``t``."""
    if t.dim() <= 1:  # a part without batch axis: the state is one sample
        return mask.reshape(())
    return mask.reshape(mask.shape + (1,) * (t.dim() - 1))


def where_rows(mask: Tensor, a: State, b: State) -> State:
    """Per sample: ``a`` where ``mask``, else ``b`` (differentiable, out of place)."""
    return map_parts(lambda x, y: torch.where(row_mask(mask, x), x, y.to(x.dtype)), a, b)


def restrict(g: Callable[[State], State], index: Tensor, held: State) -> Callable[[State], State]:
    """``g`` on the samples ``index``; ``held`` (a full-batch state) supplies the other
    samples when ``g`` is a plain callable that must see the whole batch."""
    if isinstance(g, BoundMap):
        return g.rows(index)

    def on_rows(z: State) -> State:
        return take_rows(g(put_rows(held, index, z)), index)

    return on_rows
