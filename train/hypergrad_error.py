"""The paper's synthetic figure: hypergradient error versus t = k (Grazzi et al. 2020).

For ridge regression (closed-form ∇f) and binary logistic regression (reference from a
tightly solved inner problem and a dense implicit solve), both with one L2 weight per
feature and the gradient-step inner map with step 1/L, measure the relative error
‖ĝ − ∇f‖ / ‖∇f‖ of

* ITD (reverse mode through t inner steps from w₀ = 0), and
* AID-FP, AID-CG, AID-GMRES (t inner steps, then k linear-solver iterations),

with t = k; and, second panel row, the variant with the inner problem solved exactly and k
varied.  Mean and spread (min–max) over random λ.  Writes ``hypergrad_error.csv`` and
``hypergrad_error.png`` under ``--out``.

    python -m train.hypergrad_error --out runs/hypergrad_error
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import implicitnets as inn
from implicitnets import hypergrad as hg
from train.atomic import pyplot, write_csv, write_png
from train.cli import make_hypergradient
from train.config import parse_config


@dataclass
class Config:
    out: str = "runs/hypergrad_error"
    n: int = 500  # training = validation size
    p: int = 100  # features
    ks: str = "1,2,3,5,7,10,15,20,30,40,50,70,100"  # values of t = k (and of k, exact inner)
    n_lambda: int = 5  # random λ draws
    seed: int = 0
    threads: int = 1  # CPU threads for tensor maths (torch.set_num_threads); the matrices are small, one is enough


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_config(Config, argv, prog="python -m train.hypergrad_error", description=__doc__)


def ridge_problem(cfg: Config, lam: torch.Tensor, g: torch.Generator):
    """Inner ‖Xw − y‖²/2n + ½Σλᵢwᵢ², outer ‖X_val w − y_val‖²/2n; exact ∇f in closed form."""
    w_true = torch.randn(cfg.p, generator=g)
    X, Xv = torch.randn(cfg.n, cfg.p, generator=g), torch.randn(cfg.n, cfg.p, generator=g)
    y, yv = X @ w_true + torch.randn(cfg.n, generator=g), Xv @ w_true + torch.randn(cfg.n, generator=g)
    phi = inn.maps.GradientStep(lambda w, hp: hg.ridge_inner_loss(X, y, w, hp[0]), 1.0 / hg.ridge_lipschitz(X, lam))
    problem = hg.Bilevel(phi, lambda w, hp: hg.ridge_outer_loss(Xv, yv, w))
    return problem, hg.ridge_solution(X, y, lam), hg.ridge_hypergradient(X, y, Xv, yv, lam)


def logistic_problem(cfg: Config, lam: torch.Tensor, g: torch.Generator):
    """Inner mean BCE + ½Σλᵢwᵢ², outer validation BCE; w* by Newton, ∇f by a dense solve."""
    w_o = torch.randn(cfg.p, generator=g)
    X, Xv = torch.randn(cfg.n, cfg.p, generator=g), torch.randn(cfg.n, cfg.p, generator=g)
    y = ((X @ w_o + 0.1 * torch.randn(cfg.n, generator=g)) > 0).double()
    yv = ((Xv @ w_o + 0.1 * torch.randn(cfg.n, generator=g)) > 0).double()
    inner = lambda w, hp: F.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * (hp[0] * w * w).sum()
    L = 0.25 * float(torch.linalg.eigvalsh(X.T @ X / cfg.n).max()) + float(lam.max())
    problem = hg.Bilevel(inn.maps.GradientStep(inner, 1.0 / L),
                         lambda w, hp: F.binary_cross_entropy_with_logits(Xv @ w, yv))
    w = torch.zeros(cfg.p)
    for _ in range(50):  # Newton on the strongly convex inner loss
        s = torch.sigmoid(X @ w)
        grad = X.T @ (s - y) / cfg.n + lam * w
        H = X.T @ (X * (s * (1 - s)).unsqueeze(1)) / cfg.n + torch.diag(lam)
        w = w - torch.linalg.solve(H, grad)
        if float(grad.norm()) < 1e-14:
            break
    (exact,) = hg.dense_hypergradient(problem, (lam,), w)
    return problem, w, exact


METHODS = {"AID-FP": "aid-fp", "AID-CG": "aid-cg", "AID-GMRES": "aid-gmres"}  # name in the figure → method


def main(cfg: Config) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    torch.set_default_dtype(torch.float64)
    ks = [int(k) for k in cfg.ks.split(",")]
    rows: list[dict] = []
    start = time.perf_counter()
    for problem, build in (("ridge", ridge_problem), ("logistic", logistic_problem)):
        for r in range(cfg.n_lambda):
            g = torch.Generator().manual_seed(cfg.seed + 1000 * r)
            lam = 10 ** (torch.rand(cfg.p, generator=g) * 2 - 2)  # log-uniform in [0.01, 1]
            bilevel, w_star, exact = build(cfg, lam, g)

            def rel(method: hg.HypergradientMethod, start: torch.Tensor, exact: torch.Tensor = exact) -> float:
                (grad,) = method.hypergradient(bilevel, (lam,), start).grads  # noqa: B023 (called in this iteration)
                return float((grad - exact).norm() / exact.norm())

            w0 = torch.zeros(cfg.p)
            for k in ks:  # t = k inner steps from 0; "exact inner": one step from w* (a fixed point)
                rows.append(dict(problem=problem, setting="t=k", method="ITD", k=k, draw=r,
                                 rel_error=rel(make_hypergradient("itd", k), w0)))
                for name, spec in METHODS.items():
                    rows.append(dict(problem=problem, setting="t=k", method=name, k=k, draw=r,
                                     rel_error=rel(make_hypergradient(spec, k), w0)))
                    rows.append(dict(problem=problem, setting="exact inner", method=name, k=k, draw=r,
                                     rel_error=rel(make_hypergradient(spec, 1, k), w_star)))
        print(f"{problem}: done ({time.perf_counter() - start:.1f}s)")

    write_csv(os.path.join(cfg.out, "hypergrad_error.csv"), rows)
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), sharex=True)
    colors = {"ITD": "C0", "AID-FP": "C1", "AID-CG": "C2", "AID-GMRES": "C3"}
    for col, problem in enumerate(("ridge", "logistic")):
        for row, setting in enumerate(("t=k", "exact inner")):
            ax = axes[row, col]
            for method, color in colors.items():
                pts = [r for r in rows if r["problem"] == problem and r["setting"] == setting and r["method"] == method]
                if not pts:
                    continue
                errs = torch.tensor([[r["rel_error"] for r in pts if r["k"] == k] for k in ks]).clamp_min(1e-16)
                mean = errs.log().mean(1).exp()
                ax.plot(ks, mean, color=color, label=method)
                ax.fill_between(ks, errs.min(1).values, errs.max(1).values, color=color, alpha=0.2)
            ax.set_yscale("log")
            ax.set_title(f"{problem}, {'t = k' if setting == 't=k' else 'inner solved exactly'}")
            ax.set_xlabel("t = k" if setting == "t=k" else "k")
            ax.grid(alpha=0.3)
        axes[0, col].set_ylabel("‖ĝ − ∇f‖ / ‖∇f‖") if col == 0 else None
    axes[1, 0].set_ylabel("‖ĝ − ∇f‖ / ‖∇f‖")
    axes[0, 0].legend()
    fig.suptitle(f"hypergradient error, n = {cfg.n}, p = {cfg.p}, {cfg.n_lambda} random λ (geometric mean, min–max)")
    fig.tight_layout()
    write_png(fig, os.path.join(cfg.out, "hypergrad_error.png"))

    for problem in ("ridge", "logistic"):
        for setting in ("t=k", "exact inner"):
            for k in (10, 20, 50, 100):
                if k not in ks:
                    continue
                summary = []
                for method in colors:
                    key = (problem, setting, method, k)
                    errs = [r["rel_error"] for r in rows if (r["problem"], r["setting"], r["method"], r["k"]) == key]
                    if errs:
                        summary.append(f"{method} {sum(errs) / len(errs):.2e}")
                print(f"{problem:8s} {setting:11s} k={k:3d}: " + ", ".join(summary))
    return rows


if __name__ == "__main__":
    main(parse_args())
