"""Logistic regression with one L2 weight per feature, tuned by hypergradient descent.

The hypertorch example's setting: synthetic n = 1000, d = 20 (labels from a random linear
oracle plus noise), half held out for validation; inner problem
``L(w, λ) = BCE(X_tr w, y_tr) + ½ Σ λᵢ wᵢ²`` solved by T = 100 steps of gradient descent
(lr 0.1) from w = 0; outer objective the validation BCE.  The hypergradient of the
T-step problem is computed by reverse ITD (default), forward ITD, or AID (CG / FP / GMRES,
at w_T with k = T), and λ is updated by Adam, projected onto λ ≥ 0.

    python -m train.logistic_hpo --out runs/logistic_hpo
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from implicitnets import hypergrad as hg
from implicitnets import linear
from train.atomic import write_atomic
from train.config import parse_config


@dataclass
class Config:
    out: str = "runs/logistic_hpo"
    method: str = "itd"  # itd | forward-itd | aid-cg | aid-fp | aid-gmres
    n: int = 1000
    d: int = 20
    val_fraction: float = 0.5
    inner_lr: float = 0.1
    inner_steps: int = 100  # T
    outer_steps: int = 1000
    outer_optimizer: str = "adam"  # adam | sgd, on λ
    outer_lr: float = 0.01
    nonnegative: int = 1  # 1: project λ onto λ >= 0 after each step (0: unconstrained, as hypertorch)
    target: float = 0.285
    seed: int = 1
    threads: int = 1  # the machine is shared: 2 contended threads can be 100x slower than 1
    dtype: str = "float64"


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_config(Config, argv, prog="python -m train.logistic_hpo", description=__doc__)


def make_data(cfg: Config, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(cfg.seed)
    w_oracle = torch.randn(cfg.d, generator=g, dtype=dtype)
    X = torch.randn(cfg.n, cfg.d, generator=g, dtype=dtype)
    y = ((X @ w_oracle + 0.1 * torch.randn(cfg.n, generator=g, dtype=dtype)) > 0).to(dtype)
    perm = torch.randperm(cfg.n, generator=g)
    n_val = int(round(cfg.val_fraction * cfg.n))
    val, tr = perm[:n_val], perm[n_val:]
    return X[tr], y[tr], X[val], y[val]


def make_method(cfg: Config):
    T = cfg.inner_steps
    methods = {
        "itd": lambda: hg.ReverseITD(T),
        "forward-itd": lambda: hg.ForwardITD(T),
        "aid-cg": lambda: hg.AID(linear.CG(max_iter=T, tol=0.0)),
        "aid-fp": lambda: hg.AID(linear.Neumann(max_iter=T, tol=0.0)),
        "aid-gmres": lambda: hg.AID(linear.GMRES(max_iter=T, tol=0.0)),
    }
    if cfg.method not in methods:
        raise SystemExit(f"--method must be one of {sorted(methods)}, got {cfg.method!r}")
    return methods[cfg.method]()


def main(cfg: Config) -> dict[str, float]:
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # saturated logits make denormals: 100x slower on CPU
    dtype = {"float64": torch.float64, "float32": torch.float32}[cfg.dtype]
    Xt, yt, Xv, yv = make_data(cfg, dtype)

    def inner_loss(w: torch.Tensor, hp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(Xt @ w, yt) + 0.5 * (hp[0] * w * w).sum()

    def outer_loss(w: torch.Tensor, hp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(Xv @ w, yv)

    phi = hg.GradientStep(inner_loss, cfg.inner_lr)
    method = make_method(cfg)
    lam = torch.ones(cfg.d, dtype=dtype, requires_grad=True)
    if cfg.outer_optimizer not in ("sgd", "adam"):
        raise SystemExit(f"--outer-optimizer must be sgd or adam, got {cfg.outer_optimizer!r}")
    opt_cls = torch.optim.SGD if cfg.outer_optimizer == "sgd" else torch.optim.Adam
    opt = opt_cls([lam], lr=cfg.outer_lr)
    w0 = torch.zeros(cfg.d, dtype=dtype)

    rows, reached, start = [], None, time.perf_counter()
    for step in range(cfg.outer_steps + 1):
        w_T = hg.iterate(phi, w0, (lam,), cfg.inner_steps)
        with torch.no_grad():
            val = float(outer_loss(w_T, (lam,)))
            acc = float(((Xv @ w_T > 0).to(dtype) == yv).to(dtype).mean())
        rows.append((step, val, acc, float(lam.detach().min()), float(lam.detach().max())))
        if reached is None and val <= cfg.target:
            reached = step
        if step % 100 == 0:
            print(f"step {step:5d}  val loss {val:.4f}  val acc {acc:.3f}  λ∈[{rows[-1][3]:.3f}, {rows[-1][4]:.3f}]")
        if step == cfg.outer_steps:
            break
        w_arg = w0 if isinstance(method, (hg.ReverseITD, hg.ForwardITD)) else w_T
        (g,) = method(phi, outer_loss, w_arg, (lam,))
        opt.zero_grad(set_to_none=True)
        lam.grad = g  # the training loop, not the library, owns .grad
        opt.step()
        if cfg.nonnegative:
            with torch.no_grad():
                lam.clamp_(min=0.0)
    seconds = time.perf_counter() - start

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["outer_step", "val_loss", "val_acc", "lam_min", "lam_max"])
    writer.writerows(rows)
    write_atomic(os.path.join(cfg.out, f"logistic_hpo_{cfg.method}.csv"), buf.getvalue().encode())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], label=f"{cfg.method}, T={cfg.inner_steps}")
    ax.axhline(cfg.target, color="k", ls="--", lw=0.8, label=f"target {cfg.target}")
    ax.set_xlabel("outer step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"logistic HPO, n={cfg.n}, d={cfg.d}")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_atomic(os.path.join(cfg.out, f"logistic_hpo_{cfg.method}.png"), png.getvalue())

    summary = {"initial_val": rows[0][1], "final_val": rows[-1][1], "best_val": min(r[1] for r in rows),
               "reached_target_at": -1 if reached is None else reached, "seconds": seconds}
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    main(parse_args())
