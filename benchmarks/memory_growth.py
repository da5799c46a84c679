"""Process memory over a long training run: RSS after each step, for every backward mode.

A small FC equilibrium classifier (TanhMap with spectral bound 0.9, linear head,
cross-entropy, SGD) trains on one fixed batch for ``--steps`` steps with
FixedPointIteration(t, tol=0) and each backward mode: ITD, AID-Neumann(k), AID-GMRES(k),
JacobianFree.  The resident set size (``/proc/self/statm``) is printed every ``--every``
steps together with the number of live tensors (``gc``); a layer that kept the previous
step's graph, or a list that grew per step, would show as a rising curve.  The target is
RSS after the last step within 5 % of RSS after step 200 (``tests/test_memory.py`` checks
it at 2,000 steps), and the same number of live tensors.

    python benchmarks/memory_growth.py [--steps 2000] [--every 200] [--width 16] [--batch 8] [--t 10]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import implicitnets as inn
from implicitnets import linear

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


def modes(t: int) -> dict[str, inn.BackwardMode]:
    return {
        "ITD": inn.ITD(),
        "AID-Neumann": inn.AID(linear.Neumann(max_iter=t, tol=0.0)),
        "AID-GMRES": inn.AID(linear.GMRES(max_iter=t, tol=0.0, restart=t)),
        "JacobianFree": inn.JacobianFree(),
    }


def curve(backward: inn.BackwardMode, steps: int, every: int, width: int, batch: int, t: int) -> list[tuple]:
    """``(step, RSS MiB, live tensors)`` after every ``every``-th step (and step 200)."""
    torch.manual_seed(0)
    layer = inn.FixedPointLayer(inn.maps.TanhMap(8, width, contraction=0.9),
                                solver=inn.FixedPointIteration(max_iter=t, tol=0.0), backward=backward)
    model = nn.Sequential(layer, nn.Linear(width, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 8), torch.randint(0, 3, (batch,))
    points = []
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step % every == 0 or step in (1, 200):
            points.append((step, rss_mb(), live_tensors()))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--t", type=int, default=10, help="forward iterations (and AID's k)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"width {args.width}, batch {args.batch}, t = k = {args.t}, {args.steps} steps, torch {torch.__version__}")
    for name, backward in modes(args.t).items():
        points = curve(backward, args.steps, args.every, args.width, args.batch, args.t)
        at200 = next(rss for step, rss, _ in points if step == 200)
        print(f"\n{name}")
        print(f"{'step':>6} {'RSS (MiB)':>10} {'vs step 200':>12} {'live tensors':>13}")
        for step, rss, tensors in points:
            print(f"{step:>6} {rss:>10.1f} {100 * (rss / at200 - 1):>+11.2f}% {tensors:>13}")


if __name__ == "__main__":
    main()
