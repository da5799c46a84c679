"""Benchmark 9: time to accuracy, each equilibrium model against its explicit baseline.

For every model of ``--models`` (fc, conv, mon, monconv) and every seed of ``--seeds`` the
script runs ``python -m train.mnist --model <m> --seed <s>`` with the model's own defaults
(and any extra options after ``--``): the equilibrium model, then its explicit baseline of
the same size with the same data, epochs, optimiser, schedule and augmentation.  From the
two runs' ``metrics.jsonl`` it prints:

* the final test accuracy of both;
* the time ratio equilibrium / baseline, in **model-step time** (the training steps alone:
  forward, backward, optimiser step; data preparation and evaluation excluded; synchronised
  on CUDA) and in **wall time** (the whole run, evaluation included);
* the **time to accuracy**: the equilibrium model's time to its first epoch whose test
  accuracy reaches the baseline's final accuracy, divided by the baseline's whole time, in
  both clocks (``–`` when it never does);
* forward and backward iterations per training step (means over the run).

With ``torchdeq`` installed (``pip install -e ".[bench]"``), the fc model is also trained
with torchdeq's recipe as the peer: the same ``TanhMap`` cell and head, solved by
``torchdeq.get_deq(f_solver="anderson")`` with torchdeq's defaults (40 iterations, tol 1e-3,
1-step phantom gradient), in the same training loop; its time to the MLP's accuracy is
compared with ours.

Targets (the FC one on every seed; the others in model-step time, mean over seeds):
FC ≤ 2.0× its MLP in model-step and wall time at accuracy ≥ the MLP's; conv ≤ 4× the CNN;
mon ≤ 2.5× its MLP; monconv ≤ 5× the CNN; FC time to the MLP's accuracy ≤ torchdeq's.

    python benchmarks/time_to_accuracy.py                        # fc, seeds 0 1 2 (about 20 min on 2 cores)
    python benchmarks/time_to_accuracy.py --models fc,mon,conv,monconv --seeds 0
    python benchmarks/time_to_accuracy.py --models fc --seeds 0 -- --backward aid-fp --backward-tol 0
    python benchmarks/time_to_accuracy.py --quick                # 3 epochs of fc, a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import harness
import implicitnets as inn
from train import mnist

MODELS = ("fc", "conv", "mon", "monconv")
EPOCHS = {"conv": 15}  # the README's commands; the others use train.mnist's defaults
TARGETS = {"fc": 2.0, "conv": 4.0, "mon": 2.5, "monconv": 5.0}  # model-step time, equilibrium / baseline


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


CLOCKS = {"wall": "step_seconds", "cpu": "step_cpu_seconds"}  # --clock: the model-step time in metrics.jsonl


def time_to(history: list[dict], accuracy: float, key: str) -> tuple[float, float] | None:
    """(model-step seconds, wall seconds) up to the first epoch with test accuracy >= ``accuracy``."""
    steps = 0.0
    for r in history:
        steps += r[key]
        if r["test_acc"] >= accuracy:
            return steps, r["elapsed"]
    return None


def iterations(history: list[dict], key: str) -> float | None:
    values = [r[key] for r in history if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def summarize(ours: list[dict], base: list[dict], key: str) -> dict:
    """The ratios of one seed: equilibrium history ``ours`` against the baseline's ``base``;
    ``key`` names the model-step time of an epoch."""
    base_steps, base_wall = sum(r[key] for r in base), base[-1]["elapsed"]
    steps, wall = sum(r[key] for r in ours), ours[-1]["elapsed"]
    reached = time_to(ours, base[-1]["test_acc"], key)
    return dict(
        acc=ours[-1]["test_acc"], base_acc=base[-1]["test_acc"], steps=steps, base_steps=base_steps,
        step_ratio=steps / base_steps, wall_ratio=wall / base_wall,
        tta_steps=reached[0] / base_steps if reached else math.inf,
        tta_wall=reached[1] / base_wall if reached else math.inf,
        fwd=iterations(ours, "forward_iterations"), bwd=iterations(ours, "backward_iterations"),
    )


class TorchdeqFC(nn.Module):
    """The fc model (``TanhMap`` cell, linear head) solved by torchdeq with its defaults and an
    Anderson forward; ``stats`` carries torchdeq's iteration count for the training log."""

    def __init__(self, width: int, contraction: float) -> None:
        super().__init__()
        from torchdeq import get_deq

        self.cell = inn.maps.TanhMap(784, width, contraction=contraction)
        self.head = nn.Linear(width, 10)
        self.deq = get_deq(f_solver="anderson")
        self.stats = inn.SolverStats(0, math.nan, True)

    def lipschitz_bound(self) -> float:
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.cell.A.weight.detach(), ord=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        u = self.cell.inject(x)
        z, info = self.deq(lambda z: self.cell.step(z, u), self.cell.initial_state(x))
        self.stats = inn.SolverStats(int(info["nstep"].float().mean()), float(info["rel_lowest"].float().mean()),
                                     True)
        return self.head(z[-1])


@contextlib.contextmanager
def torchdeq_model():
    """train.mnist builds :class:`TorchdeqFC` for ``--model fc`` inside this block."""
    build = mnist.build_model

    def peer(cfg):
        return TorchdeqFC(cfg.width, cfg.gamma) if cfg.model == "fc" else build(cfg)

    mnist.build_model = peer
    try:
        yield
    finally:
        mnist.build_model = build


def run(model: str, seed: int, extra: list[str], out: Path, baseline: bool = True) -> Path:
    argv = ["--model", model, "--seed", str(seed), "--out", str(out), "--no-progress", "--no-plot", *extra]
    if model in EPOCHS and "--epochs" not in extra:
        argv += ["--epochs", str(EPOCHS[model])]
    if not baseline:
        argv.append("--no-baseline")
    print(f"$ python -m train.mnist {' '.join(argv)}", flush=True)
    mnist.main(argv)
    return out


def spread(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return "–" if not finite else f"{statistics.mean(finite):.2f} ({len(values) - len(finite)} not reached)"
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fc", help="comma-separated: fc, conv, mon, monconv")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="3 epochs, seed 0: a smoke run (targets not judged)")
    parser.add_argument("--no-peer", action="store_true", help="skip the torchdeq peer even if installed")
    parser.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="model-step time as wall time or as the process's CPU time (with -- --threads 1: "
                             "robust to other jobs on the machine)")
    parser.add_argument("extra", nargs="*", help="options after -- go to every train.mnist run")
    args = parser.parse_args()
    key = CLOCKS[args.clock]
    models = [m for m in args.models.split(",") if m]
    if unknown := [m for m in models if m not in MODELS]:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    extra = [*args.extra, *(["--epochs", "3"] if args.quick else [])]
    peer = "fc" in models and not args.no_peer and importlib.util.find_spec("torchdeq") is not None
    with contextlib.ExitStack() as stack:
        root = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        results: dict[str, list[dict]] = {}
        for model in models:
            for seed in seeds:
                out = run(model, seed, extra, root / f"{model}-seed{seed}")
                results.setdefault(model, []).append(summarize(records(out), records(out / "baseline"), key))
                if model == "fc" and peer:
                    with torchdeq_model():
                        theirs = run("fc", seed, extra, root / f"torchdeq-seed{seed}", baseline=False)
                    peer_result = summarize(records(theirs), records(out / "baseline"), key)  # against the fc MLP
                    results.setdefault("fc (torchdeq)", []).append(peer_result)
        return report(results, judged=not args.quick)


def report(results: dict[str, list[dict]], judged: bool) -> int:
    rows = []
    for name, runs in results.items():
        rows.append([
            name, len(runs), spread([100 * r["acc"] for r in runs]), spread([100 * r["base_acc"] for r in runs]),
            spread([r["step_ratio"] for r in runs]), spread([r["wall_ratio"] for r in runs]),
            spread([r["tta_steps"] for r in runs]), spread([r["tta_wall"] for r in runs]),
            f"{iterations(runs, 'fwd') or 0:.1f}",
            "–" if iterations(runs, "bwd") is None else f"{iterations(runs, 'bwd'):.1f}",
        ])
    harness.print_table(
        ["model", "seeds", "test acc %", "baseline acc %", "model-step ratio", "wall ratio",
         "time to baseline acc (model steps)", "(wall)", "fwd it/step", "bwd it/step"],
        rows, "Equilibrium model / explicit baseline of the same size, same recipe (ratios: time ÷ baseline's time)")
    if not judged:
        return 0
    verdicts = harness.Verdicts()
    for model, runs in results.items():
        if model not in TARGETS:
            continue
        target, steps = TARGETS[model], [r["step_ratio"] for r in runs]
        if model == "fc":
            walls = [r["wall_ratio"] for r in runs]
            ok = all(max(r["step_ratio"], r["wall_ratio"]) <= target and r["acc"] >= r["base_acc"] for r in runs)
            verdicts.check(f"fc: model-step and wall time <= {target}x the MLP at accuracy >= the MLP's, every seed",
                           ok, f"model steps {spread(steps)}, wall {spread(walls)}, accuracy >= MLP on "
                           f"{sum(r['acc'] >= r['base_acc'] for r in runs)}/{len(runs)} seeds")
        else:
            verdicts.check(f"{model}: model-step time <= {target}x its baseline (mean over seeds)",
                           statistics.mean(steps) <= target, spread(steps))
    if "fc (torchdeq)" in results and "fc" in results:
        ours = statistics.mean(r["tta_steps"] for r in results["fc"])
        theirs = statistics.mean(r["tta_steps"] for r in results["fc (torchdeq)"])
        verdicts.check("fc: time to the MLP's accuracy (model steps) <= torchdeq's", ours <= theirs,
                       f"ours {ours:.2f}, torchdeq {theirs:.2f} (x the MLP's whole time)")
    return verdicts.finish()


if __name__ == "__main__":
    sys.exit(main())
