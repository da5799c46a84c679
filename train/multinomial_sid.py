"""Multinomial logistic regression with one L2 weight per pixel on real (Fashion-)MNIST:
stochastic implicit differentiation (SID) versus deterministic AID at equal epochs.

Inner ``L(W, θ) = CE(X_tr W) + ½ Σ_j exp(θ_j) ‖W_j‖²`` (W: 785 × 10 with an unregularised
bias row; θ: 784 log-weights, one per pixel), outer the validation cross-entropy.  Both
methods warm-start the inner weights and the adjoint across outer steps and update θ with
Adam; they differ in how each hypergradient is estimated:

* AID: ``t`` full-batch gradient steps, then ``k`` CG iterations on the adjoint system;
* SID: ``t`` minibatch SGD steps, then ``k`` stochastic fixed-point steps on the adjoint
  system, each on a fresh minibatch.

Cost is counted in epochs of per-sample gradient or Hessian-vector evaluations on the
training set (a full gradient or a full HVP is one epoch; validation passes are free).

    python -m train.multinomial_sid                          # embedded Fashion-MNIST subset (fashion-5k)
    python -m train.multinomial_sid --dataset mnist-5k       # the embedded digits
    python -m train.multinomial_sid --dataset fashion-mnist --n-train 10000 --n-val 10000   # the full set
                                                             # (downloaded by torchvision into runs/data)
    python -m train.multinomial_sid --dataset fashion-mnist --data-root DIR ...   # an existing copy, offline

Data are read by :func:`train.data.load` (see :mod:`train.data` for the folder layouts); a
missing or corrupt file is an error naming it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import implicitnets as inn
from implicitnets import hypergrad as hg
from train import data
from train.atomic import pyplot, write_csv, write_png
from train.cli import make_hypergradient
from train.config import parse_config


@dataclass
class Config:
    out: str = "runs/multinomial_sid"
    data_root: str = ""  # a folder holding a copy of a full set (read offline; --download fetches it there)
    download: bool = False  # with --data-root: download the full set into it with torchvision
    dataset: str = "fashion-5k"  # fashion-5k | mnist-5k (embedded) | fashion-mnist | mnist (full sets)
    n_train: int = 2500  # training images (taken from the training split)
    n_val: int = 2500  # validation images (the next ones of the training split)
    epochs: float = 100.0  # budget per method
    aid_inner: int = 3  # t (full-batch steps per outer step)
    aid_linear: int = 3  # k (CG iterations per outer step)
    sid_inner: int = 30  # t (minibatch steps per outer step)
    sid_linear: int = 30  # k (stochastic linear steps per outer step)
    sid_step: float = 0.5  # η = γ (constant, warm-started across outer steps)
    batch_size: int = 100
    outer_lr: float = 0.05  # Adam on θ = log λ
    init_lambda: float = 1e-3
    seed: int = 0
    threads: int = 1  # CPU threads for tensor maths (torch.set_num_threads); the matrices are small, one is enough
    dtype: str = "float32"


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_config(Config, argv, prog="python -m train.multinomial_sid", description=__doc__)


def load(cfg: Config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Train/validation split of the training set and the official test set."""
    if cfg.dataset not in data.DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(data.DATASETS)}, got {cfg.dataset!r}")
    loaded = data.load(cfg.dataset, cfg.data_root or None, download=cfg.download)
    n = len(loaded.train)
    if cfg.n_train + cfg.n_val > n:
        raise ValueError(f"{cfg.dataset} has {n} training images < --n-train + --n-val = {cfg.n_train + cfg.n_val}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))  # mnist-5k is sorted by class

    def features(images: torch.Tensor) -> torch.Tensor:
        x = images.reshape(len(images), -1).to(dtype)
        return torch.cat([x, torch.ones(len(x), 1, dtype=dtype)], 1)  # bias feature

    tr, va = perm[: cfg.n_train], perm[cfg.n_train : cfg.n_train + cfg.n_val]
    images, labels = loaded.train.images, loaded.train.labels
    return dict(Xtr=features(images[tr]), ytr=labels[tr], Xval=features(images[va]), yval=labels[va],
                Xtest=features(loaded.test.images), ytest=loaded.test.labels)


def main(cfg: Config) -> dict[str, dict[str, float]]:
    torch.set_num_threads(cfg.threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    D = load(cfg, dtype)
    Xt, yt, Xv, yv, Xs, ys = D["Xtr"], D["ytr"], D["Xval"], D["yval"], D["Xtest"], D["ytest"]
    n, d = Xt.shape
    C = int(yt.max()) + 1
    u = torch.ones(d, dtype=dtype)
    for _ in range(50):  # power iteration: largest eigenvalue of XᵀX/n
        u = Xt.T @ (Xt @ u) / n
        xtx_max, u = float(u.norm()), u / u.norm()

    def inner_loss(W: torch.Tensor, hp: tuple[torch.Tensor, ...], idx: torch.Tensor | None = None) -> torch.Tensor:
        X, y = (Xt, yt) if idx is None else (Xt[idx], yt[idx])
        return F.cross_entropy(X @ W, y) + 0.5 * (hp[0].exp().unsqueeze(1) * W[:-1] ** 2).sum()

    def outer_loss(W: torch.Tensor, hp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.cross_entropy(Xv @ W, yv)

    def evaluate(W: torch.Tensor) -> tuple[float, float, float]:
        with torch.no_grad():
            return (float(outer_loss(W, ())), float(F.cross_entropy(Xs @ W, ys)),
                    float(((Xs @ W).argmax(1) == ys).to(dtype).mean()))

    rows, summary = [], {}
    for method in ("AID", "SID"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        theta = torch.full((d - 1,), float(torch.log(torch.tensor(cfg.init_lambda))), dtype=dtype, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=cfg.outer_lr)
        W, epochs, step = torch.zeros(d, C, dtype=dtype), 0.0, 0
        previous: hg.Hypergradient | torch.Tensor = W  # each call warm-starts w (and v) from the last
        aid = make_hypergradient("aid-cg", cfg.aid_inner, cfg.aid_linear, warm_start=True)
        step_size = hg.DecayingStep(cfg.sid_step)
        sid = hg.SID(cfg.sid_inner, cfg.sid_linear, step_size, step_size)
        start = time.perf_counter()
        while True:
            val, test, acc = evaluate(W)
            rows.append(dict(method=method, outer_step=step, epochs=epochs, val_loss=val, test_loss=test, test_acc=acc,
                             seconds=time.perf_counter() - start))
            if epochs >= cfg.epochs:
                break
            alpha = 1.0 / (0.5 * xtx_max + float(theta.detach().exp().max()))  # 1 / Lipschitz(∇L)
            if method == "AID":
                problem = hg.Bilevel(inn.maps.GradientStep(inner_loss, alpha), outer_loss)
                previous = aid.hypergradient(problem, theta, previous)
                epochs += cfg.aid_inner + cfg.aid_linear
            else:
                def phi_batch(W_: torch.Tensor, hp: tuple[torch.Tensor, ...], idx: torch.Tensor,
                              alpha: float = alpha) -> torch.Tensor:
                    return inn.maps.GradientStep(lambda w, h: inner_loss(w, h, idx), alpha)(W_, hp)

                sample = lambda gen=gen: torch.randint(0, n, (cfg.batch_size,), generator=gen)
                previous = sid.hypergradient(hg.Bilevel(phi_batch, outer_loss, sample), theta, previous)
                epochs += (cfg.sid_inner + cfg.sid_linear + 1) * cfg.batch_size / n
            (g,), W = previous.grads, previous.w
            opt.zero_grad(set_to_none=True)
            theta.grad = g  # the training loop, not the library, owns .grad
            opt.step()
            step += 1
        first = next(r for r in rows if r["method"] == method)
        summary[method] = dict(val_loss=rows[-1]["val_loss"], test_loss=rows[-1]["test_loss"],
                               test_acc=rows[-1]["test_acc"], outer_steps=step, epochs=epochs,
                               seconds=time.perf_counter() - start, initial_val_loss=first["val_loss"])
        shown = (f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary[method].items())
        print(f"{method}: " + "  ".join(shown))

    write_csv(os.path.join(cfg.out, "multinomial_sid.csv"), rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for method in ("AID", "SID"):
        pts = [r for r in rows if r["method"] == method]
        axes[0].plot([r["epochs"] for r in pts], [r["val_loss"] for r in pts], label=method)
        axes[1].plot([r["epochs"] for r in pts], [100 * r["test_acc"] for r in pts], label=method)
    axes[0].set_ylabel("validation cross-entropy")
    axes[1].set_ylabel("test accuracy (%)")
    for ax in axes:
        ax.set_xlabel("epochs (gradient + HVP evaluations / n_train)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{cfg.dataset}: per-pixel L2 weights, n_train = {cfg.n_train}, n_val = {cfg.n_val}")
    fig.tight_layout()
    write_png(fig, os.path.join(cfg.out, "multinomial_sid.png"))
    return summary


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, data.DataError) as err:  # a bad option or data file: one clear line
        sys.exit(f"error: {err}")
