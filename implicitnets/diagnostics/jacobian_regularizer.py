"""Hutchinson estimate of ‖∂₁Φ(z, x)‖_F², a differentiable Jacobian regulariser.

For probes ε with ``E[εεᵀ] = I`` (Rademacher ±1 by default),

    ‖J‖_F² = tr(JᵀJ) = E_ε ‖Jᵀε‖²,

so the mean of ``‖Jᵀε_p‖²`` over P probes is an unbiased estimate costing P vector–Jacobian
products.  With ``create_graph=True`` the estimate is differentiable with respect to the
map's parameters, so adding ``λ · estimate.mean() / d`` to the training loss pushes Φ
towards a contraction (Jacobian regularisation of DEQs, Bai, Koltun & Kolter 2021).
Passing all scaled basis vectors ``√d·e_i`` as probes makes the estimate exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["jacobian_frobenius_sq"]


def jacobian_frobenius_sq(
    f: Callable[[Tensor, Tensor], Tensor],
    z: Tensor,
    x: Tensor,
    *,
    n_probes: int = 1,
    probes: Tensor | None = None,
    create_graph: bool = True,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate ``‖∂₁Φ(z, x)‖_F²`` per sample (shape ``(batch,)``) or for the whole batch.

    ``z`` is detached (the regulariser acts on Φ's parameters and on ``x``'s graph, not on
    how ``z`` was found, as in Bai et al.).  ``probes`` (shape ``(P, *z.shape)``) overrides
    the ``n_probes`` random Rademacher probes.  ``per_sample=False`` returns one scalar, the
    sum over the batch.  With ``create_graph=False`` the result carries no graph.

    Args:
        f: The map ``f(z, x) -> z`` (a tensor state).
        z: The point, shape (batch, ...); detached.
        x: The map's input.
        n_probes: Keyword only.  Number P of Rademacher probes, an int >= 1 (ignored when
            ``probes`` is given).
        probes: Keyword only.  Probes of shape ``(P, *z.shape)``, or ``None``.
        create_graph: Keyword only.  Make the estimate differentiable.
        per_sample: Keyword only.  One estimate per sample (else the sum over the batch).
        generator: Keyword only.  The random generator of the probes, or ``None``.

    Returns:
        The estimate, shape ``(batch,)`` or a scalar.

    Raises:
        ValueError: ``n_probes`` is not an int >= 1, ``probes`` has the wrong shape, or
            the map's output is not shaped like ``z``.
    """
    if probes is None:
        if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
            raise ValueError(f"jacobian_frobenius_sq: n_probes must be an int >= 1, got {n_probes!r}")
        signs = torch.randint(0, 2, (n_probes, *z.shape), device=z.device, generator=generator)
        probes = (2 * signs - 1).to(z.dtype)
    elif probes.shape[1:] != z.shape:
        raise ValueError(
            f"jacobian_frobenius_sq: probes must have shape (P, *{tuple(z.shape)}), got {tuple(probes.shape)}"
        )
    with torch.enable_grad():
        zr = z.detach().requires_grad_(True)
        fz = f(zr, x)
        if fz.shape != zr.shape:
            raise ValueError(f"jacobian_frobenius_sq: the map returned shape {tuple(fz.shape)} for {tuple(zr.shape)}")
        squares = []
        for eps in probes:
            (jt,) = torch.autograd.grad(fz, zr, eps, retain_graph=True, create_graph=create_graph, allow_unused=True)
            if jt is None:
                jt = torch.zeros_like(zr)
            sq = jt.pow(2)
            squares.append(sq.reshape(sq.shape[0], -1).sum(1) if per_sample and sq.dim() > 0 else sq.sum())
        est = torch.stack(squares).mean(0)
    return est if create_graph else est.detach()
