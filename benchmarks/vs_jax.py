"""Benchmark 8: a training step of implicitnets against the same step in JAX (hand-written, optimistix, jaxopt).

The problem, identical on every side:

* the FC tanh map ``w ← tanh(w Aᵀ + u)``, ``u = x Bᵀ + c`` computed once; A (200 × 200) a plain
  weight with spectral norm 0.9, B (200 × 784), float32, batch 128 and 1000;
* t = 20 fixed-point steps from ``w = 0``; a linear head on ``w_t`` and the mean cross-entropy;
* the gradient of A, B, c and the head by AID: k = 20 Neumann steps ``v ← Jᵀ v + g`` from
  ``v = 0`` (the first step is ``v = g``), ``J`` the map's Jacobian at ``w_t``.

The sides:

* ours: ``FixedPointLayer(TanhMap(784, 200, contraction=None), FixedPointIteration(20, tol=0),
  AID(Neumann(20, tol=0)))``, a linear head, ``loss.backward()`` (``limit.ours``);
* ours (compiled): the same layer with the opt-in compiled path, ``compile=inn.Compile()`` on
  ``FixedPointIteration`` and on ``Neumann`` (each fixed-count loop one inductor function; the
  model and loss stay eager);
* ours (compiled model): the eager layer, ``torch.compile(fullgraph=True)`` around the model and
  loss (one forward and one backward graph);
* both compiled sides are left out by ``--no-compile``; their compile time (cold: inductor's
  caches off; the wall time of the first two calls) and the steps it takes to pay it off are
  printed;
* torch (hand-written): the same step in bare eager tensor code, no autograd (``limit.bare``);
* JAX (hand-written): ``lax.fori_loop`` forward, a ``jax.custom_vjp`` whose backward runs the k
  Neumann steps, ``jax.jit``;
* optimistix: ``optx.fixed_point(fn, FixedPointIteration, y0, adjoint=ImplicitAdjoint(
  linear_solver=Neumann(k)), max_steps=t, throw=False)``;
* jaxopt: ``FixedPointIteration(maxiter=t, tol=0, implicit_diff=True, implicit_diff_solve=<k
  Neumann steps>)``.

The Neumann solve for optimistix is a lineax ``AbstractLinearSolver`` (Richardson iteration of a
fixed number of steps); for jaxopt a ``solve(matvec, b)`` function.  optimistix with
``rtol = atol = 0`` stops early (0/0 in its error test), so it gets ``atol = 1e-30``, which a
float32 solve never reaches; the script checks that optimistix and jaxopt take exactly t steps.

All sides get the same numbers: the weights and data are drawn once with numpy from ``--seed``
and handed to both frameworks.  Before timing, the script checks that every side computes the
gradients of ours: float32 to 1e-5 (relative, the worst weight), and float64 to 1e-12 in a
second process with ``jax_enable_x64`` (``--no-f64`` skips it).

Timing runs every side in one process, interleaved rounds (``harness.compare``), one thread per
framework, the process pinned to one core: ``os.sched_setaffinity`` on every thread of the
process before JAX starts, ``torch.set_num_threads(1)``, and
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` set before JAX
is imported (the flags alone did not keep jaxlib on one core).  The script prints the threads'
allowed cores and the CPU ÷ wall time of a JAX loop as evidence.  The default clock on the CPU is
the process's CPU time (``--clock cpu``), robust to other processes sharing the machine.

Targets (issue 28): ours ÷ optimistix <= 1.0 and ours ÷ jaxopt <= 1.0 at batch 128 and 1000,
checked for ours, ours (compiled) and ours (compiled model).  A side whose package is not
installed is reported as SKIP.

``--device cuda`` gives the GPU column: the torch sides (data, weights, every step) run on the
GPU and are timed with the wall clock, synchronised after each timed loop (``harness.compare``);
the JAX sides stay on the CPU, pinned as above, as the reference.  The targets are for the CPU
step, so on a GPU they are reported as not checked.

    pip install -e ".[jax]"          # jax, optimistix, jaxopt: never dependencies of the library
    python benchmarks/vs_jax.py [--quick] [--batches 128,1000] [--core N] [--no-compile] [--no-f64]
                                [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import harness
import implicitnets as inn
import limit

IN_FEATURES, WIDTH, CLASSES = 784, 200, 10
NAMES = ("A", "B", "c", "H", "h")  # map weight, injection weight and bias, head weight and bias
F32_RTOL = 1e-5
F64_RTOL = 1e-12
XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
OPTX_ATOL = 1e-30  # never reached: optimistix's error test with rtol = atol = 0 is 0/0
JAX_SIDES = ("JAX (hand-written)", "optimistix", "jaxopt")
PACKAGES = {"JAX (hand-written)": "jax", "optimistix": "optimistix", "jaxopt": "jaxopt"}


# --------------------------------------------------------------------------- process set-up


def pin(core: int) -> None:
    """Restrict every thread of this process to ``core`` (threads made later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            pass


def allowed_cores() -> tuple[int, set[str]]:
    """The number of threads of this process and the set of their allowed-core lists."""
    lists = set()
    tids = os.listdir("/proc/self/task")
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/status") as fh:
                for line in fh:
                    if line.startswith("Cpus_allowed_list:"):
                        lists.add(line.split(":", 1)[1].strip())
        except FileNotFoundError:
            pass
    return len(tids), lists


def have(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


# --------------------------------------------------------------------------- the data (numpy)


def problem(batch: int, seed: int, dtype) -> dict[str, np.ndarray]:
    """Weights (torch's default init ranges; A rescaled to spectral norm 0.9) and data, from one seed."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((WIDTH, WIDTH))
    A *= 0.9 / np.linalg.norm(A, 2)
    b_in, b_w = 1 / np.sqrt(IN_FEATURES), 1 / np.sqrt(WIDTH)
    p = {
        "A": A,
        "B": rng.uniform(-b_in, b_in, (WIDTH, IN_FEATURES)),
        "c": rng.uniform(-b_in, b_in, WIDTH),
        "H": rng.uniform(-b_w, b_w, (CLASSES, WIDTH)),
        "h": rng.uniform(-b_w, b_w, CLASSES),
        "x": rng.standard_normal((batch, IN_FEATURES)),
    }
    p = {name: a.astype(dtype) for name, a in p.items()}
    p["y"] = rng.integers(0, CLASSES, batch)
    return p


def rel_diff(a, b) -> float:
    """max over weights of ‖a − b‖ / ‖b‖ (numpy, float64)."""
    return max(float(np.linalg.norm(np.asarray(p, np.float64) - np.asarray(q, np.float64))
                     / np.linalg.norm(np.asarray(q, np.float64))) for p, q in zip(a, b))


# --------------------------------------------------------------------------- the torch sides


def torch_net(p: dict[str, np.ndarray], device: torch.device) -> limit.Net:
    dtype = torch.float64 if p["A"].dtype == np.float64 else torch.float32
    net = limit.fc_net(IN_FEATURES, WIDTH).to(device=device, dtype=dtype)
    with torch.no_grad():
        for param, name in zip(net.parameters(), NAMES):  # A.weight, B.weight, B.bias, head.weight, head.bias
            param.copy_(torch.from_numpy(p[name]))
    return net


def torch_data(p: dict[str, np.ndarray], device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(p["x"]).to(device), torch.from_numpy(p["y"]).to(device)


def compiled_path(net: limit.Net, t: int, k: int, x: Tensor, y: Tensor):
    """Ours with the opt-in compiled path: ``compile=inn.Compile()`` on the forward solver and
    on the Neumann adjoint solver (each fixed-count loop one inductor function); the model and
    loss stay eager."""
    options = inn.Compile(dynamic=False)
    layer = inn.FixedPointLayer(net.cell, solver=inn.FixedPointIteration(max_iter=t, tol=0.0, compile=options),
                                backward=inn.AID(inn.linear.Neumann(max_iter=k, tol=0.0, compile=options)))
    params = list(net.parameters())

    def step() -> list[Tensor]:
        for q in params:
            q.grad = None
        F.cross_entropy(net.head(layer(x)), y).backward()
        return [q.grad for q in params]

    return step


def torch_sides(p: dict[str, np.ndarray], t: int, k: int, compile_: bool, device: torch.device
                ) -> tuple[dict, dict[str, str]]:
    """name -> step returning the gradients (A, B, c, H, h) on ``device``; and name -> why a side is missing."""
    x, y = torch_data(p, device)
    sides = {"ours": limit.ours(torch_net(p, device), "AID-FP", t, k, x, y),
             "torch (hand-written)": limit.bare(torch_net(p, device), limit.BareFC, "AID-FP", t, k, x, y)}
    missing = {}
    if compile_:  # inductor's on-disk caches off: the first call of a compiled side is a cold compile
        import torch._inductor.config

        torch._inductor.config.force_disable_caches = True
    for name, build in COMPILED.items():
        if not compile_:
            missing[name] = "left out (--no-compile)"
            continue
        try:
            sides[name] = build(torch_net(p, device), t, k, x, y)
        except Exception as e:  # reported, not raised
            missing[name] = f"{type(e).__name__}: {e}"
    return sides, missing


COMPILED = {"ours (compiled)": compiled_path,
            "ours (compiled model)": lambda net, t, k, x, y: limit.compiled_ours(net, "AID-FP", t, k, x, y)}


# --------------------------------------------------------------------------- the JAX sides


def jax_sides(t: int, k: int) -> tuple[dict, dict[str, str], dict]:
    """name -> jitted ``grad(A, B, c, H, h, x, y)``; name -> why missing; name -> step-count check."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def f(w, A, u):
        return jnp.tanh(w @ A.T + u)

    def loss_of(solve):
        def loss(A, B, c, H, h, x, y):
            u = x @ B.T + c
            w = solve(A, u)
            logp = jax.nn.log_softmax(w @ H.T + h)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))

    # hand-written: fori_loop forward, custom_vjp with k Neumann steps
    @jax.custom_vjp
    def solve(A, u):
        return lax.fori_loop(0, t, lambda _, w: f(w, A, u), jnp.zeros_like(u))

    def solve_fwd(A, u):
        w = solve(A, u)
        return w, (w, A, u)

    def solve_bwd(res, g):
        w, A, u = res
        _, vjp_w = jax.vjp(lambda w: f(w, A, u), w)
        v = lax.fori_loop(0, k - 1, lambda _, v: vjp_w(v)[0] + g, g)
        _, vjp_p = jax.vjp(lambda A, u: f(w, A, u), A, u)
        return vjp_p(v)

    solve.defvjp(solve_fwd, solve_bwd)
    sides = {"JAX (hand-written)": loss_of(solve)}
    missing: dict[str, str] = {}
    steps: dict = {}

    if have("optimistix"):
        import equinox as eqx
        import jax.tree_util as jtu
        import lineax as lx
        import optimistix as optx

        class Neumann(lx.AbstractLinearSolver):
            """A fixed number of Richardson steps ``x ← x + ω (b − M x)`` from ``x = 0`` (the first is ``x = ω b``).

            optimistix's fixed-point adjoint solves with ``M = Jᵀ − I`` (the transpose of the
            Jacobian of ``f(y) − y``): ``ω = −1`` gives ``x ← Jᵀ x − b``, the Neumann series.
            """

            steps: int = eqx.field(static=True)
            omega: float = eqx.field(static=True, default=-1.0)

            def init(self, operator, options):
                del options
                return lx.linearise(operator)

            def compute(self, state, vector, options):
                del options
                om = self.omega

                def body(_, x):
                    return jtu.tree_map(lambda xi, bi, mi: xi + om * (bi - mi), x, vector, state.mv(x))

                x = lax.fori_loop(0, self.steps - 1, body, jtu.tree_map(lambda bi: om * bi, vector))
                return x, lx.RESULTS.successful, {"num_steps": self.steps}

            def transpose(self, state, options):
                return state.transpose(), options

            def conj(self, state, options):
                return lx.conj(state), options

            def assume_full_rank(self):
                return True

        optx_solver = optx.FixedPointIteration(rtol=0.0, atol=OPTX_ATOL)
        adjoint = optx.ImplicitAdjoint(linear_solver=Neumann(k))

        def optx_sol(A, u):
            return optx.fixed_point(lambda w, args: f(w, *args), optx_solver, jnp.zeros_like(u), args=(A, u),
                                    adjoint=adjoint, max_steps=t, throw=False)

        sides["optimistix"] = loss_of(lambda A, u: optx_sol(A, u).value)
        steps["optimistix"] = jax.jit(lambda A, u: optx_sol(A, u).stats["num_steps"])
    else:
        missing["optimistix"] = "optimistix not installed"

    if have("jaxopt"):
        try:
            with warnings.catch_warnings():  # jaxopt announces its deprecation on import
                warnings.simplefilter("ignore")
                import jaxopt

            def neumann_solve(matvec, b, **kwargs):
                """``(Jᵀ − I) x = b``, jaxopt's ``matvec`` the transpose Jacobian of ``f(w) − w``: ``x ← Jᵀ x − b``."""
                del kwargs
                x = lax.fori_loop(0, k - 1, lambda _, x: matvec(x) + x - b, -b)
                return x

            jopt = jaxopt.FixedPointIteration(fixed_point_fun=f, maxiter=t, tol=0.0, implicit_diff=True,
                                              implicit_diff_solve=neumann_solve, jit=True)
            sides["jaxopt"] = loss_of(lambda A, u: jopt.run(jnp.zeros_like(u), A, u).params)
            steps["jaxopt"] = jax.jit(lambda A, u: jopt.run(jnp.zeros_like(u), A, u).state.iter_num)
        except Exception as e:  # a broken peer is reported, not raised
            missing["jaxopt"] = f"{type(e).__name__}: {e}"
    else:
        missing["jaxopt"] = "jaxopt not installed"
    return sides, missing, steps


def jax_args(p: dict[str, np.ndarray]) -> tuple:
    import jax.numpy as jnp

    return tuple(jnp.asarray(p[name]) for name in (*NAMES, "x", "y"))


def jax_step(fn, args):
    import jax

    def step():
        return jax.block_until_ready(fn(*args))

    return step


def step_counts(steps: dict, p: dict[str, np.ndarray]) -> dict[str, int]:
    """Forward iterations optimistix and jaxopt actually ran (must be t)."""
    import jax.numpy as jnp

    A, B, c, x = (jnp.asarray(p[n]) for n in ("A", "B", "c", "x"))
    u = x @ B.T + c
    return {name: int(fn(A, u)) for name, fn in steps.items()}


# --------------------------------------------------------------------------- checks


def gradient_diffs(p, t: int, k: int, compile_: bool, use_jax: bool, device: torch.device
                   ) -> tuple[dict, dict, dict, dict, dict]:
    """The sides, the missing ones (why), each side's relative gradient difference from ours, the
    forward step counts of optimistix and jaxopt, and the wall time of the torch sides' first two
    calls (a compiled side compiles at the first)."""
    tsides, missing = torch_sides(p, t, k, compile_, device)
    ref = [g.detach().cpu().numpy() for g in tsides["ours"]()]
    diffs, first = {}, {}
    for name, step in list(tsides.items())[1:]:
        try:
            t0 = time.perf_counter()
            step()
            grads = step()
            harness.sync(device)
            first[name] = time.perf_counter() - t0
            diffs[name] = rel_diff([g.detach().cpu().numpy() for g in grads], ref)
        except Exception as e:  # the compiled side may fail; reported
            missing[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            del tsides[name]
    jsides, steps, counts = {}, {}, {}
    if use_jax:
        jsides, jmissing, steps = jax_sides(t, k)
        missing.update(jmissing)
        args = jax_args(p)
        for name, fn in jsides.items():
            diffs[name] = rel_diff(fn(*args), ref)
        counts = step_counts(steps, p)
    return {**tsides, **jsides}, missing, diffs, counts, first


def f64_check(args) -> dict:
    """Run in a second process: float64 gradient differences at batch 128 (``jax_enable_x64``)."""
    cmd = [sys.executable, __file__, "--f64-only", "--t", str(args.t), "--k", str(args.k), "--seed", str(args.seed),
           "--core", str(args.core), "--device", args.device]
    if args.no_compile:
        cmd.append("--no-compile")
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    for line in out.stdout.splitlines():
        if line.startswith("F64 "):
            return json.loads(line[4:])
    return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_FLAGS).strip()
    return env


def f64_only(args) -> int:
    use_jax = have("jax")
    if use_jax:
        import jax

        jax.config.update("jax_enable_x64", True)
    p = problem(128, args.seed, np.float64)
    _, missing, diffs, counts, _ = gradient_diffs(p, args.t, args.k, not args.no_compile, use_jax,
                                                  torch.device(args.device))
    print("F64 " + json.dumps({"diffs": diffs, "missing": missing, "counts": counts}), flush=True)
    return 0


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = harness.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.set_defaults(threads=1, clock=None, device="cpu")
    parser.add_argument("--t", type=int, default=20, help="forward iterations")
    parser.add_argument("--k", type=int, default=20, help="Neumann steps of the adjoint solve")
    parser.add_argument("--batches", default="128,1000")
    parser.add_argument("--core", type=int, default=-1, help="the core to pin the process to (-1: the last allowed)")
    parser.add_argument("--no-compile", action="store_true", help="leave out ours (compiled model)")
    parser.add_argument("--no-f64", action="store_true", help="skip the float64 gradient check (second process)")
    parser.add_argument("--no-jax", action="store_true", help="leave out the JAX sides (as if not installed)")
    parser.add_argument("--f64-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.core < 0:
        args.core = max(os.sched_getaffinity(0))
    # before JAX starts: one core for every thread, single-threaded XLA CPU
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_FLAGS).strip()
    pin(args.core)
    torch.set_num_threads(1)
    if args.f64_only:
        return f64_only(args)
    on_cpu = torch.device(args.device).type == "cpu"
    if args.clock is None:  # the process's CPU time on CPU; a GPU's kernels need the wall clock
        args.clock = "cpu" if on_cpu else "wall"
    if args.threads != 1:
        print("# note: one intra-op thread per side is the design of this benchmark; --threads "
              f"{args.threads} ignored", file=sys.stderr)
        args.threads = 1
    device = harness.setup(args)
    warnings.simplefilter("ignore", inn.ConvergenceWarning)
    use_jax = have("jax") and not args.no_jax
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.quick:
        batches = batches[:1]
    if use_jax:
        import jax
        import jaxlib

        versions = [f"jax {jax.__version__}", f"jaxlib {jaxlib.__version__}"]
        for pkg in ("optimistix", "lineax", "jaxopt"):
            if have(pkg):
                versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        print(f"# {', '.join(versions)}; XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    else:
        print("# jax not installed (or --no-jax): the JAX sides are SKIP")
    print(f"# FC tanh map {IN_FEATURES} → {WIDTH}, t = {args.t}, k = {args.k} (Neumann), float32, "
          f"one thread per side, pinned to core {args.core}, data from numpy seed {args.seed}")
    if not on_cpu:
        print(f"# the torch sides run on {device} (synchronised after each timed loop), the JAX sides on the CPU")

    verdicts = harness.Verdicts()
    if not args.no_f64:
        r = f64_check(args)
        if "error" in r:
            verdicts.check(f"float64 gradients of every side = ours (rel. diff <= {F64_RTOL:g})", None,
                           f"the float64 run failed: {r['error']}")
        else:
            worst = max(r["diffs"].values())
            print("# float64 (batch 128, jax_enable_x64, second process): rel. gradient diff from ours: "
                  + ", ".join(f"{n} {d:.1e}" for n, d in r["diffs"].items()))
            verdicts.check(f"float64 gradients of every side = ours (rel. diff <= {F64_RTOL:g}, batch 128)",
                           worst <= F64_RTOL, f"worst {worst:.1e}")

    rows, ratio_rows, all_missing, compile_info = [], [], {}, {}
    order = ["ours", *COMPILED, "torch (hand-written)", *JAX_SIDES]
    for batch in batches:
        p = problem(batch, args.seed, np.float32)
        t0 = time.perf_counter()
        sides, missing, diffs, counts, first = gradient_diffs(p, args.t, args.k, not args.no_compile, use_jax, device)
        first_call = time.perf_counter() - t0
        if not use_jax:
            missing.update({n: f"{PACKAGES[n]} not installed" if not have(PACKAGES[n]) else "--no-jax"
                            for n in JAX_SIDES})
        all_missing.update(missing)
        print(f"# batch {batch}: float32 rel. gradient diff from ours: "
              + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()) + f" (set-up and first calls {first_call:.1f} s)")
        if diffs:
            worst = max(diffs.values())
            verdicts.check(f"batch {batch}: float32 gradients of every side = ours (rel. diff <= {F32_RTOL:g})",
                           worst <= F32_RTOL, f"worst {worst:.1e}")
        for name, n in counts.items():
            verdicts.check(f"batch {batch}: {name} runs t = {args.t} forward steps", n == args.t, f"{n} steps")

        for name in COMPILED:  # the compile time: the first two calls of a compiled side
            if name in sides:
                compile_info[batch, name] = first[name]

        # timing: every side in one process, interleaved rounds
        cands = {}
        for name in order:
            if name not in sides:
                continue
            if name in JAX_SIDES:
                cands[name] = jax_step(sides[name], jax_args(p))
            else:
                cands[name] = sides[name]
        pin(args.core)  # threads JAX or inductor started meanwhile
        if use_jax:
            n_threads, lists = allowed_cores()
            step = cands["JAX (hand-written)"]
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(20):
                step()
            cpu_wall = (time.process_time() - c0) / (time.perf_counter() - w0)
            print(f"# batch {batch}: {n_threads} threads, allowed cores {sorted(lists)}; JAX step CPU ÷ wall time "
                  f"{cpu_wall:.2f} (≤ 1: one core)")
        times = harness.compare(cands, device=device, repeats=args.repeats, min_time=args.min_time)
        ms = {n: harness.median(ts) * 1e3 for n, ts in times.items()}

        def ratio(num: str, den: str):
            return harness.paired_ratio(times, num, den) if num in times and den in times else "SKIP"

        rows.append([batch, *[f"{ms[n]:.2f}" if n in ms else "SKIP" for n in order]])
        ratio_rows.append([batch, ratio("ours", "JAX (hand-written)"), ratio("ours", "optimistix"),
                           ratio("ours", "jaxopt"), ratio("torch (hand-written)", "JAX (hand-written)"),
                           ratio("ours", "torch (hand-written)"),
                           *(ratio(name, peer) for name in COMPILED for peer in ("optimistix", "jaxopt", "ours"))])
        for name in COMPILED:
            if (batch, name) in compile_info and name in ms:
                seconds = compile_info[batch, name]
                gain = (ms["ours"] - ms[name]) / 1e3
                payoff = f"{seconds / gain:.0f} steps" if gain > 0 else "never (not faster than eager)"
                print(f"# batch {batch}: {name}: compile time {seconds:.1f} s (wall time of the first two calls), "
                      f"pays off after {payoff}")
        for name in ("ours", *COMPILED):
            for peer in ("optimistix", "jaxopt"):
                r = ratio(name, peer)
                target = f"batch {batch}: {name} ÷ {peer} <= 1.0"
                if not on_cpu:
                    verdicts.check(target, None, f"the targets are for the CPU step (torch on {device} here)")
                elif r == "SKIP":
                    why = all_missing.get(name) or all_missing.get(peer) or "side not measured"
                    verdicts.check(target, None, why)
                else:
                    verdicts.check(target, r <= 1.0, f"{r:.2f}")
        print(f"  done batch {batch}", file=sys.stderr, flush=True)

    where = "" if on_cpu else f"; torch sides on {device}, JAX sides on the CPU"
    harness.print_table(["batch", *order], rows, f"ms per training step (median of rounds, {args.clock} clock{where})")
    harness.print_table(["batch", "ours ÷ JAX", "ours ÷ optimistix", "ours ÷ jaxopt", "torch ÷ JAX",
                         "ours ÷ torch", *(f"{short} ÷ {peer}" for short in ("compiled", "compiled model")
                                           for peer in ("optimistix", "jaxopt", "ours"))],
                        ratio_rows, "Ratios (median of per-round paired ratios); torch, JAX: the hand-written steps")
    for name, why in all_missing.items():
        print(f"- SKIP {name}: {why}")
    return verdicts.finish()


if __name__ == "__main__":
    sys.exit(main())
