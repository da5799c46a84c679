"""The fully connected monotone map of monDEQ: ``z = ReLU(W z + U x + b)``, ``I − W ⪰ m I``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..operator import LinearOperator
from ..parametrizations.monotone import check_margin, monotone_weight
from .monotone import MonotoneMap, ReLUJacobian
from .sizes import check_sizes

__all__ = ["MonotoneFC"]


class MonotoneFC(MonotoneMap):
    """``Φ(z, x) = ReLU(W z + U x + b)`` with ``W = (1 − m) I − AᵀA + B − Bᵀ`` (width × width).

    ``W`` is ``self.linear.weight`` under the :func:`~implicitnets.parametrizations.monotone_weight`
    parametrization (trainable ``A`` and ``B``), so ``I − W ⪰ m I`` for every value of the
    weights and the equilibrium exists and is unique; ``A`` and ``B`` start like
    ``nn.Linear`` weights (uniform in ±1/√width), as in monDEQ.  ``‖W‖₂`` is *not* bounded by
    1 (:meth:`lipschitz_bound` reports it; it is typically above 1 after training), so
    Picard iteration need not converge: solve with
    :class:`~implicitnets.solvers.PeacemanRachford` or
    :class:`~implicitnets.solvers.ForwardBackward`.  Inputs are ``(batch, in_features)``.

    Args:
        in_features: Size of the input ``x``, an int >= 1.
        width: Size of the state ``z``, an int >= 1.
        m: Keyword only.  The monotonicity margin m > 0 of ``I − W ⪰ m I``.
        device: Keyword only.  Device of the parameters.
        dtype: Keyword only.  Dtype of the parameters.

    Raises:
        ValueError: A size is not an int >= 1 or ``m`` is not a finite number > 0.
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        *,
        m: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes("MonotoneFC", in_features=in_features, width=width)
        self.in_features, self.width, self.m = in_features, width, check_margin("MonotoneFC", m)
        self.U = nn.Linear(in_features, width, device=device, dtype=dtype)
        self.linear = nn.Linear(width, width, bias=False, device=device, dtype=dtype)
        monotone_weight(self.linear, m=self.m)
        bound = 1.0 / math.sqrt(width)
        factors = self.linear.parametrizations.weight
        with torch.no_grad():
            factors.original0.uniform_(-bound, bound)
            factors.original1.uniform_(-bound, bound)

    @property
    def weight(self) -> Tensor:
        """The effective ``W`` (cached for a whole solve inside ``parametrize.cached()``)."""
        return self.linear.weight

    def inject(self, x: Tensor) -> Tensor:
        """``u = U x + b``, computed once per solve.

        Args:
            x: The input, shape (batch, in_features).

        Returns:
            ``u``, shape (batch, width).

        Raises:
            ValueError: ``x`` is not of shape (batch, in_features).
        """
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"MonotoneFC expects x of shape (batch, {self.in_features}), got {tuple(x.shape)}")
        return self.U(x)

    def initial_state(self, x: Tensor) -> Tensor:
        """``z₀ = 0`` of shape (batch, width).

        Args:
            x: The input, shape (batch, in_features).
        """
        return x.new_zeros(x.shape[0], self.width)

    def weight_mv(self, z: Tensor) -> Tensor:
        return z @ self.weight.t()

    def weight_rmv(self, z: Tensor) -> Tensor:
        return z @ self.weight

    def step(self, z: Tensor, u: Tensor) -> Tensor:
        """One map evaluation ``ReLU(W z + u)``.

        Args:
            z: The state, shape (batch, width).
            u: The injected input, shape (batch, width).
        """
        return torch.relu(torch.addmm(u, z, self.weight.t()))

    def resolvent(self, alpha: float) -> Callable[[Tensor], Tensor]:
        """``v ↦ (I + α(I − W))⁻¹ v`` by one explicit inverse of ``M = (1 + α) I − α W``
        (``torch.linalg.inv``, differentiable), so that every right-hand side costs one
        matrix product.  ``I − W ⪰ m I`` gives ``‖M⁻¹‖₂ ≤ 1 / (1 + α m)``: ``M`` is well
        conditioned unless ``α ‖W‖₂`` is huge, and the inverse is as accurate as a factorisation.

        Args:
            alpha: The step size α >= 0.

        Returns:
            The solve, a callable on states of shape (batch, width).
        """
        W = self.weight
        eye = torch.eye(self.width, dtype=W.dtype, device=W.device)
        inverse_t = torch.linalg.inv((1.0 + alpha) * eye - alpha * W).t()
        return lambda v: v @ inverse_t  # rows are samples: z = v M⁻ᵀ

    def jacobian(self, w: Tensor, u: Tensor, out: Tensor) -> LinearOperator:
        """``J y = D ⊙ (y Wᵀ)``, ``Jᵀ v = (D ⊙ v) W`` (``D = out > 0``), with the effective
        ``W`` captured, detached, when this is called (inside the solve's parametrization cache).

        Args:
            w: The state at which ``J`` is taken, shape (batch, width).
            u: The input term ``inject(x)``.
            out: ``Φ(w, u)``, whose values alone are read.

        Returns:
            ``J`` as a :class:`~implicitnets.LinearOperator` on vectors shaped like ``w``.
        """
        W = self.weight.detach()
        return ReLUJacobian(lambda y: y @ W.t().to(y.dtype), lambda v: v @ W.to(v.dtype), out)

    def lipschitz_bound(self) -> float:
        """``‖W‖₂`` (exact largest singular value) times Lip(ReLU) = 1: a global Lipschitz
        bound of Φ(·, x).  Unlike a contraction's it is typically above 1; the equilibrium's
        existence and uniqueness come from ``I − W ⪰ m I`` instead."""
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.weight.detach(), ord=2))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, width={self.width}, m={self.m}"
