"""The statistics of a backward pass, kept apart from the forward solve's."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["BackwardStats"]


@dataclass
class BackwardStats:
    """What the last backward pass through a solve did; filled in by the backward mode
    (AID's adjoint solve), empty (``None``) for modes without one (ITD, JacobianFree).

    ``iterations``, ``residual`` (relative, ``‖b − A v‖ / ‖b‖``) and ``converged`` describe
    the adjoint linear solve, ``fallback`` names the method a failure policy fell back to,
    and ``adjoint`` is the solution ``v`` (detached; a warm start for the next solve).

    Args:
        iterations: Iterations of the adjoint linear solve, or ``None``.
        residual: Its relative residual ``‖b − A v‖ / ‖b‖``, or ``None``.
        converged: Whether it reached its tolerance, or ``None``.
        fallback: Name of the method a failure policy fell back to (``"ITD"``,
            ``"JacobianFree"``), or ``None``.
        adjoint: The detached adjoint solution ``v``, or ``None``.
    """

    iterations: int | None = None
    residual: float | None = None
    converged: bool | None = None
    fallback: str | None = None
    adjoint: Tensor | None = field(default=None, repr=False)
