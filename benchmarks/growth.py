"""Benchmark 5: how a training step grows with batch, width and t, and samples per second.

One training step (forward + backward + SGD update) of the FC tanh equilibrium model
(TanhMap, spectral bound 0.9, linear head, cross-entropy) with FixedPointIteration(t, tol=0)
and AID(Neumann(k = t, tol=0)).  Each sweep varies one of batch, width, t (the points of a
sweep are timed interleaved) and reports the least-squares exponent p of time ~ size^p.
Ideal exponents: 1 in batch, 2 in width (a width x width matmul dominates), 1 in t (t + k map
evaluations and vector-Jacobian products, nothing that grows faster).  Targets: p_batch <= 1.1,
p_width <= 2.1, p_t <= 1.1 (no superlinear work hidden in the loops).

Samples per second are reported for the FC model (batch 128, width 200, t = k = 20: the MNIST
reference protocol) and for the conv model of ``models/conv.py`` (skipped with a message when
that file does not exist yet).

    python benchmarks/growth.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import harness
import implicitnets as inn
from train.cli import make_backward


def fc_step(batch: int, width: int, t: int, device, in_features: int = 784, train: bool = True):
    """A closure running one training step (or one inference forward) of the FC model."""
    layer = inn.FixedPointLayer(inn.maps.TanhMap(in_features, width, contraction=0.9),
                                solver=inn.FixedPointIteration(max_iter=t, tol=0.0),
                                backward=make_backward("aid-fp", t))
    model = nn.Sequential(layer, nn.Linear(width, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, in_features, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer():
        with torch.no_grad():
            return model(x)

    return step if train else infer


def conv_model(device):
    """The conv equilibrium model from models/conv.py, or (None, reason)."""
    path = Path(__file__).resolve().parents[1] / "models" / "conv.py"
    if not path.exists():
        return None, f"models/conv.py does not exist yet ({path})"
    try:
        import models.conv as conv
    except Exception as exc:
        return None, f"models/conv.py failed to import: {type(exc).__name__}: {exc}"
    classes = [c for _, c in inspect.getmembers(conv, inspect.isclass)
               if issubclass(c, nn.Module) and c.__module__ == conv.__name__]
    builders = [getattr(conv, n) for n in getattr(conv, "__all__", []) if callable(getattr(conv, n))]
    for candidate in builders + classes:
        try:
            model = candidate()
        except Exception:
            continue
        if isinstance(model, nn.Module):
            return model.to(device), f"{candidate.__name__}() from models/conv.py"
    return None, "models/conv.py has no model constructible without arguments"


def sweep(name, points, make, args, device):
    cands = {p: make(p) for p in points}
    times = harness.compare({str(p): fn for p, fn in cands.items()}, device=device,
                            repeats=args.repeats, min_time=args.min_time)
    med = [harness.median(times[str(p)]) for p in points]
    return med, harness.fit_exponent(points, med)


def main() -> int:
    parser = harness.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    device = harness.setup(args)
    warnings.simplefilter("ignore", inn.ConvergenceWarning)
    verdicts = harness.Verdicts()
    q = args.quick
    grids = {
        "batch": ([64, 256, 1024] if q else [32, 64, 128, 256, 512, 1024, 2048],
                  lambda b: fc_step(b, 200, 20, device), "width 200, t = k = 20", 1.1),
        "width": ([100, 400, 1600] if q else [100, 200, 400, 800, 1600],
                  lambda w: fc_step(128, w, 20, device), "batch 128, t = k = 20", 2.1),
        "t": ([5, 20, 80] if q else [5, 10, 20, 40, 80, 160],
              lambda t: fc_step(128, 200, t, device), "batch 128, width 200, k = t", 1.1),
    }
    for name, (points, make, fixed, target) in grids.items():
        med, p = sweep(name, points, make, args, device)
        rows = [[pt, f"{m * 1e3:.2f}", m / med[0] * points[0] / pt] for pt, m in zip(points, med)]
        harness.print_table([name, "step (ms)", f"time per unit of {name}, relative to {name}={points[0]}"],
                            rows, f"Training step vs {name} ({fixed}); fitted exponent p = {p:.2f}")
        verdicts.check(f"step time ~ {name}^p with p <= {target}", p <= target, f"p = {p:.2f}")
        print(f"  done sweep {name}", file=sys.stderr, flush=True)

    rows = []
    fc_train, fc_infer = fc_step(128, 200, 20, device), fc_step(128, 200, 20, device, train=False)
    times = harness.compare({"train": fc_train, "infer": fc_infer}, device=device,
                            repeats=args.repeats, min_time=args.min_time)
    rows.append(["FC tanh (784-200-10, t = k = 20)", 128, f"{128 / harness.median(times['train']):.0f}",
                 f"{128 / harness.median(times['infer']):.0f}"])
    model, note = conv_model(device)
    if model is None:
        print(f"# conv model skipped: {note}")
        rows.append(["conv (models/conv.py)", "-", "skipped", note])
    else:
        batch = 64
        x = torch.randn(batch, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def conv_train():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def conv_infer():
            with torch.no_grad():
                return model(x)

        try:
            times = harness.compare({"train": conv_train, "infer": conv_infer}, device=device,
                                    repeats=max(3, args.repeats // 2), min_time=args.min_time, warmup=1)
            rows.append([f"conv: {note}", batch, f"{batch / harness.median(times['train']):.0f}",
                         f"{batch / harness.median(times['infer']):.0f}"])
        except Exception as exc:
            rows.append([f"conv: {note}", batch, "error", f"{type(exc).__name__}: {exc}"[:100]])
    harness.print_table(["model", "batch", "train samples/s", "inference samples/s"], rows,
                        "Throughput (float32)")
    return verdicts.finish()


if __name__ == "__main__":
    sys.exit(main())
