"""Lipschitz constant of ``w ↦ Φ(w, x)`` implied by a map's structure and parametrization.

Every shipped map defines ``lipschitz_bound()`` (e.g. :class:`~implicitnets.maps.TanhMap`:
``‖A‖₂`` of the effective weight, exactly, times Lip(tanh) = 1): a global bound, valid at
every ``w`` and every ``x``, unlike the local ‖∂₁Φ(w*)‖₂ of :func:`jacobian_spectral_norm`
(which is ≤ it).  Any other map takes part by defining the same method.
"""

from __future__ import annotations

import torch

__all__ = ["lipschitz_bound"]


def lipschitz_bound(f: object) -> float:
    """An upper bound of ``Lip(Φ(·, x))`` over all ``x``: ``< 1`` certifies a contraction.

    Calls the map's ``lipschitz_bound()`` method; a bare ``torch.nn.Linear`` gives ``‖W‖₂``.
    Raises ``TypeError`` for anything else, or when the map's method returns ``None`` (its
    parametrization implies no bound).

    Args:
        f: A map with a ``lipschitz_bound()`` method, or an ``nn.Linear``.

    Returns:
        The bound, a float.

    Raises:
        TypeError: No bound is known for ``f``.
    """
    own = getattr(f, "lipschitz_bound", None)
    if callable(own):
        value = own()
        if value is None:
            raise TypeError(f"lipschitz_bound: {type(f).__name__}'s parametrization implies no global bound")
        return float(value)
    if isinstance(f, torch.nn.Linear):
        weight = f.weight
    else:
        raise TypeError(
            f"lipschitz_bound: no structural bound known for {type(f).__name__}; give it a "
            "lipschitz_bound() method or estimate jacobian_spectral_norm at the fixed point"
        )
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(weight.detach(), ord=2))
