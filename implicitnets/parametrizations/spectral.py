"""Spectral-norm bounds ``‖W‖₂ ≤ γ``: a parametrization and the paper's projection."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .norm_bound import check_bound
from .power import PowerIterationBound, check_power_options
from .subspace import BLOCK, ScaledOperator, matrix_operator

__all__ = ["SpectralBound", "spectral_norm", "project_spectral_"]

_SUBSPACE_LIMIT = 2048  # a larger Gram matrix costs more than the plain power iteration


class SpectralBound(PowerIterationBound):
    """Parametrization ``W ↦ W · γ / max(σ(W), γ)``: shrinks W only when ``σ(W) > γ``.

    ``σ`` is the largest singular value of ``W`` reshaped to (out, −1): exact
    (``torch.linalg.matrix_norm(·, 2)``, O(n³) per evaluation) when ``exact=True``; otherwise
    ``uᵀ W v`` from a warm-started power iteration run to ``tol`` whenever ``W`` has changed
    (see :mod:`implicitnets.parametrizations.power`).  The power estimate approaches σ from
    below, so the bound holds to the iteration's accuracy; ``exact=True`` guarantees it.

    For a matrix whose smaller side is at most 2048 the iteration is a subspace iteration on
    the smaller Gram matrix with a block of 16 vectors
    (:mod:`implicitnets.parametrizations.subspace`), so a cluster of top singular values does
    not slow it down; it stops when the estimate changes by at most ``tol`` (relative) in one
    step.  Larger matrices use the plain power iteration with ``W`` and ``Wᵀ``.  Traced by
    ``torch.compile``, a refresh is one subspace step (four power steps for larger
    matrices) with no stopping test and no host read; a NaN in ``W`` then propagates
    instead of raising (see :mod:`implicitnets.parametrizations.power`).

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
        k = min(weight.flatten(1).shape)  # the block lives on the smaller side
        block = torch.randn(k, min(BLOCK, k), generator=generator, dtype=weight.dtype)
        super().__init__(weight, bound, v0, tol=tol, max_iter=max_iter, block=block)
        self.exact = bool(exact)

    def apply(self, v: Tensor, weight: Tensor) -> Tensor:
        return weight.flatten(1) @ v

    def operator(self, weight: Tensor) -> ScaledOperator | None:
        """The matrix for the subspace iteration, or ``None`` above the size where the plain
        power iteration is cheaper."""
        W = weight.flatten(1)
        return None if min(W.shape) > _SUBSPACE_LIMIT else matrix_operator(W)

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
