"""Backward modes: how gradients flow through ``w* = Φ(w*, x; θ)``.

With ``E`` a loss of ``w*`` and ``J = ∂₁Φ(w*)``:

* :class:`ITD` — iterative differentiation: reverse mode through the solver's steps
  (memory O(t·d)); ``truncate=K`` keeps the graph of the last K steps only.
* :class:`AID` — approximate implicit differentiation: solve ``(I − Jᵀ) v = ∇E`` with a
  linear solver from :mod:`implicitnets.linear`, then ``∇θ = ∂₂Φᵀ v`` (memory O(d)).
* :class:`JacobianFree` — one differentiable step at ``w*`` (``v = ∇E``; Fung et al. 2022).

Subclass :class:`BackwardMode` to add your own.
"""

from .adjoint import adjoint_message, solve_adjoint
from .aid import AID
from .base import BackwardMode, Problem
from .itd import ITD
from .jfb import JacobianFree

__all__ = ["BackwardMode", "Problem", "ITD", "AID", "JacobianFree", "solve_adjoint", "adjoint_message"]
