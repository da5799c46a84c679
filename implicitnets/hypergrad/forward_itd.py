"""Forward-mode iterative differentiation (Forward-HG, Franceschi et al. 2017).

Propagate the total derivative ``Z_t = dw_t/dλ`` alongside the inner iterates,

    Z_t = A_t Z_{t−1} + B_t,   A_t = ∂₁Φ(w_{t−1}, λ),   B_t = ∂₂Φ(w_{t−1}, λ),   Z₀ = 0,

and return ``∇f_t(λ) = ∇₂E(w_t, λ) + Z_tᵀ ∇₁E(w_t, λ)``, the same number as reverse-mode
ITD.  The pair ``(w, Z)`` is itself iterated by the core's
:class:`~implicitnets.FixedPointIteration` (a tuple state), each step costing one
Jacobian-vector product per hyperparameter entry (``m`` of them, batched with
:func:`torch.func.vmap`); memory O(m·d), independent of ``t``.  Good when there are few
hyperparameters (learning rate, momentum, a handful of weights); Φ must be written with
``torch.func``-compatible operations (e.g. :class:`~implicitnets.maps.GradientStep`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..solvers import FixedPointIteration
from ..state import State, pack, parts
from ._state import Hparams, InnerMap, as_hparams, check_finite, check_steps, detach, outer_grads
from .base import Bilevel, Hypergradient, HypergradientMethod, Start, split_start

__all__ = ["ForwardITD"]


def tangent_basis(hparams: Hparams) -> tuple[Tensor, ...]:
    """The identity ``dλ/dλ`` split per hyperparameter: shapes ``(m, *λ_i.shape)``."""
    m = sum(h.numel() for h in hparams)
    eye = torch.eye(m, dtype=hparams[0].dtype, device=hparams[0].device)
    out, start = [], 0
    for h in hparams:
        out.append(eye[:, start : start + h.numel()].reshape(m, *h.shape).to(h.dtype))
        start += h.numel()
    return tuple(out)


def zero_tangents(state: State, hparams: Hparams) -> tuple[Tensor, ...]:
    """``Z₀ = 0`` (a start that does not depend on λ): one ``(m, *part.shape)`` per part."""
    m = sum(h.numel() for h in hparams)
    return tuple(s.new_zeros((m, *s.shape)) for s in parts(state))


def tangent_map(phi: InnerMap, like: State, hparams: Hparams, vectorize: bool) -> Callable[[State], State]:
    """``(w, Z) ↦ (Φ(w, λ), A Z + B)`` on the tuple ``(*parts(w), *Z)`` (forward-mode AD), every
    part with a leading axis of size 1 (one problem: the solver's batch)."""
    n = len(parts(like))
    basis = tangent_basis(hparams)

    def step(state: State) -> State:
        state = tuple(t.squeeze(0) for t in state)
        ws, Z = state[:n], state[n:]

        def flat(*args: Tensor) -> tuple[Tensor, ...]:
            return parts(phi(pack(like, args[:n]), tuple(args[n:])))

        def column(*tangents: Tensor) -> tuple[Tensor, ...]:
            return torch.func.jvp(flat, (*ws, *hparams), tangents)[1]

        if vectorize:
            Z_new = torch.func.vmap(column)(*Z, *basis)
        else:
            cols = [column(*(z[j] for z in Z), *(b[j] for b in basis)) for j in range(basis[0].shape[0])]
            Z_new = tuple(torch.stack([c[i] for c in cols]) for i in range(n))
        return (*(t.detach()[None] for t in flat(*ws, *hparams)), *(z.detach()[None] for z in Z_new))

    return step


def forward_mode(problem: Bilevel, hparams: Hparams, w: State, Z: tuple[Tensor, ...] | None, steps: int,
                 vectorize: bool, name: str) -> Hypergradient:
    """``steps`` iterations of :func:`tangent_map` from ``(w, Z)`` (``Z = None``: zero) by the
    core's fixed-point iteration, then ``∇₂E + Zᵀ∇₁E``; the result carries ``Z``."""
    w = detach(w)
    Z = zero_tangents(w, hparams) if Z is None else Z
    n = len(parts(w))
    state, stats = FixedPointIteration(max_iter=steps, tol=0.0).solve(
        tangent_map(problem.inner, w, hparams, vectorize), tuple(t[None] for t in (*parts(w), *Z))
    )
    state = tuple(t[0] for t in state)
    w, Z = pack(w, state[:n]), tuple(state[n:])
    gw, gh = outer_grads(problem.outer, w, hparams)
    grads = contract(Z, gw, gh, hparams)
    check_finite(name, grads)
    return Hypergradient(grads, w, None, stats, carry=Z)


def contract(Z: tuple[Tensor, ...], grads_w: tuple[Tensor, ...], grads_h: tuple[Tensor, ...],
             hparams: Hparams) -> tuple[Tensor, ...]:
    """``∇₂E + Zᵀ ∇₁E``, split back into one tensor per hyperparameter."""
    total = sum((z.reshape(z.shape[0], -1) @ g.reshape(-1)) for z, g in zip(Z, grads_w))
    out, start = [], 0
    for h, gh in zip(hparams, grads_h):
        out.append(gh + total[start : start + h.numel()].reshape(h.shape))
        start += h.numel()
    return tuple(out)


@dataclass(frozen=True)
class ForwardITD(HypergradientMethod):
    """Forward-mode ITD through ``steps`` applications of Φ from the start (memory O(m·d)).

    ``vectorize=False`` loops over the m tangent directions instead of using ``vmap``
    (for maps with operations ``vmap`` does not support).  Each call restarts the tangents
    at ``Z = 0`` (:class:`RTHO` continues them).

    Args:
        steps: Number t of applications of Φ, an int >= 1.
        vectorize: Push the tangent directions through Φ with ``vmap`` (``False``: a loop).

    Raises:
        ValueError: ``steps`` is not an int >= 1 or ``vectorize`` is not a bool.
    """

    steps: int
    vectorize: bool = True

    def __post_init__(self) -> None:
        check_steps("ForwardITD", "steps", self.steps, minimum=1)
        if not isinstance(self.vectorize, bool):
            raise ValueError(f"ForwardITD: vectorize must be a bool, got {self.vectorize!r}")

    def hypergradient(self, problem: Bilevel, hparams: Tensor | Sequence[Tensor], start: Start) -> Hypergradient:
        """``∇f_t(λ) = ∇₂E(w_t, λ) + Z_tᵀ ∇₁E(w_t, λ)``, one tensor per hyperparameter.

        Args:
            problem: The :class:`Bilevel` problem.
            hparams: The hyperparameters λ, a tensor or a sequence of tensors.
            start: The inner state ``w₀`` or a previous :class:`Hypergradient` (its ``w``;
                the tangents restart at zero).

        Returns:
            The :class:`Hypergradient`: one gradient per hyperparameter, shaped like it.
        """
        w0, _ = split_start(start)
        hp = tuple(h.detach() for h in as_hparams(hparams))
        return forward_mode(problem, hp, w0, None, self.steps, self.vectorize, "ForwardITD")
