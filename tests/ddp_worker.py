"""A few guarded DDP steps with a fault injected on one process (run by tests/test_ddp_faults.py).

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py --fault adjoint --policy raise --out DIR

Model: ``logits = head(w*)``, ``w* = tanh(A w* + B x + c)`` (a :class:`~implicitnets.FixedPointLayer`
around :class:`~implicitnets.maps.TanhMap`, width 8), float64, SGD, ``AID`` with a Neumann
linear solver under the failure policy ``--policy``.  At step ``--fault-step`` rank
``--fault-rank`` meets ``--fault``:

- ``nan``: its input batch is NaN;
- ``diverge``: its forward map is ``w ↦ 2 w + u + 1`` (the solve raises ConvergenceError);
- ``adjoint``: its linear solver reports ``converged=False`` (the failure policy decides);
- ``kill``: it kills itself with SIGKILL;
- ``stop``: it stops itself with SIGSTOP (a hung process: its connections stay open).

Every rank writes ``DIR/rank<r>.json``: per step the skip reason (``""`` for a step taken),
the AID fallback used, and SHA-256 digests of its state dict (``weights``: parameters and
the spectral norm's power-iteration buffers) and of its parameters (``params``) after the step.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import implicitnets as inn
from implicitnets.linear import LinearInfo, LinearSolver, Neumann
from train.step import guarded_step

POLICIES = {"warn": inn.Warn(), "raise": inn.Raise(), "itd": inn.FallbackITD(), "jfb": inn.FallbackJacobianFree()}


class Fault:
    """Where the fault strikes: this process's rank, the current step, and the fault's."""

    rank = 0
    step = 0
    kind = ""
    at_step = -1
    at_rank = 1

    @classmethod
    def now(cls, kind: str) -> bool:
        return cls.kind == kind and cls.step == cls.at_step and cls.rank == cls.at_rank


@dataclass(frozen=True)
class FlakyNeumann(LinearSolver):
    """:class:`~implicitnets.linear.Neumann`, except that it reports ``converged=False`` when
    the ``adjoint`` fault strikes."""

    inner: Neumann = Neumann(max_iter=40, tol=1e-12)

    def solve(self, op: inn.LinearOperator, b: Tensor, x0: Tensor | None = None) -> tuple[Tensor, LinearInfo]:
        v, info = self.inner.solve(op, b, x0)
        if Fault.now("adjoint"):
            return v, LinearInfo(info.iterations, 0.5, False)
        return v, info


class FlakyTanh(nn.Module):
    """``tanh(A w + B x + c)``, or the expanding ``2 w + u + 1`` when the ``diverge`` fault strikes."""

    def __init__(self, in_features: int, width: int) -> None:
        super().__init__()
        self.tanh = inn.maps.TanhMap(in_features, width, contraction=0.5)

    def inject(self, x: Tensor) -> Tensor:
        return self.tanh.inject(x)

    def step(self, w: Tensor, u: Tensor) -> Tensor:
        if Fault.now("diverge"):
            return 2 * w + u + 1
        return self.tanh.step(w, u)

    def initial_state(self, x: Tensor) -> Tensor:
        return self.tanh.initial_state(x)


class Net(nn.Module):
    def __init__(self, policy: inn.FailurePolicy) -> None:
        super().__init__()
        solver = inn.FixedPointIteration(max_iter=60, tol=1e-10, on_failure=inn.Raise())
        backward = inn.AID(FlakyNeumann(), on_failure=policy)
        self.deq = inn.FixedPointLayer(FlakyTanh(4, 8), solver=solver, backward=backward)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.deq(x))


def digest(named: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(named.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fault", default="", choices=["", "nan", "diverge", "adjoint", "kill", "stop"])
    parser.add_argument("--policy", default="raise", choices=sorted(POLICIES))
    parser.add_argument("--fault-step", type=int, default=3)
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=20.0, help="process-group timeout (seconds)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank = dist.get_rank()
    Fault.rank, Fault.kind, Fault.at_step, Fault.at_rank = rank, args.fault, args.fault_step, args.fault_rank

    torch.manual_seed(0)
    raw = Net(POLICIES[args.policy]).double()
    model = nn.parallel.DistributedDataParallel(raw)
    optimizer = torch.optim.SGD(raw.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own share of the batch
    log: list[dict] = []
    out = Path(args.out)
    for step in range(args.steps):
        Fault.step = step
        x = torch.randn(5, 4, generator=data, dtype=torch.float64)
        y = torch.randint(0, 3, (5,), generator=data)
        if Fault.now("nan"):
            x = torch.full_like(x, float("nan"))
        if Fault.now("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        if Fault.now("stop"):  # hangs with its connections open until killed from outside
            os.kill(os.getpid(), signal.SIGSTOP)

        def forward(x=x, y=y):
            logits = model(x)
            return nn.functional.cross_entropy(logits, y), logits

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", inn.ConvergenceWarning)
            outcome = guarded_step(list(raw.parameters()), optimizer, forward, ddp=model)
        stats = raw.deq.stats
        log.append(dict(step=step, skipped=outcome.skipped, fallback=stats.backward.fallback if stats else None,
                        weights=digest(raw.state_dict()), params=digest(dict(raw.named_parameters()))))
        print(f"rank {rank} step {step}: {outcome.skipped or 'taken'}", flush=True)
        (out / f"rank{rank}.json").write_text(json.dumps(log, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
