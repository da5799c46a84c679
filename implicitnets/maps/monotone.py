"""Monotone operator equilibrium maps (monDEQ, Winston & Kolter 2020): the protocol.

A monotone map is ``Φ(z, x) = prox_f(W z + u)`` with ``u = U x + b`` the injected input,
``prox_f`` the proximal operator of a convex, closed, proper ``f`` (ReLU: ``f`` the
indicator of ``z ≥ 0``) and ``I − W ⪰ m I`` (symmetric part, m > 0).  Its fixed points are
the zeros of ``(I − W) z − u + ∂f(z)``: an m-strongly monotone, Lipschitz operator plus a
maximal monotone one.  The equilibrium therefore exists and is unique for every weight and
input, although Φ need not be a contraction (``‖W‖₂`` is typically above 1, and plain
fixed-point iteration may diverge).  The operator-splitting solvers
(:class:`~implicitnets.solvers.ForwardBackward`, :class:`~implicitnets.solvers.PeacemanRachford`)
find it from what :class:`MonotoneMap` asks of a map: ``W`` (``weight_mv``/``weight_rmv``),
``u`` (``inject``), the prox, and the resolvent ``(I + α(I − W))⁻¹``.  Subclass it to run
them on your own monotone map.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import Tensor

from ..operator import LinearOperator
from .protocol import Map

__all__ = ["MonotoneMap"]


class MonotoneMap(Map):
    """``Φ(z, x) = prox(W z + u)``, ``u = inject(x)``, with ``I − W ⪰ m I``; subclass it.

    Subclasses implement :meth:`inject`, :meth:`initial_state`, :meth:`weight_mv`,
    :meth:`weight_rmv` and :meth:`resolvent`, and set ``self.m`` (the margin m, which
    bounds forward–backward's step size).  The prox is ReLU (the projection onto ``z ≥ 0``,
    the same for every step size α); a subclass with another prox overrides :meth:`prox`
    and :meth:`jacobian`.  :meth:`step` and the closed-form :meth:`jacobian` (``J y =
    D ⊙ (W y)``, ``Jᵀ v = Wᵀ (D ⊙ v)``, ``D = ReLU'``) follow from these, so the map works
    with every forward solver and backward mode of the library.  States are tensors.
    """

    #: each sample's output depends only on its own rows of ``w`` and ``x`` (``vmap`` may solve
    #: the mapped problems as one batch)
    row_separable = True

    m: float

    @abc.abstractmethod
    def inject(self, x: Tensor) -> Tensor:
        """The injected input ``u = U x + b``, computed once per solve.

        Args:
            x: The input, a batch.

        Returns:
            ``u``, shaped like the state.
        """

    @abc.abstractmethod
    def initial_state(self, x: Tensor) -> Tensor:
        """The starting state for input ``x`` (usually zeros).

        Args:
            x: The input, a batch.
        """

    @abc.abstractmethod
    def weight_mv(self, z: Tensor) -> Tensor:
        """``W z`` for a batch of states (differentiable in the weights).

        Args:
            z: A batch of states.
        """

    @abc.abstractmethod
    def weight_rmv(self, z: Tensor) -> Tensor:
        """``Wᵀ z`` for a batch of states.

        Args:
            z: A batch of states.
        """

    @abc.abstractmethod
    def resolvent(self, alpha: float) -> Callable[[Tensor], Tensor]:
        """``v ↦ (I + α(I − W))⁻¹ v`` for a batch of states, factorised once per call.

        The solve must be exact (a direct factorisation, to rounding) and, when autograd is
        on, differentiable in the weights, so that ITD can run through the solver.
        ``I + α(I − W)`` has symmetric part ``⪰ (1 + αm) I``: it is invertible for α ≥ 0
        and its inverse has norm ≤ 1 / (1 + αm).

        Args:
            alpha: The step size α >= 0.

        Returns:
            The solve, a callable on a batch of states.
        """

    def prox(self, v: Tensor, alpha: float) -> Tensor:
        """``prox_{αf}(v)``; ReLU for every α (``f`` the indicator of ``z ≥ 0``).

        Args:
            v: A batch of states.
            alpha: The step size α > 0 (unused by ReLU).
        """
        return torch.relu(v)

    def reflect(self, v: Tensor, alpha: float) -> Tensor:
        """The reflection ``2 prox_{αf}(v) − v``: ``|v|`` for the ReLU prox (one operation), else
        from :meth:`prox` (a subclass that overrides :meth:`prox` gets the general form).

        Args:
            v: A batch of states.
            alpha: The step size α > 0 of the prox.
        """
        if type(self).prox is MonotoneMap.prox:
            return torch.abs(v)
        return torch.lerp(v, self.prox(v, alpha), 2.0)

    def step(self, z: Tensor, u: Tensor) -> Tensor:
        """One map evaluation ``Φ(z) = prox(W z + u)``.

        Args:
            z: A batch of states.
            u: The injected input, shaped like ``z``.
        """
        return self.prox(self.weight_mv(z) + u, 1.0)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.step(z, self.inject(x))

    def jacobian(self, w: Tensor, u: Tensor, out: Tensor) -> LinearOperator:
        """``J = ∂₁Φ(w)`` from ``out = Φ(w, u)``: ``J y = D ⊙ (W y)``, ``Jᵀ v = Wᵀ (D ⊙ v)``
        with ``D = (out > 0)`` (the ReLU's derivative).  Products run without autograd; a
        subclass may override this to capture its effective weight once.

        Args:
            w: The state at which ``J`` is taken, a batch of states.
            u: The input term ``inject(x)``.
            out: ``Φ(w, u)``, whose values alone are read.

        Returns:
            ``J`` as a :class:`~implicitnets.LinearOperator` on vectors shaped like ``w``.
        """
        return ReLUJacobian(self.weight_mv, self.weight_rmv, out)


class ReLUJacobian(LinearOperator):
    """``J y = D ⊙ (K y)``, ``Jᵀ v = Kᵀ (D ⊙ v)`` with ``D = (out > 0)`` and ``K`` given by
    its products ``mv`` (``K y``) and ``rmv`` (``Kᵀ v``), which run without autograd."""

    def __init__(self, mv: Callable[[Tensor], Tensor], rmv: Callable[[Tensor], Tensor], out: Tensor) -> None:
        out = out.detach()
        self._mv, self._rmv, self.slope = mv, rmv, (out > 0).to(out.dtype)

    @property
    def like(self) -> Tensor:
        return self.slope

    def mv(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.slope.to(x.dtype) * self._mv(x)

    def rmv(self, y: Tensor) -> Tensor:
        with torch.no_grad():
            return self._rmv(self.slope.to(y.dtype) * y)
