"""Spectral-norm bounds ``‖W‖₂ ≤ γ``: a parametrization and the paper's projection."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import NonFiniteError
from .power import _CHECK_EVERY, PowerIterationBound, _normalize, check_bound, check_power_options

__all__ = ["SpectralBound", "spectral_norm", "project_spectral_"]

_MAX_SQUARINGS = 6  # one Gram product stands for 2^6 = 64 power steps
_GRAM_LIMIT = 2048  # a larger Gram matrix costs more to square than the plain iteration saves


class SpectralBound(PowerIterationBound):
    """Parametrization ``W ↦ W · γ / max(σ(W), γ)``: shrinks W only when ``σ(W) > γ``.

    ``σ`` is the largest singular value of ``W`` reshaped to (out, −1): exact
    (``torch.linalg.matrix_norm(·, 2)``, O(n³) per evaluation) when ``exact=True``; otherwise
    ``uᵀ W v`` from a warm-started power iteration run to ``tol`` whenever ``W`` has changed
    (see :mod:`implicitnets.parametrizations.power`).  The power estimate approaches σ from
    below, so the bound holds to the iteration's accuracy; ``exact=True`` guarantees it.

    The power iteration runs on the smaller Gram matrix ``G`` (``WᵀW`` or ``WWᵀ``) raised to
    the power ``2^s`` by ``s`` squarings, each scaled to unit Frobenius norm (so neither over-
    nor underflows): one product ``x ← G^(2^s) x / ‖·‖`` is ``2^s`` power steps, and the
    stopping test is the plain iteration's (σ̂ grows by at most ``tol``, relative, per 4
    steps) on average over those ``2^s`` steps.  ``s`` is the largest with ``2^s ≤ max_iter``
    and at most 6 (64 steps per product); a matrix whose smaller side exceeds 2048 uses the plain iteration of products
    with ``W`` and ``Wᵀ`` instead.

    Args:
        weight: The initial weight (at least 2-D), for the power iteration's vectors.
        bound: The bound γ, a finite number > 0.
        exact: Use the exact largest singular value instead of the power iteration.
        tol: Keyword only.  Relative increase of the power-iteration estimate that stops
            it, in ``[0, 1)``.
        max_iter: Keyword only.  Maximum power-iteration steps per refresh, an int >= 1.

    Raises:
        ValueError: An option is out of range or ``weight`` has fewer than 2 dimensions.
    """

    def __init__(self, weight: Tensor, bound: float, exact: bool = False, *, tol: float = 1e-6,
                 max_iter: int = 500) -> None:
        check_bound("spectral_norm", bound)
        check_power_options("spectral_norm", tol, max_iter)
        if weight.dim() < 2:
            raise ValueError(f"spectral_norm: the weight must have >= 2 dimensions, got shape {tuple(weight.shape)}")
        generator = torch.Generator(device="cpu").manual_seed(0)
        v0 = torch.randn(weight.flatten(1).shape[1], generator=generator, dtype=weight.dtype)
        super().__init__(weight, bound, v0, tol=tol, max_iter=max_iter)
        self.exact = bool(exact)

    def apply(self, v: Tensor, weight: Tensor) -> Tensor:
        return weight.flatten(1) @ v

    @torch.no_grad()
    def power_iterate_(self, weight: Tensor, max_iter: int | None = None, tol: float | None = None) -> int:
        """Power iteration on ``(WᵀW)^(2^s)`` (or ``(WWᵀ)^(2^s)``) to ``tol``, warm-started from
        the stored vectors; returns the number of power steps it stands for."""
        max_iter = self.max_iter if max_iter is None else max_iter
        tol = self.tol if tol is None else tol
        W = weight.detach().flatten(1)
        if min(W.shape) > _GRAM_LIMIT:
            return super().power_iterate_(weight, max_iter, tol)
        squarings = min(_MAX_SQUARINGS, int(math.log2(max_iter)))
        wide = W.shape[0] < W.shape[1]  # iterate on the left vector u (WWᵀ is the smaller Gram)
        M = W / W.abs().amax().clamp_min(torch.finfo(W.dtype).tiny)  # entries in [-1, 1]: no overflow in MᵀM
        G = M @ M.t() if wide else M.t() @ M
        for _ in range(squarings):
            G = G / torch.linalg.matrix_norm(G).clamp_min(torch.finfo(G.dtype).tiny)
            G = G @ G
        def estimate(x: Tensor) -> float:  # σ̂ / max |Wᵢⱼ| at the unit vector x
            sigma = float(torch.linalg.vector_norm(M.t() @ x if wide else M @ x))
            if not math.isfinite(sigma):
                raise NonFiniteError(f"{type(self).__name__}: the weight contains NaN or Inf")
            return sigma

        x = self._u if wide else self._v
        per_product = 2**squarings
        previous, steps = estimate(x), 0
        while steps < max_iter:
            x = _normalize(G @ x)
            steps += per_product
            sigma = estimate(x)
            if sigma - previous <= tol * sigma * per_product / _CHECK_EVERY:
                break
            previous = sigma
        v = _normalize(W.t() @ x) if wide else x
        self._v.copy_(v)
        self._u.copy_(_normalize(W @ v))
        return steps

    def adjoint(self, u: Tensor, weight: Tensor) -> Tensor:
        return weight.flatten(1).t() @ u

    def sigma(self, weight: Tensor) -> Tensor:
        if self.exact:
            return torch.linalg.matrix_norm(weight.flatten(1), 2)
        return super().sigma(weight)

    def extra_repr(self) -> str:
        return f"bound={self.bound}, exact={self.exact}, tol={self.tol}"


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    *,
    bound: float = 0.9,
    exact: bool = False,
    tol: float = 1e-6,
    max_iter: int = 500,
) -> nn.Module:
    """Register :class:`SpectralBound` on ``module.<name>`` so that ``‖W‖₂ ≤ bound``.

    Uses ``torch.nn.utils.parametrize``; the trainable tensor becomes
    ``module.parametrizations.<name>.original``.  ``tol`` and ``max_iter`` control the power
    iteration (ignored with ``exact=True``).  Returns ``module``.

    Args:
        module: The module holding the weight.
        name: The name of the tensor attribute to bound.
        bound: Keyword only.  The bound on ``‖W‖₂``, a finite number > 0.
        exact: Keyword only.  Use the exact largest singular value (O(n³) per evaluation).
        tol: Keyword only.  Relative increase of the power-iteration estimate that stops
            it, in ``[0, 1)``.
        max_iter: Keyword only.  Maximum power-iteration steps per refresh, an int >= 1.

    Returns:
        ``module``, parametrized.

    Raises:
        ValueError: ``module`` has no tensor attribute ``name``, it has fewer than 2
            dimensions, or an option is out of range.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"spectral_norm: {type(module).__name__} has no tensor attribute {name!r}")
    parametrize.register_parametrization(module, name, SpectralBound(weight, bound, exact, tol=tol, max_iter=max_iter))
    return module


@torch.no_grad()
def project_spectral_(weight: Tensor, bound: float) -> Tensor:
    """Project ``weight`` in place onto ``{W : ‖W‖₂ ≤ bound}`` by clipping singular values.

    This is the Euclidean (Frobenius) projection; call it after each optimiser step.  A
    weight with more than two dimensions is treated as (out, −1).  Returns ``weight``.

    Args:
        weight: The weight to project in place (at least 2-D).
        bound: The bound on ``‖W‖₂``, a finite number > 0.

    Returns:
        ``weight``.

    Raises:
        ValueError: ``bound`` is not a finite number > 0.
    """
    check_bound("project_spectral_", bound)
    matrix = weight.flatten(1)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    if S.max() > bound:
        weight.copy_(((U * S.clamp(max=bound)) @ Vh).reshape(weight.shape))
    return weight
