"""Differentiable inner optimisers whose learning rate and momentum can be hyperparameters.

Each optimiser turns an inner loss ``L(w, λ)`` into an inner map on its state, usable with
every method here (reverse/forward ITD, RTHO; AID when the map contracts; unrolled, with
the graph kept, by ``fixed_point(..., backward=ITD())``):

* :class:`GradientDescent`: state ``w``;  ``w_{t+1} = w_t − α ∇₁L(w_t, λ)``.
* :class:`HeavyBall`: state ``(w_t, w_{t−1})``;
  ``w_{t+1} = w_t − α ∇₁L(w_t, λ) + β (w_t − w_{t−1})`` (Polyak momentum).

``lr`` (α) and ``momentum`` (β) are floats or callables ``λ -> Tensor``: writing, e.g.,
``lr=lambda hp: hp[1].exp()`` makes the log learning rate the hyperparameter ``hp[1]``, and
its hypergradient comes out of any method like the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..maps import GradientStep
from ..state import State
from ._state import Hparams, InnerMap, OuterLoss

__all__ = ["GradientDescent", "HeavyBall", "OnParams"]

Scalar = float | Callable[[Hparams], Tensor]
InnerLoss = Callable[[Tensor, Hparams], Tensor]


def _value(x: Scalar, hparams: Hparams) -> Tensor | float:
    return x(hparams) if callable(x) else float(x)


def _check_scalar(name: str, field: str, x: object, lo: float, hi: float | None) -> None:
    if callable(x):
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (x > lo if hi is None else lo <= x < hi):
        bound = f"> {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{name}: {field} must be {bound} or a callable hparams -> Tensor, got {x!r}")


@dataclass(frozen=True)
class OnParams:
    """Adapt an outer loss ``E(w, λ)`` to an optimiser state ``(w, …)``: ``E(state[0], λ)``.

    Args:
        outer_loss: The outer loss ``E(w, λ)``.
    """

    outer_loss: OuterLoss

    def __call__(self, state: State, hparams: Hparams) -> Tensor:
        return self.outer_loss(state[0] if isinstance(state, tuple) else state, hparams)


@dataclass(frozen=True)
class GradientDescent:
    """``w_{t+1} = w_t − α ∇₁L(w_t, λ)``; ``lr`` = α (float > 0 or callable of λ).

    ``map(inner_loss)`` is the inner map (a :class:`~implicitnets.maps.GradientStep`),
    ``init(w0)`` the state ``w0`` and ``outer(outer_loss)`` the outer loss unchanged.

    Args:
        lr: The learning rate α, a number > 0 or a callable ``λ -> Tensor``.

    Raises:
        ValueError: ``lr`` is neither a number > 0 nor callable.
    """

    lr: Scalar

    def __post_init__(self) -> None:
        _check_scalar("GradientDescent", "lr", self.lr, 0.0, None)

    def map(self, inner_loss: InnerLoss) -> InnerMap:
        return GradientStep(inner_loss, self.lr)

    def init(self, w0: Tensor) -> State:
        return w0

    def outer(self, outer_loss: OuterLoss) -> OuterLoss:
        return outer_loss


@dataclass(frozen=True)
class _HeavyBallMap:
    opt: HeavyBall
    inner_loss: InnerLoss

    def __call__(self, state: State, hparams: Hparams) -> State:
        w, w_prev = state
        alpha, beta = _value(self.opt.lr, hparams), _value(self.opt.momentum, hparams)
        g = torch.func.grad(self.inner_loss)(w, hparams)
        return (w - alpha * g + beta * (w - w_prev), w)


@dataclass(frozen=True)
class HeavyBall:
    """``w_{t+1} = w_t − α ∇₁L(w_t, λ) + β (w_t − w_{t−1})`` on the state ``(w_t, w_{t−1})``,
    started at ``(w₀, w₀)``.  ``lr`` = α > 0, ``momentum`` = β ∈ [0, 1), or callables of λ.

    ``map(inner_loss)`` is the inner map on ``(w_t, w_{t−1})``, ``init(w0)`` the state
    ``(w0, w0)`` and ``outer(outer_loss)`` the outer loss on ``state[0]`` (:class:`OnParams`).

    Args:
        lr: The learning rate α, a number > 0 or a callable ``λ -> Tensor``.
        momentum: The momentum β, a number in ``[0, 1)`` or a callable ``λ -> Tensor``.

    Raises:
        ValueError: ``lr`` or ``momentum`` is out of range and not callable.
    """

    lr: Scalar
    momentum: Scalar

    def __post_init__(self) -> None:
        _check_scalar("HeavyBall", "lr", self.lr, 0.0, None)
        _check_scalar("HeavyBall", "momentum", self.momentum, 0.0, 1.0)

    def map(self, inner_loss: InnerLoss) -> InnerMap:
        return _HeavyBallMap(self, inner_loss)

    def init(self, w0: Tensor) -> State:
        return (w0, w0)

    def outer(self, outer_loss: OuterLoss) -> OuterLoss:
        return OnParams(outer_loss)
