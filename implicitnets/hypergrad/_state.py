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

__all__ = ["State", "Hparams", "InnerMap", "OuterLoss"]

State = Tensor | tuple[Tensor, ...]
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


def as_tuple(state: State) -> tuple[Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def like(state: State, parts: Sequence[Tensor]) -> State:
    """Pack ``parts`` in the structure of ``state`` (tensor or tuple)."""
    return tuple(parts) if isinstance(state, tuple) else parts[0]


def detach(state: State) -> State:
    return like(state, [s.detach() for s in as_tuple(state)])


def fill_none(grads: Sequence[Tensor | None], refs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Replace ``None`` gradients (unused inputs) by zeros shaped like ``refs``."""
    return tuple(torch.zeros_like(r) if g is None else g for g, r in zip(grads, refs))


def check_finite(name: str, tensors: Sequence[Tensor]) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NonFiniteError(f"{name}: the hypergradient is NaN/Inf")


def check_steps(name: str, field: str, value: object, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: {field} must be an int >= {minimum}, got {value!r}")


def outer_grads(outer_loss: OuterLoss, state: State, hparams: Hparams) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``(∇₁E(w, λ), ∇₂E(w, λ))`` at detached copies of ``w`` and ``λ``."""
    w_leaves = leaves(as_tuple(state))
    h_leaves = leaves(hparams)
    with torch.enable_grad():
        loss = outer_loss(like(state, w_leaves), h_leaves)
        grads = torch.autograd.grad(loss, (*w_leaves, *h_leaves), allow_unused=True)
    n = len(w_leaves)
    return fill_none(grads[:n], w_leaves), fill_none(grads[n:], h_leaves)
