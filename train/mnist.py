"""Train an MNIST equilibrium classifier (or the explicit baseline of the same size).

    python -m train.mnist                               # FC equilibrium model, embedded 5k digits
    python -m train.mnist --model conv --epochs 15      # conv equilibrium model
    python -m train.mnist --model mlp                   # explicit baseline, same budget
    python -m train.mnist --model mon                   # monotone operator DEQ (monDEQ), FC
    python -m train.mnist --model monconv               # monotone operator DEQ, conv (10 epochs)
    python -m train.mnist --preset grazzi2020           # the reference experiment
    torchrun --nproc_per_node=2 -m train.mnist ...      # DistributedDataParallel (gloo / nccl)

The default run trains ``w = tanh(A w + B x + c)`` (width 200, ‖A‖₂ ≤ 0.9, forward solve to
1e-3, the 2-step phantom gradient) on the embedded 5,000 MNIST digits and then, with the same
recipe (100 epochs of Adam, lr 1e-3 on a cosine schedule, batch 100, random shifts of up to 2
pixels), the explicit 784-200-200-10 tanh network of the same size, and prints the two side
by side with their time ratios (whole run and model steps alone).

``--backward``: ``phantom:K[:λ]`` (K damped steps from w*), ``jfb``, ``itd``, ``itd:K``, or
``aid-fp`` / ``aid-normalcg`` / ``aid-gmres`` / ``aid-cg`` (at most k steps of that linear
solver, to ``--backward-tol``, by default the forward's ``--tol``; CG assumes a symmetric
Jacobian, which these models lack).  Monotone models (``mon``, ``monconv``:
``z = ReLU(W z + U x + b)``, ``I − W ⪰ m I``) use operator splitting (``--solver pr`` / ``fb``)
and their own defaults.

Reads top to bottom: model and processes, one epoch of guarded steps (a non-finite step is
skipped and logged), evaluation, one run, main.  Draws are seeded by (seed, epoch) and the
global batch does not depend on the number of processes: ``--resume`` and ``torchrun``
reproduce an uninterrupted run.  Each epoch logs its model-step time (``step_seconds``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
import models
from models import count_parameters
from train.atomic import write_atomic
from train.augment import shift_images
from train.baseline import comparison, matched_size
from train.checkpoint import CheckpointError, resume, save_checkpoint
from train.cli import make_backward, make_optimizer, make_solver
from train.data import DataError, DeviceData, load, on_device
from train.mnist_config import ACTIVATION, BASELINE, MATCHED_SIZE, Config, backward_tol, check_config
from train.mnist_config import parse_args as parse_options
from train.plots import training_curves
from train.processes import init_processes
from train.schedule import learning_rate
from train.step import PeerLostError, guarded_all_reduce, guarded_barrier, guarded_step
from train.warning_fold import FoldedWarnings

# -----------------------------------------------------------------------------------------
# options (train.mnist_config) and the model of --model; the processes: train.processes


parse_args = functools.partial(parse_options, description=__doc__)  # argv → Config; --help shows this docstring


def build_model(cfg: Config) -> nn.Module:
    contraction = cfg.gamma if cfg.contraction == "spectral" else None
    solver = make_solver(cfg.solver, cfg.t, cfg.tol, alpha=cfg.alpha)
    backward = make_backward(cfg.backward, cfg.k, backward_tol(cfg), on_failure=cfg.on_failure)
    if cfg.model == "mon":
        return models.MonotoneEquilibrium(784, cfg.width, 10, m=cfg.m, solver=solver, backward=backward)
    if cfg.model == "monconv":
        return models.MonotoneConvEquilibrium(1, cfg.channels, 10, 28, m=cfg.m, solver=solver, backward=backward)
    deq = dict(contraction=contraction, solver=solver, backward=backward)
    if cfg.model == "fc":
        return models.FCEquilibrium(784, cfg.width, 10, **deq)
    if cfg.model == "conv":
        norm_bound = inn.conv_circulant_norm if cfg.conv_bound == "circulant" else inn.conv_spectral_norm
        return models.ConvEquilibrium(1, cfg.channels, 10, 28, activation=cfg.activation, norm_bound=norm_bound, **deq)
    if cfg.model == "mlp":
        return models.MLP(784, cfg.width, 10)
    return models.CNN(1, cfg.channels, 10, 28)


# -----------------------------------------------------------------------------------------
# one epoch and one evaluation


@dataclass(frozen=True)
class Run:
    """What every epoch of one run uses: ``model`` is ``raw_model`` or its DDP wrapper;
    ``project`` (or None) restores the contraction bound after each step."""

    cfg: Config
    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    project: Callable[[], None] | None
    data: DeviceData
    cache: inn.SampleCache | None  # --warm-start: each training sample's last w* and adjoint solution
    test_cache: inn.SampleCache | None  # --eval-warm-start: each test sample's w* at the last evaluation
    rank: int
    world: int
    autocast: torch.autocast

    def lr(self, step: int) -> float:
        steps_per_epoch = self.data.train_x.shape[0] // self.cfg.batch_size
        return learning_rate(step, lr=self.cfg.lr, total=steps_per_epoch * self.cfg.epochs,
                             warmup=self.cfg.warmup_epochs * steps_per_epoch, schedule=self.cfg.schedule)


mean = lambda values: sum(values) / len(values) if values else None


def train_epoch(run: Run, epoch: int, step: int) -> tuple[int, dict]:
    """One pass over the shuffled training set, one guarded step per batch (a non-finite step
    is skipped and logged); returns the new step count and the epoch's training statistics."""
    cfg, data, rank, world = run.cfg, run.data, run.rank, run.world
    n_train, local_batch, device = data.train_x.shape[0], cfg.batch_size // world, data.train_x.device
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(n_train, generator=generator).to(device)
    offsets = torch.randint(0, 2 * cfg.augment + 1, (n_train, 2), generator=generator).to(device)
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss·n, correct, n
    f_iters, f_resid, b_iters, b_resid, skipped, step_seconds, step_cpu = [], [], [], [], [], 0.0, 0.0
    bar = tqdm(range(n_train // cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (rank == 0 and cfg.progress), dynamic_ncols=True)  # the last partial batch is dropped
    with FoldedWarnings(f"epoch {epoch + 1}") as folded:  # solver warnings: one line per epoch
        for i in bar:
            if cfg.max_steps and step >= cfg.max_steps:
                break
            # this process's share of the global batch: the same images whatever the world size
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size][rank * local_batch : (rank + 1) * local_batch]
            xb, yb = data.train_x[idx], data.train_y[idx]
            if cfg.augment:
                xb = shift_images(xb, offsets[idx], cfg.augment)
            xb = (xb - data.mean) / data.std
            for group in run.optimizer.param_groups:
                group["lr"] = run.lr(step)

            def forward(xb=xb, yb=yb, idx=idx):
                starts = {} if run.cache is None else dict(z0=run.cache.start("w", idx, None),
                                                            adjoint_x0=run.cache.start("v", idx, None))
                with run.autocast:
                    logits = run.model(xb, **starts).float()
                # sum over the local share / global batch · world: the mean over processes gives the global mean
                loss = F.cross_entropy(logits, yb, reduction="sum", label_smoothing=cfg.label_smoothing)
                return loss * (world / cfg.batch_size), logits

            began, began_cpu = time.perf_counter(), time.process_time()  # model-step time: forward, backward, step
            outcome = guarded_step(list(run.raw_model.parameters()), run.optimizer, forward, after_step=run.project,
                                   ddp=run.model if world > 1 else None)
            if device.type == "cuda":  # the step's kernels finish before its time is read
                torch.cuda.synchronize(device)
            step_seconds, step = step_seconds + time.perf_counter() - began, step + 1
            step_cpu += time.process_time() - began_cpu  # this process's CPU time: no waiting for a busy core
            if outcome.skipped:
                skipped.append(step - 1)
                warnings.warn(f"step {step - 1}: skipped ({outcome.skipped[:300]})", RuntimeWarning, stacklevel=1)
                continue
            with torch.no_grad():
                sums += torch.stack([outcome.loss.detach().double() * cfg.batch_size / world,
                                     (outcome.output.argmax(1) == yb).sum().double(),
                                     torch.full((), float(yb.shape[0]), device=device, dtype=torch.float64)])
            stats = getattr(run.raw_model, "stats", None)
            if run.cache is not None:
                run.cache.store("w", idx, run.raw_model.fixed_point)
                run.cache.store("v", idx, stats.backward.adjoint)
            if stats is not None:
                f_iters.append(stats.iterations)
                f_resid.append(stats.residual)
                if stats.backward.iterations is not None:
                    b_iters.append(stats.backward.iterations)
                    b_resid.append(stats.backward.residual)
            if rank == 0 and cfg.progress and i % 10 == 0:
                bar.set_postfix(loss=f"{float(outcome.loss.detach()) * cfg.batch_size / world / yb.shape[0]:.4f}")
    bar.close()
    if world > 1:
        guarded_all_reduce(sums, f"epoch {epoch + 1}'s training sums")
    n_seen = max(1.0, float(sums[2]))
    return step, dict(
        train_loss=float(sums[0]) / n_seen, train_acc=float(sums[1]) / n_seen,
        forward_iterations=mean(f_iters), forward_residual=mean(f_resid),
        forward_residual_max=max(f_resid, default=None),
        backward_iterations=mean(b_iters), backward_residual=mean(b_resid),
        skipped_steps=skipped, convergence_warnings=folded.convergence, step_seconds=step_seconds,
        step_cpu_seconds=step_cpu,
    )


def evaluate(run: Run, where: str) -> dict:
    """Test accuracy, loss and forward-solver statistics; the test set is split over processes
    and the sums are all-reduced; solver warnings are folded into one line naming ``where``."""
    (model := run.raw_model).eval()
    x, y, size = run.data.test_x, run.data.test_y, run.cfg.eval_batch_size
    sums = torch.zeros(2, device=x.device, dtype=torch.float64)  # correct, loss
    iters, resid = [], []
    with torch.no_grad(), run.autocast, FoldedWarnings(where):
        for start in range(run.rank * size, x.shape[0], run.world * size):
            xb, yb = x[start : start + size], y[start : start + size]
            idx, cache = torch.arange(start, start + len(xb)), run.test_cache
            logits = (model(xb) if cache is None else model(xb, z0=cache.start("w", idx, None))).float()
            if cache is not None:
                cache.store("w", idx, model.fixed_point)
            sums += torch.stack([(logits.argmax(1) == yb).sum().double(),
                                 F.cross_entropy(logits, yb, reduction="sum").double()])
            if hasattr(model, "stats"):
                iters.append(model.stats.iterations)
                resid.append(model.stats.residual)
    if run.world > 1:
        guarded_all_reduce(sums, f"{where} evaluation sums")
    model.train()
    return dict(test_acc=float(sums[0]) / x.shape[0], test_loss=float(sums[1]) / x.shape[0],
                test_forward_iterations=mean(iters), test_forward_residual=max(resid, default=None))


# -----------------------------------------------------------------------------------------
# one run: model, optimiser, resume, epochs (train, test, log, checkpoint), summary


def summarize(cfg: Config, model: nn.Module, data_name: str, history: list[dict], step: int, device: torch.device,
              world: int) -> dict:
    """The run in one dictionary: final and best test accuracy, time, skipped steps, configuration."""
    final = history[-1] if history else {}
    config = dict(dataclasses.asdict(cfg), activation=ACTIVATION.get(cfg.model, cfg.activation))
    return dict(
        model=cfg.model, parameters=count_parameters(model), data=data_name, activation=config["activation"],
        backward=cfg.backward if hasattr(model, "stats") else None, epochs_completed=len(history), steps=step,
        test_acc=final.get("test_acc"), best_test_acc=max((r["test_acc"] for r in history), default=None),
        train_acc=final.get("train_acc"), seconds=final.get("elapsed"),
        step_seconds=sum(r.get("step_seconds", 0.0) for r in history),
        skipped_steps=sum(len(r["skipped_steps"]) for r in history), contraction=final.get("contraction"),
        device=str(device), world_size=world, torch=torch.__version__, config=config,
    )


def train(cfg: Config, device: torch.device, rank: int, world: int) -> dict:
    """Train ``cfg.model`` on this process's share of every global batch; returns the summary."""
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    data = on_device(load(cfg.data, cfg.data_root or None, cfg.download), device, dtype, cfg.test_limit)
    if data.train_x.shape[0] < cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {data.train_x.shape[0]} training images")
    torch.manual_seed(cfg.seed)
    model = raw_model = build_model(cfg).to(device=device, dtype=dtype)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(cfg.optimizer, raw_model.parameters(), cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    project = (lambda: raw_model.project_(cfg.gamma)) if cfg.contraction == "projection" and hasattr(
        raw_model, "project_") else None
    if project is not None:
        project()
    is_deq = hasattr(raw_model, "stats")
    # under torchrun each process caches the samples it saw; the checkpoint holds rank 0's cache
    cache = inn.SampleCache(data.train_x.shape[0]).to(device) if cfg.warm_start and is_deq else None
    test_cache = inn.SampleCache(data.test_x.shape[0]).to(device) if cfg.eval_warm_start and is_deq else None
    run = Run(cfg, model, raw_model, optimizer, project, data, cache, test_cache, rank, world,
              torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp))

    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")  # written at the end of every epoch
    start_epoch, step, history = resume(ckpt_path, raw_model, optimizer, device, log, modules=dict(
        warm_start=cache) if cache is not None else None) if cfg.resume else (0, 0, [])
    log(f"{cfg.model}: {count_parameters(raw_model):,} parameters | data {data.name} ({data.train_x.shape[0]} "
        f"train, {data.test_x.shape[0]} test) | device {device} x {world} | backward "
        f"{cfg.backward if is_deq else '(explicit)'} | out {cfg.out}")
    run_start = time.time() - (history[-1]["elapsed"] if history else 0.0)
    for epoch in range(start_epoch, cfg.epochs):
        if (cfg.max_steps and step >= cfg.max_steps) or (cfg.stop_after and epoch - start_epoch >= cfg.stop_after):
            break
        if cfg.switch_backward and epoch >= round(cfg.switch_at * cfg.epochs) and is_deq:  # the late estimator
            raw_model.deq.backward = make_backward(cfg.switch_backward, cfg.k, backward_tol(cfg),
                                                   on_failure=cfg.on_failure)
        t0 = time.time()
        step, trained = train_epoch(run, epoch, step)
        train_seconds = time.time() - t0
        tested = evaluate(run, f"epoch {epoch + 1} (test)")
        record = dict(epoch=epoch + 1, step=step, lr=run.lr(max(0, step - 1)), **trained, **tested,
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
                            config=dataclasses.asdict(cfg), warm_start=cache.state_dict() if cache else None)
        if world > 1:
            guarded_barrier(f"after epoch {epoch + 1}")

    summary = summarize(cfg, raw_model, data.name, history, step, device, world)
    if master:
        write_atomic(os.path.join(cfg.out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
        if cfg.plot and history:
            training_curves(history, os.path.join(cfg.out, "curves.png"),
                            f"{cfg.model} ({summary['backward'] or 'explicit'})")
    if world > 1:
        guarded_barrier("after training")
    return summary


# -----------------------------------------------------------------------------------------
# main: the model, then (--baseline) the explicit network of the same size, side by side


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, train, and (``--baseline``, the default for equilibrium models) train the
    explicit baseline of the same size with the same settings in the same run; returns the
    summary (with the baseline's summary under ``"baseline"``)."""
    cfg = parse_args(argv)
    check_config(cfg)
    device, rank, world = init_processes(cfg.device, dist_timeout=cfg.dist_timeout, threads=cfg.threads,
                                         batch_size=cfg.batch_size)
    cfg.device = device.type
    try:
        summary = train(cfg, device, rank, world)
        if cfg.baseline and cfg.model in BASELINE:
            base_cfg = dataclasses.replace(cfg, model=BASELINE[cfg.model], out=os.path.join(cfg.out, "baseline"))
            if cfg.model in MATCHED_SIZE:
                field = MATCHED_SIZE[cfg.model]
                count = lambda size: count_parameters(build_model(dataclasses.replace(base_cfg, **{field: size})))
                base_cfg = dataclasses.replace(base_cfg, **{field: matched_size(count, summary["parameters"])})
            summary["baseline"] = train(base_cfg, device, rank, world)
            if rank == 0:
                write_atomic(os.path.join(cfg.out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
        if rank == 0 and summary["epochs_completed"]:  # the model's accuracy, then the table
            print(f"{cfg.model} test accuracy: {summary['test_acc']:.4f} ({summary['epochs_completed']} epochs, "
                  f"{summary['seconds']:.1f}s)")
            if "baseline" in summary:
                print(comparison(summary))
    finally:
        if world > 1 and dist.is_initialized():
            if not isinstance(sys.exc_info()[1], PeerLostError):  # a lost process: no barrier to wait in
                dist.barrier()
            dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, DataError, CheckpointError, PeerLostError) as err:  # bad option/data/checkpoint, lost peer
        sys.exit(f"error: {err}")
