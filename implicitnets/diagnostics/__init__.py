"""Diagnostics for equilibrium models: is Φ(·, x) a contraction, did a solve diverge, how
wrong is a hypergradient.

* :func:`jacobian_spectral_norm` — ‖∂₁Φ(w*)‖₂ by batched power iteration on JᵀJ.
* :func:`jacobian_spectral_radius` — ρ(∂₁Φ(w*)) by batched Arnoldi (non-symmetric J).
* :func:`lipschitz_bound` — the global bound implied by the map's parametrization.
* :func:`jacobian_frobenius_sq` — Hutchinson ‖∂₁Φ‖_F², a differentiable regulariser.
* :func:`detect_divergence` — NaN/Inf or residual growth in a residual trace.
* :func:`hypergradient_error` — relative error / cosine against a reference gradient.
* :func:`perron_frobenius` — λ_pf of a non-negative (sparse) matrix, Collatz–Wielandt bounds.
"""

from ..maps.perron_frobenius import PerronFrobenius, perron_frobenius
from .divergence import DivergenceReport, detect_divergence
from .hypergradient_error import HypergradientError, hypergradient_error
from .jacobian_regularizer import jacobian_frobenius_sq
from .lipschitz import lipschitz_bound
from .spectral_estimate import SpectralEstimate
from .spectral_norm import jacobian_spectral_norm
from .spectral_radius import jacobian_spectral_radius

__all__ = [
    "SpectralEstimate",
    "jacobian_spectral_norm",
    "jacobian_spectral_radius",
    "lipschitz_bound",
    "perron_frobenius",
    "PerronFrobenius",
    "jacobian_frobenius_sq",
    "DivergenceReport",
    "detect_divergence",
    "HypergradientError",
    "hypergradient_error",
]
