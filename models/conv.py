"""A convolutional equilibrium classifier: one weight-tied conv cell solved to its fixed point.

    x̃ = space-to-depth(x)                       (B, 1, 28, 28) → (B, 4, 14, 14)
    z* = act(A ⋆ z* + B ⋆ x̃ + b)               A: C → C, B: 4 → C, 3×3, 14 × 14 maps
    logits = H · flatten(maxpool₂(z*)) + h      (B, C, 7, 7) → (B, 10)

``act`` (ReLU or tanh) is 1-Lipschitz, so ``z ↦ act(A ⋆ z + u)`` is a γ-contraction when the
*operator* norm of the convolution ``z ↦ A ⋆ z`` on (C, 14, 14) images is ≤ γ; that is what
:func:`implicitnets.parametrizations.conv.conv_spectral_norm` enforces (power iteration with
``conv2d`` / ``conv_transpose2d``).  The reshapes are einops patterns.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

import implicitnets as inn

from .equilibrium import EquilibriumClassifier
from implicitnets.parametrizations.conv import conv_operator_norm, conv_spectral_norm

__all__ = ["ConvCell", "ConvEquilibrium"]

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class ConvCell(nn.Module):
    """``Φ(z, x) = act(A ⋆ z + B ⋆ x + b)`` on ``size`` = (H, W) feature maps.

    ``contraction=γ`` bounds ``‖A ⋆ ·‖₂ ≤ γ`` by :func:`conv_spectral_norm`; ``None`` leaves
    ``A`` free.  Has ``inject``/``step`` so the layer computes ``B ⋆ x + b`` once per solve.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        size: tuple[int, int],
        *,
        contraction: float | None = 0.9,
        activation: str = "relu",
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"ConvCell: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"ConvCell: kernel_size must be odd, got {kernel_size!r}")
        self.channels, self.size, self.contraction, self.activation = channels, tuple(size), contraction, activation
        pad = kernel_size // 2
        self.A = nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False)
        self.B = nn.Conv2d(in_channels, channels, kernel_size, padding=pad)
        with torch.no_grad():  # start well inside the contraction region
            self.A.weight.mul_(0.5)
        if contraction is not None:
            conv_spectral_norm(self.A, bound=contraction, input_shape=self.size)
        self._act = _ACTIVATIONS[activation]

    def inject(self, x: Tensor) -> Tensor:
        """``u = B ⋆ x + b``, computed once per solve."""
        return self.B(x)

    def step(self, z: Tensor, u: Tensor) -> Tensor:
        """One map evaluation ``act(A ⋆ z + u)``."""
        return self._act(self.A(z) + u)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.step(z, self.inject(x))

    def initial_state(self, x: Tensor) -> Tensor:
        """``z₀ = 0`` of shape (batch, C, H, W)."""
        return x.new_zeros(x.shape[0], self.channels, *x.shape[2:])

    def lipschitz_bound(self) -> float:
        """``‖A ⋆ ·‖₂`` on (C, H, W) (power iteration to convergence): bounds Lip(Φ(·, x))."""
        return conv_operator_norm(self.A, self.size)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}, contraction={self.contraction}, activation={self.activation}"


class ConvEquilibrium(EquilibriumClassifier):
    """The conv equilibrium classifier above for (B, 1, 28, 28) images (or any even size).

    ``solver`` / ``backward`` go to :class:`implicitnets.FixedPointLayer`.
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
        solver: inn.FixedPointIteration | inn.Anderson = inn.Anderson(max_iter=30, tol=1e-4),
        backward: inn.ITD | inn.AID | inn.JacobianFree = inn.JacobianFree(),
    ) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"ConvEquilibrium: image_size must be a multiple of 4, got {image_size!r}")
        half = image_size // 2
        self.cell = ConvCell(4 * in_channels, channels, (half, half), contraction=contraction, activation=activation)
        self.deq = inn.FixedPointLayer(self.cell, solver=solver, backward=backward)
        self.head = nn.Linear(channels * (half // 2) ** 2, num_classes)

    def lipschitz_bound(self) -> float:
        return self.cell.lipschitz_bound()

    @torch.no_grad()
    def project_(self, bound: float) -> None:
        """Rescale ``A`` so that ``‖A ⋆ ·‖₂ ≤ bound`` (for ``contraction=None``).

        The operator norm is estimated by power iteration; rescaling (not an SVD clip, which
        the operator does not have in closed form) is the projection used for conv cells.
        """
        sigma = conv_operator_norm(self.cell.A, self.cell.size, max_iter=100, tol=1e-6)
        if sigma > bound:
            self.contraction_weight.mul_(bound / sigma)

    def forward(self, x: Tensor) -> Tensor:
        x = rearrange(x, "b c (h p) (w q) -> b (c p q) h w", p=2, q=2)
        z = self.deq(x)
        z = reduce(z, "b c (h p) (w q) -> b c h w", "max", p=2, q=2)
        return self.head(rearrange(z, "b c h w -> b (c h w)"))
