"""Benchmark 3: implicitnets against torchdeq on the same FC tanh equilibrium model.

Both sides train the *same* module (one TanhMap and linear head, deep-copied so the weights are
identical): w = tanh(A w + u), u = B x + c computed once per step, A a plain weight rescaled
to spectral norm 0.9 (``contraction=None``, weight rescaled once, so neither side pays a
parametrisation), cross-entropy loss on a linear head, forward and backward.  Same work:

| comparison | implicitnets (forward: FixedPointIteration(t, tol=0)) | torchdeq (get_deq, core 'sliced') |
|---|---|---|
| implicit | AID(Neumann(k, tol=0)) | f_solver=b_solver='fixed_point_iter', f_max_iter=t, |
| | | b_max_iter=k, f_tol=b_tol=0, ift=True |
| JFB | JacobianFree() | f_max_iter=t, f_tol=0, grad=1 (1-step phantom grad) |
| truncated | ITD(truncate=K) | f_max_iter=t-K, f_tol=0, grad=K (phantom grad, tau=1) |

Both sides return g^(t+1)(0) (implicit, JFB) or g^t(0) (truncated), so the gradients must
agree to float32 rounding; this is checked first (and in float64 to 1e-12).  Times are
medians of interleaved rounds; the ratio is the median of per-round paired ratios.
Targets: gradients equal within float32 tolerance; implicit training-step time ours / theirs
<= 0.50 at batch 128 and <= 0.60 at batch 1024 (width 200, where the per-iteration overhead
of each library shows).  Every other size and mode is reported; at width 1000 both libraries
issue the same width x width products and the ratio approaches 1 for JFB and truncated ITD.

torchdeq is an optional extra, never a dependency of implicitnets; run this in the benchmark
environment:

    pip install -e ".[bench]"        # implicitnets plus torchdeq
    python benchmarks/vs_torchdeq.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import sys
import warnings

import torch
from torch import nn

import harness
import implicitnets as inn
from train.cli import make_backward

F32_RTOL = 1e-5   # norm-relative gradient difference allowed in float32
F64_RTOL = 1e-12  # and in float64
IMPLICIT_TARGETS = {128: 0.50, 1024: 0.60}  # batch -> ours / torchdeq, implicit mode, width 200


class Net(nn.Module):
    """The FC equilibrium model shared by both libraries: TanhMap + linear head."""

    def __init__(self, in_features: int, width: int, classes: int = 10):
        super().__init__()
        self.f = inn.maps.TanhMap(in_features, width, contraction=None)
        with torch.no_grad():  # ||A||_2 = 0.9 exactly: a 0.9-contraction
            self.f.A.weight.mul_(0.9 / torch.linalg.matrix_norm(self.f.A.weight, 2))
        self.head = nn.Linear(width, classes)


def ours(net: Net, t: int, k: int, mode: str, K: int):
    solver = inn.FixedPointIteration(max_iter=t, tol=0.0)
    backward = {
        "implicit": lambda: make_backward("aid-fp", k),
        "JFB": lambda: inn.JacobianFree(),
        "truncated": lambda: inn.ITD(truncate=K),
    }[mode]()
    layer = inn.FixedPointLayer(net.f, solver=solver, backward=backward)

    def forward(x):
        return net.head(layer(x))

    return forward


def theirs(net: Net, t: int, k: int, mode: str, K: int, f_solver: str = "fixed_point_iter"):
    from torchdeq import get_deq

    common = dict(f_solver=f_solver, f_tol=0.0, f_stop_mode="abs")
    if mode == "implicit":
        deq = get_deq(f_max_iter=t, b_solver="fixed_point_iter", b_max_iter=k, b_tol=0.0, ift=True, **common)
    elif mode == "JFB":
        deq = get_deq(f_max_iter=t, grad=1, **common)
    else:
        deq = get_deq(f_max_iter=t - K, grad=K, **common)
    deq.train()

    def forward(x):
        u = net.f.inject(x)
        z_out, _ = deq(lambda z: net.f.step(z, u), net.f.initial_state(x))
        return net.head(z_out[-1])

    return forward


def make_step(forward, params, x, y):
    def step():
        for p in params:
            p.grad = None
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        return loss

    return step


def grad_difference(a: Net, b: Net) -> float:
    """max over parameters of ||grad_a - grad_b|| / ||grad_b||."""
    worst = 0.0
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is None or pb.grad is None:
            raise AssertionError(f"parameter {name} got no gradient (ours {pa.grad is not None}, "
                                 f"theirs {pb.grad is not None})")
        den = torch.linalg.vector_norm(pb.grad).clamp_min(torch.finfo(pb.grad.dtype).tiny)
        worst = max(worst, float(torch.linalg.vector_norm(pa.grad - pb.grad) / den))
    return worst


def gradient_check(args, device, mode: str, dtype: torch.dtype) -> float:
    torch.manual_seed(args.seed)
    a = Net(args.in_features, 200).to(device, dtype)
    b = copy.deepcopy(a)
    x = torch.randn(64, args.in_features, device=device, dtype=dtype)
    y = torch.randint(0, 10, (64,), device=device)
    make_step(ours(a, args.t, args.k, mode, args.truncate), list(a.parameters()), x, y)()
    make_step(theirs(b, args.t, args.k, mode, args.truncate), list(b.parameters()), x, y)()
    return grad_difference(a, b)


def main() -> int:
    parser = harness.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--t", type=int, default=30, help="forward iterations")
    parser.add_argument("--k", type=int, default=30, help="backward (adjoint) iterations")
    parser.add_argument("--truncate", type=int, default=5, help="K for ITD(truncate=K) vs phantom grad K")
    parser.add_argument("--in-features", type=int, default=784)
    args = parser.parse_args()
    if importlib.util.find_spec("torchdeq") is None:
        print("SKIP: torchdeq is not installed here.\n"
              "  python3 -m venv /work/venv-bench && /work/venv-bench/bin/pip install -e . torchdeq\n"
              "  /work/venv-bench/bin/python benchmarks/vs_torchdeq.py")
        return 0
    device = harness.setup(args)
    print(f"# torchdeq {importlib.metadata.version('torchdeq')}, t={args.t}, k={args.k}, K={args.truncate}")
    warnings.simplefilter("ignore", inn.ConvergenceWarning)
    verdicts = harness.Verdicts()
    mode_names = ["implicit", "JFB", "truncated"]

    grad_rows = []
    for mode in mode_names:
        e32 = gradient_check(args, device, mode, torch.float32)
        e64 = gradient_check(args, device, mode, torch.float64)
        grad_rows.append([mode, e32, e64])
        verdicts.check(f"{mode}: gradients equal (float32 rel. diff <= {F32_RTOL:g}, float64 <= {F64_RTOL:g})",
                       e32 <= F32_RTOL and e64 <= F64_RTOL, f"float32 {e32:.2e}, float64 {e64:.2e}")
    harness.print_table(["mode", "float32 max rel. grad diff", "float64 max rel. grad diff"], grad_rows,
                        "Gradients, implicitnets vs torchdeq (batch 64, width 200)")

    sizes = [(128, 200)] if args.quick else [(128, 200), (1024, 200), (128, 1000), (1024, 1000)]
    rows, worst, implicit = [], {m: 0.0 for m in mode_names}, {}
    for batch, width in sizes:
        torch.manual_seed(args.seed)
        x = torch.randn(batch, args.in_features, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        for mode in mode_names:
            a = Net(args.in_features, width).to(device)
            b, c = copy.deepcopy(a), copy.deepcopy(a)
            cands = {
                "ours": make_step(ours(a, args.t, args.k, mode, args.truncate), list(a.parameters()), x, y),
                "theirs": make_step(theirs(b, args.t, args.k, mode, args.truncate), list(b.parameters()), x, y),
            }
            if mode != "implicit":  # torchdeq's statistics-free solver cannot be its IFT b_solver
                cands["theirs-simple"] = make_step(
                    theirs(c, args.t, args.k, mode, args.truncate, f_solver="simple_fixed_point_iter"),
                    list(c.parameters()), x, y)
            times = harness.compare(cands, device=device, repeats=args.repeats, min_time=args.min_time)
            ratio = harness.paired_ratio(times, "ours", "theirs")
            worst[mode] = max(worst[mode], ratio)
            if mode == "implicit" and width == 200:
                implicit[batch] = ratio
            simple = harness.paired_ratio(times, "ours", "theirs-simple") if "theirs-simple" in times else ""
            pm_ours = harness.peak_memory(cands["ours"], device)
            pm_theirs = harness.peak_memory(cands["theirs"], device)
            rows.append([batch, width, mode, f"{harness.median(times['ours']) * 1e3:.2f}",
                         f"{harness.median(times['theirs']) * 1e3:.2f}", ratio, simple,
                         pm_ours / pm_theirs])
            print(f"  done batch={batch} width={width} {mode}", file=sys.stderr, flush=True)
    harness.print_table(
        ["batch", "width", "mode", "ours (ms)", "torchdeq (ms)", "ours / torchdeq",
         "ours / torchdeq simple_fp [info]", "peak memory ours / torchdeq"],
        rows, f"Training step (forward + backward), t={args.t}, k={args.k}, float32",
    )
    for batch, target in IMPLICIT_TARGETS.items():
        ratio = implicit.get(batch)
        verdicts.check(f"implicit: training-step time ours / torchdeq <= {target:.2f} at batch {batch}, width 200",
                       None if ratio is None else ratio <= target, "not measured" if ratio is None else f"{ratio:.3f}")
    for mode in mode_names:
        print(f"(info) {mode}: worst ours / torchdeq over the sizes measured {worst[mode]:.3f}")
    return verdicts.finish()


if __name__ == "__main__":
    sys.exit(main())
