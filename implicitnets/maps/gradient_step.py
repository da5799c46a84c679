"""Gradient-step maps ``Φ(w, x) = w − η ∇_w ℓ(w, x)`` (symmetric Jacobian ``I − η ∇²ℓ``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..operator import GraphJacobian, LinearOperator
from ..state import State
from .protocol import Map

__all__ = ["GradientStep"]

StepSize = float | Callable[[State], Tensor]


class GradientStep(Map):
    """One gradient-descent step on an inner loss: ``Φ(w, x) = w − η ∇_w ℓ(w, x)``.

    Its fixed points are the stationary points of ℓ(·, x); for a μ-strongly convex, L-smooth
    ℓ and ``0 < η ≤ 2/(L + μ)`` it is a contraction with ``q = 1 − ημ``.  ``∂₁Φ = I − η∇²ℓ``
    is symmetric, so ``linear.CG`` applies in the AID backward, and :meth:`jacobian` gives
    AID that operator with ``J y = Jᵀ y`` (one Hessian–vector product per product, no
    second-order trick for ``J y``).

    ``inner_loss(w, x)`` returns a scalar; ``x`` is the map's input, a tensor or a tuple of
    tensors (for a bilevel problem, the hyperparameters λ).  ``step_size`` is a float > 0 or
    a callable ``x -> η`` (a learning rate that is itself a hyperparameter).  If
    ``inner_loss`` is an ``nn.Module`` its parameters are the map's parameters.  The
    gradient is :func:`torch.func.grad`, so the map composes with reverse mode (ITD, AID),
    forward mode (:class:`~implicitnets.hypergrad.ForwardITD`) and ``torch.no_grad`` alike.

    Args:
        inner_loss: The inner loss ``ℓ(w, x)``, a callable returning a scalar tensor.
        step_size: The step size η, a finite number > 0 or a callable ``x -> η``.

    Raises:
        ValueError: ``inner_loss`` is not callable or ``step_size`` is neither a finite
            number > 0 nor callable.
    """

    def __init__(self, inner_loss: Callable[[Tensor, State], Tensor], step_size: StepSize) -> None:
        super().__init__()
        if not callable(inner_loss):
            raise ValueError(f"GradientStep: inner_loss must be callable (w, x) -> scalar, got {inner_loss!r}")
        if not callable(step_size) and (
            isinstance(step_size, bool)
            or not isinstance(step_size, (int, float))
            or not (math.isfinite(step_size) and step_size > 0)
        ):
            raise ValueError(f"GradientStep: step_size must be a finite number > 0 or a callable x -> η, "
                             f"got {step_size!r}")
        self.inner_loss = inner_loss
        self.step_size = step_size if callable(step_size) else float(step_size)

    def _scalar_loss(self, w: Tensor, x: State) -> Tensor:
        loss = self.inner_loss(w, x)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"GradientStep: inner_loss must return a scalar tensor, got {shape}")
        return loss

    def eta(self, x: State) -> Tensor | float:
        """The step size η at input ``x``.

        Args:
            x: The map's input (for a bilevel problem, the hyperparameters λ).

        Returns:
            The float ``step_size``, or ``step_size(x)`` when it is callable.
        """
        return self.step_size(x) if callable(self.step_size) else self.step_size

    def inject(self, x: State) -> State:
        """The input enters the step as it is (``u = x``).

        Args:
            x: The map's input, a tensor or a tuple of tensors.
        """
        return x

    def step(self, w: Tensor, u: State) -> Tensor:
        """``w − η ∇_w ℓ(w, u)``.

        Args:
            w: The state, a tensor.
            u: The input term (``x`` itself).

        Raises:
            ValueError: ``inner_loss`` does not return a scalar tensor.
        """
        return w - self.eta(u) * torch.func.grad(self._scalar_loss)(w, u)

    def forward(self, w: Tensor, x: State) -> Tensor:
        return self.step(w, x)

    def jacobian(self, w: Tensor, u: State, out: Tensor) -> LinearOperator:
        """``J = I − η ∇²ℓ(w, u)`` from the recorded ``out = step(w, u)``: symmetric, so
        ``J y`` is the vector–Jacobian product ``Jᵀ y`` on that graph.

        Args:
            w: The state at which ``J`` is taken, a tensor that requires grad.
            u: The input term ``inject(x)``.
            out: ``Φ(w, u)``, recorded from ``w``.

        Returns:
            ``J`` as a :class:`~implicitnets.LinearOperator` on vectors shaped like ``w``.
        """
        return _SymmetricJacobian(GraphJacobian(out, w))

    def extra_repr(self) -> str:
        return f"step_size={self.step_size}"


class _SymmetricJacobian(LinearOperator):
    """A Jacobian known to be symmetric: ``mv = rmv``, the cheaper vector–Jacobian product."""

    def __init__(self, graph: GraphJacobian) -> None:
        self.graph = graph

    @property
    def like(self) -> Tensor:
        return self.graph.like

    def mv(self, x: Tensor) -> Tensor:
        return self.graph.rmv(x)

    def rmv(self, y: Tensor) -> Tensor:
        return self.graph.rmv(y)
