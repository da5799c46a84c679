"""Forward solvers for ``z = g(z)``: the :class:`ForwardSolver` protocol and the built-ins.

:class:`FixedPointIteration` (damped Picard), :class:`Anderson` and :class:`Broyden` stop on
the relative residual ``‖g(z) − z‖ / ‖g(z)‖`` of the whole batch; ``tol = 0`` runs exactly
``max_iter`` map evaluations (the ``t`` of the paper).  All three report per-sample
residuals and can freeze converged samples (``freeze_converged``) or return each sample's
best iterate (``return_best``).  Any subclass of :class:`ForwardSolver` works wherever these
do.
"""

from .anderson import Anderson
from .base import ForwardSolver, SolverStats
from .broyden import Broyden
from .fixed_point import FixedPointIteration

__all__ = ["ForwardSolver", "SolverStats", "FixedPointIteration", "Anderson", "Broyden"]
