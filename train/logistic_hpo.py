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

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import implicitnets as inn
from implicitnets import hypergrad as hg
from train.atomic import pyplot, write_csv, write_png
from train.cli import make_hypergradient, run
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
    threads: int = 1  # CPU threads for tensor maths (torch.set_num_threads); the matrices are small, one is enough
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


def main(cfg: Config) -> dict[str, float]:
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # saturated logits make denormals: 100x slower on CPU
    dtype = {"float64": torch.float64, "float32": torch.float32}[cfg.dtype]
    Xt, yt, Xv, yv = make_data(cfg, dtype)

    def inner_loss(w: torch.Tensor, hp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(Xt @ w, yt) + 0.5 * (hp[0] * w * w).sum()

    def outer_loss(w: torch.Tensor, hp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(Xv @ w, yv)

    problem = hg.Bilevel(inn.maps.GradientStep(inner_loss, cfg.inner_lr), outer_loss)
    method = make_hypergradient(cfg.method, cfg.inner_steps)
    lam = torch.ones(cfg.d, dtype=dtype, requires_grad=True)
    if cfg.outer_optimizer not in ("sgd", "adam"):
        raise ValueError(f"--outer-optimizer must be sgd or adam, got {cfg.outer_optimizer!r}")
    opt_cls = torch.optim.SGD if cfg.outer_optimizer == "sgd" else torch.optim.Adam
    opt = opt_cls([lam], lr=cfg.outer_lr)
    w0 = torch.zeros(cfg.d, dtype=dtype)

    rows, reached, start = [], None, time.perf_counter()
    for step in range(cfg.outer_steps + 1):
        result = method.hypergradient(problem, (lam,), w0)  # T inner steps from w0, then ∇f(λ)
        w_T = result.w
        with torch.no_grad():
            val = float(outer_loss(w_T, (lam,)))
            acc = float(((Xv @ w_T > 0).to(dtype) == yv).to(dtype).mean())
        rows.append(dict(outer_step=step, val_loss=val, val_acc=acc, lam_min=float(lam.detach().min()),
                         lam_max=float(lam.detach().max())))
        if reached is None and val <= cfg.target:
            reached = step
        if step % 100 == 0:
            print(f"step {step:5d}  val loss {val:.4f}  val acc {acc:.3f}  "
                  f"λ∈[{rows[-1]['lam_min']:.3f}, {rows[-1]['lam_max']:.3f}]")
        if step == cfg.outer_steps:
            break
        opt.zero_grad(set_to_none=True)
        (lam.grad,) = result.grads  # the training loop, not the library, owns .grad
        opt.step()
        if cfg.nonnegative:
            with torch.no_grad():
                lam.clamp_(min=0.0)
    seconds = time.perf_counter() - start

    write_csv(os.path.join(cfg.out, f"logistic_hpo_{cfg.method}.csv"), rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["outer_step"] for r in rows], [r["val_loss"] for r in rows], label=f"{cfg.method}, T={cfg.inner_steps}")
    ax.axhline(cfg.target, color="k", ls="--", lw=0.8, label=f"target {cfg.target}")
    ax.set(xlabel="outer step", ylabel="validation loss", title=f"logistic HPO, n={cfg.n}, d={cfg.d}")
    ax.legend()
    fig.tight_layout()
    write_png(fig, os.path.join(cfg.out, f"logistic_hpo_{cfg.method}.png"), dpi=110)

    summary = {"initial_val": rows[0]["val_loss"], "final_val": rows[-1]["val_loss"],
               "best_val": min(r["val_loss"] for r in rows),
               "reached_target_at": -1 if reached is None else reached, "seconds": seconds}
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    run(main, parse_args)
