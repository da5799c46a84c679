"""Measurement harness shared by the benchmark scripts (timing, peak memory, tables, verdicts).

The machines these benchmarks run on are small and shared, so an absolute time means little.
Every script therefore measures the things it compares *side by side in one run*:

* ``compare(candidates)`` times each candidate callable in interleaved rounds
  (round r runs A, B, C, ... in a rotated order), each measurement a loop of ``n`` calls
  calibrated to last at least ``min_time`` seconds.  A load spike hits all candidates of a
  round alike, so the *paired* ratio of two candidates within a round is robust; the scripts
  report the median over rounds of those paired ratios.  ``--clock cpu`` measures the
  process's CPU time instead of wall time (CPU device, ``--threads 1``): time the process
  spends waiting for a core that another process holds is not counted.
* ``peak_memory(fn)`` is the peak of live tensor bytes allocated while ``fn`` runs, above
  what was live before.  On CUDA it is ``torch.cuda.max_memory_allocated`` minus the starting
  allocation.  On CPU it replays the allocator events of ``torch.profiler`` (``profile_memory``;
  every tensor allocation and free with its byte count, in time order) and takes the maximum
  running sum.  Unlike process RSS this is deterministic, ignores the allocator's caching and
  other processes, and sees transient buffers (the adjoint solve's workspace), which counting
  the tensors saved for backward would miss.
* ``saved_bytes(fn)`` counts the bytes of distinct storages autograd saves for backward during
  ``fn`` (``torch.autograd.graph.saved_tensors_hooks``): the graph memory that grows with t
  under ITD.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# Scripts run as ``python benchmarks/<name>.py``: make the repository (implicitnets, models)
# importable without installing it.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

__all__ = [
    "add_common_args",
    "setup",
    "sync",
    "compare",
    "paired_ratio",
    "peak_memory",
    "saved_bytes",
    "fit_exponent",
    "print_table",
    "Verdicts",
    "fmt_bytes",
]


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options every benchmark takes: --quick, --device, --threads, --repeats, --seed."""
    parser.add_argument("--quick", action="store_true", help="smaller grid, fewer repeats (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--repeats", type=int, default=0, help="interleaved rounds per comparison (0: auto)")
    parser.add_argument("--min-time", type=float, default=0.0,
                        help="seconds per measurement (0: auto; calibrates the inner loop)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the process's CPU time (CPU device with --threads 1: robust to "
                             "other processes sharing the cores)")
    return parser


_clock = time.perf_counter


def setup(args: argparse.Namespace) -> torch.device:
    """Seed, thread count and device; prints the environment line every result table needs."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.repeats:
        args.repeats = 5 if args.quick else 11
    if not args.min_time:
        args.min_time = 0.02 if args.quick else 0.05
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    clock = getattr(args, "clock", "wall")
    if clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures host CPU time; use the wall clock on a GPU")
    global _clock
    _clock = time.process_time if clock == "cpu" else time.perf_counter
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# torch {torch.__version__}, device {device} ({name}), threads {torch.get_num_threads()}, "
          f"rounds {args.repeats}, >= {args.min_time * 1e3:.0f} ms per measurement, {clock} clock"
          f"{', quick' if args.quick else ''}")
    return device


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _time_loop(fn: Callable[[], object], n: int, device: torch.device) -> float:
    sync(device)
    start = _clock()
    for _ in range(n):
        fn()
    sync(device)
    return (_clock() - start) / n


def compare(
    candidates: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    repeats: int,
    min_time: float,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one entry per interleaved round.

    Each candidate is warmed up, its inner loop count ``n`` calibrated so that one
    measurement lasts about ``min_time``; then ``repeats`` rounds run every candidate once,
    in an order rotated from round to round.
    """
    names = list(candidates)
    counts: dict[str, int] = {}
    for name in names:
        fn = candidates[name]
        for _ in range(warmup):
            fn()
        one = _time_loop(fn, 1, device)
        counts[name] = max(1, min(10_000, math.ceil(min_time / max(one, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(_time_loop(candidates[name], counts[name], device))
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num][r] / times[den][r]`` (robust to load that drifts)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensors allocated during ``fn()`` above those live before it."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (y ~ x^p)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    """Print a Markdown table (pastes straight into benchmarks/README.md)."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n### {title}\n")
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
    print(flush=True)


def _cell(c: object) -> str:
    if isinstance(c, float):
        if c == 0 or 1e-3 <= abs(c) < 1e5:
            return f"{c:.3f}" if abs(c) < 10 else f"{c:.1f}"
        return f"{c:.2e}"
    return str(c)


class Verdicts:
    """Collects target checks; ``finish()`` prints them and returns the process exit code."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bool | None, str]] = []

    def check(self, target: str, ok: bool | None, measured: str) -> bool | None:
        """Record one target; ``ok=None`` means it could not be measured (SKIP)."""
        self.items.append((target, ok, measured))
        return ok

    def finish(self) -> int:
        print("\n### Verdicts\n")
        for target, ok, measured in self.items:
            word = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
            print(f"- {word}: {target} — {measured}")
        failed = any(ok is False for _, ok, _ in self.items)
        print(f"\n{'FAIL' if failed else 'PASS'} overall", flush=True)
        return 1 if failed else 0
