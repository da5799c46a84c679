"""Stochastic implicit differentiation (SID, Grazzi, Pontil & Salzo 2021).

For a stochastic inner map ``Φ(w, λ; ξ)`` with ``E_ξ Φ(w, λ; ξ) = Φ(w, λ)``:

1. inner solve, ``t`` minibatch steps ``w_{s+1} = (1 − η_s) w_s + η_s Φ(w_s, λ; ξ_s)``
   (for a gradient-step map this is SGD with step ``η_s α``);
2. linear system, ``k`` stochastic fixed-point steps
   ``v_{j+1} = (1 − γ_j) v_j + γ_j (∂₁Φ(w_t, λ; ζ_j)ᵀ v_j + ∇₁E(w_t, λ))``, each product
   ``∂₁Φᵀv`` taken by the core's :class:`~implicitnets.GraphJacobian` on one minibatch step;
3. ``ĝ = ∇₂E(w_t, λ) + ∂₂Φ(w_t, λ; ζ)ᵀ v_k``.

Decreasing steps (``η_s, γ_j → 0``, e.g. :class:`DecayingStep`) make ``ĝ → ∇f`` in mean
square as ``t, k → ∞``; the previous result's ``w`` and ``v`` are the warm starts.  With
full batches and unit steps, SID is AID-FP at ``w_t`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..operator import GraphJacobian
from ..state import map_parts, parts
from ._state import as_hparams, check_finite, check_steps, detach, fill_none, flat, leaves, outer_grads, unflat
from .base import Bilevel, Hypergradient, HypergradientMethod, Start, split_start

__all__ = ["SID", "DecayingStep"]


@dataclass(frozen=True)
class DecayingStep:
    """Step-size schedule ``η_j = initial / (1 + decay · j)^power`` (``decay = 0``: constant).

    Args:
        initial: The first step size ``η_0``, in ``(0, 1]``.
        decay: The decay rate, >= 0.
        power: The decay exponent, > 0.

    Raises:
        ValueError: An option is out of range.
    """

    initial: float = 1.0
    decay: float = 0.0
    power: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.initial <= 1.0:
            raise ValueError(f"DecayingStep: initial must be in (0, 1], got {self.initial!r}")
        if not self.decay >= 0.0:
            raise ValueError(f"DecayingStep: decay must be >= 0, got {self.decay!r}")
        if not self.power > 0.0:
            raise ValueError(f"DecayingStep: power must be > 0, got {self.power!r}")

    def __call__(self, j: int) -> float:
        return self.initial / (1.0 + self.decay * j) ** self.power


@dataclass(frozen=True)
class SID(HypergradientMethod):
    """SID with ``inner_steps`` = t, ``linear_steps`` = k and step-size schedules.

    Needs a :class:`Bilevel` with ``sample``; ``inner(w, λ, batch)`` is the minibatch map.

    Args:
        inner_steps: Number t of damped inner steps ``w ← (1 − η_s) w + η_s Φ(w, λ, batch)``,
            an int >= 0.
        linear_steps: Number k of damped adjoint steps
            ``v ← (1 − γ_j) v + γ_j (∂₁Φᵀ v + ∇₁E)``, an int >= 0.
        inner_step_size: The :class:`DecayingStep` schedule of ``η_s``.
        linear_step_size: The :class:`DecayingStep` schedule of ``γ_j``.

    Raises:
        ValueError: A step count is not an int >= 0 or a schedule is not a
            :class:`DecayingStep`.
    """

    inner_steps: int
    linear_steps: int
    inner_step_size: DecayingStep = DecayingStep()
    linear_step_size: DecayingStep = DecayingStep()

    def __post_init__(self) -> None:
        check_steps("SID", "inner_steps", self.inner_steps)
        check_steps("SID", "linear_steps", self.linear_steps)
        for name in ("inner_step_size", "linear_step_size"):
            if not isinstance(getattr(self, name), DecayingStep):
                raise ValueError(f"SID: {name} must be a DecayingStep, got {getattr(self, name)!r}")

    def hypergradient(self, problem: Bilevel, hparams: Tensor | Sequence[Tensor], start: Start) -> Hypergradient:
        """Run SID from ``start`` (a previous result warm-starts both ``w`` and ``v``).

        Args:
            problem: The :class:`Bilevel` problem.
            hparams: The hyperparameters λ, a tensor or a sequence of tensors.
            start: The inner state ``w₀`` or a previous :class:`Hypergradient` (warm-starts
                ``w`` and ``v``).

        Returns:
            The :class:`Hypergradient`: one gradient per hyperparameter, shaped like it.

        Raises:
            ValueError: ``problem`` has no ``sample``.
            NonFiniteError: The hypergradient is NaN or Inf.
        """
        if problem.sample is None:
            raise ValueError("SID: the Bilevel problem needs sample() (a fresh minibatch per call)")
        w, previous = split_start(start)
        phi, sample = problem.inner, problem.sample
        hp = leaves(as_hparams(hparams))
        hp_const = tuple(h.detach() for h in hp)
        w = detach(w)
        with torch.enable_grad():
            for s in range(self.inner_steps):
                eta = self.inner_step_size(s)
                w = detach(map_parts(lambda a, b, eta=eta: (1.0 - eta) * a + eta * b, w, phi(w, hp_const, sample())))
        grads_w, grads_h = outer_grads(problem.outer, w, hp)
        b = flat(grads_w)
        v = torch.zeros_like(b) if previous is None or previous.v is None else previous.v.detach().to(b).clone()
        w_leaf = map_parts(lambda t: t.detach().requires_grad_(), w)
        with torch.enable_grad():
            for j in range(self.linear_steps):
                gamma = self.linear_step_size(j)
                jtv = GraphJacobian(phi(w_leaf, hp_const, sample()), w_leaf).rmv(v.reshape(b.shape))
                v = ((1.0 - gamma) * v + gamma * (jtv + b)).detach()
            fw = phi(w_leaf, hp, sample())
            cross = fill_none(torch.autograd.grad(parts(fw), hp, parts(unflat(v, fw)), allow_unused=True), hp)
        grads = tuple(g + c for g, c in zip(grads_h, cross))
        check_finite("SID", grads)
        return Hypergradient(grads, w, v)
