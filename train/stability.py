"""Stability study: what happens to each backward mode when Φ(·, x) stops being a contraction.

    python -m train.stability                     # full grid (5 modes × 6 settings × 3 seeds, 3 epochs)
    python -m train.stability --quick             # reduced grid, a few minutes
    python -m train.stability --figures docs/figures

Trains the FC equilibrium classifier ``w = tanh(A w + B x + c)``, ``logits = H w + h``
(:class:`models.FCEquilibrium`, width 200) on the embedded MNIST-5k digits with t = 20
forward fixed-point iterations and k = 20 backward iterations (the reference experiment's
t = k = 20), for every backward mode

    itd | aid-fp | aid-normalcg | aid-gmres | jfb

times every contraction setting

    0.5 | 0.9 | 0.99 (spectral-norm parametrization ‖A‖₂ ≤ γ) | projection (‖A‖₂ ≤ 0.99
    after every optimiser step) | none (A free, default init) | none@1.5 (A free, started
    expansive: A₀ = 1.5·Q, Q random orthogonal, so ‖A₀‖₂ = ρ(A₀) = 1.5)

and a few seeds.  AID runs with ``on_failure=Raise()``: a diverging adjoint solve (residual
above ‖g‖ after k steps, or NaN/Inf) raises, the step is skipped and logged (a *divergence
event*), and non-finite weights after a step are replaced by the last good snapshot.
Recorded per run: final test accuracy, skipped steps, forward and backward relative
residuals at every step, and at checkpoints (a fixed batch of training digits, float64)
the measured contraction at the fixed point — ‖∂₁Φ‖₂ and ρ(∂₁Φ) per sample
(:mod:`implicitnets.diagnostics`) and ‖A‖₂ — and the relative error of the run's
hypergradient against a high-accuracy reference (Anderson forward to 1e-11, AID-GMRES
backward to 1e-10).  Writes ``runs/<run>.json`` (resumable), ``results.json``,
``table.md`` and ``stability_*.png`` under ``--out``, all atomically.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import implicitnets as inn
from implicitnets import diagnostics as diag
from implicitnets import linear
from models import FCEquilibrium
from train.data import load
from train.atomic import write_atomic
from train.config import config_parser, parse_config
from train.mnist import make_backward

MODES = ("itd", "aid-fp", "aid-normalcg", "aid-gmres", "jfb")
SETTINGS = ("0.5", "0.9", "0.99", "projection", "none", "none@1.5")

# -----------------------------------------------------------------------------------------
# configuration: a dataclass turned into argparse; --quick changes the defaults


@dataclass
class Config:
    out: str = "runs/stability"
    modes: str = ",".join(MODES)
    settings: str = ",".join(SETTINGS)
    seeds: str = "0,1,2"
    epochs: int = 3
    batch_size: int = 100
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    width: int = 200
    t: int = 20  # forward fixed-point iterations (tol = 0: exactly t)
    k: int = 20  # backward iterations of the AID linear solver (tol = 0: exactly k)
    projection: float = 0.99  # the bound of the "projection" setting
    diag_every: int = 100  # optimiser steps between diagnostics checkpoints (plus start and end)
    diag_batch: int = 32  # training digits used for the diagnostics
    train_limit: int = 0  # use the first N (shuffled) training digits only (0: all 5,000)
    test_limit: int = 0  # evaluate on the first N test digits only (0: all 10,000)
    threads: int = 1
    figures: str = ""  # also write the PNGs and table.md into this folder (e.g. docs/figures)
    resume: bool = True  # reuse finished runs found under --out/runs
    quick: bool = False
    progress: bool = True


QUICK = dict(settings="0.9,none", seeds="0", epochs=2, diag_every=50)


def parse_args(argv: list[str] | None = None) -> Config:
    prog = "python -m train.stability"
    cfg = parse_config(Config, argv, prog=prog, description=__doc__, presets={"quick": QUICK}, preset_field="quick")
    error = config_parser(Config, prog, __doc__).error
    if cfg.optimizer not in ("adam", "sgd"):
        error(f"--optimizer must be adam or sgd, got {cfg.optimizer!r}")
    for mode in _split(cfg.modes):
        if mode not in MODES:
            error(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    for setting in _split(cfg.settings):
        if setting not in ("projection", "none"):
            try:
                if not 0 < float(setting[5:] if setting.startswith("none@") else setting):
                    raise ValueError
            except ValueError:
                error(f"--settings: {setting!r} is not a bound γ > 0, 'projection', 'none' or 'none@s'")
    return cfg


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


# -----------------------------------------------------------------------------------------
# the pieces of one run


def make_model(cfg: Config, mode: str, setting: str) -> FCEquilibrium:
    """``setting``: a bound γ, ``projection``, ``none``, or ``none@s`` (A free, initialised
    expansive as ``s·Q`` with Q a random orthogonal matrix: ‖A‖₂ = ρ(A) = s)."""
    backward = make_backward(mode, cfg.k, 0.0)
    if isinstance(backward, inn.AID):  # a failed adjoint solve raises: the loop skips the step
        backward = dataclasses.replace(backward, on_failure=inn.Raise())
    free = setting in ("projection", "none") or setting.startswith("none@")
    solver = inn.FixedPointIteration(max_iter=cfg.t, tol=0.0, check_every=1)  # full trace: divergence detection
    model = FCEquilibrium(784, cfg.width, 10, contraction=None if free else float(setting), solver=solver,
                          backward=backward)
    if setting.startswith("none@"):
        Q, _ = torch.linalg.qr(torch.randn(cfg.width, cfg.width))
        with torch.no_grad():
            model.cell.A.weight.copy_(float(setting[5:]) * Q)
    return model


REFERENCE_SOLVER = inn.Anderson(max_iter=400, tol=1e-11, memory=10)
REFERENCE_BACKWARD = inn.AID(linear.GMRES(max_iter=600, tol=1e-10, restart=60))


def _grads(model: FCEquilibrium, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], inn.SolverStats]:
    loss = F.cross_entropy(model(x), y)
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True)), model.stats


def diagnose(model: FCEquilibrium, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict:
    """Contraction at the fixed point and hypergradient error, on a float64 copy."""
    m = copy.deepcopy(model).double().eval()
    x, xin = x.double(), x.double().flatten(1)
    gen = torch.Generator().manual_seed(seed)
    out: dict = {"lipschitz": diag.lipschitz_bound(m.cell)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", inn.ConvergenceWarning)
        with torch.no_grad():
            w = m.deq(xin)  # the point the run trains at (t iterations)
        norm = diag.jacobian_spectral_norm(m.cell, w, xin, max_iter=60, tol=1e-5, generator=gen)
        rho = diag.jacobian_spectral_radius(m.cell, w, xin, krylov_dim=40, tol=1e-5, generator=gen)
        out.update(norm_worst=norm.worst, norm_mean=float(norm.per_sample.mean()),
                   rho_worst=rho.worst, rho_mean=float(rho.per_sample.mean()))
        try:  # the run's own hypergradient; failures are measured here, not raised
            backward = m.deq.backward
            if isinstance(backward, inn.AID):
                m.deq.backward = dataclasses.replace(backward, on_failure=inn.Warn())
            approx, _ = _grads(m, x, y)
        except (inn.NonFiniteError, inn.ConvergenceError):
            approx = None
        m.deq.solver, m.deq.backward = REFERENCE_SOLVER, REFERENCE_BACKWARD
        reference, stats = _grads(m, x, y)
    out.update(ref_forward_residual=stats.residual, ref_backward_residual=stats.backward_residual,
               ref_valid=bool(stats.converged and stats.backward_converged))
    if approx is None:
        out.update(hypergrad_error=math.inf, hypergrad_cosine=math.nan)
    else:
        err = diag.hypergradient_error(approx, reference)
        out.update(hypergrad_error=err.relative if err.finite else math.inf, hypergrad_cosine=err.cosine)
    return out


def evaluate(model: FCEquilibrium, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", inn.ConvergenceWarning)
        for i in range(0, x.shape[0], batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train()
    return correct / x.shape[0]


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def run_one(cfg: Config, data: dict, mode: str, setting: str, seed: int) -> dict:
    """Train one (mode, setting, seed) and return its record (see the module docstring)."""
    torch.manual_seed(seed)
    model = make_model(cfg, mode, setting)
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    project = setting == "projection"
    if project:
        model.project_(cfg.projection)
    xtr, ytr, xte, yte, xd, yd = (data[k] for k in ("xtr", "ytr", "xte", "yte", "xd", "yd"))
    n = xtr.shape[0]
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    rec: dict = dict(mode=mode, setting=setting, seed=seed, loss=[], forward_residual=[], backward_residual=[],
                     skipped=[], events=[], forward_divergence=0, checkpoints=[], test_acc_epoch=[])
    snapshot = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    start = time.time()

    def checkpoint(step: int) -> None:
        d = diagnose(model, xd, yd, seed=step)
        d["step"] = step
        rec["checkpoints"].append(d)

    checkpoint(0)
    step = 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            reason = ""
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", inn.ConvergenceWarning)
                try:
                    loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                    if not torch.isfinite(loss):
                        reason = "non-finite loss"
                    else:
                        loss.backward()
                except inn.ConvergenceError:
                    reason = "adjoint solve diverged"
                except inn.NonFiniteError:
                    reason = "NaN/Inf in a solve"
            stats = model.stats
            if not reason and not _finite(p.grad for p in model.parameters()):
                reason = "non-finite gradient"
            rec["forward_residual"].append(stats.residual if stats is not None else math.nan)
            bres = stats.backward_residual if stats is not None else None
            rec["backward_residual"].append(math.nan if bres is None else bres)
            if stats is not None and diag.detect_divergence(stats.trace).diverged:
                rec["forward_divergence"] += 1
            if reason:  # skip the step, log it, keep the weights
                optimizer.zero_grad(set_to_none=True)
                rec["skipped"].append(step)
                rec["events"].append(dict(step=step, reason=reason))
                rec["loss"].append(math.nan)
            else:
                optimizer.step()
                if project:
                    model.project_(cfg.projection)
                rec["loss"].append(float(loss.detach()))
                if not _finite(model.parameters()):
                    model.load_state_dict(snapshot[0])
                    optimizer.load_state_dict(snapshot[1])
                    rec["events"].append(dict(step=step, reason="non-finite weights: restored last good snapshot"))
            step += 1
            if step % cfg.diag_every == 0 and step < total:
                checkpoint(step)
        if _finite(model.parameters()):
            snapshot = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
        rec["test_acc_epoch"].append(evaluate(model, xte, yte))
        if cfg.progress:
            print(f"  {mode:>12} {setting:>10} seed {seed} | epoch {epoch + 1}/{cfg.epochs} | "
                  f"test {rec['test_acc_epoch'][-1]:.4f} | skipped {len(rec['skipped'])} | "
                  f"‖A‖₂ {diag.lipschitz_bound(model.cell):.3f} | {time.time() - start:.0f}s", flush=True)
    checkpoint(step)
    rec.update(test_acc=rec["test_acc_epoch"][-1], steps=step, seconds=time.time() - start)
    return rec


# -----------------------------------------------------------------------------------------
# aggregation: markdown table and figures


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _label(setting: str) -> str:
    if setting == "projection":
        return "projection ≤0.99"
    if setting.startswith("none@"):
        return f"none, A₀ = {setting[5:]}·Q"
    return "none" if setting == "none" else f"spectral γ={setting}"


def _fmt(x: float, spec: str = ".2e") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def summarize(records: list[dict], modes: list[str], settings: list[str], n_test: int) -> tuple[str, dict]:
    """The markdown table (accuracy grid + per-cell details) and the aggregated numbers."""
    cells: dict = {}
    for s in settings:
        for m in modes:
            rs = [r for r in records if r["mode"] == m and r["setting"] == s]
            if not rs:
                continue
            accs = [100 * r["test_acc"] for r in rs]
            last = [r["checkpoints"][-1] for r in rs]
            errs = [c["hypergrad_error"] for r in rs for c in r["checkpoints"][1:]]
            tail = lambda key, r: _nanmean(r[key][-max(1, len(r[key]) // 10):])  # noqa: E731
            cells[(s, m)] = dict(
                acc=sum(accs) / len(accs), acc_std=_std(accs), n=len(rs),
                skipped=sum(len(r["skipped"]) for r in rs), steps=sum(r["steps"] for r in rs),
                restored=sum(1 for r in rs for e in r["events"] if e["reason"].startswith("non-finite weights")),
                fwd=_nanmean([tail("forward_residual", r) for r in rs]),
                bwd=_nanmean([tail("backward_residual", r) for r in rs]),
                fwd_div=sum(r["forward_divergence"] for r in rs),
                rho=max(c["rho_worst"] for c in last), norm=max(c["norm_worst"] for c in last),
                lip=max(c["lipschitz"] for c in last),
                err_median=sorted(errs)[len(errs) // 2] if errs else math.nan,
                err_final=_nanmean([c["hypergrad_error"] for c in last]) if all(
                    math.isfinite(c["hypergrad_error"]) for c in last) else math.inf,
                ref_valid=all(c["ref_valid"] for r in rs for c in r["checkpoints"]),
            )
    seeds = sorted({r["seed"] for r in records})
    lines = [f"Test accuracy (%) on {n_test:,} MNIST test digits, mean ± std over seeds {seeds}; "
             "in brackets: skipped steps (diverged adjoint solves) / total steps.", ""]
    lines.append("| mode | " + " | ".join(_label(s) for s in settings) + " |")
    lines.append("|---|" + "---|" * len(settings))
    for m in modes:
        row = [m]
        for s in settings:
            c = cells.get((s, m))
            row.append("–" if c is None else f"{c['acc']:.2f} ± {c['acc_std']:.2f}"
                       + (f" [{c['skipped']}/{c['steps']}]" if c["skipped"] else ""))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Spread (max − min of the mean accuracies over modes) per setting: "
              + ", ".join(f"{_label(s)}: {_spread(cells, s, modes):.2f} pp" for s in settings), ""]
    lines.append("| setting | mode | acc % | skipped | restores | fwd residual (last 10%) | "
                 "bwd residual (last 10%) | fwd diverged | ‖A‖₂ | ‖∂₁Φ‖₂ worst | ρ(∂₁Φ) worst | "
                 "hypergrad rel. err (median / final) | reference converged |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in settings:
        for m in modes:
            c = cells.get((s, m))
            if c is None:
                continue
            lines.append(
                f"| {_label(s)} | {m} | {c['acc']:.2f} | {c['skipped']}/{c['steps']} | {c['restored']} | "
                f"{_fmt(c['fwd'])} | {_fmt(c['bwd'])} | {c['fwd_div']} | {c['lip']:.3f} | {c['norm']:.3f} | "
                f"{c['rho']:.3f} | {_fmt(c['err_median'])} / {_fmt(c['err_final'])} | "
                f"{'yes' if c['ref_valid'] else 'no'} |")
    return "\n".join(lines) + "\n", {f"{s}|{m}": v for (s, m), v in cells.items()}


def _spread(cells: dict, setting: str, modes: list[str]) -> float:
    accs = [cells[(setting, m)]["acc"] for m in modes if (setting, m) in cells]
    return max(accs) - min(accs) if accs else math.nan


def _save(fig, paths: list[str]) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    for path in paths:
        write_atomic(path, buffer.getvalue())


def _mean_curve(records: list[dict], key: str) -> list[float]:
    length = min(len(r[key]) for r in records)
    return [_nanmean([r[key][i] for r in records]) for i in range(length)]


def plot(records: list[dict], modes: list[str], settings: list[str], folders: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(MODES, ("C0", "C1", "C2", "C3", "C4")))
    written = []

    def out(name: str) -> list[str]:
        paths = [os.path.join(f, name) for f in folders]
        written.extend(paths)
        return paths

    # 1. final test accuracy per setting and mode
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / max(1, len(modes))
    for j, m in enumerate(modes):
        xs, ys, es = [], [], []
        for i, s in enumerate(settings):
            accs = [100 * r["test_acc"] for r in records if r["mode"] == m and r["setting"] == s]
            if accs:
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                ys.append(sum(accs) / len(accs))
                es.append(_std(accs))
        ax.bar(xs, ys, width, yerr=es, label=m, color=colors[m])
    ax.set_xticks(range(len(settings)), [_label(s) for s in settings])
    accs = [100 * r["test_acc"] for r in records]
    ax.set_ylim(max(0.0, min(accs) - 5), min(100.0, max(accs) + 2))
    ax.set(ylabel="test accuracy (%)", title="final test accuracy (MNIST-5k, t = k = 20)")
    ax.legend(ncol=len(modes), fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, out("stability_accuracy.png"))
    plt.close(fig)

    # 2.-4. curves over training, one column per setting
    panels = [
        ("stability_contraction.png", "measured contraction at w_t", [("rho_worst", "-", "ρ(∂₁Φ) worst"),
                                                                      ("norm_worst", ":", "‖∂₁Φ‖₂ worst"),
                                                                      ("lipschitz", "--", "‖A‖₂")], "linear"),
        ("stability_hypergrad.png", "hypergradient relative error", [("hypergrad_error", "-", "")], "log"),
    ]
    for name, title, series, yscale in panels:
        fig, axes = plt.subplots(1, len(settings), figsize=(3.3 * len(settings), 3.2), sharey=True, squeeze=False)
        for ax, s in zip(axes[0], settings):
            for m in modes:
                rs = [r for r in records if r["mode"] == m and r["setting"] == s]
                if not rs:
                    continue
                steps = [c["step"] for c in rs[0]["checkpoints"]]
                for key, style, label in series:
                    ys = [_nanmean([r["checkpoints"][i][key] if math.isfinite(r["checkpoints"][i][key]) else math.nan
                                    for r in rs]) for i in range(len(steps))]
                    ax.plot(steps, ys, style, color=colors[m], label=f"{m} {label}".strip())
            if yscale == "linear":
                ax.axhline(1.0, color="k", lw=0.6)
            ax.set(title=_label(s), xlabel="optimiser step", yscale=yscale)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(title)
        handles, labels = axes[0][0].get_legend_handles_labels()
        keep = [(h, l) for h, l in zip(handles, labels) if series[0][2] in l] if len(series) > 1 else list(zip(handles, labels))
        axes[0][-1].legend(*zip(*keep), fontsize=7) if keep else None
        if len(series) > 1:
            fig.suptitle(f"{title}: solid ρ(∂₁Φ), dotted ‖∂₁Φ‖₂, dashed ‖A‖₂ (worst sample)", fontsize=9)
        fig.tight_layout()
        _save(fig, out(name))
        plt.close(fig)

    fig, axes = plt.subplots(2, len(settings), figsize=(3.3 * len(settings), 5.6), sharey="row", squeeze=False)
    for col, s in enumerate(settings):
        for m in modes:
            rs = [r for r in records if r["mode"] == m and r["setting"] == s]
            if not rs:
                continue
            for row, key in enumerate(("forward_residual", "backward_residual")):
                ys = _mean_curve(rs, key)
                if all(math.isnan(v) for v in ys):
                    continue
                win = max(1, len(ys) // 50)
                smooth = [_nanmean(ys[i : i + win]) for i in range(0, len(ys), win)]
                axes[row][col].plot([i * win for i in range(len(smooth))], smooth, color=colors[m], label=m)
        axes[0][col].set(title=_label(s), yscale="log")
        axes[1][col].set(xlabel="optimiser step", yscale="log")
        for row in range(2):
            axes[row][col].grid(alpha=0.3)
    axes[0][0].set_ylabel("forward residual after t steps")
    axes[1][0].set_ylabel("adjoint residual after k steps")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out("stability_residuals.png"))
    plt.close(fig)
    return written


# -----------------------------------------------------------------------------------------
# main: every (setting, mode, seed), resumable, then the table and the figures


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    modes, settings, seeds = _split(cfg.modes), _split(cfg.settings), [int(s) for s in _split(cfg.seeds)]
    raw = load("mnist-5k")
    mean, std = raw.train.images.mean(), raw.train.images.std()
    order = torch.randperm(len(raw.train), generator=torch.Generator().manual_seed(12345))
    xtr, ytr = (raw.train.images[order] - mean) / std, raw.train.labels[order]
    if cfg.train_limit:
        xtr, ytr = xtr[: cfg.train_limit], ytr[: cfg.train_limit]
    xte, yte = (raw.test.images - mean) / std, raw.test.labels
    if cfg.test_limit:
        xte, yte = xte[: cfg.test_limit], yte[: cfg.test_limit]
    data = dict(xtr=xtr, ytr=ytr, xte=xte, yte=yte, xd=xtr[: cfg.diag_batch], yd=ytr[: cfg.diag_batch])
    tag = lambda m, s, seed: f"{m}__{s}__seed{seed}".replace(".", "p")  # noqa: E731
    settings_key = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
                        momentum=cfg.momentum, width=cfg.width, t=cfg.t, k=cfg.k,
                        projection=cfg.projection, diag_every=cfg.diag_every, diag_batch=cfg.diag_batch,
                        train_limit=cfg.train_limit, test_limit=cfg.test_limit)
    records = []
    total = len(modes) * len(settings) * len(seeds)
    print(f"stability study: {len(modes)} modes × {len(settings)} settings × {len(seeds)} seeds = {total} runs, "
          f"{cfg.epochs} epochs each | out {cfg.out}", flush=True)
    for seed in seeds:
        for s in settings:
            for m in modes:
                path = os.path.join(cfg.out, "runs", tag(m, s, seed) + ".json")
                if cfg.resume and os.path.exists(path):
                    with open(path) as fh:
                        rec = json.load(fh)
                    if rec.get("config") == settings_key:
                        records.append(rec)
                        continue
                rec = run_one(cfg, data, m, s, seed)
                rec["config"] = settings_key
                write_atomic(path, json.dumps(rec).encode())
                records.append(rec)
                print(f"[{len(records)}/{total}] {m} / {_label(s)} / seed {seed}: test {100 * rec['test_acc']:.2f}% "
                      f"skipped {len(rec['skipped'])}/{rec['steps']} hypergrad err "
                      f"{_fmt(rec['checkpoints'][-1]['hypergrad_error'])} ({rec['seconds']:.0f}s)", flush=True)
    table, cells = summarize(records, modes, settings, int(xte.shape[0]))
    header = (f"# Stability study\n\n`python -m train.stability {' '.join(argv if argv is not None else sys.argv[1:])}`"
              f" — {cfg.epochs} epochs of {cfg.optimizer} (lr {cfg.lr}, batch {cfg.batch_size}) on MNIST-5k, width {cfg.width}, "
              f"t = {cfg.t}, k = {cfg.k}, torch {torch.__version__}.\n\n")
    folders = [cfg.out] + ([cfg.figures] if cfg.figures else [])
    for folder in folders:
        write_atomic(os.path.join(folder, "stability_table.md"), (header + table).encode())
    write_atomic(os.path.join(cfg.out, "results.json"),
                 json.dumps(dict(config=dataclasses.asdict(cfg), cells=cells), indent=1, default=str).encode())
    pngs = plot(records, modes, settings, folders)
    print(table)
    print("wrote " + ", ".join([os.path.join(f, "stability_table.md") for f in folders] + pngs))
    return cells


if __name__ == "__main__":
    main()
