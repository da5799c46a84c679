"""Faults on one of two processes (gloo, CPU): every handled fault is a collective decision.

Each run is ``tests/ddp_worker.py`` (a FixedPointLayer classifier, AID-Neumann, a fault on
rank 1 at step 3) in two processes with a hard time limit.  After a handled fault both
ranks hold bit-identical weights after every step and log the same skipped steps; a killed
or hung process makes the survivor stop with :class:`train.step.PeerLostError` within the
process-group timeout; ``train.mnist`` killed mid-epoch under torchrun resumes to the
weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import mnist

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
FAULT_STEP = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _logs(out: Path) -> list[list[dict]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("fault, policy, reason", [
    ("nan", "raise", "forward: "),
    ("diverge", "raise", "forward solve diverged"),
    ("adjoint", "raise", "adjoint solve diverged"),
    ("adjoint", "warn", ""),
    ("adjoint", "itd", ""),
])
def test_a_fault_on_rank_1_keeps_the_replicas_identical(tmp_path, fault, policy, reason):
    proc = _torchrun(str(WORKER), "--fault", fault, "--policy", policy, "--fault-step", str(FAULT_STEP),
                     "--steps", "6", "--timeout", "20", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    log0, log1 = _logs(tmp_path)
    assert len(log0) == len(log1) == 6
    for a, b in zip(log0, log1):  # bit-identical weights after every step
        assert a["weights"] == b["weights"], (a, b)
    skipped = [[e["step"] for e in log if e["skipped"]] for log in (log0, log1)]
    if reason:  # a raised fault: every rank skips the step and logs it; the weights stay
        assert skipped == [[FAULT_STEP], [FAULT_STEP]]
        assert log1[FAULT_STEP]["skipped"].startswith(reason), log1[FAULT_STEP]
        assert log0[FAULT_STEP]["skipped"] == "another process failed"
        assert log0[FAULT_STEP]["params"] == log0[FAULT_STEP - 1]["params"]
    else:  # a fault the policy absorbs: the step is taken everywhere
        assert skipped == [[], []]
        assert log0[FAULT_STEP]["params"] != log0[FAULT_STEP - 1]["params"]
        assert log1[FAULT_STEP]["fallback"] == ("ITD" if policy == "itd" else None)
        assert log0[FAULT_STEP]["fallback"] is None
    assert log0[-1]["params"] != log0[0]["params"]


def _two_processes(tmp_path: Path, fault: str, timeout: float) -> tuple[list[subprocess.Popen], list[Path]]:
    """The worker as two plain processes (no torchrun agent to stop the survivor for it)."""
    port, procs, errs = _free_port(), [], []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        errs.append(tmp_path / f"stderr{rank}.txt")
        with errs[-1].open("w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), "--fault", fault, "--fault-step", str(FAULT_STEP), "--steps", "6",
                 "--timeout", str(timeout), "--out", str(tmp_path)],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err))
    return procs, errs


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_the_survivor_of_a_killed_or_hung_process_stops_with_a_clear_error(tmp_path, fault):
    """kill -9 closes rank 1's connections (rank 0 stops at once); SIGSTOP leaves them open
    (rank 0 stops when the 3 s process-group timeout has passed)."""
    procs, errs = _two_processes(tmp_path, fault, timeout=3)
    try:
        start = time.monotonic()
        procs[0].wait(timeout=60)
        assert procs[0].returncode != 0
        deadline = 3 + 45  # the timeout, plus start-up of two processes on a loaded machine
        assert time.monotonic() - start < deadline
        if fault == "kill":
            assert procs[1].wait(timeout=10) == -9
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    message = errs[0].read_text()
    assert "PeerLostError: rank 0: the all_reduce of the failure flags failed" in message, message[-3000:]
    log0 = json.loads((tmp_path / "rank0.json").read_text())
    assert [e["step"] for e in log0] == list(range(FAULT_STEP))  # it stopped at the fault, not before


MNIST = ["-m", "train.mnist", "--no-progress", "--no-plot", "--no-baseline", "--test-limit", "100", "--threads", "1",
         "--width", "16", "--batch-size", "100", "--t", "8", "--k", "8", "--augment", "1"]


def test_mnist_survivor_of_a_killed_process_exits_with_one_line_within_the_timeout(tmp_path):
    """Two plain ``train.mnist`` processes (no torchrun agent): rank 1 is killed in the
    second epoch; rank 0 exits by itself, with one ``error:`` line naming the lost process."""
    port, procs = _free_port(), []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *MNIST, "--epochs", "30", "--dist-timeout", "10",
                                       "--out", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    try:
        metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 90
        while time.monotonic() < deadline and procs[0].poll() is None and not metrics.is_file():
            time.sleep(0.02)
        time.sleep(0.5)  # inside the second epoch's training steps
        assert procs[0].poll() is None and procs[1].poll() is None, "the run ended before it could be killed"
        procs[1].kill()
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - start < 10 + 20  # the process-group timeout, plus slack for a loaded machine
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert procs[0].returncode == 1
    last = err.strip().splitlines()[-1]
    # the kill lands in one of the guarded collectives: the step's two (the failure flags or the
    # gradients), the epoch's or the evaluation's sums, or a barrier
    assert last.startswith("error: rank 0: the "), err[-3000:]
    assert "failed: another process died or did not answer" in last, err[-3000:]


def _rank_pid(agent: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (read from /proc), or None if not started yet."""
    try:
        children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_mnist_under_torchrun_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    common = [*MNIST, "--epochs", "3", "--dist-timeout", "10"]
    proc = _torchrun(*common, "--out", str(tmp_path / "straight"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *common, "--out", str(out)]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, victim = time.monotonic() + 90, None
        metrics = out / "metrics.jsonl"
        while time.monotonic() < deadline and agent.poll() is None:
            if metrics.is_file() and metrics.read_text().count("\n") >= 1:
                victim = _rank_pid(agent, 1)
                break
            time.sleep(0.02)
        assert victim is not None and agent.poll() is None, "the run ended before rank 1 could be killed"
        os.kill(victim, 9)
        _, err = agent.communicate(timeout=60)  # bounded: the agent stops the survivor
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode != 0 and "Signal 9 (SIGKILL)" in err, err[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] in (1, 2)

    proc = _torchrun(*common, "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("timeout", ["0", "-5", "nan"])
def test_a_bad_dist_timeout_is_a_value_error(timeout):
    with pytest.raises(ValueError, match="--dist-timeout"):
        mnist.check_config(mnist.parse_args(["--dist-timeout", timeout]))
