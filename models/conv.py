"""A convolutional equilibrium classifier: one weight-tied conv cell solved to its fixed point.

    x̃ = space-to-depth(x)                       (B, 1, 28, 28) → (B, 4, 14, 14)
    z* = act(A ⋆ z* + B ⋆ x̃ + b)               A: C → C, B: 4 → C, 3×3, 14 × 14 maps
    logits = H · flatten(maxpool₂(z*)) + h      (B, C, 7, 7) → (B, 10)

``act`` (ReLU or tanh) is 1-Lipschitz, so ``z ↦ act(A ⋆ z + u)`` is a γ-contraction when the
*operator* norm of the convolution ``z ↦ A ⋆ z`` on (C, 14, 14) images is ≤ γ; that is what
:func:`implicitnets.conv_circulant_norm` enforces (through an exact upper bound, the norm of
the circular extension of the convolution; :class:`implicitnets.maps.ConvCell`).  The reshapes
are einops patterns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

import implicitnets as inn
from implicitnets.maps import ConvCell
from implicitnets.parametrizations.conv import conv_operator_norm

from .equilibrium import EquilibriumClassifier

__all__ = ["ConvCell", "ConvEquilibrium"]


class ConvEquilibrium(EquilibriumClassifier):
    """The conv equilibrium classifier above for (B, 1, 28, 28) images (or any even size).

    ``contraction``, ``activation`` and ``norm_bound`` go to :class:`implicitnets.maps.ConvCell`,
    ``solver`` / ``backward`` to :class:`implicitnets.FixedPointLayer`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 48,
        num_classes: int = 10,
        image_size: int = 28,
        *,
        contraction: float | None = 0.9,
        activation: str = "relu",
        norm_bound: Callable[..., nn.Conv2d] = inn.conv_circulant_norm,
        solver: inn.FixedPointIteration | inn.Anderson = inn.Anderson(max_iter=30, tol=1e-4),
        backward: inn.ITD | inn.AID | inn.JacobianFree = inn.JacobianFree(),
    ) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"ConvEquilibrium: image_size must be a multiple of 4, got {image_size!r}")
        half = image_size // 2
        self.cell = ConvCell(4 * in_channels, channels, (half, half), contraction=contraction, activation=activation,
                             norm_bound=norm_bound)
        self.deq = inn.FixedPointLayer(self.cell, solver=solver, backward=backward)
        self.head = nn.Linear(channels * (half // 2) ** 2, num_classes)

    def lipschitz_bound(self) -> float:
        return self.cell.lipschitz_bound()

    @torch.no_grad()
    def project_(self, bound: float) -> None:
        """Rescale ``A`` so that ``‖A ⋆ ·‖₂ ≤ bound`` (for ``contraction=None``).

        The operator norm itself is estimated by power iteration; rescaling (not an SVD clip, which
        the operator does not have in closed form) is the projection used for conv cells.
        """
        sigma = conv_operator_norm(self.cell.A, self.cell.size, max_iter=100, tol=1e-6)
        if sigma > bound:
            self.contraction_weight.mul_(bound / sigma)

    def forward(self, x: Tensor, z0: Tensor | None = None, adjoint_x0: Tensor | None = None) -> Tensor:
        """Logits of ``x``; ``z0`` and ``adjoint_x0`` start the solves (see ``solve``)."""
        # channels-last: the convolutions of every iteration run about 2x faster on CPU (oneDNN)
        x = rearrange(x, "b c (h p) (w q) -> b (c p q) h w", p=2, q=2).contiguous(memory_format=torch.channels_last)
        z = self.solve(x, z0, adjoint_x0)
        z = reduce(z, "b c (h p) (w q) -> b c h w", "max", p=2, q=2)
        return self.head(rearrange(z, "b c h w -> b (c h w)"))
