"""Lipschitz constant of ``w ↦ Φ(w, x)`` implied by a map's structure and parametrization.

For :class:`~implicitnets.maps.TanhMap`, ``Φ(w, x) = tanh(A w + u)`` and tanh is
1-Lipschitz, so ``Lip(Φ(·, x)) ≤ ‖A‖₂ · 1``: a global bound, valid at every ``w`` and every
``x``, unlike the local ‖∂₁Φ(w*)‖₂ of :func:`jacobian_spectral_norm` (which is ≤ it).
``‖A‖₂`` is computed exactly (largest singular value of the effective, i.e. parametrized,
weight), so the bound holds even when the spectral-norm parametrization uses an inexact
power-iteration estimate of σ.

Other maps can take part by defining a method ``lipschitz_bound() -> float``.
"""

from __future__ import annotations

import torch

from ..maps import TanhMap

__all__ = ["lipschitz_bound"]


def lipschitz_bound(f: object) -> float:
    """An upper bound of ``Lip(Φ(·, x))`` over all ``x``: ``< 1`` certifies a contraction.

    Supports :class:`~implicitnets.maps.TanhMap` (``‖A‖₂``), ``torch.nn.Linear`` (``‖W‖₂``)
    and any object with a ``lipschitz_bound()`` method; raises ``TypeError`` otherwise.
    """
    own = getattr(f, "lipschitz_bound", None)
    if callable(own):
        return float(own())
    if isinstance(f, TanhMap):
        weight = f.A.weight
    elif isinstance(f, torch.nn.Linear):
        weight = f.weight
    else:
        raise TypeError(
            f"lipschitz_bound: no structural bound known for {type(f).__name__}; give it a "
            "lipschitz_bound() method or estimate jacobian_spectral_norm at the fixed point"
        )
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(weight.detach(), ord=2))
