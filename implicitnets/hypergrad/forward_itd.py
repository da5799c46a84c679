"""Forward-mode iterative differentiation (Forward-HG, Franceschi et al. 2017).

Propagate the total derivative ``Z_t = dw_t/dλ`` alongside the inner iterates,

    Z_t = A_t Z_{t−1} + B_t,   A_t = ∂₁Φ(w_{t−1}, λ),   B_t = ∂₂Φ(w_{t−1}, λ),   Z₀ = 0,

and return ``∇f_t(λ) = ∇₂E(w_t, λ) + Z_tᵀ ∇₁E(w_t, λ)``, the same number as reverse-mode
ITD.  Each step costs one Jacobian-vector product per hyperparameter entry (``m`` of them,
batched with :func:`torch.func.vmap`); memory is O(m·d), independent of ``t``.  Good when
there are few hyperparameters (learning rate, momentum, a handful of weights); the map must
be written with ``torch.func``-compatible operations (e.g. :class:`GradientStep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._state import (
    Hparams,
    InnerMap,
    OuterLoss,
    State,
    as_hparams,
    as_tuple,
    check_finite,
    check_steps,
    detach,
    like,
    outer_grads,
)

__all__ = ["ForwardITD", "forward_itd", "Tangents", "tangent_basis", "zero_tangents", "tangent_step", "contract"]

Tangents = tuple[Tensor, ...]
"""``Z`` for each part of the state: shape ``(m, *part.shape)``, m = total hyperparameter size."""


def tangent_basis(hparams: Hparams) -> tuple[Tensor, ...]:
    """The identity ``dλ/dλ`` split per hyperparameter: shapes ``(m, *λ_i.shape)``."""
    m = sum(h.numel() for h in hparams)
    eye = torch.eye(m, dtype=hparams[0].dtype, device=hparams[0].device)
    out, start = [], 0
    for h in hparams:
        out.append(eye[:, start : start + h.numel()].reshape(m, *h.shape).to(h.dtype))
        start += h.numel()
    return tuple(out)


def zero_tangents(state: State, hparams: Hparams) -> Tangents:
    """``Z₀ = 0``: an initial state that does not depend on λ."""
    m = sum(h.numel() for h in hparams)
    return tuple(s.new_zeros((m, *s.shape)) for s in as_tuple(state))


def tangent_step(
    phi: InnerMap, state: State, hparams: Hparams, Z: Tangents, basis: tuple[Tensor, ...], vectorize: bool = True
) -> tuple[State, Tangents]:
    """One step ``(w_t, Z_t) = (Φ(w_{t−1}, λ), A_t Z_{t−1} + B_t)`` by forward-mode AD."""
    parts = as_tuple(state)
    n = len(parts)
    primals = (*parts, *hparams)

    def flat(*args: Tensor) -> tuple[Tensor, ...]:
        return as_tuple(phi(like(state, args[:n]), tuple(args[n:])))

    def column(*tangents: Tensor) -> tuple[Tensor, ...]:
        return torch.func.jvp(flat, primals, tangents)[1]

    if vectorize:
        Z_new = torch.func.vmap(column)(*Z, *basis)
    else:
        cols = [column(*(z[j] for z in Z), *(b[j] for b in basis)) for j in range(basis[0].shape[0])]
        Z_new = tuple(torch.stack([c[i] for c in cols]) for i in range(n))
    with torch.enable_grad():
        new_state = detach(phi(state, hparams))
    return new_state, tuple(z.detach() for z in Z_new)


def contract(
    Z: Tangents, grads_w: tuple[Tensor, ...], grads_h: tuple[Tensor, ...], hparams: Hparams
) -> tuple[Tensor, ...]:
    """``∇₂E + Zᵀ ∇₁E``, split back into one tensor per hyperparameter."""
    total = sum((z.reshape(z.shape[0], -1) @ g.reshape(-1)) for z, g in zip(Z, grads_w))
    out, start = [], 0
    for h, gh in zip(hparams, grads_h):
        out.append(gh + total[start : start + h.numel()].reshape(h.shape))
        start += h.numel()
    return tuple(out)


@dataclass(frozen=True)
class ForwardITD:
    """Forward-mode ITD through ``steps`` applications of Φ from ``w₀`` (memory O(m·d)).

    ``vectorize=False`` loops over the m tangent directions instead of using ``vmap``
    (for maps with operations ``vmap`` does not support).
    """

    steps: int
    vectorize: bool = True

    def __post_init__(self) -> None:
        check_steps("ForwardITD", "steps", self.steps)
        if not isinstance(self.vectorize, bool):
            raise ValueError(f"ForwardITD: vectorize must be a bool, got {self.vectorize!r}")

    def __call__(
        self, phi: InnerMap, outer_loss: OuterLoss, w0: State, hparams: Tensor | Sequence[Tensor]
    ) -> tuple[Tensor, ...]:
        """Return ``∇f_t(λ) = ∇₂E(w_t, λ) + Z_tᵀ ∇₁E(w_t, λ)``, one tensor per hyperparameter."""
        hp = tuple(h.detach() for h in as_hparams(hparams))
        w, basis = detach(w0), tangent_basis(hp)
        Z = zero_tangents(w, hp)
        for _ in range(self.steps):
            w, Z = tangent_step(phi, w, hp, Z, basis, self.vectorize)
        gw, gh = outer_grads(outer_loss, w, hp)
        grads = contract(Z, gw, gh, hp)
        check_finite("ForwardITD", grads)
        return grads


def forward_itd(
    phi: InnerMap, outer_loss: OuterLoss, w0: State, hparams: Tensor | Sequence[Tensor], steps: int
) -> tuple[Tensor, ...]:
    """Functional form of :class:`ForwardITD`."""
    return ForwardITD(steps)(phi, outer_loss, w0, hparams)
