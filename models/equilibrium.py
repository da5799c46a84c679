"""What every equilibrium classifier here shares: a ``cell`` whose ``A`` sets the contraction,
solved by ``self.deq`` (a :class:`implicitnets.FixedPointLayer`)."""

from __future__ import annotations

from torch import Tensor, nn

import implicitnets as inn

__all__ = ["EquilibriumClassifier"]


class EquilibriumClassifier(nn.Module):
    """Base class: subclasses set ``self.cell`` (with a module ``A``) and ``self.deq``."""

    cell: nn.Module
    deq: inn.FixedPointLayer

    fixed_point: Tensor | None = None  # w* of the last forward pass (detached), e.g. for a SampleCache

    def solve(self, x: Tensor, z0: Tensor | None, adjoint_x0: Tensor | None) -> Tensor:
        """``w*`` of the prepared input ``x`` from ``z0`` (default: the cell's initial state), the
        backward's adjoint solve from ``adjoint_x0``; keeps ``w*`` in :attr:`fixed_point`."""
        w = self.deq(x, z0=z0, adjoint_x0=adjoint_x0)
        self.fixed_point = w.detach()
        return w

    @property
    def stats(self) -> inn.SolverStats | None:
        """The :class:`~implicitnets.SolverStats` of the last forward (and backward) pass."""
        return self.deq.stats

    @property
    def contraction_weight(self) -> Tensor:
        """The trainable tensor that bounds the contraction: ``A``'s weight before any parametrization."""
        A = self.cell.A
        return A.parametrizations.weight.original if hasattr(A, "parametrizations") else A.weight
