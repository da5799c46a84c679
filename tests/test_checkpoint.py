"""train.checkpoint: a checkpoint holds tensors and plain containers only; one that carries a
pickled callable is refused with a one-line ``error:`` and runs no code."""

from __future__ import annotations

import pathlib
import random
import subprocess
import sys
from pathlib import Path

import torch

from train import mnist

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-progress", "--no-plot", "--no-baseline", "--test-limit", "100", "--threads", "1", "--width", "16",
        "--max-steps", "1"]


class Payload:
    """Unpickling this object touches ``marker``: what a malicious shared checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_checkpoint_carrying_a_pickled_callable_is_refused_and_runs_no_code(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "MARKER"
    mnist.main([*ARGS, "--out", str(out)])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["note"] = Payload(str(marker))
    torch.save(ckpt, out / "checkpoint.pt")
    proc = subprocess.run([sys.executable, "-m", "train.mnist", *ARGS, "--out", str(out), "--resume", "--epochs", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert not marker.exists(), "loading the checkpoint ran the code it carried"
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: refused checkpoint {out / 'checkpoint.pt'}"), proc.stderr[-2000:]


def test_a_checkpoint_holds_only_tensors_and_plain_containers(tmp_path):
    mnist.main([*ARGS, "--out", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # loads without full pickle
    assert {"model", "optimizer", "epoch", "step", "history", "config", "rng"} <= set(ckpt)
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
    version, state, gauss = ckpt["rng"]["python"]
    assert isinstance(version, int) and all(isinstance(v, int) for v in state)


def test_resume_restores_the_random_number_generators(tmp_path):
    from train.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(7)
    random.seed(7)
    save_checkpoint(str(tmp_path / "c.pt"), model, optimizer, epoch=1, step=2, history=[])
    want = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    state = load_checkpoint(str(tmp_path / "c.pt"), model, optimizer, torch.device("cpu"))
    assert (state["epoch"], state["step"]) == (1, 2)
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
