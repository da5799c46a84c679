"""The weight-tied convolutional cell ``z = act(A ⋆ z + B ⋆ x + b)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..parametrizations.circulant import conv_circulant_norm
from ..parametrizations.conv import conv_operator_norm
from .activation import tanh
from .fused_conv import fused_conv_step
from .protocol import Map
from .sizes import check_sizes
from .slope_jacobian import SlopeJacobian

__all__ = ["ConvCell"]

# tanh: ATen's kernel also inside compiled CPU graphs (maps.activation)
_ACTIVATIONS = {"relu": torch.relu, "tanh": tanh}


class ConvCell(Map):
    """``Φ(z, x) = act(A ⋆ z + B ⋆ x + b)`` on ``size`` = (H, W) feature maps.

    ``act`` (ReLU or tanh) is 1-Lipschitz, so Φ(·, x) is a γ-contraction when the operator
    norm of ``z ↦ A ⋆ z`` on (C, H, W) images is ≤ γ; ``contraction=γ`` enforces that by the
    parametrization ``norm_bound`` registers, ``None`` leaves ``A`` free.  Has
    ``inject``/``step`` so the layer computes ``B ⋆ x + b`` once per solve, and the
    closed-form :meth:`jacobian` that AID's adjoint solve uses.

    Args:
        in_channels: Channels of the input ``x`` of shape (batch, in_channels, H, W).
        channels: Channels C of the state ``z`` of shape (batch, C, H, W).
        size: The spatial size (H, W) of the feature maps, on which the operator-norm bound
            is enforced.
        contraction: Keyword only.  The bound γ > 0 on the operator norm of ``A ⋆ ·``, or
            ``None`` for an unconstrained ``A``.
        activation: Keyword only.  ``"relu"`` or ``"tanh"``.
        kernel_size: Keyword only.  Odd kernel size of ``A`` and ``B`` (same padding).
        norm_bound: Keyword only.  The function that registers the bound on ``A``, called as
            ``norm_bound(A, bound=γ, input_shape=size)``:
            :func:`~implicitnets.conv_circulant_norm` (the default: the exact norm of the
            circular extension, an upper bound never violated, one FFT and a batched
            factorisation per refresh)
            or :func:`~implicitnets.conv_spectral_norm` (``‖A ⋆ ·‖₂`` itself by subspace
            iteration to a tolerance, a lower estimate; on the conv model a refresh costs
            about 4× more).

    Raises:
        ValueError: ``activation`` is unknown, ``kernel_size`` is not an odd int,
            ``contraction`` is neither ``None`` nor a finite number > 0, or ``norm_bound``
            is not callable.
    """

    #: :meth:`jacobian` reads only values (no graph through ``w``), see :mod:`implicitnets.maps.protocol`
    jacobian_needs_graph = False
    #: each sample's output depends only on its own rows of ``w`` and ``x`` (``vmap`` may solve
    #: the mapped problems as one batch)
    row_separable = True

    def __init__(
        self,
        in_channels: int,
        channels: int,
        size: tuple[int, int],
        *,
        contraction: float | None = 0.9,
        activation: str = "relu",
        kernel_size: int = 3,
        norm_bound: Callable[..., nn.Conv2d] = conv_circulant_norm,
    ) -> None:
        super().__init__()
        check_sizes("ConvCell", in_channels=in_channels, channels=channels)
        if not (isinstance(size, (tuple, list)) and len(size) == 2):
            raise ValueError(f"ConvCell: size must be (H, W), got {size!r}")
        check_sizes("ConvCell", height=size[0], width=size[1])
        if activation not in _ACTIVATIONS:
            raise ValueError(f"ConvCell: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size % 2 != 1:
            raise ValueError(f"ConvCell: kernel_size must be an odd int, got {kernel_size!r}")
        if not callable(norm_bound):
            raise ValueError(f"ConvCell: norm_bound must be a function such as conv_circulant_norm, got {norm_bound!r}")
        self.in_channels, self.channels, self.size = in_channels, channels, tuple(size)
        self.contraction, self.activation = contraction, activation
        self.padding = kernel_size // 2
        self.A = nn.Conv2d(channels, channels, kernel_size, padding=self.padding, bias=False)
        self.B = nn.Conv2d(in_channels, channels, kernel_size, padding=self.padding)
        with torch.no_grad():  # start well inside the contraction region
            self.A.weight.mul_(0.5)
        if contraction is not None:
            norm_bound(self.A, bound=contraction, input_shape=self.size)
        self._act = _ACTIVATIONS[activation]

    def inject(self, x: Tensor) -> Tensor:
        """``u = B ⋆ x + b``, computed once per solve.

        Args:
            x: The input, shape (batch, in_channels, H, W).

        Returns:
            ``u``, shape (batch, channels, H, W).
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.size:
            raise ValueError(
                f"ConvCell expects x of shape (batch, {self.in_channels}, {self.size[0]}, {self.size[1]}), "
                f"got {tuple(x.shape)}"
            )
        return self.B(x)

    def step(self, z: Tensor, u: Tensor) -> Tensor:
        """One map evaluation ``act(A ⋆ z + u)``.

        Args:
            z: The state, shape (batch, channels, H, W).
            u: The input term, shape (batch, channels, H, W).
        """
        weight = self.A.weight  # evaluated once (a parametrized weight outside a solve's cache)
        fused = fused_conv_step(z, u, weight, (self.padding, self.padding), self.activation)
        if fused is not None:  # a solver's step without autograd on CPU: one oneDNN primitive
            return fused
        return self._act(F.conv2d(z, weight, None, 1, self.padding) + u)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.step(z, self.inject(x))

    def initial_state(self, x: Tensor) -> Tensor:
        """``z₀ = 0`` of shape (batch, C, H, W), channels-last when ``x`` is (then every
        iterate is: the convolutions keep their input's memory format).

        Args:
            x: The input, shape (batch, in_channels, H, W).
        """
        shape = (x.shape[0], self.channels, *x.shape[2:])
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return torch.zeros(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=torch.channels_last)
        return x.new_zeros(shape)

    def jacobian(self, w: Tensor, u: Tensor, out: Tensor) -> SlopeJacobian:
        """``J = ∂₁Φ(w)`` in closed form from ``out = Φ(w, u)``: with ``D = act'`` at ``w``
        (ReLU: ``out > 0``; tanh: ``1 − out²``), ``J y = D ⊙ (A ⋆ y)`` and
        ``Jᵀ v = Aᵀ ⋆ (D ⊙ v)`` (a transposed convolution).  The effective weight is
        captured, detached, when this is called (inside the solve's parametrization cache).

        Args:
            w: The state at which ``J`` is taken, shape (batch, channels, H, W).
            u: The input term ``inject(x)``.
            out: ``Φ(w, u)``, whose values alone are read.

        Returns:
            ``J`` as a :class:`~implicitnets.LinearOperator` on vectors shaped like ``w``.
        """
        out = out.detach()
        slope = (out > 0).to(out.dtype) if self.activation == "relu" else 1 - out * out
        return _ConvJacobian(self.A.weight.detach(), slope, self.padding)

    def lipschitz_bound(self) -> float:
        """``‖A ⋆ ·‖₂`` on (C, H, W) (power iteration to convergence) times Lip(act) = 1: a
        global bound of Lip(Φ(·, x)) for every ``x`` (approached from below by the estimate)."""
        return conv_operator_norm(self.A, self.size)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, size={self.size}, contraction={self.contraction}, "
                f"activation={self.activation}")


class _ConvJacobian(SlopeJacobian):
    """``J y = D ⊙ (A ⋆ y)``, ``Jᵀ v = Aᵀ ⋆ (D ⊙ v)`` for a stride-1, same-size convolution;
    products run in the argument's dtype."""

    def __init__(self, weight: Tensor, slope: Tensor, padding: int) -> None:
        super().__init__(weight, slope)
        self.padding = padding

    def mv(self, x: Tensor) -> Tensor:
        weight, slope = self._cast(x.dtype)
        return slope * F.conv2d(x, weight, None, 1, self.padding)

    def rmv(self, y: Tensor) -> Tensor:
        weight, slope = self._cast(y.dtype)
        return F.conv_transpose2d(slope * y, weight, None, 1, self.padding)

    def mv_add(self, x: Tensor, c: Tensor, alpha: float = 1.0) -> Tensor:
        weight, slope = self._cast(x.dtype)
        return torch.addcmul(c, slope, F.conv2d(x, weight, None, 1, self.padding), value=alpha)
