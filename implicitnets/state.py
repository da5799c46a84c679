"""States of a fixed-point problem: a tensor or a tuple of tensors.

A multiscale DEQ keeps one tensor per resolution; its state is the tuple of them.  Every
part has the batch as its first axis (a 0-D or 1-D part makes the whole state one sample).
Solvers that need one flat vector per sample (Anderson, GMRES) use :class:`Flattener` at
their edge; everything else works part by part with :func:`parts` and :func:`pack`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["State", "parts", "pack", "map_parts", "Flattener", "flat_vector", "from_flat_vector"]

State = Tensor | tuple[Tensor, ...]


def parts(state: State) -> tuple[Tensor, ...]:
    """The tensors of ``state``: ``(state,)`` for a tensor, the tuple itself otherwise."""
    return (state,) if isinstance(state, Tensor) else tuple(state)


def pack(like: State, tensors: Sequence[Tensor]) -> State:
    """``tensors`` in the structure of ``like`` (a tensor, or a tuple)."""
    return tensors[0] if isinstance(like, Tensor) else tuple(tensors)


def map_parts(fn: Callable[..., Tensor], *states: State) -> State:
    """Apply ``fn`` part by part to states of one structure."""
    return pack(states[0], [fn(*ts) for ts in zip(*(parts(s) for s in states))])


def flat_vector(tensors: tuple[Tensor, ...], single: bool) -> Tensor:
    """The parts of a state as the one vector a linear system acts on: the tensor itself for
    a tensor state (``single``), the flat concatenation of the parts otherwise."""
    return tensors[0] if single else torch.cat([t.reshape(-1) for t in tensors])


def from_flat_vector(v: Tensor, like: tuple[Tensor, ...], single: bool) -> tuple[Tensor, ...]:
    """:func:`flat_vector` undone: parts shaped (and typed) like ``like``."""
    if single:
        return (v.to(like[0].dtype),)
    chunks = torch.split(v, [t.numel() for t in like])
    return tuple(c.reshape(t.shape).to(t.dtype) for c, t in zip(chunks, like))


def batch_size(state: State) -> int:
    """The common first-axis size of the parts (1 when a part has fewer than two axes)."""
    sizes = {t.shape[0] if t.dim() > 1 else 1 for t in parts(state)}
    if len(sizes) != 1:
        raise ValueError(
            "the parts of a tuple state must share their first (batch) axis; got shapes "
            + ", ".join(str(tuple(t.shape)) for t in parts(state))
        )
    return sizes.pop()


class Flattener:
    """Maps a state to a ``(batch, d)`` matrix, one row per sample, and back."""

    def __init__(self, like: State) -> None:
        self.like = like
        self.batch = batch_size(like)
        self.shapes = [t.shape for t in parts(like)]
        self.sizes = [t.numel() // self.batch for t in parts(like)]
        self.single = isinstance(like, Tensor)

    def flatten(self, state: State) -> Tensor:
        if self.single:
            return state.reshape(self.batch, -1)
        return torch.cat([t.reshape(self.batch, -1) for t in parts(state)], dim=1)

    def unflatten(self, flat: Tensor) -> State:
        if self.single:
            return flat.reshape(self.shapes[0])
        chunks = torch.split(flat, self.sizes, dim=1)
        return tuple(c.reshape(s) for c, s in zip(chunks, self.shapes))
