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
    differentiable step ``w = Φ(w*, x)``, i.e. ``v = ∇E`` instead of ``(I − Jᵀ)⁻¹∇E``.
    Composes with ``torch.func`` transforms."""

    def run(self, problem: Problem) -> tuple[State, SolverStats]:
        with torch.no_grad():
            z, stats = problem.solver.solve(problem.map(), problem.z0)
        if not problem.needs_grad:
            return z, stats
        return problem.step(map_parts(torch.Tensor.detach, z), problem.u), stats
