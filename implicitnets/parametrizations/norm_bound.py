"""Operator-norm bounds as parametrizations: ``W ↦ W · γ / max(σ(W), γ)``.

``σ(W)`` is a norm of a linear operator built from a weight ``W`` (a matrix, a
convolution), computed by a subclass of :class:`NormBound` from state kept in buffers
(singular vectors, a block, a frequency) that it brings up to date by a *refresh*.  The
refresh runs whenever the weight's values have changed since the last evaluation (an
optimiser step, a projection) and not otherwise, in training and eval mode alike, so every
evaluation of the same weight gives the same ``σ`` (forward and backward of a solve, an
ITD recomputation, the eval-mode model after the last step all see one weight).  ``σ`` is
differentiable in ``W`` with the buffers held fixed.

Traced by ``torch.compile`` (while ``torch.compiler.is_compiling()``) the refresh reads
nothing on the host: the subclass's traced update always runs, and the comparison with the
weight last seen is a tensor, ``changed``, that selects the new or the old buffers
(``torch.where``).  An unchanged weight therefore keeps its buffers bit for bit, and an
eager evaluation after compiled ones finds the weight already seen and does not refresh.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from ..options import check_real
from ..transforms import plain_value

__all__ = ["NormBound", "check_bound"]


def check_bound(name: str, bound: float) -> None:
    """Raise ``ValueError`` unless ``bound`` is a finite number > 0."""
    check_real(name, "bound", bound, low=0, low_open=True)


class NormBound(nn.Module, ABC):
    """Base parametrization ``W ↦ W · γ / max(σ(W), γ)``, refreshed when ``W`` changes.

    Subclasses define :meth:`refresh_` (eager, may read the host), :meth:`traced_updates`
    (no host read) and :meth:`estimate` (``σ`` from the buffers, differentiable in ``W``).
    ``last_iterations`` is what the last eager refresh returned (0: the weight was unchanged).
    """

    def __init__(self, weight: Tensor, bound: float) -> None:
        super().__init__()
        self.bound = float(bound)
        # The weight the buffers were last refreshed for (saved with them, so that a model loaded
        # from a state_dict evaluates exactly as the one saved), and a cheap key of that tensor.
        self.register_buffer("_weight_seen", torch.full_like(weight.detach(), math.nan))
        self._seen: tuple | None = None
        self.last_iterations = 0

    @abstractmethod
    def refresh_(self, weight: Tensor) -> int:
        """Bring the buffers up to date for ``weight`` (eager; no autograd); returns the number
        of iteration steps taken (1 for a direct computation)."""

    @abstractmethod
    def traced_updates(self, weight: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The refresh with no host read, as ``(buffer, new value)`` pairs."""

    @abstractmethod
    def estimate(self, weight: Tensor) -> Tensor:
        """``σ(W)`` from the buffers, a 0-d tensor differentiable in ``weight``."""

    def _refresh(self, weight: Tensor) -> None:
        """Refresh if ``weight`` differs from the one the buffers belong to (inside a
        ``torch.func`` transform: the weight's plain value); traced, see :meth:`_refresh_traced`."""
        weight = plain_value(weight)
        if torch.compiler.is_compiling():
            self._refresh_traced(weight)
            return
        key = (weight.untyped_storage().data_ptr(), weight._version, weight.dtype, weight.device)
        self.last_iterations = 0
        if key != self._seen and not torch.equal(weight, self._weight_seen):
            with torch.no_grad():
                self.last_iterations = self.refresh_(weight.detach())
                self._weight_seen.copy_(weight)
        self._seen = key

    @torch.no_grad()
    def _refresh_traced(self, weight: Tensor) -> None:
        """:meth:`traced_updates` always runs; its results replace the buffers only if the
        weight differs from the one last seen."""
        changed = (weight != self._weight_seen).any()
        for buffer, new in self.traced_updates(weight):
            buffer.copy_(torch.where(changed, new, buffer))
        self._weight_seen.copy_(weight)

    def sigma(self, weight: Tensor) -> Tensor:
        """``σ(W)`` after a refresh if ``W`` changed, differentiable in ``W``."""
        self._refresh(weight)
        return self.estimate(weight)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * (self.bound / torch.clamp(self.sigma(weight), min=self.bound))
