"""The paper's fully connected equilibrium classifier (Grazzi et al. 2020, §4 MNIST).

    w* = tanh(A w* + B x + c),      logits = H w* + h,

``x`` the flattened image, ``A`` (width × width) kept a contraction (‖A‖₂ ≤ γ) either by
:func:`implicitnets.spectral_norm` (``contraction=γ``) or by projecting after each optimiser
step (``contraction=None`` plus :func:`implicitnets.project_spectral_`).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

import implicitnets as inn

from .equilibrium import EquilibriumClassifier

__all__ = ["FCEquilibrium"]


class FCEquilibrium(EquilibriumClassifier):
    """``logits = head(w*)`` with ``w* = tanh(A w* + B x + c)`` solved by ``solver``.

    ``contraction`` is passed to :class:`implicitnets.maps.TanhMap` (``None``: ``A`` free);
    ``solver`` and ``backward`` to :class:`implicitnets.FixedPointLayer`.  Accepts images of
    any shape ``(batch, ...)`` with ``in_features`` entries per sample.
    """

    def __init__(
        self,
        in_features: int = 784,
        width: int = 200,
        num_classes: int = 10,
        *,
        contraction: float | None = 0.9,
        solver: inn.FixedPointIteration | inn.Anderson = inn.FixedPointIteration(max_iter=20, tol=0.0),
        backward: inn.ITD | inn.AID | inn.JacobianFree = inn.JacobianFree(),
    ) -> None:
        super().__init__()
        self.cell = inn.maps.TanhMap(in_features, width, contraction=contraction)
        self.deq = inn.FixedPointLayer(self.cell, solver=solver, backward=backward)
        self.head = nn.Linear(width, num_classes)

    def lipschitz_bound(self) -> float:
        """``‖A‖₂`` of the effective weight (exact): the map's contraction factor bound."""
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.cell.A.weight.detach(), ord=2))

    @torch.no_grad()
    def project_(self, bound: float) -> None:
        """Project ``A`` onto ``‖A‖₂ ≤ bound`` (clip singular values; for ``contraction=None``)."""
        inn.project_spectral_(self.contraction_weight, bound)

    def forward(self, x: Tensor, z0: Tensor | None = None, adjoint_x0: Tensor | None = None) -> Tensor:
        """Logits of ``x``; ``z0`` and ``adjoint_x0`` start the solves (see ``solve``)."""
        return self.head(self.solve(rearrange(x, "b ... -> b (...)"), z0, adjoint_x0))
