"""Benchmark: what a second derivative and ``vmap`` cost through an AID layer.

Two ratios, each measured side by side in interleaved rounds (``harness.compare``):

* **Hessian–vector product ÷ first-order training step.**  The step: ``FixedPointLayer(
  TanhMap(784, width), FixedPointIteration(t, tol=0), AID(Neumann(k, tol=0)))``, a linear
  head and cross-entropy, ``torch.autograd.grad`` of the loss.  The HVP: the same gradient
  with ``create_graph=True``, then the gradient of ``g · v``.  Target ≤ 4.
* **``vmap`` over B problems ÷ one batched solve of B.**  ``torch.func.vmap(lambda x:
  layer(x[None]))(X)`` against ``layer(X)``, both the forward solve of B samples under
  ``no_grad``; the map is row-separable, so the vmapped problems are solved as one batch.
  Target ≤ 1.3.

Before timing, the script checks in float64 that the HVP equals the unrolled-ITD one and the
vmapped solve the batched one.

    python benchmarks/higher_order.py [--quick] [--device cpu|cuda] [--threads N] [--batch 128]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import harness
import implicitnets as inn
from implicitnets import linear


def build(width: int, in_features: int, t: int, k: int, device, dtype, backward=None):
    torch.manual_seed(0)
    cell = inn.maps.TanhMap(in_features, width, contraction=None).to(device, dtype)
    with torch.no_grad():
        cell.A.weight.mul_(0.9 / torch.linalg.matrix_norm(cell.A.weight, 2))
    backward = backward or inn.AID(linear.Neumann(max_iter=k, tol=0.0))
    layer = inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(max_iter=t, tol=0.0), backward=backward)
    head = torch.nn.Linear(width, 10).to(device, dtype)
    return layer, head


def loss_fn(layer, head, x, y):
    return F.cross_entropy(head(layer(x)), y)


def first_order(layer, head, x, y):
    params = [*layer.parameters(), *head.parameters()]
    return lambda: torch.autograd.grad(loss_fn(layer, head, x, y), params)


def hvp(layer, head, x, y, vs):
    params = [*layer.parameters(), *head.parameters()]

    def run():
        grads = torch.autograd.grad(loss_fn(layer, head, x, y), params, create_graph=True)
        return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), params)

    return run


def check_exactness(args, device) -> tuple[float, float]:
    """float64: the HVP against unrolled ITD, the vmapped solve against the batched one."""
    dtype = torch.float64
    x = torch.randn(8, 30, device=device, dtype=dtype)
    y = torch.randint(0, 10, (8,), device=device)
    layer, head = build(16, 30, 200, 200, device, dtype)
    ref_layer, _ = build(16, 30, 200, 200, device, dtype, inn.ITD())
    params = [*layer.parameters(), *head.parameters()]
    vs = [torch.randn_like(p) for p in params]
    got = hvp(layer, head, x, y, vs)()
    ref_layer.load_state_dict(layer.state_dict())
    ref = hvp(ref_layer, head, x, y, vs)()
    hv_err = max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref))
    with torch.no_grad():
        mapped = torch.func.vmap(lambda xi: layer(xi[None]))(x).squeeze(1)
        batched = layer(x)
    return hv_err, float((mapped - batched).norm() / batched.norm())


def main(argv: list[str] | None = None) -> int:
    parser = harness.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--t", type=int, default=20)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args(argv)
    device = harness.setup(args)
    verdicts = harness.Verdicts()
    hv_err, vmap_err = check_exactness(args, device)
    verdicts.check("HVP through AID equals unrolled ITD (float64, rel. <= 1e-8)", hv_err <= 1e-8, f"{hv_err:.1e}")
    verdicts.check("vmap solve equals the batched solve (float64, rel. <= 1e-12)", vmap_err <= 1e-12,
                   f"{vmap_err:.1e}")

    dtype = torch.float32
    x = torch.rand(args.batch, 784, device=device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch,), device=device)
    layer, head = build(args.width, 784, args.t, args.k, device, dtype)
    vs = [torch.randn_like(p) for p in [*layer.parameters(), *head.parameters()]]

    def batched_solve():
        with torch.no_grad():
            return layer(x)

    def mapped_solve():
        with torch.no_grad():
            return torch.func.vmap(lambda xi: layer(xi[None]))(x)

    times = harness.compare(
        {
            "first-order step": first_order(layer, head, x, y),
            "HVP": hvp(layer, head, x, y, vs),
            "batched solve": batched_solve,
            "vmap solve": mapped_solve,
        },
        device=device, repeats=args.repeats, min_time=args.min_time,
    )
    hvp_ratio = harness.paired_ratio(times, "HVP", "first-order step")
    vmap_ratio = harness.paired_ratio(times, "vmap solve", "batched solve")
    harness.print_table(
        ["what", "ms (median)", "ratio", "target"],
        [
            ["first-order step", 1e3 * harness.median(times["first-order step"]), "", ""],
            ["HVP", 1e3 * harness.median(times["HVP"]), hvp_ratio, "<= 4"],
            ["batched solve", 1e3 * harness.median(times["batched solve"]), "", ""],
            ["vmap solve", 1e3 * harness.median(times["vmap solve"]), vmap_ratio, "<= 1.3"],
        ],
        title=f"AID(Neumann(k={args.k})), t = {args.t}, batch {args.batch} × width {args.width}",
    )
    verdicts.check("HVP / first-order step <= 4", hvp_ratio <= 4, f"{hvp_ratio:.2f}")
    verdicts.check(f"vmap over {args.batch} problems / one batched solve <= 1.3", vmap_ratio <= 1.3,
                   f"{vmap_ratio:.2f}")
    return verdicts.finish()


if __name__ == "__main__":
    raise SystemExit(main())
