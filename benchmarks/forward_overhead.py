"""Benchmark 1: forward-solver overhead against the physical limit.

    ratio = solver time / (t x time of one map evaluation)

for the FC tanh map w <- tanh(A w + u), u = B x + c, at batch 128 and 5000, width 200 and 1000,
float32.  The limit is a bare Python loop of t map evaluations, timed interleaved with the
solvers (``tol=0``: exactly t evaluations, no early stop).  Targets: <= 1.10 for
FixedPointIteration, <= 1.5 for Anderson, both with their defaults (at ``tol=0`` the residual
is computed after the last evaluation only).  For information FixedPointIteration is also
timed with ``check_every=1``: a relative residual (a subtraction and two norms) after every
evaluation for a full trace, which costs most on the smallest map.

Also reported (no target): the same ratio for the functional ``fixed_point`` in inference
(``no_grad``), whose unit is one full evaluation ``f(w, x)``, and what one map evaluation costs
when the spectrally-normalised weight is re-parametrised on every read instead of cached.

    python benchmarks/forward_overhead.py [--quick] [--device cpu|cuda] [--iters 50]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.nn.utils import parametrize

import harness
import implicitnets as inn


def main() -> int:
    parser = harness.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--iters", type=int, default=0, help="map evaluations t per solve (0: 50, quick 20)")
    parser.add_argument("--in-features", type=int, default=784)
    parser.add_argument("--memory", type=int, default=5, help="Anderson memory")
    args = parser.parse_args()
    device = harness.setup(args)
    t = args.iters or (20 if args.quick else 50)
    grid = [(128, 200), (128, 1000), (5000, 200), (5000, 1000)]
    verdicts = harness.Verdicts()

    rows, layer_rows, param_rows = [], [], []
    worst = {"fp": 0.0, "anderson": 0.0}
    for batch, width in grid:
        torch.manual_seed(args.seed)
        f = inn.maps.TanhMap(args.in_features, width, contraction=0.9).to(device)
        x = torch.randn(batch, args.in_features, device=device)
        fp = inn.FixedPointIteration(max_iter=t, tol=0.0)
        fp1 = inn.FixedPointIteration(max_iter=t, tol=0.0, check_every=1)
        aa = inn.Anderson(max_iter=t, tol=0.0, memory=args.memory)
        with torch.no_grad(), parametrize.cached():
            u = f.inject(x)
            z0 = f.initial_state(x)
            g = lambda w: f.step(w, u)

            def limit():
                w = z0
                for _ in range(t):
                    w = g(w)
                return w

            times = harness.compare(
                {"limit": limit, "fp": lambda: fp.solve(g, z0), "fp1": lambda: fp1.solve(g, z0),
                 "anderson": lambda: aa.solve(g, z0)},
                device=device, repeats=args.repeats, min_time=args.min_time,
            )
        r_fp = harness.paired_ratio(times, "fp", "limit")
        r_fp1 = harness.paired_ratio(times, "fp1", "limit")
        r_aa = harness.paired_ratio(times, "anderson", "limit")
        worst["fp"], worst["anderson"] = max(worst["fp"], r_fp), max(worst["anderson"], r_aa)
        worst["fp1"] = max(worst.get("fp1", 0.0), r_fp1)
        per_eval = harness.median(times["limit"]) / t
        rows.append([batch, width, t, f"{per_eval * 1e6:.1f}", r_fp, r_aa, r_fp1])

        # The functional API in inference: unit is one full evaluation f(w, x).
        with torch.no_grad():
            def full_limit():
                with parametrize.cached():
                    w = z0
                    for _ in range(t):
                        w = f(w, x)
                return w

            def layer(solver):
                return lambda: inn.fixed_point(f, x, solver=solver, backward=inn.JacobianFree())

            lt = harness.compare(
                {"limit": full_limit, "fp": layer(fp), "anderson": layer(aa)},
                device=device, repeats=max(3, args.repeats // 2), min_time=args.min_time,
            )
        layer_rows.append([batch, width, t, harness.paired_ratio(lt, "fp", "limit"),
                           harness.paired_ratio(lt, "anderson", "limit")])

        # One map evaluation: parametrised weight re-computed per read vs cached vs plain weight.
        plain = inn.maps.TanhMap(args.in_features, width, contraction=None).to(device)
        with torch.no_grad():
            def cached_step():
                with parametrize.cached():
                    return f.step(z0, u)

            pt = harness.compare(
                {"uncached": lambda: f.step(z0, u), "cached": cached_step, "plain": lambda: plain.step(z0, u)},
                device=device, repeats=max(3, args.repeats // 2), min_time=args.min_time,
            )
        param_rows.append([batch, width, harness.paired_ratio(pt, "uncached", "plain"),
                           harness.paired_ratio(pt, "cached", "plain")])
        print(f"  done batch={batch} width={width}", file=sys.stderr, flush=True)

    harness.print_table(
        ["batch", "width", "t", "one eval (us)", "FixedPointIteration / limit", "Anderson / limit",
         "FixedPointIteration check_every=1 / limit [info]"], rows,
        "Solver time / (t x one map evaluation)  [solver.solve(g, z0), tol=0]",
    )
    harness.print_table(
        ["batch", "width", "t", "fixed_point FP / limit", "fixed_point Anderson / limit"], layer_rows,
        "inn.fixed_point(...) under no_grad / (t x f(w, x))  [info, no target]",
    )
    harness.print_table(
        ["batch", "width", "step() uncached / plain weight", "step() in parametrize.cached() / plain"],
        param_rows, "Cost of one map evaluation with the spectral-norm parametrisation  [info]",
    )
    verdicts.check("FixedPointIteration overhead <= 1.10 x limit (all 4 sizes)", worst["fp"] <= 1.10,
                   f"worst {worst['fp']:.3f}")
    print(f"(info) FixedPointIteration(check_every=1): worst {worst['fp1']:.3f} x limit")
    verdicts.check("Anderson overhead <= 1.5 x limit (all 4 sizes)", worst["anderson"] <= 1.5,
                   f"worst {worst['anderson']:.3f}")
    return verdicts.finish()


if __name__ == "__main__":
    sys.exit(main())
