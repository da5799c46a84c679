"""Monotone operator equilibrium classifiers (monDEQ, Winston & Kolter 2020).

    FC:    z* = ReLU(W z* + U x + b),                   logits = H z* + h       (x flattened)
    conv:  z* = ReLU(W z* + U ⋆ x̃ + b),  x̃ = space-to-depth(x) (B, 4, 14, 14),
           logits = H · flatten(maxpool₂(z*)) + h

with ``I − W ⪰ m I`` by construction (:class:`implicitnets.maps.MonotoneFC`,
:class:`implicitnets.maps.MonotoneConv`): the equilibrium exists and is unique for every
weight, although ``‖W‖₂`` is not bounded by 1 and plain fixed-point iteration may diverge.
Solve with :class:`implicitnets.PeacemanRachford` or :class:`implicitnets.ForwardBackward`;
differentiate with AID-GMRES (the Neumann series of AID-FP needs ρ(∂₁Φ) < 1, which a
monotone map does not promise).
"""

from __future__ import annotations

from einops import rearrange, reduce
from torch import Tensor, nn

import implicitnets as inn
from implicitnets import linear

from .equilibrium import EquilibriumClassifier

__all__ = ["MonotoneEquilibrium", "MonotoneConvEquilibrium"]

SOLVER = inn.PeacemanRachford(max_iter=30, tol=1e-4)
BACKWARD = inn.AID(linear.GMRES(max_iter=20, tol=0.0, restart=20))


class MonotoneEquilibrium(EquilibriumClassifier):
    """``logits = head(z*)``, ``z* = ReLU(W z* + U x + b)`` on flattened images.

    Width 174 gives 198,892 parameters, the budget of the tanh FC equilibrium model
    (199,010) and of its MLP baseline (199,210).
    """

    def __init__(
        self,
        in_features: int = 784,
        width: int = 174,
        num_classes: int = 10,
        *,
        m: float = 0.1,
        solver: inn.ForwardSolver = SOLVER,
        backward: inn.BackwardMode = BACKWARD,
    ) -> None:
        super().__init__()
        self.cell = inn.maps.MonotoneFC(in_features, width, m=m)
        self.deq = inn.FixedPointLayer(self.cell, solver=solver, backward=backward)
        self.head = nn.Linear(width, num_classes)

    def lipschitz_bound(self) -> float:
        """``‖W‖₂`` (exact): not a contraction factor; typically above 1."""
        return self.cell.lipschitz_bound()

    def forward(self, x: Tensor, z0: Tensor | None = None, adjoint_x0: Tensor | None = None) -> Tensor:
        """Logits of ``x``; ``z0`` and ``adjoint_x0`` start the solves (see ``solve``)."""
        return self.head(self.solve(rearrange(x, "b ... -> b (...)"), z0, adjoint_x0))


class MonotoneConvEquilibrium(EquilibriumClassifier):
    """The conv monotone classifier above for (B, in_channels, S, S) images, S a multiple of 4.

    38 channels give 46,028 parameters, the budget of :class:`~models.ConvEquilibrium`
    (48 channels, 46,042) and of the CNN baseline (48 channels, 46,090).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 38,
        num_classes: int = 10,
        image_size: int = 28,
        *,
        m: float = 0.1,
        solver: inn.ForwardSolver = SOLVER,
        backward: inn.BackwardMode = BACKWARD,
    ) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"MonotoneConvEquilibrium: image_size must be a multiple of 4, got {image_size!r}")
        half = image_size // 2
        self.cell = inn.maps.MonotoneConv(4 * in_channels, channels, (half, half), m=m)
        self.deq = inn.FixedPointLayer(self.cell, solver=solver, backward=backward)
        self.head = nn.Linear(channels * (half // 2) ** 2, num_classes)

    def lipschitz_bound(self) -> float:
        """``‖W‖₂`` (exact, from the symbol): not a contraction factor; typically above 1."""
        return self.cell.lipschitz_bound()

    def forward(self, x: Tensor, z0: Tensor | None = None, adjoint_x0: Tensor | None = None) -> Tensor:
        """Logits of ``x``; ``z0`` and ``adjoint_x0`` start the solves (see ``solve``)."""
        x = rearrange(x, "b c (h p) (w q) -> b (c p q) h w", p=2, q=2)
        z = reduce(self.solve(x, z0, adjoint_x0), "b c (h p) (w q) -> b c h w", "max", p=2, q=2)
        return self.head(rearrange(z, "b c h w -> b (c h w)"))
