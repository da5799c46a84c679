"""The Jacobian ``J = ∂₁Φ(z, x)`` of a fixed-point map at a point, as a linear operator.

One differentiable evaluation ``fz = Φ(z, x)`` is recorded; then

* ``rmatvec(u) = Jᵀu`` is a vector–Jacobian product on that graph (reverse mode), and
* ``matvec(v) = J v`` differentiates the linear map ``u ↦ Jᵀu`` once more (the
  "double-vjp" trick), so maps need only reverse-mode derivatives.

Every product reuses the same graph, so all products see the same weights (and the same
dropout masks, if any).  Parameters of Φ receive no ``.grad`` from these products.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["Linearization"]

Map = Callable[[Tensor, Tensor], Tensor]


class Linearization:
    """``J = ∂₁Φ(z, x)`` with ``matvec(v) = J v`` and ``rmatvec(u) = Jᵀ u``.

    ``f(w, x) -> w`` must return a tensor shaped like ``z``.  Vectors are tensors shaped like
    ``z``; when ``z`` holds a batch and Φ acts sample-wise, ``J`` is block diagonal and each
    product acts on every sample at once.
    """

    def __init__(self, f: Map, z: Tensor, x: Tensor) -> None:
        with torch.enable_grad():
            self.z = z.detach().requires_grad_(True)
            self.fz = f(self.z, x)
            if self.fz.shape != self.z.shape:
                raise ValueError(
                    f"Linearization: the map returned shape {tuple(self.fz.shape)} for a state of "
                    f"shape {tuple(self.z.shape)}"
                )
            self._dummy = torch.zeros_like(self.fz, requires_grad=True)
            self._jtu = self._grad(self.fz, self.z, self._dummy, create_graph=True)

    @staticmethod
    def _grad(out: Tensor, inp: Tensor, cotangent: Tensor, create_graph: bool = False) -> Tensor:
        if not out.requires_grad:  # Φ does not depend on w at all: J = 0
            return torch.zeros_like(inp)
        (g,) = torch.autograd.grad(
            out, inp, cotangent, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        return torch.zeros_like(inp) if g is None else g

    def rmatvec(self, u: Tensor) -> Tensor:
        """``Jᵀ u``."""
        with torch.enable_grad():
            return self._grad(self.fz, self.z, u).detach()

    def matvec(self, v: Tensor) -> Tensor:
        """``J v``."""
        with torch.enable_grad():
            return self._grad(self._jtu, self._dummy, v).detach()

    @property
    def shape(self) -> torch.Size:
        """Shape of the vectors the operator acts on (that of ``z``)."""
        return self.z.shape
