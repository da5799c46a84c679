"""Benchmark 6: the training step against its physical limit (bare tensor code, no autograd).

    ratio = time of our training step / time of the same step written by hand

Ours is the step as a user writes it: ``FixedPointLayer(cell, solver=FixedPointIteration(t,
tol=0), backward=mode)``, a linear head, cross-entropy, ``loss.backward()`` (the gradients of
every weight land in ``.grad``).  The limit computes the same numbers with plain tensor
operations and no autograd, no implicitnets code:

* every mode: one input injection ``u = B x + c`` and t map evaluations from ``w₀ = 0``;
  the head's logits and the cross-entropy gradient ``g`` by hand;
* AID-FP (``AID(Neumann(k, tol=0))``): one more map evaluation ``w_{t+1}``, then
  ``v ← (v ⊙ D) A + g`` from ``v = 0`` for k steps (``D = 1 − w_{t+1}²``; the first step is
  ``v = g``, so k − 1 products), and the weight gradients from ``δ = v ⊙ D``.  The library
  spends one product more: the final true residual of the adjoint solve (``layer.stats``);
* AID-GMRES (``AID(GMRES(k, tol=0, restart=k))``): a minimal GMRES on bare products ``(I − Jᵀ) q``
  (k Arnoldi steps, classical Gram–Schmidt, least squares on the small Hessenberg matrix);
* JacobianFree: one more map evaluation and ``δ = g ⊙ D``;
* ITD: a manual reverse pass through the stored t steps.

For AID and JacobianFree the head sees the value the layer returns: ``w_{t+1}``, or ``w_t`` on
the graph of ``w_{t+1}`` (the script asks the layer which).

The FC cell is ``TanhMap(784, width)`` at batch {128, 1000} × width {200, 1000}; the conv cell
``ConvCell(4, 48, (14, 14))`` (ReLU, 3×3) at batch 64.  Both use ``contraction=None`` with the
weight rescaled once to norm 0.9 (so neither side pays a parametrisation).  t = k = 20.
The user-map cases (``user 128×200``, ``user 1000×200``) run the same FC step with the map
written by a user as an ``nn.Module`` with ``inject`` and ``step`` (``tanh(A(w) + u)``) and no
closed-form Jacobian: the library's generic path, against the same bare limit.

``--compiled`` adds, for each FC and user-map case, ours with ``torch.compile(fullgraph=True)``
around the model and loss (``compiled_ours``: one forward and one backward graph; the limit
stays eager), with its compile time.

Before timing, the script checks that the limit computes the library's gradients: in
float64 (relative difference <= 1e-10 for every weight) and, at the timed size, in float32
(<= 1e-4, reported).  Targets: for AID-FP and JacobianFree, ratio <= 1.15 at batch 128 and
<= 1.05 at batch 1000 (the FC map), <= 1.2 for the user map at both sizes, eager or compiled;
<= 1.35 for ITD and AID-GMRES (every FC size, the user map's too); <= 1.3 for the conv cell
(every mode).

    python benchmarks/limit.py [--quick] [--device cpu|cuda] [--threads N] [--repeats N] [--compiled]
                               [--clock wall|cpu] [--cases 128x200,conv,user] [--modes AID-FP,ITD]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import harness
import implicitnets as inn

MODES = ("AID-FP", "AID-GMRES", "JacobianFree", "ITD")
# ours ÷ limit: by mode and batch (FC map); the user map's and the conv cell's for every mode and size
FC_TARGET = {"AID-FP": {128: 1.15, 1000: 1.05}, "JacobianFree": {128: 1.15, 1000: 1.05},
             "AID-GMRES": {128: 1.35, 1000: 1.35}, "ITD": {128: 1.35, 1000: 1.35}}
USER_TARGET = {"AID-FP": 1.2, "JacobianFree": 1.2, "AID-GMRES": 1.35, "ITD": 1.35}
CONV_TARGET = 1.3


def target(kind: str, mode: str, batch: int) -> float:
    """The ratio a case must reach: by mode and batch for the FC map, by mode for the user map."""
    if kind == "conv":
        return CONV_TARGET
    return FC_TARGET[mode][batch] if kind == "FC" else USER_TARGET[mode]


F64_RTOL = 1e-10
F32_RTOL = 1e-4


# --------------------------------------------------------------------------- the models (ours)


class Net(nn.Module):
    """An equilibrium cell followed by a linear head on the flattened fixed point."""

    def __init__(self, cell: nn.Module, features: int, classes: int = 10):
        super().__init__()
        self.cell = cell
        self.head = nn.Linear(features, classes)


def fc_net(in_features: int, width: int) -> Net:
    cell = inn.maps.TanhMap(in_features, width, contraction=None)
    with torch.no_grad():
        cell.A.weight.mul_(0.9 / torch.linalg.matrix_norm(cell.A.weight, 2))
    return Net(cell, width)


class UserTanh(nn.Module):
    """``w ← tanh(A(w) + u)``, ``u = B(x)``: the FC map as a user writes it, with no closed-form
    Jacobian (the adjoint products take the library's generic path)."""

    def __init__(self, in_features: int, width: int):
        super().__init__()
        self.A = nn.Linear(width, width, bias=False)
        self.B = nn.Linear(in_features, width)

    def inject(self, x: Tensor) -> Tensor:
        return self.B(x)

    def step(self, w: Tensor, u: Tensor) -> Tensor:
        return torch.tanh(self.A(w) + u)

    def initial_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.A.weight.shape[0])


def user_net(in_features: int, width: int) -> Net:
    """The weights of :func:`fc_net` (same seed) in a :class:`UserTanh` map."""
    fc = fc_net(in_features, width)
    cell = UserTanh(in_features, width)
    cell.load_state_dict(fc.cell.state_dict())
    net = Net(cell, width)
    net.head.load_state_dict(fc.head.state_dict())
    return net


def conv_net(in_channels: int, channels: int, size: int) -> Net:
    cell = inn.maps.ConvCell(in_channels, channels, (size, size), contraction=None)
    with torch.no_grad():
        sigma = inn.parametrizations.conv.conv_operator_norm(cell.A, cell.size, max_iter=200, tol=1e-7)
        cell.A.weight.mul_(0.9 / sigma)
    return Net(cell, channels * size * size)


def backward_mode(mode: str, k: int) -> inn.BackwardMode:
    return {
        "AID-FP": lambda: inn.AID(inn.linear.Neumann(max_iter=k, tol=0.0)),
        "AID-GMRES": lambda: inn.AID(inn.linear.GMRES(max_iter=k, tol=0.0, restart=k)),
        "JacobianFree": lambda: inn.JacobianFree(),
        "ITD": lambda: inn.ITD(),
    }[mode]()


def ours(net: Net, mode: str, t: int, k: int, x: Tensor, y: Tensor):
    """The training step as a user writes it; returns the gradients it leaves in ``.grad``."""
    layer = inn.FixedPointLayer(net.cell, solver=inn.FixedPointIteration(max_iter=t, tol=0.0),
                                backward=backward_mode(mode, k))
    params = list(net.parameters())

    def step() -> list[Tensor]:
        for p in params:
            p.grad = None
        z = layer(x)
        loss = F.cross_entropy(net.head(z.flatten(1)), y)
        loss.backward()
        return [p.grad for p in params]

    return step


def compiled_ours(net: Net, mode: str, t: int, k: int, x: Tensor, y: Tensor):
    """:func:`ours` with ``torch.compile(fullgraph=True)`` around the model and loss (one forward
    and one backward graph); ``loss.backward()`` as in eager."""
    layer = inn.FixedPointLayer(net.cell, solver=inn.FixedPointIteration(max_iter=t, tol=0.0),
                                backward=backward_mode(mode, k))
    model = torch.compile(lambda x, y: F.cross_entropy(net.head(layer(x).flatten(1)), y), dynamic=False,
                          fullgraph=True)
    params = list(net.parameters())

    def step() -> list[Tensor]:
        for p in params:
            p.grad = None
        model(x, y).backward()
        return [p.grad for p in params]

    return step


# --------------------------------------------------------------------------- the limit (bare)


class BareFC:
    """``w ← tanh(w Aᵀ + u)``, ``u = x Bᵀ + c`` with plain tensors."""

    def __init__(self, net: Net):
        c = net.cell
        self.A, self.B, self.c = c.A.weight.detach(), c.B.weight.detach(), c.B.bias.detach()
        self.At = self.A.t()

    def inject(self, x: Tensor) -> Tensor:
        return torch.addmm(self.c, x, self.B.t())

    def step(self, w: Tensor, u: Tensor) -> Tensor:
        return torch.tanh(torch.addmm(u, w, self.At))

    def slope(self, out: Tensor) -> Tensor:
        return 1 - out * out

    def act_back(self, g: Tensor, out: Tensor) -> Tensor:
        """``g ⊙ act'`` from the activation's output (one fused kernel)."""
        return torch.ops.aten.tanh_backward(g, out)

    def back(self, d: Tensor) -> Tensor:
        """``δ ↦ δ A``: the cotangent of ``w`` from that of the pre-activation."""
        return d @ self.A

    def back_and_weight_grad(self, d: Tensor, w: Tensor, acc: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.back(d), self.weight_grad(d, w, acc)

    def weight_grad(self, d: Tensor, w: Tensor, acc: Tensor | None = None) -> Tensor:
        """``δᵀ w`` (the gradient of A), added to ``acc`` when given."""
        return torch.mm(d.t(), w) if acc is None else acc.addmm_(d.t(), w)

    def input_grads(self, du: Tensor, x: Tensor) -> list[Tensor]:
        return [torch.mm(du.t(), x), du.sum(0)]


class BareConv:
    """``z ← relu(A ⋆ z + u)``, ``u = B ⋆ x + b`` with ``conv2d`` and its backward kernels."""

    def __init__(self, net: Net):
        c = net.cell
        self.A, self.B, self.b, self.p = c.A.weight.detach(), c.B.weight.detach(), c.B.bias.detach(), c.padding

    def inject(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.B, self.b, 1, self.p)

    def step(self, z: Tensor, u: Tensor) -> Tensor:
        return torch.relu(F.conv2d(z, self.A, None, 1, self.p) + u)

    def slope(self, out: Tensor) -> Tensor:
        return (out > 0).to(out.dtype)

    def act_back(self, g: Tensor, out: Tensor) -> Tensor:
        return torch.ops.aten.threshold_backward(g, out, 0)

    def back(self, d: Tensor) -> Tensor:
        return F.conv_transpose2d(d, self.A, None, 1, self.p)

    def _conv_back(self, d: Tensor, inp: Tensor, weight: Tensor, mask: list[bool]) -> tuple:
        return torch.ops.aten.convolution_backward(
            d, inp, weight, None, [1, 1], [self.p, self.p], [1, 1], False, [0, 0], 1, mask)

    def _wgrad(self, d: Tensor, inp: Tensor, weight: Tensor) -> Tensor:
        return self._conv_back(d, inp, weight, [False, True, False])[1]

    def back_and_weight_grad(self, d: Tensor, z: Tensor, acc: Tensor | None) -> tuple[Tensor, Tensor]:
        gz, g = self._conv_back(d, z, self.A, [True, True, False])[:2]
        return gz, (g if acc is None else acc.add_(g))

    def weight_grad(self, d: Tensor, z: Tensor, acc: Tensor | None = None) -> Tensor:
        g = self._wgrad(d, z, self.A)
        return g if acc is None else acc.add_(g)

    def input_grads(self, du: Tensor, x: Tensor) -> list[Tensor]:
        return [self._wgrad(du, x, self.B), du.sum((0, 2, 3))]


def bare_gmres(apply, g: Tensor, k: int) -> Tensor:
    """k Arnoldi steps for ``(I − Jᵀ) v = g`` from ``v = 0`` with ``Jᵀ q = apply(q)``."""
    shape, b = g.shape, g.reshape(-1)
    beta = torch.linalg.vector_norm(b)
    V = b.new_empty(k + 1, b.numel())
    H = b.new_zeros(k + 1, k)
    V[0] = b / beta
    for j in range(k):
        q = V[j]
        w = q - apply(q.view(shape)).reshape(-1)
        h = V[: j + 1] @ w
        w = w - h @ V[: j + 1]
        hn = torch.linalg.vector_norm(w)
        H[: j + 1, j] = h
        H[j + 1, j] = hn
        V[j + 1] = w / hn
    rhs = torch.zeros(k + 1, 1, dtype=torch.float64)
    rhs[0, 0] = float(beta)
    y = torch.linalg.lstsq(H.cpu().double(), rhs).solution[:, 0]
    return (y.to(V) @ V[:k]).view(shape)


def returns_last_iterate(net: Net, cell_cls, mode: str, t: int, k: int, x: Tensor) -> bool:
    """Whether our layer's output value (with grad enabled) is ``w_t`` rather than ``w_{t+1}``."""
    layer = inn.FixedPointLayer(net.cell, solver=inn.FixedPointIteration(max_iter=t, tol=0.0),
                                backward=backward_mode(mode, k))
    out = layer(x).detach()
    cell = cell_cls(net)
    with torch.no_grad():
        u = cell.inject(x)
        w = torch.zeros_like(u)
        for _ in range(t):
            w = cell.step(w, u)
        return bool(torch.linalg.vector_norm(out - w) <= torch.linalg.vector_norm(out - cell.step(w, u)))


def bare(net: Net, cell_cls, mode: str, t: int, k: int, x: Tensor, y: Tensor):
    """The same step as :func:`ours` in plain tensor code; returns the gradients."""
    head_at_last = mode == "ITD" or returns_last_iterate(net, cell_cls, mode, t, k, x)
    cell = cell_cls(net)
    H, h = net.head.weight.detach(), net.head.bias.detach()
    onehot = F.one_hot(y, H.shape[0]).to(x.dtype)
    n = x.shape[0]

    def head_grads(out: Tensor) -> tuple[Tensor, list[Tensor]]:
        flat = out.reshape(n, -1)
        dl = (torch.softmax(torch.addmm(h, flat, H.t()), 1) - onehot) / n
        return (dl @ H).view(out.shape), [torch.mm(dl.t(), flat), dl.sum(0)]

    def step() -> list[Tensor]:
        with torch.no_grad():
            u = cell.inject(x)
            w = torch.zeros_like(u)
            if mode == "ITD":
                ws = [w]
                for _ in range(t):
                    ws.append(cell.step(ws[-1], u))
                g, head = head_grads(ws[-1])
                gA, du = None, None
                for j in range(t, 0, -1):
                    d = cell.act_back(g, ws[j])
                    du = d.clone() if du is None else du.add_(d)
                    if j > 1:  # w₀ = 0 is a constant: no gradient through it
                        g, gA = cell.back_and_weight_grad(d, ws[j - 1], gA)
                return [gA, *cell.input_grads(du, x), *head]
            for _ in range(t):
                w = cell.step(w, u)
            out = cell.step(w, u)
            g, head = head_grads(w if head_at_last else out)
            if mode == "JacobianFree":
                d = cell.act_back(g, out)
                return [cell.weight_grad(d, w), *cell.input_grads(d, x), *head]
            D = cell.slope(out)
            if mode == "AID-FP":
                v = g
                for _ in range(k - 1):
                    v = cell.back(v * D) + g
            else:  # AID-GMRES
                v = bare_gmres(lambda q: cell.back(q * D), g, k)
            d = v * D
            return [cell.weight_grad(d, w), *cell.input_grads(d, x), *head]

    return step


# --------------------------------------------------------------------------- measurement


def rel_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """max over weights of ‖a − b‖ / ‖b‖."""
    return max(float(torch.linalg.vector_norm(p - q) / torch.linalg.vector_norm(q)) for p, q in zip(a, b))


def case_data(kind: str, batch: int, size: int, in_features: int, device, dtype=torch.float32):
    if kind != "conv":
        x = torch.randn(batch, in_features, device=device, dtype=dtype)
    else:
        x = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), device=device)
    return x, y


def main() -> int:
    parser = harness.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--t", type=int, default=20, help="forward iterations")
    parser.add_argument("--k", type=int, default=20, help="backward (adjoint) iterations")
    parser.add_argument("--in-features", type=int, default=784)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    parser.add_argument("--cases", default="", help="comma-separated subset, e.g. 128x200,conv (default: all)")
    parser.add_argument("--compiled", action="store_true",
                        help="also time ours under torch.compile(fullgraph=True) (FC and user-map cases)")
    args = parser.parse_args()
    device = harness.setup(args)
    warnings.simplefilter("ignore", inn.ConvergenceWarning)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown --modes {sorted(unknown)}; choose from {MODES}")
    cases = [("FC", 128, 200), ("FC", 1000, 200), ("FC", 128, 1000), ("FC", 1000, 1000), ("conv", 64, 48),
             ("user", 128, 200), ("user", 1000, 200)]
    if args.quick:
        cases = [("FC", 128, 200), ("conv", 64, 48), ("user", 128, 200)]
    if args.cases:
        want = set(args.cases.split(","))
        cases = [c for c in cases if (c[0] == "conv" and "conv" in want) or (c[0] == "user" and "user" in want)
                 or f"{'user' if c[0] == 'user' else ''}{c[1]}x{c[2]}" in want]
    print(f"# t = {args.t}, k = {args.k}, float32; FC TanhMap({args.in_features}, width), "
          "conv ConvCell(4, 48, (14, 14)) ReLU at batch 64, user: the FC map as a user's nn.Module (no closed form)")

    verdicts = harness.Verdicts()
    rows = []
    for kind, batch, width in cases:
        label = f"conv {batch}×48×14×14" if kind == "conv" else f"{kind} {batch}×{width}"
        for mode in modes:
            torch.manual_seed(args.seed)
            make = {"FC": lambda: fc_net(args.in_features, width), "user": lambda: user_net(args.in_features, width),
                    "conv": lambda: conv_net(4, 48, 14)}[kind]
            cell_cls = BareConv if kind == "conv" else BareFC
            net = make().to(device)
            # the limit must compute our gradients: float64 at a small batch, then float32 at this size
            net64 = copy.deepcopy(net).double()
            x64, y64 = case_data(kind, min(batch, 32), 14, args.in_features, device, torch.float64)
            e64 = rel_diff(ours(net64, mode, args.t, args.k, x64, y64)(),
                           bare(net64, cell_cls, mode, args.t, args.k, x64, y64)())
            x, y = case_data(kind, batch, 14, args.in_features, device)
            cands = {"ours": ours(net, mode, args.t, args.k, x, y),
                     "limit": bare(net, cell_cls, mode, args.t, args.k, x, y)}
            e32 = rel_diff(cands["ours"](), cands["limit"]())
            goal = target(kind, mode, batch)
            verdicts.check(f"{label} {mode}: the limit computes our gradients (float64 rel. diff <= {F64_RTOL:g}, "
                           f"float32 <= {F32_RTOL:g})", e64 <= F64_RTOL and e32 <= F32_RTOL,
                           f"float64 {e64:.1e}, float32 {e32:.1e}")
            compile_seconds = None
            if args.compiled and kind != "conv":
                cands["compiled"] = compiled_ours(copy.deepcopy(net), mode, args.t, args.k, x, y)
                start = time.perf_counter()
                cands["compiled"]()
                harness.sync(device)
                compile_seconds = time.perf_counter() - start
                e_compiled = rel_diff(cands["compiled"](), cands["limit"]())
                verdicts.check(f"{label} {mode} compiled: the limit computes its gradients (float32 <= {F32_RTOL:g})",
                               e_compiled <= F32_RTOL, f"{e_compiled:.1e}")
            times = harness.compare(cands, device=device, repeats=args.repeats, min_time=args.min_time)
            ratios = {name: harness.paired_ratio(times, name, "limit") for name in cands if name != "limit"}
            for name, ratio in ratios.items():
                side = "ours" if name == "ours" else f"ours, compiled ({compile_seconds:.0f} s to compile)"
                rows.append([label, mode, side, f"{harness.median(times[name]) * 1e3:.2f}",
                             f"{harness.median(times['limit']) * 1e3:.2f}", ratio, f"{goal:.2f}",
                             f"{e64:.1e}", f"{e32:.1e}"])
            best = min(ratios, key=ratios.get)
            either = " (eager or compiled)" if kind == "user" and len(ratios) > 1 else ""
            verdicts.check(f"{label} {mode}: training step / limit <= {goal:.2f}{either}",
                           ratios["ours"] <= goal or (bool(either) and ratios[best] <= goal),
                           ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()))
            print(f"  done {label} {mode}: " + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()),
                  file=sys.stderr, flush=True)
    harness.print_table(["case", "mode", "side", "ours (ms)", "limit (ms)", "ours / limit", "target",
                         "grad diff f64", "grad diff f32"], rows,
                        f"Training step ÷ bare limit, t = {args.t}, k = {args.k}")
    return verdicts.finish()


if __name__ == "__main__":
    sys.exit(main())
