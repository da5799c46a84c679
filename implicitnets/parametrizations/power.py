"""Operator-norm bounds by warm-started power iteration: ``W ↦ W · γ / max(σ(W), γ)``.

``σ(W) = ‖K_W‖₂`` is the largest singular value of a linear operator built from a weight
``W`` (a matrix, a convolution).  It is estimated by power iteration on ``K_Wᵀ K_W``,

    v ← K_Wᵀ u / ‖K_Wᵀ u‖,   u ← K_W v / ‖K_W v‖,   σ̂ = uᵀ K_W v,

with ``u, v`` kept in buffers, refreshed to a tolerance whenever the weight's values have
changed (:mod:`implicitnets.parametrizations.norm_bound`).  So ``σ̂`` tracks a weight that
moves fast.  One power step per optimiser step, as in ``torch.nn.utils.spectral_norm``,
lags behind: on the FC equilibrium model under Adam (lr 1e-3, width 200, γ = 0.9) it let
‖A‖₂ reach 1.036 — not a contraction.

``σ̂`` approaches ``σ`` from below, so the bound holds to the iteration's accuracy: it stops
when ``σ̂`` grows by at most ``tol`` (relative) over 4 steps, or after ``max_iter`` steps.
The host synchronises once per 4 steps, only when the weight has changed, and once per
evaluation after an in-place change to compare the values.

Traced by ``torch.compile`` the refresh runs a fixed number of steps from the stored vectors
with no stopping test (4 power steps, or 1 subspace step for a bound with a block,
:class:`~implicitnets.parametrizations.SpectralBound` and
:class:`~implicitnets.parametrizations.ConvOperatorBound`).  Vectors converged for the
previous weight usually need no more steps for a weight moved by one optimiser step; a
weight that jumped (loaded, projected, set by hand) is followed only at the fixed steps'
rate, and until then ``σ̂`` lies below ``σ``: evaluate it once eagerly after such a change.
A NaN or Inf in the weight cannot raise without a host read: it propagates into ``σ̂`` and
the output (the eager refresh raises ``NonFiniteError``).  ``last_iterations`` counts the
steps of eager refreshes only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..options import check_int, check_real
from .norm_bound import NormBound
from .subspace import ScaledOperator, subspace_steps, top_singular_subspace

__all__ = ["PowerIterationBound"]

_CHECK_EVERY = 4  # power steps between stopping checks (host syncs); the steps of a traced refresh
_TRACED_SUBSPACE_STEPS = 1  # subspace steps of a traced refresh (an eager one takes 1 for a slowly moving weight)


def check_power_options(name: str, tol: float, max_iter: int) -> None:
    """Raise ``ValueError`` unless ``0 <= tol < 1`` and ``max_iter`` is an int >= 1."""
    check_real(name, "tol", tol, low=0, high=1, high_open=True)
    check_int(name, "max_iter", max_iter)


def _normalize(t: Tensor) -> Tensor:
    """``t / ‖t‖`` (a zero ``t`` stays zero), scaled by ``max |tᵢ|`` first so that ``‖t‖``
    does not overflow when it exceeds the dtype's largest number."""
    tiny = torch.finfo(t.dtype).tiny
    t = t / t.abs().amax().clamp_min(tiny)
    return t / torch.linalg.vector_norm(t).clamp_min(tiny)


class PowerIterationBound(NormBound):
    """Base parametrization ``W ↦ W · γ / max(σ̂(W), γ)`` with ``σ̂`` by power iteration.

    Subclasses define ``apply(v, W) = K_W v`` and ``adjoint(u, W) = K_Wᵀ u``; ``v0`` is a
    starting vector of the input shape (any non-zero tensor).  A subclass that passes a
    starting ``block`` (n × b, n the size of ``M``'s input) and returns ``K_W`` from
    :meth:`operator` is refreshed by subspace iteration on blocks
    (:mod:`implicitnets.parametrizations.subspace`) instead of the plain power iteration;
    the block is kept in a buffer, ``_block``.
    """

    def __init__(self, weight: Tensor, bound: float, v0: Tensor, *, tol: float, max_iter: int,
                 block: Tensor | None = None) -> None:
        super().__init__(weight, bound)
        self.tol, self.max_iter = float(tol), int(max_iter)
        v = _normalize(v0.to(device=weight.device, dtype=weight.dtype))
        self.register_buffer("_v", v)
        self.register_buffer("_u", _normalize(self.apply(v, weight.detach())))
        if block is not None:
            self.register_buffer("_block", torch.linalg.qr(block.to(device=weight.device, dtype=weight.dtype))[0])

    def apply(self, v: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint(self, u: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def operator(self, weight: Tensor) -> ScaledOperator | None:
        """``K_W`` on blocks of vectors for the subspace iteration, or ``None`` (the default):
        the plain power iteration."""
        return None

    def _block_vectors(self, op: ScaledOperator, weight: Tensor, block: Tensor) -> tuple[Tensor, Tensor]:
        """The singular vectors ``u, v`` of ``K_W`` from the block's first column."""
        x = block[:, 0]
        v = _normalize(self.adjoint(x.view_as(self._u), weight)) if op.transposed else x.view_as(self._v)
        return _normalize(self.apply(v, weight)), v

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        if "_block" in self._buffers:  # a state saved without the block keeps the current one
            state_dict.setdefault(prefix + "_block", self._block)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def power_steps(self, weight: Tensor, u: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """``steps`` (>= 1) power steps for ``weight`` from ``u``: the new ``u``, ``v`` and
        ``K_W v`` (whose norm is the estimate of ``σ``).  No host read."""
        for _ in range(steps):
            v = _normalize(self.adjoint(u, weight))
            kv = self.apply(v, weight)
            u = _normalize(kv)
        return u, v, kv

    @torch.no_grad()
    def power_iterate_(self, weight: Tensor, max_iter: int | None = None, tol: float | None = None) -> int:
        """Run the power iteration for ``weight`` to ``tol`` (at most ``max_iter`` steps),
        warm-started from the stored vectors; returns the number of steps taken."""
        max_iter = self.max_iter if max_iter is None else max_iter
        tol = self.tol if tol is None else tol
        weight = weight.detach()
        op = self.operator(weight)
        if op is not None:
            block, _, steps = top_singular_subspace(op, self._block, tol=tol, max_iter=max_iter)
            u, v = self._block_vectors(op, weight, block)
            self._block.copy_(block)
            self._u.copy_(u)
            self._v.copy_(v)
            return steps
        u, v = self._u, self._v
        previous, steps = -math.inf, 0
        while steps < max_iter:
            chunk = min(_CHECK_EVERY, max_iter - steps)
            u, v, kv = self.power_steps(weight, u, chunk)
            steps += chunk
            sigma = float(torch.linalg.vector_norm(kv))
            if not math.isfinite(sigma):
                raise NonFiniteError(f"{type(self).__name__}: the weight contains NaN or Inf")
            if sigma - previous <= tol * sigma:
                break
            previous = sigma
        if steps:
            self._u.copy_(u)
            self._v.copy_(v)
        return steps

    def traced_updates(self, weight: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The traced refresh's iteration from the stored vectors, with no stopping test:
        ``_TRACED_SUBSPACE_STEPS`` subspace steps (when :meth:`operator` gives ``K_W``), else
        ``_CHECK_EVERY`` power steps.  Returns ``(buffer, new value)`` pairs."""
        op = self.operator(weight)
        if op is not None:
            block, _ = subspace_steps(op, self._block, _TRACED_SUBSPACE_STEPS)
            u, v = self._block_vectors(op, weight, block)
            return [(self._block, block), (self._u, u), (self._v, v)]
        u, v, _ = self.power_steps(weight, self._u, _CHECK_EVERY)
        return [(self._u, u), (self._v, v)]

    def refresh_(self, weight: Tensor) -> int:
        return self.power_iterate_(weight)

    def estimate(self, weight: Tensor) -> Tensor:
        """``σ̂ = uᵀ K_W v`` (a lower bound on ``‖K_W‖₂``, tight once converged), differentiable
        in ``W`` with ``u, v`` held fixed (the exact gradient of ``σ`` at convergence)."""
        return torch.sum(self._u.clone() * self.apply(self._v.clone(), weight))
