"""Train an MNIST equilibrium classifier (or the explicit baseline of the same size).

    python -m train.mnist                               # FC equilibrium model, embedded 5k digits
    python -m train.mnist --model conv --epochs 15      # conv equilibrium model
    python -m train.mnist --model mlp                   # explicit baseline, same budget
    python -m train.mnist --model mon                   # monotone operator DEQ (monDEQ), FC
    python -m train.mnist --model monconv               # monotone operator DEQ, conv (10 epochs)
    python -m train.mnist --preset grazzi2020           # the reference experiment
    torchrun --nproc_per_node=2 -m train.mnist ...      # DistributedDataParallel (gloo / nccl)

The default run trains ``w = tanh(A w + B x + c)`` (width 200, ‖A‖₂ ≤ 0.9, AID-FP, t = k = 20)
on the embedded 5,000 MNIST digits and then, with the same recipe (100 epochs of Adam, lr
1e-3 on a cosine schedule, batch 100, random shifts of up to 2 pixels), the explicit
784-200-200-10 tanh network of the same size, and prints the two side by side.

Reads top to bottom: configuration, distributed setup, data, model, optimiser, resume,
training loop (tqdm; non-finite steps skipped and logged), per-epoch JSON lines, atomic
checkpoints, summary.json and a PNG of the curves.  Everything random is drawn from
generators seeded by (seed, epoch), and the global batch does not depend on the number of
processes, so ``--resume`` and ``torchrun`` reproduce a single uninterrupted run.

Backward modes (``--backward``): ``itd`` (through all t solver steps), ``itd:K`` (last K
steps), ``aid-fp`` / ``aid-cg`` / ``aid-normalcg`` / ``aid-gmres`` (k iterations of that
linear solver on (I − Jᵀ) v = g), ``jfb`` (Jacobian-free).  ``aid-cg`` assumes a symmetric
Jacobian, which ``tanh(A w + B x + c)`` does not have: it runs (and warns) but its gradient
is biased — prefer ``aid-normalcg`` or ``aid-gmres`` for these models.

Monotone models (``mon``, ``monconv``): ``z = ReLU(W z + U x + b)`` with ``I − W ⪰ m I``
(``--m``), a unique equilibrium although ‖W‖₂ > 1 is allowed; solved by operator splitting,
``--solver pr`` (Peaceman–Rachford) or ``fb`` (forward–backward) with step ``--alpha``.
Their own defaults (``MODEL_DEFAULTS``) apply under any option given explicitly, and their
explicit baseline gets the width (channels) that matches their parameter count.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import implicitnets as inn
from models import (
    CNN,
    MLP,
    ConvEquilibrium,
    FCEquilibrium,
    MonotoneConvEquilibrium,
    MonotoneEquilibrium,
    count_parameters,
)
from train.atomic import pyplot, write_atomic, write_png
from train.cli import make_backward, make_optimizer, make_solver
from train.config import config_parser, parse_config
from train.data import DataError, load
from train.step import PeerLostError, guarded_step

BASELINE = {"fc": "mlp", "conv": "cnn", "mon": "mlp", "monconv": "cnn"}  # equilibrium model → explicit network
# the baseline's size option set to match a monotone model's parameter count
MATCHED_SIZE = {"mon": "width", "monconv": "channels"}

# -----------------------------------------------------------------------------------------
# configuration: a dataclass turned into argparse; a preset changes the defaults


@dataclass
class Config:
    model: str = "fc"  # fc | conv | mlp | cnn | mon | monconv
    backward: str = "aid-fp"  # itd | itd:K | aid-fp | aid-cg | aid-normalcg | aid-gmres | jfb
    t: int = 20  # forward solver iterations (max_iter)
    k: int = 20  # backward linear-solver iterations (AID)
    tol: float = 1e-4  # forward stopping tolerance on the relative residual; 0 runs exactly t
    backward_tol: float = 0.0  # AID tolerance; 0 runs exactly k iterations
    on_failure: str = "warn"  # a failed AID adjoint solve: warn (keep it), raise, itd (recompute by ITD), jfb
    solver: str = "fp"  # fp | anderson | broyden | pr | fb (pr, fb: monotone models only)
    alpha: float = 1.0  # step size of the splitting solvers pr / fb
    m: float = 0.1  # monotonicity margin of mon / monconv: I − W ⪰ m I
    contraction: str = "spectral"  # spectral | projection | none
    gamma: float = 0.9  # contraction bound on ‖A‖₂ (operator norm for conv)
    width: int = 200  # hidden size of fc / mlp
    channels: int = 48  # channels of conv / cnn
    activation: str = "relu"  # conv cell activation: relu | tanh
    epochs: int = 100  # passes over the training set
    batch_size: int = 100  # global batch (split over processes)
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0  # L2 penalty added to the gradient (λ·θ)
    label_smoothing: float = 0.0  # cross-entropy against (1 − ε)·one-hot + ε/10 (training loss only)
    schedule: str = "cosine"  # cosine | constant
    warmup_epochs: float = 0.0  # linear learning-rate warm-up (epochs)
    augment: int = 2  # random shifts of up to this many pixels (0: off)
    seed: int = 0  # initial weights, batch order and shifts
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # bfloat16 autocast (meant for cuda)
    dtype: str = "float32"  # float32 | float64
    dist_timeout: float = 1800.0  # seconds a process waits for the others in a collective before it stops with an error
    threads: int = 0  # CPU cores each process computes on (0: all of them, split evenly among torchrun's processes)
    data: str = "mnist-5k"  # mnist-5k | mnist | fashion-mnist
    data_root: str = ""  # read an existing copy with download=False
    test_limit: int = 0  # evaluate on the first N test images only (0: all)
    eval_batch_size: int = 1000  # test images per forward pass
    max_steps: int = 0  # stop after this many optimiser steps in total (0: no limit)
    stop_after: int = 0  # leave after this many epochs in this invocation (then --resume)
    out: str = "runs/mnist"  # folder for metrics.jsonl, checkpoint.pt, summary.json, curves.png
    resume: bool = False  # continue from out/checkpoint.pt if it exists
    progress: bool = True  # progress bar per epoch
    plot: bool = True  # write curves.png
    baseline: bool = True  # also train the explicit network of the same size (fc→mlp, conv→cnn), same settings
    preset: str = ""  # grazzi2020


PRESETS = {
    # Grazzi et al. (2020), equilibrium models on MNIST: 5,000 training digits, hidden 200,
    # t = k = 20, full-batch SGD lr 0.5 momentum 0.9, projection onto ‖A‖₂ ≤ 0.99 per step.
    "grazzi2020": dict(
        model="fc", data="mnist-5k", width=200, t=20, k=20, tol=0.0, solver="fp",
        backward="aid-fp", batch_size=5000, optimizer="sgd", lr=0.5, momentum=0.9,
        schedule="constant", contraction="projection", gamma=0.99, epochs=1000, augment=0,
    ),
}


# a model's own defaults (under any option given explicitly)
MODEL_DEFAULTS = {
    # monDEQ, FC: width 174 = the tanh FC model's budget; Peaceman–Rachford forward (≈ 15–30 iterations
    # to tol at α = 1), AID-GMRES backward (AID-FP's Neumann series needs ρ(∂₁Φ) < 1, which a monotone
    # map does not promise); lr, weight decay and label smoothing tuned on the 5k protocol (the MLP
    # baseline gets the same)
    "mon": dict(width=174, solver="pr", alpha=1.0, m=0.5, t=40, backward="aid-gmres", lr=2e-3, weight_decay=1e-4,
                label_smoothing=0.1),
    # monDEQ, conv: 38 channels = the conv model's budget; circular 3×3 convolutions by FFT; 10 epochs
    "monconv": dict(channels=38, solver="pr", alpha=1.0, m=0.5, t=30, backward="aid-gmres", lr=2e-3,
                    weight_decay=1e-4, epochs=10),
}


def parse_args(argv: list[str] | None = None) -> Config:
    prog = "python -m train.mnist"
    cfg = parse_config(Config, argv, prog=prog, description=__doc__, presets=PRESETS)
    if cfg.model not in MODEL_DEFAULTS:
        return cfg
    parser = config_parser(Config, prog, __doc__)
    parser.set_defaults(**{**PRESETS.get(cfg.preset, {}), **MODEL_DEFAULTS[cfg.model]})
    return Config(**vars(parser.parse_args(argv)))


CHOICES = dict(
    model=("fc", "conv", "mlp", "cnn", "mon", "monconv"), solver=("fp", "anderson", "broyden", "pr", "fb"),
    contraction=("spectral", "projection", "none"),
    optimizer=("adam", "sgd"), schedule=("cosine", "constant"), device=("auto", "cpu", "cuda"),
    dtype=("float32", "float64"), data=("mnist-5k", "mnist", "fashion-mnist"), activation=("relu", "tanh"),
)


def check_config(cfg: Config) -> None:
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            flag, value = name.replace("_", "-"), getattr(cfg, name)
            raise ValueError(f"--{flag} must be one of {', '.join(allowed)}, got {value!r}")
    for name in ("t", "k", "epochs", "batch_size", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and cfg.gamma > 0 and cfg.tol >= 0 and cfg.backward_tol >= 0 and cfg.augment >= 0):
        raise ValueError("--lr and --gamma must be > 0; --tol, --backward-tol and --augment must be >= 0")
    if cfg.solver in ("pr", "fb") and cfg.model not in MATCHED_SIZE:
        raise ValueError(f"--solver {cfg.solver} is an operator-splitting solver: only for --model mon or monconv")
    if not (cfg.alpha > 0 and cfg.m > 0):
        raise ValueError("--alpha and --m must be > 0")
    if not cfg.dist_timeout > 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {cfg.dist_timeout}")
    make_backward(cfg.backward, cfg.k, cfg.backward_tol, on_failure=cfg.on_failure)  # raises on an unknown mode


def build_model(cfg: Config) -> nn.Module:
    contraction = cfg.gamma if cfg.contraction == "spectral" else None
    solver = make_solver(cfg.solver, cfg.t, cfg.tol, alpha=cfg.alpha)
    backward = make_backward(cfg.backward, cfg.k, cfg.backward_tol, on_failure=cfg.on_failure)
    if cfg.model == "mon":
        return MonotoneEquilibrium(784, cfg.width, 10, m=cfg.m, solver=solver, backward=backward)
    if cfg.model == "monconv":
        return MonotoneConvEquilibrium(1, cfg.channels, 10, 28, m=cfg.m, solver=solver, backward=backward)
    deq = dict(contraction=contraction, solver=solver, backward=backward)
    if cfg.model == "fc":
        return FCEquilibrium(784, cfg.width, 10, **deq)
    if cfg.model == "conv":
        return ConvEquilibrium(1, cfg.channels, 10, 28, activation=cfg.activation, **deq)
    if cfg.model == "mlp":
        return MLP(784, cfg.width, 10)
    return CNN(1, cfg.channels, 10, 28)


def shift_images(images: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Translate each image by ``offsets - pad`` pixels (zero fill); offsets in [0, 2·pad]."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    hp, wp = h + 2 * pad, w + 2 * pad
    arange = lambda size: torch.arange(size, device=images.device)
    start = arange(n) * (c * hp * wp) + offsets[:, 0] * wp + offsets[:, 1]  # top-left corner
    grid = (arange(c) * (hp * wp))[:, None, None] + (arange(h) * wp)[:, None] + arange(w)
    return torch.take(padded, start[:, None, None, None] + grid)


def lr_at(cfg: Config, step: int, data: Data) -> float:
    """The learning rate of optimiser step ``step``: linear warm-up, then constant or cosine to 0."""
    total = (data.train_x.shape[0] // cfg.batch_size) * cfg.epochs
    warmup = cfg.warmup_epochs * total / cfg.epochs
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1.0, total - warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read back."""


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, **state) -> None:
    buffer = io.BytesIO()
    torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), **state), buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict:
    """Restore ``model`` and ``optimizer`` from ``path``; returns the rest of the checkpoint."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt.pop("model"))
        optimizer.load_state_dict(ckpt.pop("optimizer"))
        _ = ckpt["epoch"], ckpt["step"], ckpt["history"]
    except Exception as err:  # torch.load raises pickle, zip and EOF errors of many kinds
        raise CheckpointError(f"corrupt checkpoint {path}: {type(err).__name__}: {err}; "
                              "delete it to start from scratch") from err
    return ckpt


def resume(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
           log: Callable[[str], None]) -> tuple[int, int, list[dict]]:
    """Epochs done, optimiser steps taken and the per-epoch history of the checkpoint at
    ``path`` (model and optimiser restored in place); ``(0, 0, [])`` if there is none."""
    if not os.path.exists(path):
        log(f"--resume: no checkpoint at {path}, starting from scratch")
        return 0, 0, []
    ckpt = load_checkpoint(path, model, optimizer, device)
    log(f"resumed from {path} after epoch {ckpt['epoch']} (step {ckpt['step']})")
    return ckpt["epoch"], ckpt["step"], ckpt["history"]


def init_processes(cfg: Config) -> tuple[torch.device, int, int]:
    """Device, rank and number of processes (torchrun sets WORLD_SIZE / RANK / LOCAL_RANK);
    joins the process group and sets the number of CPU threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    device = torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif world > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    return device, rank, world


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, train, and (``--baseline``, the default for fc/conv) train the explicit
    baseline of the same size with the same settings in the same run; returns the summary
    (with the baseline's summary under ``"baseline"``)."""
    cfg = parse_args(argv)
    check_config(cfg)
    device, rank, world = init_processes(cfg)
    try:
        summary = train(cfg, device, rank, world)
        if cfg.baseline and cfg.model in BASELINE:
            base_cfg = dataclasses.replace(cfg, model=BASELINE[cfg.model], out=os.path.join(cfg.out, "baseline"))
            if cfg.model in MATCHED_SIZE:
                base_cfg = matched_baseline(base_cfg, MATCHED_SIZE[cfg.model], summary["parameters"])
            summary["baseline"] = train(base_cfg, device, rank, world)
            if rank == 0:
                write_atomic(os.path.join(cfg.out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
                print(comparison(summary))
    finally:
        if world > 1 and dist.is_initialized():
            if not isinstance(sys.exc_info()[1], PeerLostError):  # a lost process: no barrier to wait in
                dist.barrier()
            dist.destroy_process_group()
    return summary


def matched_baseline(cfg: Config, field: str, parameters: int) -> Config:
    """``cfg`` with ``field`` (width or channels) set so that its model's parameter count is
    closest to ``parameters`` (bisection: the count grows with the size)."""
    count = lambda size: count_parameters(build_model(dataclasses.replace(cfg, **{field: size})))
    lo, hi = 1, 1
    while count(hi) < parameters:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < parameters else (lo, mid)
    best = min((lo, hi), key=lambda size: abs(count(size) - parameters))
    return dataclasses.replace(cfg, **{field: best})


def comparison(summary: dict) -> str:
    """Two lines: the equilibrium model beside its explicit baseline (same data, epochs, settings)."""
    lines = [f"{'model':<18} {'parameters':>10}  test acc  train acc  seconds"]
    for s in (summary, summary["baseline"]):
        name = s["model"] + (f" ({s['backward']})" if s["backward"] else "")
        lines.append(f"{name:<18} {s['parameters']:>10,}  {s['test_acc']:8.4f}  {s['train_acc']:9.4f}  "
                     f"{s['seconds']:7.1f}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Data:
    """Tensors on the device: raw training images (shifted, then normalised, per batch) and
    normalised test images; ``mean`` / ``std`` are the training set's pixel statistics."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def prepare_data(cfg: Config, device: torch.device, dtype: torch.dtype) -> Data:
    data = load(cfg.data, cfg.data_root or None)
    train_x, train_y = data.train.images.to(device, dtype), data.train.labels.to(device)
    mean, std = train_x.mean(), train_x.std()
    test_x = (data.test.images[: cfg.test_limit or None].to(device, dtype) - mean) / std
    test_y = data.test.labels[: cfg.test_limit or None].to(device)
    if train_x.shape[0] < cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {train_x.shape[0]} training images")
    return Data(data.name, train_x, train_y, test_x, test_y, mean, std)


def train(cfg: Config, device: torch.device, rank: int, world: int) -> dict:
    """Train ``cfg.model`` on this process's share of every global batch; returns the summary."""
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    data = prepare_data(cfg, device, dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)

    # -------------------------------------------------------------------------------------
    # model and optimiser
    torch.manual_seed(cfg.seed)
    raw_model = build_model(cfg).to(device=device, dtype=dtype)
    model = raw_model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(cfg.optimizer, raw_model.parameters(), cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    project = None
    if cfg.contraction == "projection" and hasattr(raw_model, "project_"):
        project = lambda: raw_model.project_(cfg.gamma)
        project()
    is_deq = hasattr(raw_model, "stats")

    # -------------------------------------------------------------------------------------
    # resume from the last checkpoint (written at the end of an epoch)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    start_epoch, step, history = 0, 0, []
    if cfg.resume:
        start_epoch, step, history = resume(ckpt_path, raw_model, optimizer, device, log)
    log(f"{cfg.model}: {count_parameters(raw_model):,} parameters | data {data.name} ({data.train_x.shape[0]} "
        f"train, {data.test_x.shape[0]} test) | device {device} x {world} | backward "
        f"{cfg.backward if is_deq else '(explicit)'} | out {cfg.out}")

    # -------------------------------------------------------------------------------------
    # epochs: train, test, log, checkpoint
    run_start = time.time() - (history[-1]["elapsed"] if history else 0.0)
    for epoch in range(start_epoch, cfg.epochs):
        if (cfg.max_steps and step >= cfg.max_steps) or (cfg.stop_after and epoch - start_epoch >= cfg.stop_after):
            break
        t0 = time.time()
        step, trained = train_epoch(cfg, model, raw_model, optimizer, project, data, epoch, step, rank, world, autocast)
        train_seconds = time.time() - t0
        tested = evaluate(raw_model, data.test_x, data.test_y, cfg, rank, world, autocast, f"epoch {epoch + 1} (test)")
        record = dict(epoch=epoch + 1, step=step, lr=lr_at(cfg, max(0, step - 1), data), **trained, **tested,
                      seconds=time.time() - t0, train_seconds=train_seconds, elapsed=time.time() - run_start,
                      contraction=raw_model.lipschitz_bound() if is_deq else None)
        history.append(record)
        log(f"epoch {epoch + 1:3d} | loss {record['train_loss']:.4f} | train {record['train_acc']:.4f} "
            f"| test {record['test_acc']:.4f} | {record['seconds']:.1f}s"
            + (f" | fwd it {record['forward_iterations']:.1f} | q {record['contraction']:.3f}"
               if record["forward_iterations"] is not None else "")
            + (f" | skipped {len(record['skipped_steps'])}" if record["skipped_steps"] else ""))
        if master:  # JSON lines and checkpoint, each written atomically
            lines = "".join(json.dumps(r) + "\n" for r in history)
            write_atomic(os.path.join(cfg.out, "metrics.jsonl"), lines.encode())
            save_checkpoint(ckpt_path, raw_model, optimizer, epoch=epoch + 1, step=step, history=history,
                            config=dataclasses.asdict(cfg))
        if world > 1:
            dist.barrier()

    # -------------------------------------------------------------------------------------
    # summary and plot
    summary = summarize(cfg, raw_model, data.name, history, step, device, world)
    if master:
        write_atomic(os.path.join(cfg.out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
        if cfg.plot and history:
            plot(history, os.path.join(cfg.out, "curves.png"), f"{cfg.model} ({summary['backward'] or 'explicit'})")
        if history:
            log(f"test accuracy: {summary['test_acc']:.4f} ({len(history)} epochs, {summary['seconds']:.1f}s)")
    if world > 1:
        dist.barrier()
    return summary


def summarize(cfg: Config, model: nn.Module, data_name: str, history: list[dict], step: int, device: torch.device,
              world: int) -> dict:
    """The run in one dictionary: final and best test accuracy, time, skipped steps, configuration."""
    final = history[-1] if history else {}
    return dict(
        model=cfg.model, parameters=count_parameters(model), data=data_name,
        backward=cfg.backward if hasattr(model, "stats") else None, epochs_completed=len(history), steps=step,
        test_acc=final.get("test_acc"), best_test_acc=max((r["test_acc"] for r in history), default=None),
        train_acc=final.get("train_acc"), seconds=final.get("elapsed"),
        skipped_steps=sum(len(r["skipped_steps"]) for r in history), contraction=final.get("contraction"),
        device=str(device), world_size=world, torch=torch.__version__, config=dataclasses.asdict(cfg),
    )


def train_epoch(cfg: Config, model: nn.Module, raw_model: nn.Module, optimizer: torch.optim.Optimizer,
                project: Callable[[], None] | None, data: Data, epoch: int, step: int, rank: int, world: int,
                autocast: torch.autocast) -> tuple[int, dict]:
    """One pass over the shuffled training set, one guarded step per batch (a non-finite step
    is skipped and logged); returns the new step count and the epoch's training statistics."""
    n_train, local_batch = data.train_x.shape[0], cfg.batch_size // world
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(n_train, generator=generator).to(data.train_x.device)
    offsets = torch.randint(0, 2 * cfg.augment + 1, (n_train, 2), generator=generator).to(data.train_x.device)
    sums = torch.zeros(3, device=data.train_x.device, dtype=torch.float64)  # loss·n, correct, n
    f_iters, f_resid, b_iters, b_resid, skipped = [], [], [], [], []
    steps = n_train // cfg.batch_size  # the last partial batch is dropped
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (rank == 0 and cfg.progress),
               leave=False, dynamic_ncols=True)
    with warnings.catch_warnings(record=True) as caught:  # solver warnings: one line per epoch
        warnings.simplefilter("always")
        for i in bar:
            if cfg.max_steps and step >= cfg.max_steps:
                break
            # this process's share of the global batch: the same images whatever the world size
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size][rank * local_batch : (rank + 1) * local_batch]
            xb, yb = data.train_x[idx], data.train_y[idx]
            if cfg.augment:
                xb = shift_images(xb, offsets[idx], cfg.augment)
            xb = (xb - data.mean) / data.std
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step, data)

            def forward(xb=xb, yb=yb):
                with autocast:
                    logits = model(xb).float()
                # sum over the local share / global batch · world: the mean over processes gives the global mean
                loss = F.cross_entropy(logits, yb, reduction="sum", label_smoothing=cfg.label_smoothing)
                return loss * (world / cfg.batch_size), logits

            outcome = guarded_step(list(raw_model.parameters()), optimizer, forward, after_step=project,
                                   ddp=model if world > 1 else None)
            step += 1
            if outcome.skipped:
                skipped.append(step - 1)
                warnings.warn(f"step {step - 1}: skipped ({outcome.skipped[:300]})", RuntimeWarning, stacklevel=1)
                continue
            with torch.no_grad():
                sums += torch.stack([outcome.loss.detach().double() * cfg.batch_size / world,
                                     (outcome.output.argmax(1) == yb).sum().double(),
                                     torch.tensor(float(yb.shape[0]), device=sums.device, dtype=torch.float64)])
            stats = getattr(raw_model, "stats", None)
            if stats is not None:
                f_iters.append(stats.iterations)
                f_resid.append(stats.residual)
                if stats.backward_iterations is not None:
                    b_iters.append(stats.backward_iterations)
                    b_resid.append(stats.backward_residual)
            if rank == 0 and cfg.progress and i % 10 == 0:
                bar.set_postfix(loss=f"{float(outcome.loss.detach()) * cfg.batch_size / world / yb.shape[0]:.4f}")
    bar.close()
    n_convergence = report_warnings(caught, f"epoch {epoch + 1}")
    if world > 1:
        dist.all_reduce(sums)
    n_seen = max(1.0, float(sums[2]))
    return step, dict(
        train_loss=float(sums[0]) / n_seen, train_acc=float(sums[1]) / n_seen,
        forward_iterations=_mean(f_iters), forward_residual=_mean(f_resid),
        forward_residual_max=max(f_resid, default=None),
        backward_iterations=_mean(b_iters), backward_residual=_mean(b_resid),
        skipped_steps=skipped, convergence_warnings=n_convergence,
    )


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, rank: int, world: int,
             autocast: torch.autocast, where: str) -> dict:
    """Test accuracy, loss and forward-solver statistics; the test set is split over processes
    and the sums are all-reduced; solver warnings are folded into one line naming ``where``."""
    model.eval()
    correct = torch.zeros((), device=x.device, dtype=torch.float64)
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    iters, resid = [], []
    with torch.no_grad(), autocast, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for start in range(rank * cfg.eval_batch_size, x.shape[0], world * cfg.eval_batch_size):
            xb, yb = x[start : start + cfg.eval_batch_size], y[start : start + cfg.eval_batch_size]
            logits = model(xb).float()
            correct += (logits.argmax(1) == yb).sum()
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            if hasattr(model, "stats"):
                iters.append(model.stats.iterations)
                resid.append(model.stats.residual)
    report_warnings(caught, where)
    if world > 1:
        for t in (correct, loss_sum):
            dist.all_reduce(t)
    model.train()
    return dict(test_acc=float(correct) / x.shape[0], test_loss=float(loss_sum) / x.shape[0],
                test_forward_iterations=_mean(iters), test_forward_residual=max(resid, default=None))


def report_warnings(caught: list[warnings.WarningMessage], where: str) -> int:
    """Re-issue ``caught`` warnings, folding all :class:`~implicitnets.ConvergenceWarning` and
    skipped-step warnings into one line each; returns the number of convergence warnings."""
    folded: dict[type, list[warnings.WarningMessage]] = {inn.ConvergenceWarning: [], RuntimeWarning: []}
    for w in caught:
        kind = next((k for k in folded if w.category is k or issubclass(w.category, k)), None)
        if kind is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        else:
            folded[kind].append(w)
    for kind, found in folded.items():
        if found:
            what = "solver warnings" if kind is inn.ConvergenceWarning else "warnings"
            warnings.warn(f"{where}: {len(found)} {what}, first: {found[0].message}", kind, stacklevel=2)
    return len(folded[inn.ConvergenceWarning])


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def plot(history: list[dict], path: str, title: str) -> None:
    """Loss and accuracy curves per epoch, saved atomically as a PNG."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax1.plot(epochs, [r["test_loss"] for r in history], label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title=title)
    ax2.plot(epochs, [r["train_acc"] for r in history], label="train")
    ax2.plot(epochs, [r["test_acc"] for r in history], label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy", title=f"final test {history[-1]['test_acc']:.4f}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_png(fig, path)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, DataError, CheckpointError, PeerLostError) as err:  # a bad option, data file, checkpoint
        # or a lost process: one clear line
        sys.exit(f"error: {err}")
