"""The monotone parametrization of monDEQ (Winston & Kolter 2020): ``I − W ⪰ m I`` for any weights.

    W = (1 − m) I − AᵀA + B − Bᵀ,        m > 0,

so the symmetric part of ``I − W`` is ``m I + AᵀA ⪰ m I`` (``B − Bᵀ`` is skew and adds
nothing to it): ``I − W`` is m-strongly monotone whatever ``A`` (r × n) and ``B`` (n × n)
are, and the equilibrium ``z = ReLU(W z + u)`` exists and is unique for every input
(:class:`~implicitnets.maps.MonotoneMap`) although ``‖W‖₂`` is not bounded by 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["MonotoneWeight", "monotone_weight", "check_margin"]


def check_margin(name: str, m: float) -> float:
    """``m`` as a float, or ``ValueError`` unless it is a finite number > 0."""
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and m > 0):
        raise ValueError(f"{name}: the monotonicity margin m must be a finite number > 0, got {m!r}")
    return float(m)


class MonotoneWeight(nn.Module):
    """Parametrization ``(A, B) ↦ W = (1 − m) I − AᵀA + B − Bᵀ``, so that ``I − W ⪰ m I``.

    ``A`` is (r × n), ``B`` (n × n), ``W`` (n × n).  :meth:`right_inverse` maps a weight to
    ``(A, B)``: exactly when the weight already satisfies the bound, otherwise the nearest
    weight that does (in Frobenius norm, on the symmetric part: the negative eigenvalues of
    ``(1 − m) I − sym(W)`` are clipped to 0; the skew part is kept).

    Args:
        m: The monotonicity margin m, a finite number > 0.

    Raises:
        ValueError: ``m`` is not a finite number > 0.
    """

    def __init__(self, m: float) -> None:
        super().__init__()
        self.m = check_margin("MonotoneWeight", m)

    def forward(self, A: Tensor, B: Tensor) -> Tensor:
        n = A.shape[1]
        if A.dim() != 2 or B.shape != (n, n):
            raise ValueError(
                f"MonotoneWeight: A must be (r, n) and B (n, n); got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        eye = torch.eye(n, dtype=A.dtype, device=A.device)
        return (1.0 - self.m) * eye - A.t() @ A + (B - B.t())

    @torch.no_grad()
    def right_inverse(self, W: Tensor) -> tuple[Tensor, Tensor]:
        if W.dim() != 2 or W.shape[0] != W.shape[1]:
            raise ValueError(f"MonotoneWeight: the weight must be square, got shape {tuple(W.shape)}")
        eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        lam, Q = torch.linalg.eigh((1.0 - self.m) * eye - 0.5 * (W + W.t()))
        A = lam.clamp_min(0).sqrt()[:, None] * Q.t()  # AᵀA = Q Λ₊ Qᵀ
        B = 0.25 * (W - W.t())  # B − Bᵀ = (W − Wᵀ) / 2, the skew part of W
        return A, B

    def extra_repr(self) -> str:
        return f"m={self.m}"


def monotone_weight(module: nn.Module, name: str = "weight", *, m: float) -> nn.Module:
    """Register :class:`MonotoneWeight` on the square ``module.<name>`` so that ``I − W ⪰ m I``.

    The trainable tensors become ``module.parametrizations.<name>.original0`` (``A``) and
    ``original1`` (``B``), initialised from the current weight by
    :meth:`MonotoneWeight.right_inverse`.  Returns ``module``.

    Args:
        module: The module holding the weight.
        name: The name of the square tensor attribute to parametrize.
        m: Keyword only.  The monotonicity margin m, a finite number > 0.

    Returns:
        ``module``, parametrized.

    Raises:
        ValueError: ``module`` has no tensor attribute ``name``, it is not square, or ``m``
            is not a finite number > 0.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"monotone_weight: {type(module).__name__} has no tensor attribute {name!r}")
    parametrize.register_parametrization(module, name, MonotoneWeight(m))
    return module
