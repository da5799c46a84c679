"""Benchmark 2: backward time and peak memory of each backward mode for t = k in {10, 50, 200}.

One training step of the FC tanh equilibrium model (FixedPointLayer + linear head +
cross-entropy, forward and backward) per mode, t forward iterations (tol=0) and k adjoint
iterations (tol=0).  Peak memory is the peak of live tensor bytes during the step above what
was live before it (CUDA: max_memory_allocated; CPU: the allocator events recorded by
torch.profiler, see harness.py); "saved" is what autograd keeps for backward after the forward.

Target: AID peak memory at t = 200 <= 1.1 x its peak at t = 10 (every AID linear solver;
GMRES with restart = 10, whose memory is O(restart·d) whatever k).
ITD is expected to grow linearly with t (shown, checked as >= 5x from t = 10 to 200).

    python benchmarks/backward_memory.py [--quick] [--device cpu|cuda] [--batch 128 --width 200]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from torch import nn

import harness
import implicitnets as inn


def modes(k: int) -> dict[str, object]:
    """Backward modes compared; AID solvers run exactly k iterations (tol=0)."""
    return {
        "ITD": inn.ITD(),
        "AID-FP": inn.AID(inn.linear.Neumann(max_iter=k, tol=0.0)),
        # GMRES keeps restart + 1 Krylov vectors: O(restart·d), the same for every k >= restart
        # (restart = 10 = the smallest t here, so that every row runs full cycles).
        "AID-GMRES": inn.AID(inn.linear.GMRES(max_iter=k, tol=0.0, restart=10)),
        "AID-NormalCG": inn.AID(inn.linear.NormalCG(max_iter=k, tol=0.0)),
        "JacobianFree": inn.JacobianFree(),
    }


class Model(nn.Module):
    """FixedPointLayer(TanhMap) followed by a linear classifier."""

    def __init__(self, in_features: int, width: int, classes: int, solver, backward):
        super().__init__()
        self.deq = inn.FixedPointLayer(inn.maps.TanhMap(in_features, width, contraction=0.9),
                                       solver=solver, backward=backward)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.deq(x))


def main() -> int:
    parser = harness.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--in-features", type=int, default=784)
    parser.add_argument("--ts", default="10,50,200", help="comma-separated t = k values")
    args = parser.parse_args()
    device = harness.setup(args)
    ts = [int(s) for s in args.ts.split(",")]
    x = torch.randn(args.batch, args.in_features, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    warnings.simplefilter("ignore", inn.ConvergenceWarning)

    peak: dict[tuple[str, int], int] = {}
    saved: dict[tuple[str, int], int] = {}
    step_ms: dict[tuple[str, int], float] = {}
    errors: dict[tuple[str, int], str] = {}
    for t in ts:
        steps = {}
        for name, backward in modes(t).items():
            torch.manual_seed(args.seed)
            model = Model(args.in_features, args.width, 10, inn.FixedPointIteration(max_iter=t, tol=0.0),
                          backward).to(device)
            params = list(model.parameters())

            def step(model=model, params=params):
                for p in params:
                    p.grad = None
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            try:
                step()
                step()
            except Exception as exc:  # a mode that fails is reported, not fatal
                errors[(name, t)] = f"{type(exc).__name__}: {exc}"[:120]
                continue
            steps[name] = step
            peak[(name, t)] = harness.peak_memory(step, device)
            saved[(name, t)] = harness.saved_bytes(lambda m=model: m(x))
        times = harness.compare(steps, device=device, repeats=args.repeats, min_time=args.min_time)
        for name in steps:
            step_ms[(name, t)] = harness.median(times[name]) * 1e3
        print(f"  done t=k={t}", file=sys.stderr, flush=True)

    names = list(modes(1))
    rows = []
    for name in names:
        for t in ts:
            key = (name, t)
            if key in errors:
                rows.append([name, t, "error", errors[key], "", ""])
                continue
            rows.append([name, t, f"{step_ms[key]:.2f}", harness.fmt_bytes(peak[key]), harness.fmt_bytes(saved[key]),
                         peak[key] / peak[(name, ts[0])] if (name, ts[0]) in peak else ""])
    harness.print_table(["mode", "t = k", "step (ms)", "peak memory", "saved for backward",
                         f"peak / peak at t={ts[0]}"], rows,
                        f"Training step, batch {args.batch}, width {args.width}, float32")

    verdicts = harness.Verdicts()
    lo, hi = ts[0], ts[-1]
    for name in names:
        if (name, lo) not in peak or (name, hi) not in peak:
            verdicts.check(f"{name} measured at t={lo} and t={hi}", False,
                           errors.get((name, lo)) or errors.get((name, hi), "missing"))
            continue
        growth = peak[(name, hi)] / peak[(name, lo)]
        if name.startswith("AID"):
            verdicts.check(f"{name} peak at t={hi} <= 1.1 x peak at t={lo}", growth <= 1.1, f"{growth:.3f}x")
        elif name == "ITD":
            verdicts.check(f"ITD peak grows with t (t={hi} vs t={lo} >= 5x)", growth >= 5, f"{growth:.1f}x")
        else:
            verdicts.check(f"{name} peak at t={hi} <= 1.1 x peak at t={lo}", growth <= 1.1, f"{growth:.3f}x")
    return verdicts.finish()


if __name__ == "__main__":
    sys.exit(main())
