"""Benchmark: solver iterations per epoch with and without per-sample warm starts.

Trains the FC equilibrium classifier of ``python -m train.mnist`` (``TanhMap(784, 200)``,
‖A‖₂ ≤ 0.9, a linear head, Adam lr 1e-3, batch 100, random shifts of up to 2 pixels) on the
embedded MNIST-5k twice from the same initial weights and batch order: once starting every
solve from zero, once from :class:`implicitnets.SampleCache` (each sample's last fixed point
and adjoint solution, keyed by its index).  The forward solve stops at relative residual
``--tol``; the adjoint solve is ``Neumann(k, tol=--backward-tol, per_sample=True)``.  Prints
per epoch the mean forward and backward iterations per step, the training-step time, and the
test accuracy of both runs, then the ratios after the first epoch (when the cache is
filled).

    python benchmarks/warm_start.py [--epochs 5] [--tol 1e-4] [--backward-tol 1e-4] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import harness
import implicitnets as inn
from implicitnets import linear
from train.augment import shift_images
from train.data import load


def run(args, data, warm: bool) -> list[dict]:
    torch.manual_seed(args.seed)
    cell = inn.maps.TanhMap(784, args.width, contraction=0.9)
    layer = inn.FixedPointLayer(
        cell,
        solver=inn.FixedPointIteration(max_iter=args.t, tol=args.tol),
        backward=inn.AID(linear.Neumann(max_iter=args.k, tol=args.backward_tol, per_sample=True)),
    )
    head = torch.nn.Linear(args.width, 10)
    params = [*layer.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    X, Y = data.train.images, data.train.labels
    mean, std = X.mean(), X.std()
    Xt = ((data.test.images - mean) / std).flatten(1)
    cache = inn.SampleCache(len(Y)) if warm else None
    history = []
    for epoch in range(args.epochs):
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        perm = torch.randperm(len(Y), generator=generator)
        offsets = torch.randint(0, 5, (len(Y), 2), generator=generator)
        f_iters, b_iters, seconds = [], [], 0.0
        for i in range(len(Y) // args.batch):
            index = perm[i * args.batch : (i + 1) * args.batch]
            x = ((shift_images(X[index], offsets[index], 2) - mean) / std).flatten(1)
            start = time.perf_counter()
            z0 = cache.start("w", index, cell.initial_state(x)) if warm else None
            v0 = cache.start("v", index, None) if warm else None
            optimizer.zero_grad(set_to_none=True)
            w = layer(x, z0=z0, adjoint_x0=v0)
            F.cross_entropy(head(w), Y[index]).backward()
            optimizer.step()
            if warm:
                cache.store("w", index, w)
                cache.store("v", index, layer.stats.backward.adjoint)
            seconds += time.perf_counter() - start
            f_iters.append(layer.stats.iterations)
            b_iters.append(layer.stats.backward.iterations)
        with torch.no_grad():
            acc = float((head(layer(Xt)).argmax(1) == data.test.labels).float().mean())
        history.append(dict(forward=sum(f_iters) / len(f_iters), backward=sum(b_iters) / len(b_iters),
                            seconds=seconds, acc=acc))
    return history


def main(argv: list[str] | None = None) -> int:
    parser = harness.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--t", type=int, default=40)
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--backward-tol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 2
    harness.setup(args)
    data = load("mnist-5k")
    cold, warm = run(args, data, False), run(args, data, True)
    rows = [[e + 1, c["forward"], w["forward"], c["backward"], w["backward"], c["seconds"], w["seconds"],
             100 * c["acc"], 100 * w["acc"]] for e, (c, w) in enumerate(zip(cold, warm))]
    harness.print_table(
        ["epoch", "fwd its (zero)", "fwd its (cache)", "bwd its (zero)", "bwd its (cache)", "step s (zero)",
         "step s (cache)", "test % (zero)", "test % (cache)"],
        rows, title=f"FC DEQ on MNIST-5k, tol {args.tol:g} / backward tol {args.backward_tol:g}, "
                    f"iterations per step (mean over the epoch)",
    )
    later = slice(1, None)  # epoch 1 has nothing cached yet
    ratio = lambda key: sum(w[key] for w in warm[later]) / sum(c[key] for c in cold[later])
    print(f"after epoch 1, cache / zero: forward iterations {ratio('forward'):.2f}, backward iterations "
          f"{ratio('backward'):.2f}, training-step time {ratio('seconds'):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
