"""The paper's equilibrium map ``w = tanh(A w + B x + c)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..parametrizations.spectral import spectral_norm
from .activation import tanh
from .protocol import Map
from .sizes import check_sizes
from .slope_jacobian import SlopeJacobian

__all__ = ["TanhMap"]


class TanhMap(Map):
    """``Φ(w, x) = tanh(A w + B x + c)`` with ``A`` of shape (width, width).

    tanh is 1-Lipschitz, so Φ(·, x) is a ``contraction``-contraction when ‖A‖₂ ≤
    ``contraction`` < 1; that bound is enforced by :func:`~implicitnets.spectral_norm` on
    ``A.weight`` (power iteration, or the exact largest singular value with ``exact=True``).
    ``contraction=None`` leaves ``A`` free (e.g. to project it after each step with
    :func:`~implicitnets.project_spectral_`).  Inputs are ``(batch, in_features)``.
    :meth:`jacobian` gives AID the closed-form ``J = ∂₁Φ``; :meth:`lipschitz_bound` the
    global ``‖A‖₂``.

    Args:
        in_features: Size of the input ``x``, an int >= 1.
        width: Size of the state ``w``, an int >= 1.
        contraction: The bound γ > 0 on ``‖A‖₂`` (Φ is a contraction for γ < 1), or
            ``None`` for an unconstrained ``A``.
        exact: Keyword only.  Bound the exact largest singular value of ``A`` instead of its
            power-iteration estimate.
        bias: Keyword only.  Whether ``B`` has the bias ``c``.
        device: Keyword only.  Device of the parameters.
        dtype: Keyword only.  Dtype of the parameters.

    Raises:
        ValueError: ``in_features`` or ``width`` is not an int >= 1, or ``contraction`` is
            neither ``None`` nor a finite number > 0.
    """

    #: :meth:`jacobian` reads only values (no graph through ``w``), see :mod:`implicitnets.maps.protocol`
    jacobian_needs_graph = False
    #: each sample's output depends only on its own rows of ``w`` and ``x`` (``vmap`` may solve
    #: the mapped problems as one batch)
    row_separable = True

    def __init__(
        self,
        in_features: int,
        width: int,
        contraction: float | None = 0.9,
        *,
        exact: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes("TanhMap", in_features=in_features, width=width)
        self.in_features, self.width, self.contraction = in_features, width, contraction
        self.A = nn.Linear(width, width, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(in_features, width, bias=bias, device=device, dtype=dtype)
        if contraction is not None:
            spectral_norm(self.A, "weight", bound=contraction, exact=exact)

    def inject(self, x: Tensor) -> Tensor:
        """The input term ``u = B x + c``, computed once per solve.

        Args:
            x: The input, shape (batch, in_features).

        Returns:
            ``u``, shape (batch, width).

        Raises:
            ValueError: ``x`` is not of shape (batch, in_features).
        """
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"TanhMap expects x of shape (batch, {self.in_features}), got {tuple(x.shape)}"
            )
        return self.B(x)

    def step(self, w: Tensor, u: Tensor) -> Tensor:
        """One map evaluation ``tanh(A w + u)``.

        Args:
            w: The state, shape (batch, width).
            u: The input term, shape (batch, width).
        """
        return tanh(torch.addmm(u, w, self.A.weight.t()))

    def forward(self, w: Tensor, x: Tensor) -> Tensor:
        return self.step(w, self.inject(x))

    def initial_state(self, x: Tensor) -> Tensor:
        """``w₀ = 0`` of shape (batch, width).

        Args:
            x: The input, shape (batch, in_features).
        """
        return x.new_zeros(x.shape[0], self.width)

    def jacobian(self, w: Tensor, u: Tensor, out: Tensor) -> SlopeJacobian:
        """``J = ∂₁Φ(w)`` in closed form from ``out = Φ(w, u)``: with ``D = 1 − out²``,
        ``J y = D ⊙ (y Aᵀ)`` and ``Jᵀ v = (D ⊙ v) A`` (rows are samples).  The effective
        weight is captured, detached, when this is called (inside the solve's
        parametrization cache), so later products need no cache.

        Args:
            w: The state at which ``J`` is taken, shape (batch, width).
            u: The input term ``inject(x)``.
            out: ``Φ(w, u)``, whose values alone are read.

        Returns:
            ``J`` as a :class:`~implicitnets.LinearOperator` on vectors shaped like ``w``.
        """
        out = out.detach()
        return _TanhJacobian(self.A.weight.detach(), 1 - out * out)

    def lipschitz_bound(self) -> float:
        """``‖A‖₂`` of the effective weight (exact largest singular value) times Lip(tanh) = 1:
        a global bound of Lip(Φ(·, x)), valid at every ``w`` and ``x``."""
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.A.weight.detach(), ord=2))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, width={self.width}, contraction={self.contraction}"


class _TanhJacobian(SlopeJacobian):
    """``J y = D ⊙ (y Aᵀ)``, ``Jᵀ v = (D ⊙ v) A``; products run in the argument's dtype.

    ``c + α Jᵀ v`` is one ``addmm`` (the Neumann step ``v ← Jᵀ v + g`` and the GMRES
    product ``(I − Jᵀ) q``), ``c + α J y`` one ``addcmul``.
    """

    def mv(self, x: Tensor) -> Tensor:
        weight, slope = self._cast(x.dtype)
        return slope * (x @ weight.t())

    def rmv(self, y: Tensor) -> Tensor:
        weight, slope = self._cast(y.dtype)
        return (slope * y) @ weight

    def mv_add(self, x: Tensor, c: Tensor, alpha: float = 1.0) -> Tensor:
        weight, slope = self._cast(x.dtype)
        return torch.addcmul(c, slope, x @ weight.t(), value=alpha)

    def rmv_add(self, y: Tensor, c: Tensor, alpha: float = 1.0) -> Tensor:
        weight, slope = self._cast(y.dtype)
        return torch.addmm(c, slope * y, weight, alpha=alpha)
