"""The result type of the spectral estimates of ``∂₁Φ`` (norm and radius)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["SpectralEstimate"]


@dataclass(frozen=True)
class SpectralEstimate:
    """An estimate per sample and its worst case.

    ``per_sample`` has shape ``(batch,)`` (``(1,)`` when the whole batch is treated as one
    vector), ``worst = per_sample.max()``.  ``iterations`` counts operator products per
    sample (``J`` or ``JᵀJ`` applications); ``converged`` says whether the relative change of
    every sample's estimate fell below the requested tolerance.

    ``float(estimate)`` is ``worst``.

    Args:
        per_sample: The estimate per sample, shape ``(batch,)`` or ``(1,)``.
        worst: ``per_sample.max()``.
        iterations: Iterations run (power-iteration or Arnoldi steps).
        converged: Whether every sample's estimate met the tolerance.
    """

    per_sample: Tensor
    worst: float
    iterations: int
    converged: bool

    def __float__(self) -> float:
        return self.worst
