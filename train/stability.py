"""Stability study: what happens to each backward mode when Φ(·, x) stops being a contraction.

    python -m train.stability                     # full grid (5 modes × 7 settings × 3 seeds, 3 epochs)
    python -m train.stability --quick             # reduced grid, a few minutes
    python -m train.stability --figures train/results   # also refresh the committed figures

Trains the FC equilibrium classifier ``w = tanh(A w + B x + c)``, ``logits = H w + h``
(:class:`models.FCEquilibrium`, width 200) on the embedded MNIST-5k digits with t = 20
forward fixed-point iterations and k = 20 backward iterations (the reference experiment's
t = k = 20), for every backward mode

    itd | aid-fp | aid-normalcg | aid-gmres | jfb

times every contraction setting

    0.5 | 0.9 | 0.99 (spectral-norm parametrization ‖A‖₂ ≤ γ) | projection (‖A‖₂ ≤ 0.99
    after every optimiser step) | none (A free, default init) | none@1.5 (A free, started
    expansive: A₀ = 1.5·Q, Q random orthogonal, so ‖A₀‖₂ = ρ(A₀) = 1.5) | monotone (no
    contraction at all: the monotone operator model ``z = ReLU(W z + U x + b)`` with
    ``I − W ⪰ 0.1 I`` (:class:`models.MonotoneEquilibrium`, same width), solved by t
    Peaceman–Rachford iterations; its equilibrium is unique although ‖W‖₂ > 1)

and a few seeds.  AID runs with ``on_failure=Raise()``: a diverging adjoint solve (residual
above ‖g‖ after k steps, or NaN/Inf) raises, and the step is skipped and logged (a *divergence
event*) under the training scripts' one policy (:mod:`train.step`; a step that leaves a
non-finite weight is undone).
Recorded per run: final test accuracy, skipped steps, forward and backward relative
residuals at every step, and at checkpoints (a fixed batch of training digits, float64)
the measured contraction at the fixed point — ‖∂₁Φ‖₂ and ρ(∂₁Φ) per sample
(:mod:`implicitnets.diagnostics`) and ‖A‖₂ — and the relative error of the run's
hypergradient against a high-accuracy reference (Anderson forward to 1e-11 — Peaceman–Rachford
for the monotone model —, AID-GMRES backward to 1e-10).  Writes ``runs/<run>.json`` (resumable), ``results.json``,
``stability_table.md`` and ``stability_*.png`` under ``--out``, all atomically; the table and
figures are made by :mod:`train.stability_report`.
"""

from __future__ import annotations

import copy
import dataclasses
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
from models import FCEquilibrium, MonotoneEquilibrium
from train.atomic import write_atomic
from train.cli import OPTIMIZERS, make_backward, make_optimizer
from train.config import config_parser, parse_config
from train.data import load
from train.stability_report import MODES, fmt, label, plot, summarize
from train.step import guarded_step

SETTINGS = ("0.5", "0.9", "0.99", "projection", "none", "none@1.5", "monotone")

# -----------------------------------------------------------------------------------------
# configuration: a dataclass turned into argparse; --quick changes the defaults


@dataclass
class Config:
    out: str = "runs/stability"  # folder for runs/*.json, results.json, the table and the figures
    modes: str = ",".join(MODES)  # backward modes, comma-separated
    settings: str = ",".join(SETTINGS)  # contraction settings: γ, projection, none or none@s, comma-separated
    seeds: str = "0,1,2"  # comma-separated
    epochs: int = 3  # passes over the training set per run
    batch_size: int = 100  # training digits per optimiser step
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3  # constant learning rate
    momentum: float = 0.9  # sgd only
    width: int = 200  # size of the equilibrium state w
    t: int = 20  # forward fixed-point iterations (tol = 0: exactly t)
    k: int = 20  # backward iterations of the AID linear solver (tol = 0: exactly k)
    projection: float = 0.99  # the bound of the "projection" setting
    diag_every: int = 100  # optimiser steps between diagnostics checkpoints (plus start and end)
    diag_batch: int = 32  # training digits used for the diagnostics
    train_limit: int = 0  # use the first N (shuffled) training digits only (0: all 5,000)
    test_limit: int = 0  # evaluate on the first N test digits only (0: all 10,000)
    threads: int = 1  # CPU cores to compute on (the runs are small: more than one rarely helps)
    figures: str = ""  # also write the PNGs and table.md into this folder (e.g. train/results)
    resume: bool = True  # reuse finished runs found under --out/runs
    quick: bool = False  # a reduced grid: 0.9 and none, seed 0, 2 epochs
    progress: bool = True  # one line per epoch of every run


QUICK = dict(settings="0.9,none", seeds="0", epochs=2, diag_every=50)


def parse_args(argv: list[str] | None = None) -> Config:
    prog = "python -m train.stability"
    cfg = parse_config(Config, argv, prog=prog, description=__doc__, presets={"quick": QUICK}, preset_field="quick")
    error = config_parser(Config, prog, __doc__).error
    if cfg.optimizer not in OPTIMIZERS:
        error(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    for mode in _split(cfg.modes):
        if mode not in MODES:
            error(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    for setting in _split(cfg.settings):
        if setting not in ("projection", "none", "monotone"):
            try:
                if not 0 < float(setting[5:] if setting.startswith("none@") else setting):
                    raise ValueError
            except ValueError:
                error(f"--settings: {setting!r} is not a bound γ > 0, 'projection', 'none', 'none@s' or 'monotone'")
    return cfg


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


# -----------------------------------------------------------------------------------------
# the pieces of one run


def make_model(cfg: Config, mode: str, setting: str) -> FCEquilibrium | MonotoneEquilibrium:
    """``setting``: a bound γ, ``projection``, ``none``, ``none@s`` (A free, initialised
    expansive as ``s·Q`` with Q a random orthogonal matrix: ‖A‖₂ = ρ(A) = s), or ``monotone``
    (the monotone operator model of the same width, Peaceman–Rachford forward)."""
    # a failed adjoint solve raises: the training loop skips the step and counts it
    backward = make_backward(mode, cfg.k, 0.0, on_failure="raise")
    if setting == "monotone":
        solver = inn.PeacemanRachford(max_iter=cfg.t, tol=0.0, check_every=1)
        return MonotoneEquilibrium(784, cfg.width, 10, m=MONOTONE_MARGIN, solver=solver, backward=backward)
    free = setting in ("projection", "none") or setting.startswith("none@")
    solver = inn.FixedPointIteration(max_iter=cfg.t, tol=0.0, check_every=1)  # full trace: divergence detection
    model = FCEquilibrium(784, cfg.width, 10, contraction=None if free else float(setting), solver=solver,
                          backward=backward)
    if setting.startswith("none@"):
        Q, _ = torch.linalg.qr(torch.randn(cfg.width, cfg.width))
        with torch.no_grad():
            model.cell.A.weight.copy_(float(setting[5:]) * Q)
    return model


MONOTONE_MARGIN = 0.1  # m of the monotone setting: I − W ⪰ m I
REFERENCE_SOLVER = inn.Anderson(max_iter=400, tol=1e-11, memory=10)
MONOTONE_REFERENCE_SOLVER = inn.PeacemanRachford(max_iter=2000, tol=1e-11)
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
        monotone = isinstance(m.cell, inn.maps.MonotoneMap)
        m.deq.solver = MONOTONE_REFERENCE_SOLVER if monotone else REFERENCE_SOLVER
        m.deq.backward = REFERENCE_BACKWARD
        reference, stats = _grads(m, x, y)
    out.update(ref_forward_residual=stats.residual, ref_backward_residual=stats.backward.residual,
               ref_valid=bool(stats.converged and stats.backward.converged))
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


def run_one(cfg: Config, data: dict, mode: str, setting: str, seed: int) -> dict:
    """Train one (mode, setting, seed) and return its record (see the module docstring)."""
    torch.manual_seed(seed)
    model = make_model(cfg, mode, setting)
    params = list(model.parameters())
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, momentum=cfg.momentum)
    project = (lambda: model.project_(cfg.projection)) if setting == "projection" else None
    if project:
        project()
    xtr, ytr, xte, yte, xd, yd = (data[k] for k in ("xtr", "ytr", "xte", "yte", "xd", "yd"))
    n = xtr.shape[0]
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    rec: dict = dict(mode=mode, setting=setting, seed=seed, loss=[], forward_residual=[], backward_residual=[],
                     skipped=[], events=[], forward_divergence=0, checkpoints=[], test_acc_epoch=[])
    start = time.time()

    def checkpoint(step: int) -> None:
        rec["checkpoints"].append(dict(diagnose(model, xd, yd, seed=step), step=step))

    checkpoint(0)
    step = 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]

            def forward(idx=idx):
                logits = model(xtr[idx])
                return F.cross_entropy(logits, ytr[idx]), logits

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", inn.ConvergenceWarning)
                outcome = guarded_step(params, optimizer, forward, after_step=project)
            stats = model.stats
            rec["forward_residual"].append(stats.residual if stats is not None else math.nan)
            bres = stats.backward.residual if stats is not None else None
            rec["backward_residual"].append(math.nan if bres is None else bres)
            if stats is not None and diag.detect_divergence(stats.trace).diverged:
                rec["forward_divergence"] += 1
            taken = not outcome.skipped
            rec["loss"].append(float(outcome.loss.detach()) if taken else math.nan)
            if not taken:
                rec["events"].append(dict(step=step, reason=outcome.skipped[:300]))
                if not outcome.skipped.startswith("non-finite weights"):
                    rec["skipped"].append(step)
            step += 1
            if step % cfg.diag_every == 0 and step < total:
                checkpoint(step)
        rec["test_acc_epoch"].append(evaluate(model, xte, yte))
        if cfg.progress:
            print(f"  {mode:>12} {setting:>10} seed {seed} | epoch {epoch + 1}/{cfg.epochs} | "
                  f"test {rec['test_acc_epoch'][-1]:.4f} | skipped {len(rec['skipped'])} | "
                  f"‖A‖₂ {diag.lipschitz_bound(model.cell):.3f} | {time.time() - start:.0f}s", flush=True)
    checkpoint(step)
    rec.update(test_acc=rec["test_acc_epoch"][-1], steps=step, seconds=time.time() - start)
    return rec


# -----------------------------------------------------------------------------------------
# main: every (setting, mode, seed), resumable, then the table and the figures


def load_data(cfg: Config) -> dict[str, torch.Tensor]:
    """The embedded MNIST-5k digits, normalised, training set in a fixed shuffled order:
    ``xtr, ytr`` (training), ``xte, yte`` (test), ``xd, yd`` (the diagnostics batch)."""
    raw = load("mnist-5k")
    mean, std = raw.train.images.mean(), raw.train.images.std()
    order = torch.randperm(len(raw.train), generator=torch.Generator().manual_seed(12345))
    xtr, ytr = (raw.train.images[order] - mean) / std, raw.train.labels[order]
    if cfg.train_limit:
        xtr, ytr = xtr[: cfg.train_limit], ytr[: cfg.train_limit]
    xte, yte = (raw.test.images - mean) / std, raw.test.labels
    if cfg.test_limit:
        xte, yte = xte[: cfg.test_limit], yte[: cfg.test_limit]
    return dict(xtr=xtr, ytr=ytr, xte=xte, yte=yte, xd=xtr[: cfg.diag_batch], yd=ytr[: cfg.diag_batch])


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    modes, settings, seeds = _split(cfg.modes), _split(cfg.settings), [int(s) for s in _split(cfg.seeds)]
    data = load_data(cfg)
    tag = lambda m, s, seed: f"{m}__{s}__seed{seed}".replace(".", "p")
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
                print(f"[{len(records)}/{total}] {m} / {label(s)} / seed {seed}: test {100 * rec['test_acc']:.2f}% "
                      f"skipped {len(rec['skipped'])}/{rec['steps']} hypergrad err "
                      f"{fmt(rec['checkpoints'][-1]['hypergrad_error'])} ({rec['seconds']:.0f}s)", flush=True)
    table, cells = summarize(records, modes, settings, int(data["xte"].shape[0]))
    header = (f"# Stability study\n\n`python -m train.stability {' '.join(argv if argv is not None else sys.argv[1:])}`"
              f" — {cfg.epochs} epochs of {cfg.optimizer} (lr {cfg.lr}, batch {cfg.batch_size}) on MNIST-5k, "
              f"width {cfg.width}, "
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
