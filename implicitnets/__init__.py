"""implicitnets: deep equilibrium models, implicit layers and hypergradients in PyTorch.

A layer solves ``w = Φ(w, x; θ)``; the backward mode decides how gradients flow: ITD
(through the solver's iterations), AID (an adjoint linear solve with Neumann, CG,
NormalCG, GMRES or Exact) or the Jacobian-free one-step gradient.  Monotone maps
(:class:`maps.MonotoneMap`, monDEQ) have a unique equilibrium without a contraction; the
splitting solvers :class:`ForwardBackward` and :class:`PeacemanRachford` find it.  Forward solvers,
linear solvers, backward modes and failure policies are open: subclass
:class:`ForwardSolver`, :class:`linear.LinearSolver`, :class:`BackwardMode` or
:class:`FailurePolicy`.
"""

from . import diagnostics, hypergrad, linear, maps, parametrizations
from .backward import AID, ITD, BackwardMode, JacobianFree, Problem
from .backward_stats import BackwardStats
from .bound_map import BoundMap
from .compiled import Compile
from .errors import ConvergenceError, ConvergenceWarning, NonFiniteError
from .failure import AdjointFailure, FailurePolicy, FallbackITD, FallbackJacobianFree, Raise, Resolution, Warn
from .layer import FixedPointLayer, fixed_point
from .operator import FunctionOperator, GraphJacobian, IdentityMinus, LinearOperator, Transposed
from .parametrizations import conv_circulant_norm, conv_spectral_norm, project_spectral_, spectral_norm
from .solvers import (
    Anderson,
    Broyden,
    FixedPointIteration,
    ForwardBackward,
    ForwardSolver,
    IterativeSolver,
    PeacemanRachford,
    SolverStats,
)
from .warm_start import SampleCache

__all__ = [
    "fixed_point",
    "FixedPointLayer",
    "SampleCache",
    "ForwardSolver",
    "IterativeSolver",
    "BoundMap",
    "FixedPointIteration",
    "Anderson",
    "Broyden",
    "ForwardBackward",
    "PeacemanRachford",
    "SolverStats",
    "Compile",
    "BackwardStats",
    "BackwardMode",
    "Problem",
    "ITD",
    "AID",
    "JacobianFree",
    "FailurePolicy",
    "AdjointFailure",
    "Resolution",
    "Warn",
    "Raise",
    "FallbackITD",
    "FallbackJacobianFree",
    "LinearOperator",
    "GraphJacobian",
    "IdentityMinus",
    "Transposed",
    "FunctionOperator",
    "spectral_norm",
    "project_spectral_",
    "conv_spectral_norm",
    "conv_circulant_norm",
    "ConvergenceWarning",
    "ConvergenceError",
    "NonFiniteError",
    "linear",
    "diagnostics",
    "hypergrad",
    "maps",
    "parametrizations",
]
__version__ = "0.1.0"
