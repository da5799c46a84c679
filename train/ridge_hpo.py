"""Ridge regression with one L2 weight per feature, tuned by hypergradient descent.

Synthetic data with a sparse ground truth (only ``informative`` of the ``p`` features
matter), n_tr = n_val = 500, p = 100.  Inner ``L(w, λ) = ‖Xw − y‖²/2n + ½Σ exp(θᵢ) wᵢ²``
(λ = exp θ keeps the weights positive), outer the validation mean squared error / 2.
Each outer step runs ``t`` warm-started gradient steps (step 1/L) and one hypergradient by
the chosen method; θ is updated by Adam.  Methods: ``exact`` (closed form), ``aid-cg``,
``aid-fp``, ``aid-gmres`` (k iterations), ``itd`` (reverse mode through the t steps),
``hoag`` (summable tolerances).  The tuned model is compared on a held-out test set with
the best single λ from a validation grid.

    python -m train.ridge_hpo --out runs/ridge_hpo
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

import implicitnets as inn
from implicitnets import hypergrad as hg
from train.atomic import pyplot, write_csv, write_png
from train.cli import make_hypergradient, make_linear_solver, run
from train.config import parse_config


@dataclass
class Config:
    out: str = "runs/ridge_hpo"
    methods: str = "exact,aid-cg,aid-fp,itd,hoag"
    n: int = 500
    p: int = 100
    informative: int = 10
    noise: float = 1.0
    inner_steps: int = 20  # t, warm-started
    linear_steps: int = 20  # k
    outer_steps: int = 200
    outer_lr: float = 0.05  # Adam on θ = log λ
    init_lambda: float = 0.1
    seed: int = 0
    threads: int = 1  # CPU threads for tensor maths (torch.set_num_threads); the matrices are small, one is enough


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_config(Config, argv, prog="python -m train.ridge_hpo", description=__doc__)


def make_data(cfg: Config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    w_true = torch.zeros(cfg.p)
    w_true[: cfg.informative] = torch.randn(cfg.informative, generator=g)
    out = {}
    for split, n in (("tr", cfg.n), ("val", cfg.n), ("test", 2 * cfg.n)):
        X = torch.randn(n, cfg.p, generator=g)
        out["X" + split], out["y" + split] = X, X @ w_true + cfg.noise * torch.randn(n, generator=g)
    return out


def main(cfg: Config) -> dict[str, dict[str, float]]:
    torch.set_num_threads(cfg.threads)
    torch.set_default_dtype(torch.float64)
    D = make_data(cfg)
    Xt, yt, Xv, yv, Xs, ys = D["Xtr"], D["ytr"], D["Xval"], D["yval"], D["Xtest"], D["ytest"]
    E = lambda w, hp: hg.ridge_outer_loss(Xv, yv, w)
    inner = lambda w, hp: hg.ridge_inner_loss(Xt, yt, w, hp[0].exp())
    test_loss = lambda lam: float(hg.ridge_outer_loss(Xs, ys, hg.ridge_solution(Xt, yt, lam)))
    val_loss = lambda lam: float(hg.ridge_outer_loss(Xv, yv, hg.ridge_solution(Xt, yt, lam)))

    grid = 10 ** torch.linspace(-4, 1, 51)
    best = min(grid.tolist(), key=lambda s: val_loss(torch.full((cfg.p,), s)))
    summary = {"single λ (grid)": {"lambda": best, "val": val_loss(torch.full((cfg.p,), best)),
                                   "test": test_loss(torch.full((cfg.p,), best)), "seconds": 0.0}}

    rows = []
    t, k = cfg.inner_steps, cfg.linear_steps
    for method in cfg.methods.split(","):
        theta = torch.full((cfg.p,), float(torch.log(torch.tensor(cfg.init_lambda))), requires_grad=True)
        opt = torch.optim.Adam([theta], lr=cfg.outer_lr)
        if method == "hoag":  # inner and CG solves to ε_k = 0.01 / (k+1)^1.5, warm-started
            hyper = hg.HOAG(make_linear_solver("cg", 200, 1e-10), tolerance=hg.PowerSchedule(1e-2, 1.5))
        elif method in ("itd",) or method.startswith("aid-"):  # t inner steps from the last w, k linear steps
            hyper = make_hypergradient(method, t, k, warm_start=True)
        elif method != "exact":
            raise ValueError(f"--methods: unknown method {method!r}; choose from exact, itd, hoag, aid-fp, aid-cg, "
                             "aid-normalcg, aid-gmres")
        previous: hg.Hypergradient | torch.Tensor = torch.zeros(cfg.p)  # each call warm-starts from the last
        start = time.perf_counter()
        for step in range(cfg.outer_steps + 1):
            lam = theta.detach().exp()
            rows.append(dict(method=method, step=step, val=val_loss(lam), test=test_loss(lam)))
            if step == cfg.outer_steps:
                break
            if method == "exact":
                g = hg.ridge_hypergradient(Xt, yt, Xv, yv, lam) * lam  # chain rule through λ = exp θ
            else:
                problem = hg.Bilevel(inn.maps.GradientStep(inner, 1.0 / hg.ridge_lipschitz(Xt, lam)), E)
                previous = hyper.hypergradient(problem, theta, previous)
                (g,) = previous.grads
            opt.zero_grad(set_to_none=True)
            theta.grad = g  # the training loop, not the library, owns .grad
            opt.step()
        lam = theta.detach().exp()
        summary[method] = {"lambda": float(lam.median()), "val": val_loss(lam), "test": test_loss(lam),
                           "seconds": time.perf_counter() - start}

    write_csv(os.path.join(cfg.out, "ridge_hpo.csv"), rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for method in cfg.methods.split(","):
        pts = [r for r in rows if r["method"] == method]
        axes[0].plot([r["step"] for r in pts], [r["val"] for r in pts], label=method)
        axes[1].plot([r["step"] for r in pts], [r["test"] for r in pts], label=method)
    for ax, key in zip(axes, ("val", "test")):
        ax.axhline(summary["single λ (grid)"][key], color="k", ls="--", lw=0.8, label="best single λ")
        ax.set_xlabel("outer step")
        ax.set_ylabel(f"{key} loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"ridge, per-feature λ: n = {cfg.n}, p = {cfg.p}, {cfg.informative} informative features")
    fig.tight_layout()
    write_png(fig, os.path.join(cfg.out, "ridge_hpo.png"))

    for name, s in summary.items():
        print(f"{name:16s} val {s['val']:.4f}  test {s['test']:.4f}  median λ {s['lambda']:.3g}  ({s['seconds']:.1f}s)")
    return summary


if __name__ == "__main__":
    run(main, parse_args)
