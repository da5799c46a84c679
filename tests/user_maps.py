"""Maps as a user writes them, for the tests of the library's generic path (no closed form)."""

from __future__ import annotations

import torch
from torch import nn


class UserTanh(nn.Module):
    """``tanh(A w + B x + c)`` as a user writes it: ``inject``/``step``, no closed-form Jacobian.
    ``A`` (width × width, no bias) is rescaled to spectral norm ``norm``."""

    def __init__(self, n_in: int = 5, width: int = 6, *, norm: float = 0.6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.A = nn.Linear(width, width, bias=False, dtype=dtype)
        self.B = nn.Linear(n_in, width, dtype=dtype)
        with torch.no_grad():
            self.A.weight.mul_(norm / torch.linalg.matrix_norm(self.A.weight, 2))

    def inject(self, x):
        return self.B(x)

    def step(self, w, u):
        return torch.tanh(self.A(w) + u)

    def initial_state(self, x):
        return x.new_zeros(x.shape[0], self.A.weight.shape[0])
