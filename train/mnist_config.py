"""The options of :mod:`train.mnist`: a dataclass turned into argparse, presets, each model's
own defaults, and the checks that turn a bad option into a one-line ``error:``.

    cfg = parse_args(["--model", "conv", "--epochs", "15"])
    check_config(cfg)   # ValueError naming the option
"""

from __future__ import annotations

from dataclasses import dataclass

from train.cli import make_backward
from train.config import check_choices, config_parser, parse_config
from train.data import DATASETS
from train.schedule import SCHEDULES

__all__ = ["Config", "PRESETS", "MODEL_DEFAULTS", "BASELINE", "MATCHED_SIZE", "ACTIVATION", "parse_args",
           "check_config", "backward_tol"]

BASELINE = {"fc": "mlp", "conv": "cnn", "mon": "mlp", "monconv": "cnn"}  # equilibrium model → explicit network
MATCHED_SIZE = {"mon": "width", "monconv": "channels"}  # the baseline's size option matched to a monotone model
ACTIVATION = {"fc": "tanh", "mlp": "tanh", "mon": "relu", "monconv": "relu", "cnn": "relu"}  # conv: --activation

@dataclass
class Config:
    model: str = "fc"  # fc | conv | mlp | cnn | mon | monconv
    backward: str = "aid-fp"  # itd | itd:K | aid-fp | aid-cg | aid-normalcg | aid-gmres | jfb
    t: int = 20  # forward solver iterations (max_iter)
    k: int = 20  # backward linear-solver iterations (AID)
    tol: float = 1e-4  # forward stopping tolerance on the relative residual; 0 runs exactly t
    backward_tol: float = -1.0  # AID tolerance (at most k iterations); -1: tied to --tol; 0 runs exactly k
    switch_backward: str = ""  # from epoch --switch-at on, train with this backward mode instead (e.g. aid-fp)
    switch_at: float = 0.5  # the fraction of --epochs after which --switch-backward takes over
    on_failure: str = "warn"  # a failed AID adjoint solve: warn (keep it), raise, itd (recompute by ITD), jfb
    solver: str = "fp"  # fp | anderson | broyden | pr | fb (pr, fb: monotone models only)
    alpha: float = 1.0  # step size of the splitting solvers pr / fb
    m: float = 0.1  # monotonicity margin of mon / monconv: I − W ⪰ m I
    contraction: str = "spectral"  # spectral | projection | none
    gamma: float = 0.9  # contraction bound on ‖A‖₂ (operator norm for conv)
    conv_bound: str = "circulant"  # conv: circulant (an exact upper bound by FFT) | subspace (the norm, iterated)
    width: int = 200  # hidden size of fc / mlp
    channels: int = 48  # channels of conv / cnn
    activation: str = "relu"  # conv cell activation: relu | tanh (fc and mlp use tanh, mon and monconv relu)
    warm_start: bool = False  # start each training sample's solves from its last fixed point and adjoint solution
    eval_warm_start: bool = False  # start each test sample's solve from its fixed point at the previous evaluation
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
    data: str = "mnist-5k"  # mnist-5k | fashion-5k (embedded) | mnist | fashion-mnist (full: downloaded into runs/data)
    data_root: str = ""  # read an existing copy of the full set from this folder (offline)
    download: bool = False  # with --data-root: download the full set into that folder with torchvision
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


# a model's own defaults (under a preset's and any option given explicitly)
MODEL_DEFAULTS = {
    # the tanh FC model: chosen on time to the MLP's accuracy (benchmarks/time_to_accuracy.py): a forward
    # solve to 1e-3 and the phantom gradient of 2 steps from w* reach the MLP's accuracy on every seed in
    # about 2x its time; exact AID (--backward aid-fp --tol 1e-4) costs about 1.3x more per step
    "fc": dict(backward="phantom:2", tol=1e-3),
    # the conv model: the same choice (98.45% against the CNN's 98.18% on seed 0, as with exact AID)
    "conv": dict(backward="phantom:2", tol=1e-3),
    # monDEQ, FC: the tanh FC model's budget; lr, weight decay and label smoothing tuned on the 5k protocol;
    # the phantom gradient damped by 0.5 (a monotone map need not be a contraction, so the undamped steps and
    # AID-FP's Neumann series may diverge) and a forward solve to 1e-3, chosen on time to accuracy; PR's step
    # α = 0.75 takes 15 iterations per solve over a run where α = 1 takes 17 (α only moves the path, not z*)
    "mon": dict(width=174, solver="pr", alpha=0.75, m=0.5, t=40, tol=1e-3, backward="phantom:2:0.5", lr=2e-3,
                weight_decay=1e-4, label_smoothing=0.1),
    # monDEQ, conv: the conv model's budget; the FC monotone model's damped phantom gradient and tolerance
    "monconv": dict(channels=38, solver="pr", alpha=1.0, m=0.5, t=30, tol=1e-3, backward="phantom:2:0.5", lr=2e-3,
                    weight_decay=1e-4, epochs=10),
}


def parse_args(argv: list[str] | None = None, description: str | None = None) -> Config:
    """``argv`` (default: the command line) as a :class:`Config`: the model's defaults, then
    the preset's, then the options given; ``description`` heads ``--help``."""
    prog = "python -m train.mnist"
    cfg = parse_config(Config, argv, prog=prog, description=description, presets=PRESETS)
    if cfg.model not in MODEL_DEFAULTS:
        return cfg
    parser = config_parser(Config, prog, description)
    parser.set_defaults(**{**MODEL_DEFAULTS[cfg.model], **PRESETS.get(cfg.preset, {})})
    return Config(**vars(parser.parse_args(argv)))


CHOICES = dict(
    model=("fc", "conv", "mlp", "cnn", "mon", "monconv"), solver=("fp", "anderson", "broyden", "pr", "fb"),
    contraction=("spectral", "projection", "none"),
    optimizer=("adam", "sgd"), schedule=SCHEDULES, device=("auto", "cpu", "cuda"),
    dtype=("float32", "float64"), data=DATASETS, activation=("relu", "tanh"), conv_bound=("circulant", "subspace"),
)


def check_config(cfg: Config) -> None:
    """Raise ``ValueError`` naming the first bad option of ``cfg``."""
    check_choices(cfg, CHOICES, at_least_one=("t", "k", "epochs", "batch_size", "eval_batch_size"))
    if not (cfg.lr > 0 and cfg.gamma > 0 and cfg.tol >= 0 and (cfg.backward_tol >= 0 or cfg.backward_tol == -1)
            and cfg.augment >= 0):
        raise ValueError("--lr and --gamma must be > 0; --tol and --augment must be >= 0; --backward-tol >= 0 or -1 "
                         "(tied to --tol)")
    if not cfg.dist_timeout > 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {cfg.dist_timeout}")
    if cfg.solver in ("pr", "fb") and cfg.model not in MATCHED_SIZE:
        raise ValueError(f"--solver {cfg.solver} is an operator-splitting solver: only for --model mon or monconv")
    if not (cfg.alpha > 0 and cfg.m > 0):
        raise ValueError("--alpha and --m must be > 0")
    make_backward(cfg.backward, cfg.k, backward_tol(cfg), on_failure=cfg.on_failure)  # raises on an unknown mode
    if cfg.switch_backward:
        make_backward(cfg.switch_backward, cfg.k, backward_tol(cfg), on_failure=cfg.on_failure)
    if not 0 <= cfg.switch_at <= 1:
        raise ValueError(f"--switch-at must be a fraction of the epochs in [0, 1], got {cfg.switch_at}")


def backward_tol(cfg: Config) -> float:
    """The adjoint solve's tolerance: ``--backward-tol``, or the forward's ``--tol`` when it is -1."""
    return cfg.tol if cfg.backward_tol == -1 else cfg.backward_tol
