"""Command-line strings → library objects: the only place in the project where a name such as
``"aid-gmres"``, ``"anderson"`` or ``"adam"`` becomes a solver, backward mode or optimiser.

Every ``train/`` script and every benchmark builds its solvers here, so a renamed class is
changed in this file and nowhere else.

    make_solver("anderson", max_iter=20, tol=1e-4)    # forward solver of w = Φ(w, x)
    make_backward("aid-gmres", k=20)                  # AID with 20 GMRES steps on (I − Jᵀ) v = ∇E
    make_linear_solver("cg", max_iter=20)             # a solver of the adjoint system alone
    make_optimizer("adam", model.parameters(), 1e-3)  # the training scripts' optimiser
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

import implicitnets as inn
from implicitnets import hypergrad as hg
from implicitnets import linear

__all__ = [
    "SOLVERS", "LINEAR_SOLVERS", "BACKWARDS", "HYPERGRADIENTS",
    "OPTIMIZERS", "FAILURE_POLICIES", "run", "make_solver", "make_linear_solver", "make_backward", "make_hypergradient",
    "make_optimizer", "make_failure_policy",
]

SOLVERS = ("fp", "anderson", "broyden", "pr", "fb")
LINEAR_SOLVERS = ("fp", "cg", "normalcg", "gmres", "exact")
BACKWARDS = ("itd", "itd:K", "aid-fp", "aid-cg", "aid-normalcg", "aid-gmres", "jfb", "phantom:K[:λ]")
FAILURE_POLICIES = ("warn", "raise", "itd", "jfb")
HYPERGRADIENTS = ("itd", "itd:K", "forward-itd", "aid-fp", "aid-cg", "aid-normalcg", "aid-gmres", "aid-exact", "jfb")

def make_solver(name: str, max_iter: int, tol: float, *, memory: int = 5, alpha: float = 1.0) -> inn.ForwardSolver:
    """``fp``: fixed-point iteration ``w ← Φ(w)``; ``anderson`` / ``broyden``: Anderson
    acceleration / limited-memory Broyden with ``memory`` past iterates; ``pr`` / ``fb``:
    Peaceman–Rachford / forward–backward splitting with step ``alpha`` (monotone maps only).
    All stop after ``max_iter`` steps or at relative residual ``tol``."""
    if name == "fp":
        return inn.FixedPointIteration(max_iter=max_iter, tol=tol)
    if name == "anderson":
        return inn.Anderson(max_iter=max_iter, tol=tol, memory=memory)
    if name == "broyden":
        return inn.Broyden(max_iter=max_iter, tol=tol, memory=memory)
    if name == "pr":
        return inn.PeacemanRachford(max_iter=max_iter, tol=tol, alpha=alpha)
    if name == "fb":
        return inn.ForwardBackward(max_iter=max_iter, tol=tol, alpha=alpha)
    raise ValueError(f"unknown --solver {name!r}; choose one of {', '.join(SOLVERS)}")


def make_linear_solver(name: str, max_iter: int, tol: float = 0.0) -> linear.LinearSolver:
    """A solver of ``(I − Jᵀ) v = g``: ``fp`` (Neumann series ``v ← Jᵀ v + g``), ``cg`` (needs a
    symmetric J), ``normalcg`` (CG on the normal equations), ``gmres`` (one Krylov space of up
    to ``max_iter`` vectors, no restart within the budget), ``exact`` (dense solve; ``max_iter``
    and ``tol`` unused)."""
    if name == "fp":
        return linear.Neumann(max_iter=max_iter, tol=tol)
    if name == "cg":
        return linear.CG(max_iter=max_iter, tol=tol)
    if name == "normalcg":
        return linear.NormalCG(max_iter=max_iter, tol=tol)
    if name == "gmres":
        return linear.GMRES(max_iter=max_iter, tol=tol, restart=max(1, max_iter))
    if name == "exact":
        return linear.Exact()
    raise ValueError(f"unknown linear solver {name!r}; choose one of {', '.join(LINEAR_SOLVERS)}")


def make_failure_policy(name: str) -> inn.FailurePolicy:
    """What a failed adjoint solve does: ``warn`` (keep the approximate solution), ``raise``
    (``ConvergenceError``), ``itd`` (recompute the forward solve with autograd and use its ITD
    gradient), ``jfb`` (use the Jacobian-free gradient ``v = ∇E``)."""
    if name == "warn":
        return inn.Warn()
    if name == "raise":
        return inn.Raise()
    if name == "itd":
        return inn.FallbackITD()
    if name == "jfb":
        return inn.FallbackJacobianFree()
    raise ValueError(f"unknown --on-failure {name!r}; choose one of {', '.join(FAILURE_POLICIES)}")


def make_backward(spec: str, k: int, tol: float = 0.0, *, warm_start: bool = False,
                  on_failure: str = "warn") -> inn.BackwardMode:
    """``itd`` (reverse mode through every forward step), ``itd:K`` (the last K steps),
    ``aid-<linear solver>`` (k iterations of that solver, see :func:`make_linear_solver`;
    ``warm_start``: from the previous adjoint solution; ``on_failure``: see
    :func:`make_failure_policy`, checked whatever the mode), ``jfb`` (Jacobian-free: ``v = ∇E``),
    ``phantom:K[:λ]`` (the phantom gradient: K differentiable steps damped by λ, default 1, from w*)."""
    policy = make_failure_policy(on_failure)
    if spec == "itd":
        return inn.ITD()
    if spec.startswith("itd:"):
        try:
            return inn.ITD(truncate=int(spec[4:]))
        except ValueError as err:
            raise ValueError(f"--backward itd:K needs an integer K >= 1, got {spec!r}") from err
    if spec == "jfb":
        return inn.JacobianFree()
    if spec.startswith("phantom:"):
        steps, _, damping = spec[8:].partition(":")
        try:
            return inn.JacobianFree(steps=int(steps), damping=float(damping or 1.0))
        except ValueError as err:
            raise ValueError(f"--backward phantom:K[:λ] needs an integer K >= 1 and 0 < λ <= 1, got {spec!r}") from err
    if spec.startswith("aid-") and spec[4:] in LINEAR_SOLVERS:
        return inn.AID(make_linear_solver(spec[4:], k, tol), warm_start=warm_start, on_failure=policy)
    raise ValueError(f"unknown --backward {spec!r}; choose one of {', '.join(BACKWARDS)}")


def make_hypergradient(spec: str, steps: int, k: int | None = None, *, warm_start: bool = False
                       ) -> hg.HypergradientMethod:
    """A bilevel hypergradient method over ``steps`` inner steps ``w ← Φ(w, λ)``: ``forward-itd``
    (forward mode through them) or any backward mode of :func:`make_backward` (``itd``,
    ``itd:K``, ``aid-<linear solver>`` with ``k`` iterations at the last inner iterate, default
    ``k = steps``, warm-started from the previous result's adjoint with ``warm_start``, ``jfb``)
    through the core's fixed-point machinery."""
    if spec == "forward-itd":
        return hg.ForwardITD(steps)
    try:
        backward = make_backward(spec, steps if k is None else k, warm_start=warm_start)
    except ValueError as err:
        raise ValueError(f"unknown --method {spec!r}; choose one of {', '.join(HYPERGRADIENTS)}") from err
    return hg.Backprop(inn.FixedPointIteration(max_iter=steps, tol=0.0), backward)


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(
    name: str, params: Iterable[Tensor], lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``adam`` (``momentum`` unused) or ``sgd`` with heavy-ball ``momentum``; both add
    ``weight_decay · θ`` to the gradient."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def run(main: Callable[[Any], Any], parse_args: Callable[[], Any]) -> None:
    """A script's entry point: ``main(parse_args())``, a bad option reported in one line."""
    try:
        main(parse_args())
    except ValueError as err:
        sys.exit(f"error: {err}")
