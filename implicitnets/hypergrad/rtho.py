"""Real-time hyperparameter optimisation (RTHO, Franceschi et al. 2017).

One inner run, never restarted; the forward-mode tangent ``Z_t = A_t Z_{t−1} + B_t`` is
propagated alongside it (as in :class:`ForwardITD`).  Each call advances the run by
``period`` steps under the current λ and returns the current estimate
``∇₂E(w_t, λ) + Z_tᵀ ∇₁E(w_t, λ)``; the next call continues ``w`` and ``Z`` under the
updated λ.  With :func:`optimize` (a hyper-step after every call) the whole optimisation
costs about one inner run; memory O(m·d).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ._state import as_hparams, check_steps
from .base import Bilevel, Hypergradient, HypergradientMethod, Start, split_start
from .forward_itd import forward_mode, zero_tangents

__all__ = ["RTHO"]


@dataclass(frozen=True)
class RTHO(HypergradientMethod):
    """Real-time HO: ``period`` inner steps per call, the tangents carried across calls.

    A call from a plain state starts the run (``Z = 0``); a call from the previous
    :class:`Hypergradient` continues it.  From a plain state, one call equals
    ``ForwardITD(period)``.

    Args:
        period: Inner steps per call, an int >= 1.
        vectorize: Push the tangent directions through Φ with ``vmap`` (``False``: a loop).

    Raises:
        ValueError: ``period`` is not an int >= 1 or ``vectorize`` is not a bool.
    """

    period: int
    vectorize: bool = True

    def __post_init__(self) -> None:
        check_steps("RTHO", "period", self.period, minimum=1)
        if not isinstance(self.vectorize, bool):
            raise ValueError(f"RTHO: vectorize must be a bool, got {self.vectorize!r}")

    def hypergradient(self, problem: Bilevel, hparams: Tensor | Sequence[Tensor], start: Start) -> Hypergradient:
        """Advance the run by ``period`` steps and return the current hypergradient.

        Args:
            problem: The :class:`Bilevel` problem.
            hparams: The hyperparameters λ, a tensor or a sequence of tensors.
            start: The inner state ``w₀`` (starts the run) or the previous call's
                :class:`Hypergradient` (continues it).

        Returns:
            The :class:`Hypergradient`: one gradient per hyperparameter, shaped like it.

        Raises:
            ValueError: The start's ``carry`` does not hold tangents for these
                hyperparameters and state.
        """
        w, previous = split_start(start)
        hp = tuple(h.detach() for h in as_hparams(hparams))
        Z = None if previous is None else previous.carry
        if Z is not None:
            want = [tuple(z.shape) for z in zero_tangents(w, hp)]
            if not isinstance(Z, tuple) or [tuple(c.shape) for c in Z] != want:
                raise ValueError("RTHO: the start's carry is not RTHO tangents for these hyperparameters and state")
        return forward_mode(problem, hp, w, Z, self.period, self.vectorize, "RTHO")
