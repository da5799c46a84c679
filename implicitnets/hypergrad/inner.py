"""Running the inner dynamics: ``w_t = Φ(w_{t−1}, λ)``, t times, without autograd."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._state import InnerMap, State, as_hparams, check_steps, detach

__all__ = ["iterate"]


def iterate(phi: InnerMap, w0: State, hparams: Tensor | Sequence[Tensor], steps: int) -> State:
    """Return ``w_t = Φ(⋯Φ(w₀, λ)⋯, λ)`` after ``t = steps`` steps, detached (no graph kept).

    This is the inner solve of AID in the paper's analysis (``w_t`` feeds the linear system);
    ITD runs the same recursion with autograd on.
    """
    check_steps("iterate", "steps", steps)
    hp = tuple(h.detach() for h in as_hparams(hparams))
    w = detach(w0)
    with torch.enable_grad():  # maps built on torch.func.grad need it
        for _ in range(steps):
            w = detach(phi(w, hp))
    return w
