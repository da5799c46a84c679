"""The Jacobian-free backward (JFB, one-step gradient)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..solvers import SolverStats
from ..state import State, map_parts
from .base import BackwardMode, Problem

__all__ = ["JacobianFree"]


@dataclass(frozen=True)
class JacobianFree(BackwardMode):
    """Jacobian-free backward (Fung et al. 2022): solve without autograd, then take one
    differentiable step ``fz = Φ(w*, x)`` and let the gradient flow through it alone, i.e.
    ``v = ∇E`` instead of ``(I − Jᵀ)⁻¹∇E``.  The output has the value of the solver's ``w*``
    (like every backward mode) and the graph of ``fz``.  Composes with ``torch.func``
    transforms."""

    def run(self, problem: Problem) -> tuple[State, SolverStats]:
        with torch.no_grad():
            z, stats = problem.solver.solve(problem.map(), problem.z0)
        if not problem.needs_grad:
            return z, stats
        fz = problem.step(map_parts(torch.Tensor.detach, z), problem.u)
        return map_parts(lambda a, b: a.detach().to(b.dtype) + (b - b.detach()), z, fz), stats
