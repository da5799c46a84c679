"""Spectral-norm bounds ``‖W‖₂ ≤ γ``: a parametrization and the paper's projection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["SpectralBound", "spectral_norm", "project_spectral_"]


def _check_bound(name: str, bound: float) -> None:
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"{name}: bound must be a finite number > 0, got {bound!r}")


class SpectralBound(nn.Module):
    """Parametrization ``W ↦ W · γ / max(σ(W), γ)``: shrinks W only when ``σ(W) > γ``.

    ``σ`` is the largest singular value of ``W`` reshaped to (out, −1): exact
    (``torch.linalg.matrix_norm(·, 2)``) when ``exact=True``, otherwise ``uᵀ W v`` with the
    vectors of a power iteration kept in buffers and advanced ``n_power_iterations`` times per
    evaluation in training mode (warm-started, so it tracks σ across optimiser steps).  The
    power estimate approaches σ from below: the bound holds to the iteration's accuracy;
    ``exact=True`` guarantees it.
    """

    def __init__(self, weight: Tensor, bound: float, exact: bool = False, n_power_iterations: int = 1) -> None:
        super().__init__()
        _check_bound("spectral_norm", bound)
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ValueError(f"spectral_norm: n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
        if weight.dim() < 2:
            raise ValueError(f"spectral_norm: the weight must have >= 2 dimensions, got shape {tuple(weight.shape)}")
        self.bound, self.exact, self.n_power_iterations = float(bound), bool(exact), n_power_iterations
        matrix = weight.detach().flatten(1)
        generator = torch.Generator(device="cpu").manual_seed(0)
        u = torch.randn(matrix.shape[0], generator=generator, dtype=matrix.dtype).to(matrix.device)
        v = torch.randn(matrix.shape[1], generator=generator, dtype=matrix.dtype).to(matrix.device)
        self.register_buffer("_u", F.normalize(u, dim=0))
        self.register_buffer("_v", F.normalize(v, dim=0))
        self._power_iteration(matrix, 15)

    @torch.no_grad()
    def _power_iteration(self, matrix: Tensor, steps: int) -> None:
        for _ in range(steps):
            self._v.copy_(F.normalize(matrix.t() @ self._u, dim=0, eps=1e-30))
            self._u.copy_(F.normalize(matrix @ self._v, dim=0, eps=1e-30))

    def sigma(self, weight: Tensor) -> Tensor:
        """The (estimated) largest singular value, differentiable in ``weight``."""
        matrix = weight.flatten(1)
        if self.exact:
            return torch.linalg.matrix_norm(matrix, 2)
        if self.training:
            self._power_iteration(matrix.detach(), self.n_power_iterations)
        u, v = self._u.clone(), self._v.clone()
        return torch.dot(u, matrix @ v)

    def forward(self, weight: Tensor) -> Tensor:
        sigma = self.sigma(weight)
        return weight * (self.bound / torch.clamp(sigma, min=self.bound))


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    *,
    bound: float = 0.9,
    exact: bool = False,
    n_power_iterations: int = 1,
) -> nn.Module:
    """Register :class:`SpectralBound` on ``module.<name>`` so that ``‖W‖₂ ≤ bound``.

    Uses ``torch.nn.utils.parametrize``; the trainable tensor becomes
    ``module.parametrizations.<name>.original``.  Returns ``module``.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"spectral_norm: {type(module).__name__} has no tensor attribute {name!r}")
    parametrize.register_parametrization(module, name, SpectralBound(weight, bound, exact, n_power_iterations))
    return module


@torch.no_grad()
def project_spectral_(weight: Tensor, bound: float) -> Tensor:
    """Project ``weight`` in place onto ``{W : ‖W‖₂ ≤ bound}`` by clipping singular values.

    This is the Euclidean (Frobenius) projection; call it after each optimiser step.  A
    weight with more than two dimensions is treated as (out, −1).  Returns ``weight``.
    """
    _check_bound("project_spectral_", bound)
    matrix = weight.flatten(1)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    if S.max() > bound:
        weight.copy_(((U * S.clamp(max=bound)) @ Vh).reshape(weight.shape))
    return weight
