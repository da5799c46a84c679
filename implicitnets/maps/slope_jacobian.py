"""The closed-form Jacobian of a map ``Φ(w) = σ(A w + …)``: ``J = diag(σ') A``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..operator import LinearOperator

__all__ = ["SlopeJacobian"]


class SlopeJacobian(LinearOperator):
    """``J = D A`` with ``D = diag(slope)``, the activation's derivative at the point, and ``A``
    the (detached) weight of a linear or convolutional layer.

    Subclasses give the products with ``A``; :meth:`_cast` hands them the weight and the slope
    in the argument's dtype (a float32 weight serves a float64 or bf16 adjoint solve).
    """

    def __init__(self, weight: Tensor, slope: Tensor) -> None:
        self.weight, self.slope = weight, slope

    @property
    def like(self) -> Tensor:
        return self.slope

    def _cast(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if dtype == self.slope.dtype == self.weight.dtype:
            return self.weight, self.slope
        return self.weight.to(dtype), self.slope.to(dtype)
