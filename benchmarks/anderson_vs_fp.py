"""Benchmark 4: Anderson acceleration (and Broyden's method) against plain fixed-point iteration.

Map evaluations (``stats.iterations``) each solver needs to reach a relative residual
||g(z) - z|| / ||g(z)|| <= 1e-4 (the library's stopping rule, whole batch), and the wall-time
ratios of the solves to fixed-point iteration's (Broyden: limited memory, restarted every
``--broyden-memory`` updates):

* the FC tanh map g(w) = tanh(A w + B x + c) of a model *trained inside this script* on the
  embedded 5,000-digit MNIST sample (``train/data/mnist-5k``; FixedPointLayer, t = k = 20, AID-FP; a few hundred
  Adam steps), evaluated on 1,000 test digits; if the data is absent the row says so and uses
  random weights instead.  A second row uses random weights with ||A||_2 = 0.9 exactly.
* the symmetric linear map g(z) = M z + b, M = (G + G^T)/2 rescaled to ||M||_2 = q = 0.99
  (spectrum spread over [-q, q]); also, for information, a symmetric M with spectrum in [0, q].

Target: on the symmetric linear map with q = 0.99, Anderson needs >= 3x fewer iterations.

    python benchmarks/anderson_vs_fp.py [--quick] [--device cpu|cuda] [--memory 5] [--broyden-memory 10]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

import harness
import implicitnets as inn
from train.cli import make_backward, make_solver
from train.data import DataError, load

TOL = 1e-4

def load_mnist(root: str, device):
    """Training and test digits, flattened and normalised (the embedded set unless ``root``)."""
    data = load("mnist-5k", root or None)
    flat = lambda split: split.images.reshape(len(split), -1).sub(0.1307).div(0.3081).to(device)
    return flat(data.train), data.train.labels.to(device), flat(data.test)


def train_fc(args, device):
    """A few hundred Adam steps of the FC equilibrium model on the MNIST 5k sample."""
    torch.manual_seed(args.seed)
    f = inn.maps.TanhMap(784, 200, contraction=0.9)
    layer = inn.FixedPointLayer(f, solver=make_solver("fp", 20, 0.0), backward=make_backward("aid-fp", 20))
    model = nn.Sequential(layer, nn.Linear(200, 10)).to(device)
    try:
        xtr, ytr, xte = load_mnist(args.data, device)
    except DataError as exc:  # absent data: say so, fall back to random weights
        return f, torch.randn(1000, 784, device=device), f"random weights ({exc})"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = 100 if args.quick else 400
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (128,), device=device)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xtr[:2000]).argmax(1) == ytr[:2000]).float().mean().item()
    note = (f"trained here: {steps} Adam steps on MNIST-5k, train acc {acc:.3f}, "
            f"{time.perf_counter() - start:.0f} s")
    return f.to(device), xte[:1000], note


def measure(g, z0, args, device):
    """Statistics of FP, Anderson and Broyden to TOL and their times relative to FP's (interleaved)."""
    solvers = {"fp": make_solver("fp", args.max_iter, TOL),
               "anderson": make_solver("anderson", args.max_iter, TOL, memory=args.memory),
               "broyden": make_solver("broyden", args.max_iter, TOL, memory=args.broyden_memory)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", inn.ConvergenceWarning)
        stats = {name: s.solve(g, z0)[1] for name, s in solvers.items()}
        times = harness.compare({name: (lambda s=s: s.solve(g, z0)) for name, s in solvers.items()},
                                device=device, repeats=max(3, args.repeats // 2), min_time=args.min_time,
                                warmup=1)
    return stats, {name: harness.paired_ratio(times, name, "fp") for name in ("anderson", "broyden")}


def row(label, stats, ratios):
    fp, aa, br = stats["fp"], stats["anderson"], stats["broyden"]
    return [label, fp.iterations, aa.iterations, br.iterations, fp.iterations / aa.iterations,
            fp.iterations / br.iterations, ratios["anderson"], ratios["broyden"],
            f"{fp.residual:.1e} / {aa.residual:.1e} / {br.residual:.1e}"]


def symmetric(n: int, q: float, spectrum: str, device, generator) -> torch.Tensor:
    if spectrum == "[-q, q]":
        G = torch.randn(n, n, generator=generator, dtype=torch.float64)
        M = (G + G.T) / 2
        M = M * (q / torch.linalg.matrix_norm(M, 2))
    else:
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        lam = torch.linspace(0.0, q, n, dtype=torch.float64)
        M = (Q * lam) @ Q.T
    return M.to(device, torch.float32)


def main() -> int:
    parser = harness.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--memory", type=int, default=5, help="Anderson memory m")
    parser.add_argument("--broyden-memory", type=int, default=10, help="Broyden updates kept between restarts")
    parser.add_argument("--max-iter", type=int, default=5000)
    parser.add_argument("--q", type=float, default=0.99)
    parser.add_argument("--n", type=int, default=500, help="dimension of the linear map")
    parser.add_argument("--data", default="", help="torchvision-layout copy of MNIST-5k (default: the embedded set)")
    args = parser.parse_args()
    device = harness.setup(args)
    rows = []
    verdicts = harness.Verdicts()

    f, x, note = train_fc(args, device)
    print(f"# FC model: {note}")
    torch.manual_seed(args.seed + 1)
    rnd = inn.maps.TanhMap(784, 200, contraction=None).to(device)
    with torch.no_grad():
        rnd.A.weight.mul_(0.9 / torch.linalg.matrix_norm(rnd.A.weight, 2))
    for label, m in (("FC tanh, trained" if note.startswith("trained") else "FC tanh, random (no data)", f),
                     ("FC tanh, random ||A||=0.9", rnd)):
        with torch.no_grad(), parametrize.cached():
            u = m.inject(x)
            stats, ratios = measure(lambda w: m.step(w, u), m.initial_state(x), args, device)
        rows.append(row(label, stats, ratios))

    gen = torch.Generator().manual_seed(args.seed)
    for spectrum in ("[-q, q]", "[0, q]"):
        M = symmetric(args.n, args.q, spectrum, device, gen)
        b = torch.randn(8, args.n, generator=gen).to(device)
        with torch.no_grad():
            stats, ratios = measure(lambda z: z @ M + b, torch.zeros_like(b), args, device)
        s_fp, s_aa = stats["fp"], stats["anderson"]
        ratio = s_fp.iterations / s_aa.iterations
        rows.append(row(f"symmetric linear, q={args.q}, spectrum {spectrum}", stats, ratios))
        if spectrum == "[-q, q]":
            ok = s_aa.converged and s_fp.converged and ratio >= 3
            verdicts.check(f"symmetric linear q={args.q}: Anderson >= 3x fewer iterations to {TOL:g}", ok,
                           f"FP {s_fp.iterations}, Anderson {s_aa.iterations} ({ratio:.1f}x)")

    harness.print_table(
        ["problem", "FP iterations", "Anderson iterations", "Broyden iterations [info]", "FP / Anderson iterations",
         "FP / Broyden iterations [info]", "Anderson / FP time", "Broyden / FP time [info]",
         "final residual FP / AA / Broyden"],
        rows, f"Map evaluations to relative residual {TOL:g} (Anderson memory {args.memory}, Broyden memory "
        f"{args.broyden_memory}), float32",
    )
    return verdicts.finish()


if __name__ == "__main__":
    sys.exit(main())
