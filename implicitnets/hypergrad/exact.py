"""Exact hypergradients: the ridge closed form and a dense implicit reference.

Ridge regression with one L2 weight per feature (the inner loss of the examples):

    L(w, λ) = ‖X w − y‖² / (2n) + ½ Σᵢ λᵢ wᵢ²,    E(w) = ‖X_val w − y_val‖² / (2 n_val),
    w(λ) = H⁻¹ Xᵀy / n,   H = XᵀX / n + diag(λ),
    ∇f(λ) = −w(λ) ⊙ H⁻¹ ∇E(w(λ)),   ∇E(w) = X_valᵀ (X_val w − y_val) / n_val.

The dense reference solves the implicit equation with full Jacobians (small problems only):
``v = (I − ∂₁Φᵀ)⁻¹ ∇₁E``, ``∇f = ∇₂E + ∂₂Φᵀ v`` at the given ``w`` (a tensor or a tuple).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..state import State, parts
from ._state import as_hparams, flat, outer_grads, unflat
from .base import Bilevel

__all__ = [
    "ridge_inner_loss",
    "ridge_outer_loss",
    "ridge_solution",
    "ridge_hypergradient",
    "ridge_lipschitz",
    "dense_hypergradient",
]


def ridge_inner_loss(X: Tensor, y: Tensor, w: Tensor, lam: Tensor) -> Tensor:
    """``‖X w − y‖² / (2n) + ½ Σ λᵢ wᵢ²``.

    Args:
        X: Training features, shape (n, d).
        y: Training targets, shape (n,).
        w: Weights, shape (d,).
        lam: Penalties λ, shape (d,) or a scalar.

    Returns:
        The scalar loss.
    """
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam * w * w).sum()


def ridge_outer_loss(X_val: Tensor, y_val: Tensor, w: Tensor) -> Tensor:
    """``‖X_val w − y_val‖² / (2 n_val)``.

    Args:
        X_val: Validation features, shape (n_val, d).
        y_val: Validation targets, shape (n_val,).
        w: Weights, shape (d,).

    Returns:
        The scalar loss.
    """
    return 0.5 * ((X_val @ w - y_val) ** 2).mean()


def _hessian(X: Tensor, lam: Tensor) -> Tensor:
    return X.T @ X / X.shape[0] + torch.diag(lam.expand(X.shape[1]))


def ridge_solution(X: Tensor, y: Tensor, lam: Tensor) -> Tensor:
    """``w(λ) = (XᵀX/n + diag λ)⁻¹ Xᵀy/n`` (Cholesky).

    Args:
        X: Training features, shape (n, d).
        y: Training targets, shape (n,).
        lam: Penalties λ, shape (d,) or a scalar (one penalty for every feature).

    Returns:
        The minimiser ``w(λ)``, shape (d,).
    """
    chol = torch.linalg.cholesky(_hessian(X, lam))
    return torch.cholesky_solve((X.T @ y / X.shape[0]).unsqueeze(-1), chol).squeeze(-1)


def ridge_lipschitz(X: Tensor, lam: Tensor) -> float:
    """Largest eigenvalue of ``H = XᵀX/n + diag λ`` (the step 1/L makes Φ a contraction).

    Args:
        X: Training features, shape (n, d).
        lam: Penalties λ, shape (d,) or a scalar.

    Returns:
        The largest eigenvalue L, a float.
    """
    return float(torch.linalg.eigvalsh(_hessian(X, lam)).max())


def ridge_hypergradient(X: Tensor, y: Tensor, X_val: Tensor, y_val: Tensor, lam: Tensor) -> Tensor:
    """Closed-form ``∇f(λ) = −w(λ) ⊙ H⁻¹ X_valᵀ(X_val w(λ) − y_val)/n_val`` (shape of ``λ``;
    a scalar λ gets the sum over features).

    Args:
        X: Training features, shape (n, d).
        y: Training targets, shape (n,).
        X_val: Validation features, shape (n_val, d).
        y_val: Validation targets, shape (n_val,).
        lam: Penalties λ, shape (d,) or a single-element tensor.

    Returns:
        ``∇f(λ)``, shaped like ``lam`` (shape (d,) when ``lam`` has d > 1 elements).
    """
    chol = torch.linalg.cholesky(_hessian(X, lam))
    w = torch.cholesky_solve((X.T @ y / X.shape[0]).unsqueeze(-1), chol).squeeze(-1)
    g = X_val.T @ (X_val @ w - y_val) / X_val.shape[0]
    u = torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)
    out = -w * u
    return out.sum().reshape(lam.shape) if lam.numel() == 1 and X.shape[1] != 1 else out


def dense_hypergradient(problem: Bilevel, hparams: Tensor | Sequence[Tensor], w: State) -> tuple[Tensor, ...]:
    """Reference ``∇₂E + ∂₂Φᵀ (I − ∂₁Φᵀ)⁻¹ ∇₁E`` at ``w`` with dense Jacobians
    (``torch.autograd.functional.jacobian``) and ``torch.linalg.solve``.

    Args:
        problem: The :class:`Bilevel` problem (``inner(w, λ)``, no ``sample``).
        hparams: The hyperparameters λ, a tensor or a sequence of tensors.
        w: The inner state at which to differentiate, a tensor or a tuple of tensors.

    Returns:
        ``∇f(λ)``, one tensor per hyperparameter, shaped like it.
    """
    hp = tuple(h.detach() for h in as_hparams(hparams))
    w = tuple(t.detach() for t in parts(w)) if isinstance(w, (tuple, list)) else w.detach()
    w_flat = flat(parts(w)).reshape(-1)

    def phi_flat(v: Tensor, *h: Tensor) -> Tensor:
        return flat(parts(problem.inner(unflat(v, w), tuple(h)))).reshape(-1)

    jac = torch.autograd.functional.jacobian(phi_flat, (w_flat, *hp))
    d = w_flat.numel()
    A = jac[0].reshape(d, d)
    gw, gh = outer_grads(problem.outer, w, hp)
    eye = torch.eye(d, dtype=w_flat.dtype, device=w_flat.device)
    v = torch.linalg.solve((eye - A).T, flat(gw).reshape(d))
    return tuple(g + (jac[1 + i].reshape(d, -1).T @ v).reshape(h.shape) for i, (g, h) in enumerate(zip(gh, hp)))
