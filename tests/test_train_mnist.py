"""train.mnist: smoke runs of every model and backward mode, resume, data loading, DDP.

Short runs only (a few optimiser steps on a slice of the test set); accuracy targets are
benchmark figures in the README, not assertions here.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import mnist, stability
from train.config import config_parser, field_comments
from train.data import DOWNLOADS, EMBEDDED, DataError, load

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["--no-progress", "--no-plot", "--no-baseline", "--test-limit", "200", "--threads", "1"]


def run(tmp_path: Path, *args: str) -> dict:
    return mnist.main([*SMALL, "--out", str(tmp_path), *args])


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize(
    "backward", ["itd", "itd:3", "aid-fp", "aid-cg", "aid-normalcg", "aid-gmres", "jfb", "phantom:2:0.5"])
@pytest.mark.parametrize("model", ["fc", "conv"])
def test_two_step_smoke_every_backward_mode(tmp_path, model, backward):
    extra = ["--channels", "8", "--batch-size", "20"] if model == "conv" else ["--width", "32"]
    summary = run(tmp_path, "--model", model, "--backward", backward, "--max-steps", "2", "--t", "8", "--k", "8",
                  "--tol", "0", *extra)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
    assert record["forward_iterations"] == 8  # forward tol 0: exactly t steps
    assert record["contraction"] < 1.0
    if backward.startswith("aid"):
        assert record["backward_iterations"] == 8  # backward tol 0: exactly k steps
    assert all(torch.isfinite(w).all() for w in weights(tmp_path).values())
    assert (tmp_path / "summary.json").is_file() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_two_step_smoke_baselines(tmp_path, model):
    summary = run(tmp_path, "--model", model, "--max-steps", "2", "--channels", "8", "--width", "32",
                  "--label-smoothing", "0.1")
    assert summary["steps"] == 2 and summary["backward"] is None
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0


def test_baseline_trained_in_the_same_run(tmp_path, capsys):
    summary = mnist.main([*SMALL[:-5], "--test-limit", "200", "--out", str(tmp_path), "--max-steps", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-5].startswith("fc test accuracy: ") and lines[-4].startswith("model")  # the DEQ, then the table
    assert lines[-1].startswith("time ratio fc / mlp: ") and "(model steps)" in lines[-1]
    assert summary["activation"] == summary["config"]["activation"] == "tanh"  # the FC model's, not --activation
    base = summary["baseline"]
    assert base["model"] == "mlp" and base["steps"] == summary["steps"] == 3
    assert abs(base["parameters"] - summary["parameters"]) / summary["parameters"] < 0.01  # same size
    ours, theirs = summary["config"], base["config"]
    assert {key for key in ours if ours[key] != theirs[key]} == {"model", "out"}  # the same recipe
    assert 0 < summary["step_seconds"] < summary["seconds"] and 0 < base["step_seconds"] < base["seconds"]
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < record["step_cpu_seconds"] and 0 < record["step_seconds"] < record["train_seconds"]
    assert json.loads((tmp_path / "summary.json").read_text())["baseline"]["model"] == "mlp"
    assert (tmp_path / "baseline" / "checkpoint.pt").is_file()


@pytest.mark.parametrize("model, extra", [("mon", ["--width", "32"]), ("monconv", ["--channels", "4"])])
@pytest.mark.parametrize("solver", ["pr", "fb"])
def test_monotone_models_train_with_splitting_solvers(tmp_path, model, extra, solver):
    alpha = "1.0" if solver == "pr" else "0.5"
    summary = run(tmp_path, "--model", model, "--solver", solver, "--alpha", alpha, "--epochs", "2",
                  "--batch-size", "500", "--t", "6", "--k", "5", "--tol", "0", "--augment", "0",
                  "--backward", "aid-gmres", *extra)
    assert summary["steps"] == 20 and summary["skipped_steps"] == 0 and summary["backward"] == "aid-gmres"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses) and losses[1] < losses[0]
    assert all(r["forward_iterations"] == 6 and r["backward_iterations"] == 5 for r in records)
    assert records[-1]["contraction"] > 1.0  # ‖W‖₂: a monotone map need not be a contraction
    assert all(torch.isfinite(w).all() for w in weights(tmp_path).values())


@pytest.mark.parametrize("model, baseline", [("mon", "mlp"), ("monconv", "cnn")])
def test_monotone_baseline_has_the_same_parameter_count(tmp_path, model, baseline):
    summary = mnist.main([*SMALL[:-5], "--test-limit", "100", "--out", str(tmp_path), "--model", model,
                          "--max-steps", "1", "--t", "3", "--k", "3"])
    base = summary["baseline"]
    assert base["model"] == baseline and base["steps"] == summary["steps"] == 1
    assert abs(base["parameters"] - summary["parameters"]) / summary["parameters"] < 0.01
    assert summary["parameters"] == {"mon": 198_892, "monconv": 46_028}[model]


def test_resume_ends_with_the_same_weights(tmp_path):
    common = ["--epochs", "2", "--width", "32", "--batch-size", "500", "--augment", "1"]
    run(tmp_path / "straight", *common)
    lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train_loss"] for line in lines]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses) and losses[1] < losses[0]
    first = run(tmp_path / "split", *common, "--stop-after", "1")
    assert first["epochs_completed"] == 1
    second = run(tmp_path / "split", *common, "--resume")
    assert second["epochs_completed"] == 2 and second["steps"] == 20
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backward", ["aid-fp", "jfb"])
def test_warm_start_saves_iterations_and_resumes_with_its_cache(tmp_path, backward):
    """--warm-start starts each sample's solves from its last w* (and AID's adjoint solution):
    without augmentation the forward needs fewer iterations from the second epoch on; the
    checkpoint holds the cache, so a resumed run ends with the uninterrupted run's weights."""
    common = ["--epochs", "3", "--width", "32", "--batch-size", "250", "--augment", "0", "--backward", backward,
              "--backward-tol", "1e-4", "--tol", "1e-5", "--t", "60", "--k", "60"]
    cold = run(tmp_path / "cold", *common)
    warm = run(tmp_path / "warm", *common, "--warm-start")
    def iterations(name: str, key: str) -> list[float]:
        return [json.loads(line)[key] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    f_cold, f_warm = iterations("cold", "forward_iterations"), iterations("warm", "forward_iterations")
    assert f_warm[0] == f_cold[0] and f_warm[2] < 0.9 * f_cold[2]  # epoch 1: nothing cached yet
    if backward == "aid-fp":
        assert iterations("warm", "backward_iterations")[2] < iterations("cold", "backward_iterations")[2]
    assert abs(warm["test_acc"] - cold["test_acc"]) <= 0.02  # a start changes iterations, not the solution
    ckpt = torch.load(tmp_path / "warm" / "checkpoint.pt", weights_only=True)
    assert ckpt["warm_start"]["w__0"].shape == (5000, 32) and bool(ckpt["warm_start"]["w__seen"].all())
    run(tmp_path / "split", *common, "--warm-start", "--stop-after", "2")
    run(tmp_path / "split", *common, "--warm-start", "--resume")
    a, b = weights(tmp_path / "warm"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_warm_start_starts_each_test_sample_from_its_last_fixed_point(tmp_path):
    """--eval-warm-start: from the second evaluation on, each test sample's solve starts from its
    fixed point at the previous one; with the weights all but unchanged in between (lr 1e-12)
    the solve starts at a fixed point, so it stops at once, and the accuracy is the cold one."""
    common = ["--epochs", "2", "--width", "32", "--batch-size", "2500", "--lr", "1e-12", "--schedule", "constant",
              "--tol", "1e-5", "--t", "60", "--eval-batch-size", "64"]
    run(tmp_path / "cold", *common)
    run(tmp_path / "warm", *common, "--eval-warm-start")

    def history(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    c, w = history("cold"), history("warm")
    assert w[0]["test_forward_iterations"] == c[0]["test_forward_iterations"] > 5  # nothing cached yet
    assert w[1]["test_forward_iterations"] == 1  # the weights did not move after step 2: already solved
    assert abs(w[1]["test_acc"] - c[1]["test_acc"]) <= 1 / 200  # the same solution to tol: one sample at most


def test_the_adjoint_tolerance_is_tied_to_the_forward_one_unless_given():
    tied = mnist.build_model(mnist.parse_args(["--backward", "aid-fp", "--tol", "3e-4"])).deq.backward.linear_solver
    assert tied.tol == 3e-4 and tied.max_iter == 20
    given = mnist.build_model(mnist.parse_args(["--backward", "aid-fp", "--tol", "3e-4", "--backward-tol", "0"]))
    given = given.deq.backward.linear_solver
    assert given.tol == 0.0
    with pytest.raises(ValueError, match="--backward-tol"):
        mnist.check_config(mnist.parse_args(["--backward-tol", "-0.5"]))


@pytest.mark.parametrize("name, kind", [("circulant", "CirculantConvBound"), ("subspace", "ConvOperatorBound")])
def test_conv_bound_picks_the_conv_cells_norm_bound(name, kind):
    default = mnist.build_model(mnist.parse_args(["--model", "conv"]))
    assert type(default.cell.A.parametrizations.weight[0]).__name__ == "CirculantConvBound"
    model = mnist.build_model(mnist.parse_args(["--model", "conv", "--conv-bound", name]))
    assert type(model.cell.A.parametrizations.weight[0]).__name__ == kind


def test_preset_grazzi2020_is_the_reference_experiment():
    cfg = mnist.parse_args(["--preset", "grazzi2020"])
    assert (cfg.model, cfg.width, cfg.t, cfg.k, cfg.tol, cfg.batch_size) == ("fc", 200, 20, 20, 0.0, 5000)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.contraction, cfg.gamma) == ("sgd", 0.5, 0.9, "projection", 0.99)
    assert mnist.parse_args(["--preset", "grazzi2020", "--lr", "0.1"]).lr == 0.1  # options override the preset
    with pytest.raises(SystemExit):
        mnist.parse_args(["--preset", "nope"])


def test_preset_projection_keeps_the_bound(tmp_path):
    summary = run(tmp_path, "--preset", "grazzi2020", "--max-steps", "2", "--width", "32")
    assert summary["contraction"] <= 0.99 + 1e-6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backward", "aid-xyz"], "unknown --backward"),
        (["--backward", "itd:x"], "itd:K"),
        (["--model", "resnet"], "--model must be one of"),
        (["--t", "0"], "--t must be >= 1"),
        (["--data", "cifar"], "--data must be one of"),
        (["--solver", "pr"], "only for --model mon or monconv"),
        (["--model", "mon", "--alpha", "0"], "--alpha and --m must be > 0"),
        (["--on-failure", "retry"], "unknown --on-failure"),
        (["--model", "conv", "--conv-bound", "power"], "--conv-bound must be one of"),
    ],
)
def test_bad_options_raise(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, *args)


def test_embedded_data_is_real_and_complete():
    data = load("mnist-5k")
    assert data.train.images.shape == (5000, 1, 28, 28) and data.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train.labels).tolist() == [500] * 10
    assert 0.0 <= float(data.train.images.min()) and float(data.train.images.max()) == 1.0


def torchvision_copy(root: Path, cls_name: str) -> Path:
    """The embedded digits in torchvision's layout (``<root>/<cls_name>/raw``, uncompressed idx)."""
    raw = root / cls_name / "raw"
    raw.mkdir(parents=True)
    for gz in EMBEDDED.glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    return root


@pytest.mark.parametrize("name, cls_name, nested", [("mnist", "MNIST", False), ("mnist-5k", "MNIST", True),
                                                    ("fashion-mnist", "FashionMNIST", True)])
def test_offline_loading_of_a_torchvision_copy(tmp_path, name, cls_name, nested):
    """``--data-root`` reads ``<root>/<Class>/raw`` or ``<root>/<name>/<Class>/raw`` without a download."""
    torchvision_copy(tmp_path / name if nested else tmp_path, cls_name)
    data, embedded = load(name, tmp_path), load("mnist-5k")
    assert data.name == name and len(data.train) == 5000 and len(data.test) == 10000
    assert torch.equal(data.train.images, embedded.train.images) and torch.equal(data.test.labels, embedded.test.labels)


def test_training_on_a_torchvision_copy_offline(tmp_path):
    root = torchvision_copy(tmp_path / "data", "FashionMNIST")
    summary = run(tmp_path / "out", "--data", "fashion-mnist", "--data-root", str(root), "--max-steps", "2",
                  "--width", "32")
    assert summary["data"] == "fashion-mnist" and summary["steps"] == 2


def test_the_embedded_fashion_subset_is_real_and_balanced():
    data = load("fashion-5k")
    assert data.train.images.shape == (5000, 1, 28, 28) and data.test.images.shape == (2000, 1, 28, 28)
    assert torch.bincount(data.train.labels).tolist() == [500] * 10
    assert torch.bincount(data.test.labels).tolist() == [200] * 10
    assert not torch.equal(data.train.images[:100], load("mnist-5k").train.images[:100])


def test_a_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch):
    """torchvision's download fails part-way (no network is touched: it is replaced, and any
    socket connection would fail the test)."""
    import socket

    from torchvision import datasets

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)

    def broken_download(self):
        raw = Path(self.raw_folder)
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.FashionMNIST, "download", broken_download)
    root = tmp_path / "root"
    with pytest.raises(DataError, match="could not be downloaded: network is unreachable .*fashion-5k"):
        load("fashion-mnist", root, download=True)
    assert not root.exists()
    root.mkdir()
    with pytest.raises(DataError, match="could not be downloaded"):
        load("fashion-mnist", root, download=True)
    assert root.is_dir() and list(root.iterdir()) == []  # the user's folder stays, what was made in it goes


def test_bad_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data root not found"):
        run(tmp_path, "--data", "mnist", "--data-root", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no mnist data under"):
        run(tmp_path, "--data", "mnist", "--data-root", str(tmp_path))


def test_missing_and_corrupt_gz_files(tmp_path):
    from train import data as data_module

    folder = tmp_path / "gz"
    shutil.copytree(EMBEDDED, folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="data file not found: .*t10k-labels"):
        data_module._load_gz_folder(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt data file .*not a valid gzip"):
        data_module._load_gz_folder(folder)
    raw = gzip.decompress((EMBEDDED / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:-7]))  # truncated payload
    with pytest.raises(DataError, match="header says shape"):
        data_module._load_gz_folder(folder)


def test_truncated_gz_file_names_the_file(tmp_path):
    from train import data as data_module

    folder = tmp_path / "gz"
    shutil.copytree(EMBEDDED, folder)
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])  # a download cut short
    with pytest.raises(DataError, match=re.escape(f"corrupt data file {images}")):
        data_module._load_gz_folder(folder)


def test_corrupt_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    args = ["--max-steps", "1", "--width", "16"]
    run(tmp_path, *args)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # cut short
    with pytest.raises(mnist.CheckpointError, match=re.escape(f"corrupt checkpoint {ckpt}")):
        run(tmp_path, *args, "--resume")
    proc = subprocess.run([sys.executable, "-m", "train.mnist", *SMALL, "--out", str(tmp_path), *args, "--resume"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: corrupt checkpoint {ckpt}")


def test_default_paths_stay_inside_the_repository():
    cfg = mnist.parse_args([])
    assert not os.path.isabs(cfg.out) and not cfg.data_root
    assert DOWNLOADS.is_relative_to(ROOT) and EMBEDDED.is_relative_to(ROOT)


@pytest.mark.parametrize("script", [mnist, stability])
def test_every_option_has_help(script):
    comments = field_comments(script.Config)
    assert [f.name for f in dataclasses.fields(script.Config) if f.name not in comments] == []
    text = config_parser(script.Config, "prog", None).format_help()
    assert "--threads THREADS     CPU cores" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train.mnist", "--device", "cuda", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip() == proc.stderr.strip().splitlines()[0]
    assert proc.stderr.startswith("error: --device cuda, but this machine has no CUDA device")


def test_command_line_reports_bad_option_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train.mnist", "--backward", "nope", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: unknown --backward")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_gradients_equal_single_process(tmp_path):
    """One SGD step (lr 1, no momentum) in float64: w₀ − w₁ is the gradient of the global batch.

    AID-FP and a fixed t act on each sample separately, so the split cannot change the maths
    (GMRES/CG take inner products over the whole local batch: their truncated answers differ).
    """
    args = ["--max-steps", "1", "--width", "32", "--batch-size", "40", "--optimizer", "sgd", "--lr", "1",
            "--momentum", "0", "--schedule", "constant", "--dtype", "float64", "--backward", "aid-fp", "--tol", "0"]
    single = run(tmp_path / "single", *args)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "train.mnist",
           *SMALL, "--out", str(tmp_path / "ddp"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and single["world_size"] == 1

    torch.manual_seed(0)
    w0 = mnist.build_model(mnist.parse_args(args)).double().state_dict()
    w_single, w_ddp = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    for name, initial in w0.items():
        if not initial.is_floating_point() or name.endswith(("_u", "_v")):
            continue  # power-iteration buffers are not gradients
        g_single, g_ddp = initial - w_single[name], initial - w_ddp[name]
        assert g_single.abs().max() > 0, name
        torch.testing.assert_close(g_ddp, g_single, rtol=1e-10, atol=1e-12 * float(g_single.abs().max()))


def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """SIGKILL during the third epoch: the checkpoint on disk is the complete one of an epoch
    end (never half-written), and ``--resume`` ends with the same weights as a run that was
    never interrupted."""
    common = [*SMALL, "--epochs", "4", "--width", "32", "--batch-size", "50", "--augment", "1"]
    mnist.main([*common, "--out", str(tmp_path / "straight")])
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "train.mnist", *common, "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    time.sleep(0.3)  # inside the third epoch
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    proc.kill()
    proc.wait()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # loads: complete
    assert ckpt["epoch"] in (2, 3)  # the last epoch end before the kill
    resumed = mnist.main([*common, "--out", str(out), "--resume"])
    assert resumed["epochs_completed"] == 4
    a, b = weights(tmp_path / "straight"), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_switch_backward_changes_the_estimator_after_a_fraction_of_the_epochs(tmp_path):
    """--switch-backward aid-fp --switch-at 0.5: the phantom gradient (no adjoint solve) for the
    first half of the epochs, then AID-FP; a resumed run switches at the same epoch."""
    common = ["--epochs", "4", "--width", "32", "--batch-size", "500", "--switch-backward", "aid-fp",
              "--switch-at", "0.5", "--tol", "1e-4"]
    run(tmp_path / "straight", *common)
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["backward_iterations"] is None for r in records] == [True, True, False, False]
    run(tmp_path / "split", *common, "--stop-after", "3")
    run(tmp_path / "split", *common, "--resume")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--switch-at"):
        mnist.check_config(mnist.parse_args(["--switch-at", "1.5"]))
    with pytest.raises(ValueError, match="unknown --backward"):
        mnist.check_config(mnist.parse_args(["--switch-backward", "aid-xx"]))
