"""The convolutional monotone map of monDEQ, with circular convolutions applied by FFT.

    Φ(z, x) = ReLU(W z + U ⋆ x + b),    W z = (1 − m) z − Aᵀ⋆(A⋆z) + B⋆z − Bᵀ⋆z,

``A``, ``B`` k × k kernels (C → C) applied as *circular* convolutions on (C, H, W) maps and
``Aᵀ⋆``, ``Bᵀ⋆`` their adjoints, so ``I − W ⪰ m I`` for every value of the kernels.

Why circular and FFT: a circular convolution is diagonalised by the 2-D DFT, one C × C
matrix per frequency (its *symbol*), so ``W`` and the resolvent ``(I + α(I − W))⁻¹`` that
Peaceman–Rachford needs at every iteration become small batched matrix products.  The
resolvent is then exact (one C × C inverse per frequency, once per solve; the symmetric
part of ``I + α(I − W)`` is ``⪰ (1 + αm) I``, so the inverses are well conditioned) and made
of differentiable operations, so ITD runs through the solver.  With zero padding the
resolvent would need an iterative solve (GMRES: the matrix is not symmetric because of
``B − Bᵀ``) to a tolerance inside every iteration, a dozen or more operator products each,
and the library's GMRES is not differentiable.  The input injection ``U ⋆ x + b`` is an
ordinary zero-padded convolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..operator import LinearOperator
from ..parametrizations.monotone import check_margin
from .monotone import MonotoneMap, ReLUJacobian
from .sizes import check_sizes

__all__ = ["MonotoneConv"]


def kernel_symbol(kernel: Tensor, size: tuple[int, int]) -> Tensor:
    """The symbol of the circular convolution ``z ↦ kernel ⋆ z`` on (C_in, H, W) maps:
    complex (H, W // 2 + 1, C_out, C_in), one matrix per frequency of ``rfft2``, contiguous.

    ``kernel ⋆ z`` is the cross-correlation of ``conv2d`` with circular padding k // 2, i.e.
    the circular convolution with ``κ[s, t] = kernel[r − s, r − t]`` (indices mod H, W):
    the flipped kernel, zero-padded to H × W and rolled back by r = k // 2.
    """
    k_h, k_w = kernel.shape[-2:]
    H, W = size
    padded = F.pad(kernel.flip(-2, -1), (0, W - k_w, 0, H - k_h))
    kappa = torch.roll(padded, shifts=(-(k_h // 2), -(k_w // 2)), dims=(-2, -1))
    return torch.fft.rfft2(kappa).permute(2, 3, 0, 1).contiguous()


class _ContiguousGradient(torch.autograd.Function):
    """The identity, whose backward (and forward-mode derivative) passes the gradient on
    contiguous: a batched complex product on CPU whose gradient arrives as a permuted view
    copies it one matrix at a time, in its backward as in its forward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return tangent.view_as(tangent)


def apply_symbol(symbol: Tensor, z: Tensor) -> Tensor:
    """``z ↦ K z`` for the operator with ``symbol`` (H, W', C_out, C_in) on z (batch, C_in, H, W):
    one batched product per frequency on contiguous operands, forward and backward."""
    H, W = z.shape[-2:]
    zh = torch.fft.rfft2(z).permute(2, 3, 1, 0).contiguous()  # (H, W', C_in, batch)
    yh = _ContiguousGradient.apply(symbol.to(zh.dtype) @ zh).permute(3, 2, 0, 1)  # (batch, C_out, H, W')
    return torch.fft.irfft2(yh, s=(H, W))


class MonotoneConv(MonotoneMap):
    """``Φ(z, x) = ReLU(W z + U ⋆ x + b)`` on ``size`` = (H, W) maps with ``channels`` channels.

    ``W`` is built from the k × k kernels ``A.weight`` and ``B.weight`` (see the module
    docstring), applied through its symbol (:meth:`symbol`) by FFT.  Every value of the
    kernels gives ``I − W ⪰ m I``; ``‖W‖₂`` (:meth:`lipschitz_bound`, exact from the symbol)
    is not bounded by 1.  States (batch, channels, H, W), inputs (batch, in_channels, H, W).

    Args:
        in_channels: Channels of the input, an int >= 1.
        channels: Channels C of the state, an int >= 1.
        size: The spatial size (H, W) of the state, two ints >= ``kernel_size``.
        m: Keyword only.  The monotonicity margin m > 0 of ``I − W ⪰ m I``.
        kernel_size: Keyword only.  Odd kernel size k >= 1 of ``U``, ``A`` and ``B``.
        device: Keyword only.  Device of the parameters.
        dtype: Keyword only.  Dtype of the parameters.

    Raises:
        ValueError: A channel count is not an int >= 1, ``kernel_size`` is not an odd
            int >= 1, ``size`` is not two ints >= ``kernel_size``, or ``m`` is not a finite
            number > 0.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        size: tuple[int, int],
        *,
        m: float = 0.1,
        kernel_size: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes("MonotoneConv", in_channels=in_channels, channels=channels)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"MonotoneConv: kernel_size must be an odd int >= 1, got {kernel_size!r}")
        size = tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and s >= kernel_size for s in size):
            raise ValueError(f"MonotoneConv: size must be two ints >= kernel_size {kernel_size}, got {size!r}")
        self.channels, self.size, self.m = channels, size, check_margin("MonotoneConv", m)
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2, **factory)
        self.A = nn.Conv2d(channels, channels, kernel_size, bias=False, **factory)
        self.B = nn.Conv2d(channels, channels, kernel_size, bias=False, **factory)
        bound = 1.0 / math.sqrt(channels * kernel_size**2)
        with torch.no_grad():
            self.A.weight.uniform_(-bound, bound)
            self.B.weight.uniform_(-bound, bound)

    def symbol(self) -> Tensor:
        """``Ŵ(f) = (1 − m) I − Â(f)ᴴ Â(f) + B̂(f) − B̂(f)ᴴ``: complex (H, W // 2 + 1, C, C)."""
        Ah, Bh = kernel_symbol(self.A.weight, self.size), kernel_symbol(self.B.weight, self.size)
        eye = torch.eye(self.channels, dtype=Ah.dtype, device=Ah.device)
        return (1.0 - self.m) * eye - Ah.mH @ Ah + (Bh - Bh.mH)

    def inject(self, x: Tensor) -> Tensor:
        """``u = U ⋆ x + b``, computed once per solve.

        Args:
            x: The input, shape (batch, in_channels, H, W).

        Returns:
            ``u``, shape (batch, channels, H, W).
        """
        if x.dim() != 4 or tuple(x.shape[2:]) != self.size or x.shape[1] != self.U.in_channels:
            raise ValueError(
                f"MonotoneConv expects x of shape (batch, {self.U.in_channels}, {self.size[0]}, {self.size[1]}), "
                f"got {tuple(x.shape)}"
            )
        return self.U(x)

    def initial_state(self, x: Tensor) -> Tensor:
        """``z₀ = 0`` of shape (batch, channels, H, W).

        Args:
            x: The input, shape (batch, in_channels, H, W).
        """
        return x.new_zeros(x.shape[0], self.channels, *self.size)

    def weight_mv(self, z: Tensor) -> Tensor:
        return apply_symbol(self.symbol(), z)

    def weight_rmv(self, z: Tensor) -> Tensor:
        return apply_symbol(self.symbol().mH, z)

    def resolvent(self, alpha: float) -> Callable[[Tensor], Tensor]:
        """``v ↦ (I + α(I − W))⁻¹ v``: the symbol ``(1 + α) I − α Ŵ(f)`` inverted once per
        frequency (C × C, norm of the inverse ≤ 1 / (1 + αm)), applied by FFT.

        Args:
            alpha: The step size α >= 0.

        Returns:
            The solve, a callable on states of shape (batch, channels, H, W).
        """
        Wh = self.symbol()
        eye = torch.eye(self.channels, dtype=Wh.dtype, device=Wh.device)
        inverse = torch.linalg.inv((1.0 + alpha) * eye - alpha * Wh)
        return lambda v: apply_symbol(inverse, v)

    def jacobian(self, w: Tensor, u: Tensor, out: Tensor) -> LinearOperator:
        """``J y = D ⊙ (W y)``, ``Jᵀ v = Wᵀ (D ⊙ v)`` (``D = out > 0``), with the symbol of
        ``W`` computed, detached, once when this is called.

        Args:
            w: The state at which ``J`` is taken, shape (batch, channels, H, W).
            u: The input term ``inject(x)``.
            out: ``Φ(w, u)``, whose values alone are read.

        Returns:
            ``J`` as a :class:`~implicitnets.LinearOperator` on vectors shaped like ``w``.
        """
        Wh = self.symbol().detach()
        WhT = Wh.mH
        return ReLUJacobian(lambda y: apply_symbol(Wh, y), lambda v: apply_symbol(WhT, v), out)

    def lipschitz_bound(self) -> float:
        """``‖W‖₂``, exactly: the largest singular value of the symbol over all frequencies
        (times Lip(ReLU) = 1).  Typically above 1; see :class:`MonotoneMap`."""
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.symbol(), ord=2).max())

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}, m={self.m}"
