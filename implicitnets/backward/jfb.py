"""The Jacobian-free backward (JFB, one-step gradient)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..options import check_int, check_real
from ..solvers import SolverStats
from ..state import State, map_parts, pack, parts
from ..transforms import transforms_active
from .base import BackwardMode, Problem
from .implicit import FixedPoint, make_spec

__all__ = ["JacobianFree"]


@dataclass(frozen=True)
class JacobianFree(BackwardMode):
    """Jacobian-free backward (Fung et al. 2022) and its K-step form, the phantom gradient
    (Geng et al. 2021): solve without autograd, then take ``steps`` differentiable damped steps
    from the solution,

        w₀ = w*,   w_{j+1} = (1 − λ) w_j + λ Φ(w_j, x),   j < K,

    and let the gradient flow through them alone.  With ``K = 1, λ = 1`` (the default) that is
    one step ``fz = Φ(w*, x)``, i.e. ``v = ∇E`` instead of ``(I − Jᵀ)⁻¹∇E``; more steps
    approach the implicit gradient as ``(1 − λ + λJ)ᵀ`` is raised to higher powers (a damped,
    truncated Neumann series, the truncated ITD from ``w*``).  The output has the value of the
    solver's ``w*`` (like every backward mode) and the graph of ``w_K``.  Composes with
    ``torch.func`` transforms (the solve then runs on the transforms' plain tensors).

    Its derivatives of every order are those of the K steps ``θ ↦ w_K(θ)`` from ``w*`` held
    constant: an approximation by definition, not the derivatives of ``w*(θ)``.

    Args:
        steps: Keyword only.  The number K of differentiable steps, an int >= 1.
        damping: Keyword only.  The damping λ of the steps, in ``(0, 1]``.

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    steps: int = field(default=1, kw_only=True)
    damping: float = field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        check_int("JacobianFree", "steps", self.steps)
        check_real("JacobianFree", "damping", self.damping, low=0, high=1, low_open=True)

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
        fz, lam = map_parts(torch.Tensor.detach, z), self.damping
        for _ in range(self.steps):
            step = problem.step(fz, problem.u)
            fz = step if lam == 1.0 else map_parts(lambda w, s: w + lam * (s - w), fz, step)
        return map_parts(lambda a, b: a.detach().to(b.dtype) + (b - b.detach()), z, fz), stats
