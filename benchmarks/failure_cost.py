"""What a failed adjoint solve costs under each failure policy (time of one training step).

The FC equilibrium step of the MNIST reference protocol (TanhMap width 200, spectral bound
0.9, batch 100, FixedPointIteration(t = 20, tol=0), AID-Neumann(k = 20, tol=0), linear head,
cross-entropy, SGD) is timed when the adjoint solve succeeds and when it fails (a Neumann
solver that reports ``converged=False`` after doing the same work), under ``Warn``,
``Raise`` (the step is skipped by ``train.step.guarded_step``), ``FallbackITD`` and
``FallbackJacobianFree``.  Times are medians of interleaved rounds (``harness.compare``),
ratios paired within rounds; peak memory is that of live tensors (``harness.peak_memory``).

    python benchmarks/failure_cost.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness
import implicitnets as inn
from implicitnets.linear import LinearInfo, LinearSolver, Neumann
from train.step import guarded_step


@dataclass(frozen=True)
class FailingNeumann(LinearSolver):
    """Neumann's work, reported as not converged."""

    inner: Neumann = Neumann(max_iter=20, tol=0.0)

    def solve(self, op: inn.LinearOperator, b: Tensor, x0: Tensor | None = None) -> tuple[Tensor, LinearInfo]:
        v, info = self.inner.solve(op, b, x0)
        return v, LinearInfo(info.iterations, info.residual, False)


def step_fn(linear_solver: LinearSolver, policy: inn.FailurePolicy):
    torch.manual_seed(0)
    layer = inn.FixedPointLayer(inn.maps.TanhMap(784, 200, contraction=0.9),
                                solver=inn.FixedPointIteration(max_iter=20, tol=0.0),
                                backward=inn.AID(linear_solver, on_failure=policy))
    model = nn.Sequential(layer, nn.Linear(200, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(100, 784), torch.randint(0, 10, (100,))

    def step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", inn.ConvergenceWarning)
            guarded_step(list(model.parameters()), optimizer,
                         lambda: (nn.functional.cross_entropy(model(x), y), None))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser)
    args = parser.parse_args()
    device = harness.setup(args)
    candidates = {
        "converged": step_fn(Neumann(max_iter=20, tol=0.0), inn.Warn()),
        "failed, Warn": step_fn(FailingNeumann(), inn.Warn()),
        "failed, Raise (skipped)": step_fn(FailingNeumann(), inn.Raise()),
        "failed, FallbackITD": step_fn(FailingNeumann(), inn.FallbackITD()),
        "failed, FallbackJacobianFree": step_fn(FailingNeumann(), inn.FallbackJacobianFree()),
    }
    times = harness.compare(candidates, device=device, repeats=args.repeats, min_time=args.min_time)
    peaks = {name: harness.peak_memory(fn, device) for name, fn in candidates.items()}
    rows = [(name, f"{1e3 * harness.median(times[name]):.2f}", f"{harness.paired_ratio(times, name, 'converged'):.2f}",
             harness.fmt_bytes(peaks[name]), f"{peaks[name] / peaks['converged']:.2f}") for name in candidates]
    harness.print_table(["step", "ms", "time / converged", "peak memory", "peak / converged"], rows,
                        "one training step when the adjoint solve fails (FC width 200, batch 100, t = k = 20)")

if __name__ == "__main__":
    main()
