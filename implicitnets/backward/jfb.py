"""The Jacobian-free backward (JFB, one-step gradient)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..solvers import SolverStats
from ..state import State, map_parts, pack, parts
from ..transforms import transforms_active
from .base import BackwardMode, Problem
from .implicit import FixedPoint, make_spec

__all__ = ["JacobianFree"]


@dataclass(frozen=True)
class JacobianFree(BackwardMode):
    """Jacobian-free backward (Fung et al. 2022): solve without autograd, then take one
    differentiable step ``fz = Φ(w*, x)`` and let the gradient flow through it alone, i.e.
    ``v = ∇E`` instead of ``(I − Jᵀ)⁻¹∇E``.  The output has the value of the solver's ``w*``
    (like every backward mode) and the graph of ``fz``.  Composes with ``torch.func``
    transforms (the solve then runs on the transforms' plain tensors).

    Its derivatives of every order are those of the one step ``θ ↦ Φ(w*, x; θ)`` with ``w*``
    held constant: an approximation by definition, not the derivatives of ``w*(θ)``."""

    def run(self, problem: Problem) -> tuple[State, SolverStats]:
        inputs = (*parts(problem.z0), *parts(problem.u), *problem.params)
        traced = any(transforms_active(t) for t in inputs)
        if traced:
            spec = make_spec(problem, None, None, differentiable=False)
            z = pack(problem.z0, FixedPoint.apply(spec, *inputs))
            stats = spec.stats
        else:
            with torch.no_grad():
                z, stats = problem.solver.solve(problem.map(), problem.z0)
        if not (problem.needs_grad or traced):  # (forward-mode transforms need the step too)
            return z, stats
        fz = problem.step(map_parts(torch.Tensor.detach, z), problem.u)
        return map_parts(lambda a, b: a.detach().to(b.dtype) + (b - b.detach()), z, fz), stats
