"""Forward solvers for ``z = g(z)``: the :class:`ForwardSolver` protocol and the built-ins.

:class:`FixedPointIteration` (damped Picard), :class:`Anderson` and :class:`Broyden` stop on
the relative residual ``‖g(z) − z‖ / ‖g(z)‖`` of the whole batch; ``tol = 0`` runs exactly
``max_iter`` map evaluations (the ``t`` of the paper).  :class:`ForwardBackward` and
:class:`PeacemanRachford` are operator-splitting solvers for monotone maps
(:class:`~implicitnets.maps.MonotoneMap`, monDEQ), whose equilibrium is unique even where
``Φ`` is no contraction; they stop on the same residual of the map (subclass
:class:`SplittingSolver` for another splitting rule).  Every solve reports per-sample
residuals in its :class:`SolverStats`; the built-ins can freeze converged samples
(``freeze_converged``) or return each sample's best iterate (``return_best``).  Any subclass
of :class:`ForwardSolver` works wherever these do.
"""

from .anderson import Anderson
from .base import ForwardSolver, IterativeSolver, SolverStats
from .broyden import Broyden
from .fixed_point import FixedPointIteration
from .forward_backward import ForwardBackward
from .peaceman_rachford import PeacemanRachford
from .splitting import SplittingSolver

__all__ = [
    "ForwardSolver",
    "SolverStats",
    "IterativeSolver",
    "FixedPointIteration",
    "Anderson",
    "Broyden",
    "ForwardBackward",
    "PeacemanRachford",
    "SplittingSolver",
]
