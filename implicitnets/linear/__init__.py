"""Linear solvers for the AID adjoint system ``A v = b`` with ``A = (I − J)ᵀ``.

Every solver has one call shape, ``x, info = solver.solve(op, b, x0=None)``, with ``op`` a
:class:`~implicitnets.LinearOperator` (``op.mv``, ``op.rmv``).  ``tol = 0`` runs exactly
``max_iter`` iterations with no host synchronisation inside the loop (one read of the
final residual; GMRES also one per restart cycle, for its small least-squares problem);
``tol > 0`` synchronises once per iteration for the stopping test.

Which solver when (``J = ∂₁Φ`` at the fixed point):

* :class:`Neumann` — Richardson ``v ← Jᵀ v + b`` (AID-FP, the truncated Neumann series);
  valid when the spectral radius of ``J`` is below 1; error falls like ``‖J‖ᵏ``.
* :class:`CG` — conjugate gradients; valid only for symmetric positive definite ``A``
  (gradient-step maps).  On a non-symmetric ``A`` it returns wrong answers, so it probes
  symmetry and warns (:class:`NonSymmetricWarning`).
* :class:`NormalCG` — CG on ``Aᵀ A x = Aᵀ b``; any non-singular ``A``, squares the
  condition number.
* :class:`GMRES` — restarted GMRES; any non-singular ``A``.
* :class:`Exact` — dense ``torch.linalg.solve``; the reference for small problems.

Subclass :class:`LinearSolver` to add your own.
"""

from .base import LinearInfo, LinearSolver
from .cg import CG, NonSymmetricWarning, NormalCG
from .exact import Exact
from .gmres import GMRES
from .neumann import Neumann

__all__ = ["LinearSolver", "LinearInfo", "Neumann", "CG", "NormalCG", "GMRES", "Exact", "NonSymmetricWarning"]
