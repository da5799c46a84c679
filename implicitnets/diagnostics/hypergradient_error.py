"""Error of an approximate hypergradient against a high-accuracy reference.

With ``g`` and ``g*`` the concatenation of all parameter gradients,

    relative = ‖g − g*‖ / ‖g*‖,   cosine = ⟨g, g*⟩ / (‖g‖ ‖g*‖).

The reference is typically the same loss differentiated with ``AID(linear.Exact())`` or
``AID(linear.GMRES(tol≈1e-10))`` after a forward solve to a tight tolerance.  Only
meaningful where the reference itself is: when ``I − ∂₁Φ`` is near-singular at ``w*``
(no contraction) the "implicit gradient" is ill-defined and large errors are expected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HypergradientError", "hypergradient_error"]


@dataclass(frozen=True)
class HypergradientError:
    """``relative`` and ``absolute`` ℓ₂ errors, ``cosine`` similarity (nan if a side is 0),
    ``finite``: whether every entry of the approximate gradient is finite.

    Args:
        relative: ``‖g − g*‖ / ‖g*‖`` (``0`` or ``inf`` when ``g* = 0``).
        absolute: ``‖g − g*‖``.
        cosine: ``⟨g, g*⟩ / (‖g‖ ‖g*‖)``, ``nan`` if either is zero.
        finite: Whether every entry of ``g`` is finite.
    """

    relative: float
    absolute: float
    cosine: float
    finite: bool


def _flatten(grads: Tensor | Sequence[Tensor | None], like: Sequence[Tensor | None] | None) -> Tensor:
    if isinstance(grads, Tensor):
        return grads.detach().flatten()
    parts = []
    for i, g in enumerate(grads):
        if g is None:
            ref = None if like is None else like[i]
            if ref is None:
                continue
            g = torch.zeros_like(ref)  # no gradient reached this tensor: it is zero
        parts.append(g.detach().flatten())
    if not parts:
        raise ValueError("hypergradient_error: no gradients given")
    return torch.cat(parts)


def hypergradient_error(
    grads: Tensor | Sequence[Tensor | None], reference: Tensor | Sequence[Tensor | None]
) -> HypergradientError:
    """Compare ``grads`` with ``reference`` (same structure; ``None`` counts as zero).

    Args:
        grads: The approximate gradient ``g``: a tensor or a sequence of tensors (``None``
            entries allowed).
        reference: The reference ``g*``, of the same structure and sizes.

    Returns:
        The :class:`HypergradientError`.

    Raises:
        ValueError: The structures, lengths or numbers of entries differ, or no gradients
            are given.
    """
    if isinstance(grads, Tensor) != isinstance(reference, Tensor):
        raise ValueError("hypergradient_error: pass two tensors or two sequences of tensors")
    if not isinstance(grads, Tensor) and len(grads) != len(reference):  # type: ignore[arg-type]
        raise ValueError(f"hypergradient_error: {len(grads)} gradients vs {len(reference)} references")  # type: ignore[arg-type]
    g = _flatten(grads, None if isinstance(reference, Tensor) else reference)
    r = _flatten(reference, None if isinstance(grads, Tensor) else grads)
    if g.shape != r.shape:
        raise ValueError(f"hypergradient_error: {g.numel()} gradient entries vs {r.numel()} reference entries")
    r = r.to(g.dtype)
    absolute = float(torch.linalg.vector_norm(g - r))
    rn, gn = float(torch.linalg.vector_norm(r)), float(torch.linalg.vector_norm(g))
    relative = absolute / rn if rn > 0 else (0.0 if absolute == 0 else math.inf)
    cosine = float(torch.dot(g, r)) / (gn * rn) if gn > 0 and rn > 0 else math.nan
    return HypergradientError(relative, absolute, cosine, bool(torch.isfinite(g).all()))
