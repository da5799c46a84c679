"""Benchmark 6: what freezing converged samples saves (``freeze_converged=True``).

A batch whose samples converge at very different speeds: the row-separable map

    z_b <- tanh(s_b Q z_b + u_b),  Q orthogonal,  |u_b| small,  s_b spread evenly over [0.3, 0.98]

(sample b is an s_b-contraction, near-linear: its error shrinks by about s_b per step),
float32, solved to relative residual ``tol`` by FixedPointIteration and Anderson, each with
and without ``freeze_converged``.  Frozen samples are no longer evaluated: the solver hands
the map ``g.rows(active)`` (:class:`implicitnets.BoundMap`).  Reported side by side
(interleaved rounds, see harness.py): wall time, map evaluations summed over samples
(``stats.sample_iterations``), the ratios freeze / no freeze, and the largest difference
between the two answers.

    python benchmarks/per_sample.py [--quick] [--batch 1000] [--width 200] [--tol 1e-5]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

import harness
import implicitnets as inn


def problem(batch: int, width: int, device: torch.device, seed: int):
    """The map ``g`` (a BoundMap), the start ``z0`` and the per-sample contraction factors."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
    A = Q.float().to(device)
    scale = torch.linspace(0.3, 0.98, batch).to(device)
    u = 0.1 * torch.randn(batch, width, generator=gen).to(device)

    def step(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.addcmul(v[:, 1:], v[:, :1], z @ A.T))

    return inn.BoundMap(step, torch.cat([scale[:, None], u], 1)), torch.zeros(batch, width, device=device), scale


def main() -> int:
    parser = harness.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--batch", type=int, default=0, help="samples (0: 1000, quick 256)")
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--max-iter", type=int, default=2000)
    parser.add_argument("--memory", type=int, default=5, help="Anderson memory")
    args = parser.parse_args()
    device = harness.setup(args)
    batch = args.batch or (256 if args.quick else 1000)
    g, z0, scale = problem(batch, args.width, device, args.seed)
    print(f"# batch {batch}, width {args.width}, float32, tol {args.tol:g}, contraction factors "
          f"{float(scale.min()):.2f}..{float(scale.max()):.2f}")
    solvers = {
        "FixedPointIteration": lambda **kw: inn.FixedPointIteration(max_iter=args.max_iter, tol=args.tol, **kw),
        "Anderson": lambda **kw: inn.Anderson(max_iter=args.max_iter, tol=args.tol, memory=args.memory, **kw),
    }
    verdicts = harness.Verdicts()
    rows = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", inn.ConvergenceWarning)  # a solve that misses tol is a failure here
        for name, make in solvers.items():
            plain, frozen = make(), make(freeze_converged=True)
            z_p, s_p = plain.solve(g, z0)
            z_f, s_f = frozen.solve(g, z0)
            times = harness.compare({"plain": lambda: plain.solve(g, z0), "freeze": lambda: frozen.solve(g, z0)},
                                    device=device, repeats=args.repeats, min_time=args.min_time, warmup=1)
            evals_p, evals_f = int(s_p.sample_iterations.sum()), int(s_f.sample_iterations.sum())
            t_ratio = harness.paired_ratio(times, "freeze", "plain")
            diff = float(((z_f - z_p).norm(dim=1) / z_p.norm(dim=1)).max())
            rows.append([name, s_p.iterations, s_f.iterations, evals_p, evals_f, evals_f / evals_p,
                         harness.median(times["plain"]) * 1e3, harness.median(times["freeze"]) * 1e3, t_ratio,
                         f"{diff:.1e}"])
            verdicts.check(f"{name}: freezing saves time (freeze / no freeze < 1)", t_ratio < 1, f"{t_ratio:.3f}")
            # both answers are within tol of their fixed point in residual: the error is at most
            # tol / (1 - s_b) for each; the slowest sample bounds it
            bound = 2 * args.tol / (1 - float(scale.max()))
            verdicts.check(f"{name}: same fixed points (max relative difference <= {bound:.1e})", diff <= bound,
                           f"{diff:.1e}")
    harness.print_table(
        ["solver", "iterations", "iterations, freeze", "evaluations (sum over samples)", "evaluations, freeze",
         "evaluations freeze / no freeze", "time (ms)", "time, freeze (ms)", "time freeze / no freeze",
         "max rel. difference"],
        rows, f"Solve to relative residual {args.tol:g}: without and with freeze_converged",
    )
    return verdicts.finish()


if __name__ == "__main__":
    sys.exit(main())
