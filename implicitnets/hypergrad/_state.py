"""Private plumbing shared by the hypergradient methods.

The inner *state* is a tensor ``w`` or a tuple of tensors (e.g. ``(w, w_prev)`` for
heavy-ball); the hyperparameters ``λ`` are always a tuple of tensors.  Every method returns
one gradient per hyperparameter, shaped like it (zeros where ``λ_i`` is unused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..options import check_int
from ..state import State, map_parts, pack, parts

__all__ = ["Hparams", "InnerMap", "OuterLoss"]

Hparams = tuple[Tensor, ...]
InnerMap = Callable[[State, Hparams], State]
"""``Φ(w, λ) -> w``: one step of the inner dynamics (a contraction for AID)."""
OuterLoss = Callable[[State, Hparams], Tensor]
"""``E(w, λ) -> scalar``: the outer (validation) objective."""


def as_hparams(hparams: Tensor | Sequence[Tensor]) -> Hparams:
    """``λ`` as a tuple of tensors; a lone tensor becomes a 1-tuple."""
    if isinstance(hparams, Tensor):
        return (hparams,)
    out = tuple(hparams)
    if not out or not all(isinstance(h, Tensor) for h in out):
        raise ValueError("hparams must be a tensor or a non-empty sequence of tensors")
    return out


def leaves(xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Detached copies that require grad: new graph leaves, the caller's graph untouched."""
    return tuple(x.detach().requires_grad_() for x in xs)


def detach(state: State) -> State:
    return map_parts(torch.Tensor.detach, state)


def fill_none(grads: Sequence[Tensor | None], refs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Replace ``None`` gradients (unused inputs) by zeros shaped like ``refs``."""
    return tuple(torch.zeros_like(r) if g is None else g for g, r in zip(grads, refs))


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """The parts of a state as one vector (the operator's vectors for a tuple state)."""
    return tensors[0] if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


def unflat(v: Tensor, like: State) -> State:
    """Inverse of :func:`flat` for a state shaped like ``like``."""
    ts = parts(like)
    if len(ts) == 1:
        return pack(like, [v.reshape(ts[0].shape)])
    chunks = torch.split(v.reshape(-1), [t.numel() for t in ts])
    return pack(like, [c.reshape(t.shape) for c, t in zip(chunks, ts)])


def check_finite(name: str, tensors: Sequence[Tensor]) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NonFiniteError(f"{name}: the hypergradient is NaN/Inf")


def check_steps(name: str, field: str, value: object, minimum: int = 0) -> None:
    check_int(name, field, value, minimum)


def outer_grads(outer_loss: OuterLoss, state: State, hparams: Hparams) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``(∇₁E(w, λ), ∇₂E(w, λ))`` at detached copies of ``w`` and ``λ``."""
    w_leaves = leaves(parts(state))
    h_leaves = leaves(hparams)
    with torch.enable_grad():
        loss = outer_loss(pack(state, w_leaves), h_leaves)
        grads = torch.autograd.grad(loss, (*w_leaves, *h_leaves), allow_unused=True)
    n = len(w_leaves)
    return fill_none(grads[:n], w_leaves), fill_none(grads[n:], h_leaves)
