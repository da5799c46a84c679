"""implicitnets: deep equilibrium models, implicit layers and hypergradients in PyTorch.

A layer solves ``w = Φ(w, x; θ)``; the backward mode decides how gradients flow: ITD
(through the solver's iterations), AID (an adjoint linear solve with FixedPoint, CG,
NormalCG, GMRES or Exact) or the Jacobian-free one-step gradient.
"""

from . import diagnostics, hypergrad, linear, maps, parametrizations
from .backward import AID, ITD, JacobianFree
from .errors import ConvergenceError, ConvergenceWarning, NonFiniteError
from .failure import FallbackITD, FallbackJacobianFree, Raise, Warn
from .layer import FixedPointLayer, fixed_point
from .parametrizations import conv_spectral_norm, project_spectral_, spectral_norm
from .solvers import Anderson, FixedPointIteration, SolverStats

__all__ = [
    "fixed_point",
    "FixedPointLayer",
    "FixedPointIteration",
    "Anderson",
    "SolverStats",
    "ITD",
    "AID",
    "JacobianFree",
    "Warn",
    "Raise",
    "FallbackITD",
    "FallbackJacobianFree",
    "spectral_norm",
    "project_spectral_",
    "conv_spectral_norm",
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
