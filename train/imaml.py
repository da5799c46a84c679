"""Few-shot classification on Fashion-MNIST by implicit MAML (Rajeswaran et al. 2019).

Each task is N-way K-shot: N classes drawn from a class pool, K support and ``queries``
query images per class, labels permuted.  Meta-parameters θ of a small conv net are learnt so
that a few gradient steps on the *biased-regularised* inner problem

    w(θ) ≈ argmin_w  L_task(w) + (λ/2) ‖w − θ‖²,     L_task = support cross-entropy,

started at w₀ = θ, do well on the query set, ``E(w) = query cross-entropy``.  The inner
map is the gradient step ``Φ(w, θ) = w − α (∇L_task(w) + λ (w − θ))``, whose Jacobian
``∂₁Φ = I − α (∇²L_task + λI)`` is symmetric, and ``∂₂Φ = αλ I``.  Meta-gradients:

* ``imaml-cg`` — AID with CG: ``(∇²L_task + λI) u = ∇E(w)/α``-type adjoint system solved by
  ``linear_steps`` CG iterations, ``∇θ = αλ u = (I + ∇²L_task/λ)⁻¹ ∇E`` (iMAML);
* ``imaml-fp`` — the same adjoint system by ``linear_steps`` fixed-point (Neumann) steps;
* ``fomaml`` — first-order MAML: ``∇θ ≈ ∇E(w)``, no hypergradient;
* ``itd`` — reverse mode through the last ``truncate`` inner steps (truncated ITD; w₀ = θ
  is treated as a constant, as in :mod:`implicitnets.hypergrad`).

The adjoint solve of ``imaml-cg`` / ``imaml-fp`` fails on a task where ``∂₁Φ`` has an
eigenvalue outside (−1, 1) (FP) or ``∇²L_task + λI`` is indefinite (CG); the script counts
these tasks, and ``--on-failure`` chooses what such a task contributes: ``warn`` (the
diverged solution as it is), ``itd`` (backpropagation through all T inner steps instead),
``jfb`` (the Jacobian-free gradient) — the library's failure policies.

Classes are split into disjoint meta-train and meta-test pools (``train_classes`` from the
training images, the others from the test images).  Every method meta-trains from the same
initial θ on the same task sequence and is evaluated on the same ``test_tasks`` tasks;
accuracy is reported with a 95% normal interval (1.96 · std / √tasks).

    python -m train.imaml --quick                  # a few meta-steps, seconds
    python -m train.imaml                          # embedded Fashion-MNIST subset (fashion-5k), writes runs/imaml
    python -m train.imaml --data fashion-mnist     # the full set, downloaded by torchvision into runs/data
    python -m train.imaml --data fashion-mnist --data-root DIR --out train/results/imaml   # the committed results

The default data set, ``fashion-5k``, ships with the project (500 training and 200 test
images per class, see :mod:`train.data`).  ``--data-root DIR`` reads an existing copy of the
full set (``DIR/FashionMNIST/raw`` or ``DIR/fashion-mnist/FashionMNIST/raw``, torchvision's
layout) offline; add ``--download`` to fetch it into ``DIR``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import implicitnets as inn
from implicitnets import hypergrad as hg
from train.atomic import pyplot, write_atomic, write_csv, write_png
from train.cli import make_backward, make_failure_policy
from train.config import parse_config
from train.data import DataError, load

METHODS = ("imaml-cg", "imaml-fp", "fomaml", "itd")


@dataclass
class Config:
    out: str = "runs/imaml"  # folder for imaml_table.md, imaml.csv, summary.json, losses.json, imaml.png
    data: str = "fashion-5k"  # fashion-5k (embedded) | fashion-mnist (the full set)
    data_root: str = ""  # a folder holding a copy of the full set (read offline; --download fetches it there)
    download: bool = False  # with --data-root: download the full set into it with torchvision
    methods: str = ",".join(METHODS)
    shots: str = "1,5"  # K, one experiment per value
    ways: int = 5  # N
    queries: int = 15  # query images per class
    train_classes: str = "0,2,4,6,8"  # the other classes are held out for meta-testing
    channels: int = 16
    inner_steps: int = 10  # T gradient steps from w₀ = θ (training and testing)
    inner_lr: float = 0.02  # α; Φ is a contraction only where α (λ_max(∇²L_task) + λ) < 2, not on every task
    lam: float = 10.0  # λ: large enough that ∇²L_task + λI stays positive definite at w_T
    linear_steps: int = 5  # k, CG or fixed-point iterations of the adjoint system
    on_failure: str = "warn"  # a failed adjoint solve of imaml-cg/-fp: warn (use it), itd, jfb
    truncate: int = 5  # K, ITD's differentiated inner steps
    meta_steps: int = 300
    meta_batch: int = 4
    meta_lr: float = 1e-3  # Adam on θ
    test_tasks: int = 600
    seed: int = 0
    threads: int = 1
    quick: bool = False


QUICK = {"shots": "1", "meta_steps": 3, "meta_batch": 2, "test_tasks": 10, "inner_steps": 3, "truncate": 2,
         "linear_steps": 2, "channels": 4, "queries": 2, "out": "runs/imaml-quick"}


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_config(Config, argv, prog="python -m train.imaml", description=__doc__,
                        presets={"quick": QUICK}, preset_field="quick")


# --- the conv net, as a function of one flat parameter vector -------------------------------

def net_shapes(channels: int, ways: int) -> list[tuple[int, ...]]:
    c = channels
    return [(c, 1, 3, 3), (c,), (c, c, 3, 3), (c,), (c, c, 3, 3), (c,), (ways, c * 16), (ways,)]


def init_params(shapes: list[tuple[int, ...]], generator: torch.Generator) -> Tensor:
    parts = []
    for shape in shapes:
        if len(shape) == 1:
            parts.append(torch.zeros(shape))
        else:
            fan_in = math.prod(shape[1:])
            parts.append(torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in))
    return torch.cat([p.reshape(-1) for p in parts])


def net(w: Tensor, x: Tensor, shapes: list[tuple[int, ...]]) -> Tensor:
    """Three 3×3 stride-2 convolutions with ReLU (28 → 14 → 7 → 4) and a linear head."""
    sizes = [math.prod(s) for s in shapes]
    k1, b1, k2, b2, k3, b3, W, b = (t.view(s) for t, s in zip(torch.split(w, sizes), shapes))
    h = F.relu(F.conv2d(x, k1, b1, stride=2, padding=1))
    h = F.relu(F.conv2d(h, k2, b2, stride=2, padding=1))
    h = F.relu(F.conv2d(h, k3, b3, stride=2, padding=1))
    return F.linear(h.flatten(1), W, b)


# --- the bilevel problem of one task and its meta-gradient -----------------------------------

@dataclass(frozen=True)
class Method:
    name: str
    linear_steps: int
    truncate: int
    on_failure: str = "warn"  # see train.cli.make_failure_policy


def inner_map(support_loss: Callable[[Tensor], Tensor], lam: float, inner_lr: float) -> inn.maps.GradientStep:
    """``Φ(w, θ) = w − α ∇_w [L_task(w) + (λ/2)‖w − θ‖²]``."""
    return inn.maps.GradientStep(lambda w, hp: support_loss(w) + 0.5 * lam * ((w - hp[0]) ** 2).sum(), inner_lr)


def adapt(phi: inn.maps.GradientStep, theta: Tensor, steps: int) -> Tensor:
    """``w_T``: T inner steps from ``w₀ = θ`` (no graph kept)."""
    with torch.no_grad():
        w, _ = inn.FixedPointIteration(max_iter=steps, tol=0.0).solve(lambda w: phi(w, (theta,)), theta)
    return w


def meta_gradient(method: Method, phi: inn.maps.GradientStep, query_loss: Callable[[Tensor], Tensor], theta: Tensor,
                  steps: int) -> tuple[Tensor, Tensor, bool]:
    """``(∇θ, w_T, adjoint_failed)`` for one task.  Every call into :mod:`implicitnets.hypergrad`
    is here: the implicit methods are AID at ``w_T`` (T inner steps from ``θ``), ITD
    differentiates the last K of those steps; first-order MAML takes the query gradient at
    ``w_T``.  ``adjoint_failed``: AID's linear solve ended with a residual above ‖∇E‖ (the
    Neumann series diverges where ``∂₁Φ`` has an eigenvalue outside (−1, 1), i.e. where
    ``α (λ_max(∇²L_task) + λ) > 2`` or ``∇²L_task`` has an eigenvalue below ``−λ``); the
    gradient of such a task is the choice of ``method.on_failure`` (``warn``: the diverged
    solution as it is), and the script counts these solves."""
    if method.name == "fomaml":
        w = adapt(phi, theta, steps)
        with torch.enable_grad():
            wl = w.detach().requires_grad_()
            (g,) = torch.autograd.grad(query_loss(wl), wl)
        return g, w, False
    inner_steps = inn.FixedPointIteration(max_iter=steps, tol=0.0)
    if method.name == "itd":
        backward: inn.BackwardMode = inn.ITD(truncate=method.truncate)
    else:
        backward = make_backward("aid-" + method.name.removeprefix("imaml-"), method.linear_steps,
                                 on_failure=method.on_failure)
    problem = hg.Bilevel(phi, lambda w, hp: query_loss(w))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", inn.ConvergenceWarning)  # counted by the caller
        result = hg.Backprop(inner_steps, backward).hypergradient(problem, (theta,), theta)
    return result.grads[0], result.w, result.stats is not None and result.stats.backward.converged is False


# --- tasks -----------------------------------------------------------------------------------

def by_class(images: Tensor, labels: Tensor, classes: list[int]) -> list[Tensor]:
    return [images[labels == c] for c in classes]


def sample_task(pool: list[Tensor], cfg: Config, shots: int, g: torch.Generator) -> tuple[Tensor, ...]:
    """Support (N·K) and query (N·queries) images with labels 0..N−1 in a random class order."""
    chosen = torch.randperm(len(pool), generator=g)[: cfg.ways]
    xs, ys, xq, yq = [], [], [], []
    for label, c in enumerate(chosen.tolist()):
        images = pool[c]
        pick = torch.randperm(len(images), generator=g)[: shots + cfg.queries]
        xs.append(images[pick[:shots]])
        xq.append(images[pick[shots:]])
        ys.append(torch.full((shots,), label))
        yq.append(torch.full((cfg.queries,), label))
    return torch.cat(xs), torch.cat(ys), torch.cat(xq), torch.cat(yq)


def task_problem(task: tuple[Tensor, ...], cfg: Config, shapes: list[tuple[int, ...]]):
    xs, ys, xq, yq = task
    phi = inner_map(lambda w: F.cross_entropy(net(w, xs, shapes), ys), cfg.lam, cfg.inner_lr)
    return phi, (lambda w: F.cross_entropy(net(w, xq, shapes), yq)), xq, yq


def evaluate(theta: Tensor, pool: list[Tensor], cfg: Config, shots: int, shapes) -> tuple[float, float]:
    """Mean query accuracy after adaptation over ``test_tasks`` tasks and its 95% half-width."""
    g = torch.Generator().manual_seed(cfg.seed + 10_000 + shots)
    accs = []
    for _ in range(cfg.test_tasks):
        phi, _, xq, yq = task_problem(sample_task(pool, cfg, shots, g), cfg, shapes)
        w = adapt(phi, theta, cfg.inner_steps)
        with torch.no_grad():
            accs.append(float((net(w, xq, shapes).argmax(1) == yq).float().mean()))
    acc = torch.tensor(accs)
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(len(acc))) if len(acc) > 1 else math.nan


def meta_train(method: Method, theta0: Tensor, pool: list[Tensor], cfg: Config, shots: int, shapes) -> dict:
    theta = theta0.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=cfg.meta_lr)
    g = torch.Generator().manual_seed(cfg.seed + shots)  # the same task sequence for every method
    losses, seconds, failed = [], [], 0
    for _ in range(cfg.meta_steps):
        start = time.perf_counter()
        grad = torch.zeros_like(theta)
        loss = 0.0
        for _ in range(cfg.meta_batch):
            phi, query_loss, _, _ = task_problem(sample_task(pool, cfg, shots, g), cfg, shapes)
            gt, w, adjoint_failed = meta_gradient(method, phi, query_loss, theta.detach(), cfg.inner_steps)
            failed += adjoint_failed
            grad += gt / cfg.meta_batch
            with torch.no_grad():
                loss += float(query_loss(w)) / cfg.meta_batch
        opt.zero_grad(set_to_none=True)
        theta.grad = grad
        opt.step()
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
    return {"theta": theta.detach(), "losses": losses, "seconds": seconds, "adjoint_failed": failed,
            "tasks": cfg.meta_steps * cfg.meta_batch}


def load_pools(cfg: Config) -> tuple[list[Tensor], list[Tensor]]:
    if cfg.data not in ("fashion-5k", "fashion-mnist"):
        raise SystemExit(f"error: --data must be fashion-5k or fashion-mnist, got {cfg.data!r}")
    try:
        data = load(cfg.data, cfg.data_root or None, download=cfg.download)
    except (DataError, ValueError) as err:
        raise SystemExit(f"error: {err} (--data-root DIR reads DIR/FashionMNIST/raw offline; --data fashion-5k "
                         "is embedded)") from err
    train_classes = [int(c) for c in cfg.train_classes.split(",")]
    test_classes = [c for c in range(10) if c not in train_classes]
    if len(train_classes) < cfg.ways or len(test_classes) < cfg.ways:
        raise SystemExit(f"error: --ways {cfg.ways} needs at least that many classes in both pools; "
                         f"meta-train {train_classes}, meta-test {test_classes}")
    return (by_class(data.train.images, data.train.labels, train_classes),
            by_class(data.test.images, data.test.labels, test_classes))


def write_results(cfg: Config, results: list[dict]) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    lines = ["| shots | method | meta-test accuracy (%) | ± 95% | time per meta-step (ms) "
             "| final meta-train query loss | adjoint solves diverged |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        diverged = f"{r['adjoint_failed']}/{r['tasks']}" if r["method"].startswith("imaml") else "–"
        lines.append(f"| {r['shots']} | {r['method']} | {100 * r['acc']:.2f} | {100 * r['ci95']:.2f} | "
                     f"{r['ms_per_step']:.1f} | {r['final_loss']:.3f} | {diverged} |")
    write_atomic(os.path.join(cfg.out, "imaml_table.md"), ("\n".join(lines) + "\n").encode())
    columns = ("shots", "method", "acc", "ci95", "ms_per_step", "final_loss", "adjoint_failed", "tasks")
    write_csv(os.path.join(cfg.out, "imaml.csv"), [{k: r[k] for k in columns} for r in results])
    slim = [{k: v for k, v in r.items() if k != "losses"} for r in results]
    summary = json.dumps({"config": asdict(cfg), "results": slim}, indent=1)
    write_atomic(os.path.join(cfg.out, "summary.json"), summary.encode())
    curves = {f"{r['shots']}-shot {r['method']}": r["losses"] for r in results if r["losses"]}
    write_atomic(os.path.join(cfg.out, "losses.json"), json.dumps(curves).encode())
    plot_curves(curves, os.path.join(cfg.out, "imaml.png"))


def plot_curves(curves: dict[str, list[float]], path: str, window: int = 20) -> None:
    """Meta-training query loss against meta-step, a moving average over ``window`` steps."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.6))
    for label, losses in curves.items():
        w = min(window, len(losses))
        smooth = torch.tensor(losses).unfold(0, w, 1).mean(1)
        ax.plot(range(w, len(losses) + 1), smooth.tolist(), label=label)
    ax.set_xlabel("meta-step")
    ax.set_ylabel(f"query loss after adaptation ({window}-step mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_png(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_args(argv)
    methods = [m for m in cfg.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown --methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    try:
        make_failure_policy(cfg.on_failure)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    torch.set_num_threads(cfg.threads)
    train_pool, test_pool = load_pools(cfg)
    shapes = net_shapes(cfg.channels, cfg.ways)
    theta0 = init_params(shapes, torch.Generator().manual_seed(cfg.seed))
    results = []
    for shots in (int(s) for s in cfg.shots.split(",")):
        acc, ci = evaluate(theta0, test_pool, cfg, shots, shapes)
        results.append({"shots": shots, "method": "no meta-training", "acc": acc, "ci95": ci, "ms_per_step": 0.0,
                        "final_loss": math.nan, "meta_steps": 0, "losses": [], "adjoint_failed": 0, "tasks": 0})
        print(f"{shots}-shot  no meta-training  acc {100 * acc:.2f} ± {100 * ci:.2f}%", flush=True)
        for name in methods:
            method = Method(name, cfg.linear_steps, cfg.truncate, cfg.on_failure)
            run = meta_train(method, theta0, train_pool, cfg, shots, shapes)
            acc, ci = evaluate(run["theta"], test_pool, cfg, shots, shapes)
            ms = 1000 * sum(run["seconds"]) / len(run["seconds"])
            final = sum(run["losses"][-20:]) / len(run["losses"][-20:])
            label = f"{name} (on failure: {cfg.on_failure})" if name.startswith("imaml") and cfg.on_failure != "warn" \
                else name
            results.append({"shots": shots, "method": label, "acc": acc, "ci95": ci, "ms_per_step": ms,
                            "final_loss": final, "meta_steps": len(run["losses"]), "losses": run["losses"],
                            "finite": all(math.isfinite(v) for v in run["losses"]),
                            "adjoint_failed": run["adjoint_failed"], "tasks": run["tasks"]})
            diverged = f"  adjoint diverged on {run['adjoint_failed']}/{run['tasks']} tasks" * name.startswith("imaml")
            print(f"{shots}-shot  {label:16s}  acc {100 * acc:.2f} ± {100 * ci:.2f}%  {ms:.1f} ms/meta-step  "
                  f"query loss {final:.3f}{diverged}", flush=True)
        write_results(cfg, results)
    return results


if __name__ == "__main__":
    main()
