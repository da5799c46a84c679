"""Bounds on the induced ∞-norm ``‖W‖_∞ = max_i Σ_j |W_ij|`` (the largest row ℓ1 norm).

The ∞-norm ball ``{W : ‖W‖_∞ ≤ r}`` is the product of one ℓ1 ball of radius r per row, so
its Euclidean (Frobenius) projection projects each row onto its ℓ1 ball:

    P(v) = sign(v) ⊙ max(|v| − θ, 0),   θ ≥ 0 the smallest value with Σ_j max(|v_j| − θ, 0) ≤ r,

found by sorting (Duchi et al. 2008), O(n log n) per row.  Implicit graph networks (Gu et al.
2020) keep ``‖W‖_∞ ≤ κ / λ_pf(Â)`` this way; see :class:`~implicitnets.maps.GraphMap`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .norm_bound import check_bound

__all__ = ["project_l1_ball", "project_inf_norm_", "InfNormBound", "inf_norm"]


def inf_norm(weight: Tensor) -> Tensor:
    """``‖W‖_∞``: the largest ℓ1 norm of a row of ``weight`` (2-D).

    Args:
        weight: A 2-D tensor.

    Returns:
        ``‖W‖_∞``, a 0-d tensor (differentiable).
    """
    return weight.abs().sum(-1).max()


def project_l1_ball(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of every row of ``v`` (the last axis) onto ``{x : ‖x‖₁ ≤ radius}``.

    Rows already inside are returned unchanged.  Differentiable almost everywhere; returns a
    new tensor.

    Args:
        v: A tensor whose last axis holds the rows.
        radius: The radius, a finite number > 0.

    Returns:
        The projection, shaped like ``v``.

    Raises:
        ValueError: ``radius`` is not a finite number > 0.
    """
    check_bound("project_l1_ball", radius)
    a = v.abs()
    u, _ = torch.sort(a, dim=-1, descending=True)
    cumulative = u.cumsum(-1) - radius
    j = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    # ρ = the largest j with u_j > (Σ_{i≤j} u_i − r) / j; θ = (Σ_{i≤ρ} u_i − r) / ρ
    rho = (u * j > cumulative).sum(-1, keepdim=True).clamp_min(1)
    theta = (cumulative.gather(-1, rho - 1) / rho.to(v.dtype)).clamp_min(0)
    projected = torch.sign(v) * (a - theta).clamp_min(0)
    inside = a.sum(-1, keepdim=True) <= radius
    return torch.where(inside, v, projected)


@torch.no_grad()
def project_inf_norm_(weight: Tensor, bound: float) -> Tensor:
    """Project ``weight`` (2-D) in place onto ``{W : ‖W‖_∞ ≤ bound}`` (Frobenius projection:
    each row onto the ℓ1 ball of radius ``bound``); call it after each optimiser step.
    Returns ``weight``.

    Args:
        weight: The 2-D weight to project in place.
        bound: The bound on ``‖W‖_∞``, a finite number > 0.

    Returns:
        ``weight``.

    Raises:
        ValueError: ``weight`` is not 2-D or ``bound`` is not a finite number > 0.
    """
    if weight.dim() != 2:
        raise ValueError(f"project_inf_norm_: the weight must be 2-D, got shape {tuple(weight.shape)}")
    weight.copy_(project_l1_ball(weight, bound))
    return weight


class InfNormBound(nn.Module):
    """Parametrization ``W ↦ W · r / max(‖W‖_∞, r)``: rescales W only when ``‖W‖_∞ > r``.

    A rescaling, not the Euclidean projection (use :func:`project_inf_norm_` for that); it is
    differentiable and keeps the bound exactly at every evaluation.

    Args:
        bound: The bound r on ``‖W‖_∞``, a finite number > 0.

    Raises:
        ValueError: ``bound`` is not a finite number > 0.
    """

    def __init__(self, bound: float) -> None:
        super().__init__()
        check_bound("InfNormBound", bound)
        self.bound = float(bound)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * (self.bound / inf_norm(weight).clamp_min(self.bound))

    def extra_repr(self) -> str:
        return f"bound={self.bound}"
