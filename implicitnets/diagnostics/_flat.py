"""Flat ``(n, d)`` views of the operator ``J`` shared by the spectral estimates."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..operator import LinearOperator

__all__: list[str] = []


def flat_operators(
    lin: LinearOperator, per_sample: bool
) -> tuple[int, int, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(n, d, matvec, rmatvec)`` acting on ``(n, d)`` matrices, one row per sample.

    With ``per_sample=False`` the whole batch is one vector (``n = 1``); with
    ``per_sample=True`` row ``b`` is sample ``b`` (valid when Φ acts sample-wise, i.e. J is
    block diagonal over the batch).
    """
    shape = lin.like.shape
    if per_sample and len(shape) == 0:
        raise ValueError("per_sample=True needs a state with a batch dimension")
    n = shape[0] if per_sample else 1
    d = (shape.numel() // n) if n else 0

    def matvec(V: Tensor) -> Tensor:
        return lin.mv(V.reshape(shape)).reshape(n, d)

    def rmatvec(V: Tensor) -> Tensor:
        return lin.rmv(V.reshape(shape)).reshape(n, d)

    return n, d, matvec, rmatvec


def random_rows(n: int, d: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``n`` unit rows of dimension ``d`` drawn from a Gaussian."""
    V = torch.randn(n, d, dtype=like.dtype, device=like.device, generator=generator)
    return V / torch.linalg.vector_norm(V, dim=1, keepdim=True).clamp_min(torch.finfo(like.dtype).tiny)
