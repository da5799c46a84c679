"""Smoke test of the stability study (tiny grid, a few seconds)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import implicitnets as inn
import train.stability as stability

TINY = ["--modes", "itd,aid-fp", "--settings", "0.9,projection", "--seeds", "0", "--epochs", "1",
        "--batch-size", "50", "--train-limit", "150", "--test-limit", "200", "--width", "16", "--t", "8", "--k", "8",
        "--diag-every", "2", "--diag-batch", "4", "--no-progress"]


def test_study_writes_table_figures_and_resumes(tmp_path):
    out, figures = str(tmp_path / "out"), str(tmp_path / "figures")
    cells = stability.main(TINY + ["--out", out, "--figures", figures])
    assert len(cells) == 4
    for folder in (out, figures):
        table = open(os.path.join(folder, "stability_table.md")).read()
        assert "| aid-fp |" in table and "spectral γ=0.9" in table and "projection" in table
        for name in ("accuracy", "contraction", "residuals", "hypergrad"):
            png = os.path.join(folder, f"stability_{name}.png")
            assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # atomic writes left nothing behind
    run = json.load(open(os.path.join(out, "runs", "aid-fp__0p9__seed0.json")))
    assert run["steps"] == 3 and len(run["forward_residual"]) == 3 and len(run["backward_residual"]) == 3
    first = run["checkpoints"][0]
    assert first["ref_valid"] and math.isfinite(first["hypergrad_error"]) and first["hypergrad_error"] < 1e-2
    assert 0 < first["rho_worst"] <= first["norm_worst"] * (1 + 1e-6) <= first["lipschitz"] * (1 + 1e-6)
    projected = json.load(open(os.path.join(out, "runs", "itd__projection__seed0.json")))
    assert all(c["lipschitz"] <= 0.99 + 1e-6 for c in projected["checkpoints"])
    mtime = os.path.getmtime(os.path.join(out, "runs", "itd__0p9__seed0.json"))
    assert stability.main(TINY + ["--out", out]) == cells  # finished runs are reused
    assert os.path.getmtime(os.path.join(out, "runs", "itd__0p9__seed0.json")) == mtime


def test_diverging_adjoint_steps_are_skipped_and_logged(tmp_path, monkeypatch):
    """An expansive A (‖A‖₂ = 1.5) with a tiny input term: AID-FP's adjoint solve diverges
    at every step, so every step is skipped, logged, and the weights stay as they were."""
    made = []

    def expansive(cfg, mode, setting):
        model = stability.FCEquilibrium(784, cfg.width, 10, contraction=None,
                                        solver=inn.FixedPointIteration(max_iter=cfg.t, tol=0.0),
                                        backward=inn.AID(inn.linear.Neumann(max_iter=cfg.k, tol=0.0),
                                                         on_failure=inn.Raise()))
        Q, _ = torch.linalg.qr(torch.randn(cfg.width, cfg.width, generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            model.cell.A.weight.copy_(1.5 * Q)
            model.cell.B.weight.mul_(1e-6)
            model.cell.B.bias.mul_(1e-6)
        made.append([p.detach().clone() for p in model.cell.parameters()])
        return model

    monkeypatch.setattr(stability, "make_model", expansive)
    cells = stability.main(["--modes", "aid-fp", "--settings", "none", "--seeds", "0", "--epochs", "1",
                            "--batch-size", "50", "--train-limit", "100", "--test-limit", "100", "--width", "16",
                            "--diag-every", "100", "--diag-batch", "4", "--no-progress", "--out", str(tmp_path)])
    run = json.load(open(os.path.join(tmp_path, "runs", "aid-fp__none__seed0.json")))
    assert run["skipped"] == [0, 1] and all(e["reason"].startswith("adjoint solve diverged") for e in run["events"])
    assert cells["none|aid-fp"]["skipped"] == 2
    assert run["checkpoints"][0]["rho_worst"] > 1.4
    assert all(math.isnan(v) for v in run["loss"])


def test_bad_options_are_rejected():
    with pytest.raises(SystemExit):
        stability.parse_args(["--modes", "aid-cgx"])
    with pytest.raises(SystemExit):
        stability.parse_args(["--settings", "tight"])
    assert stability.parse_args(["--quick"]).settings == "0.9,none"
    assert stability.parse_args(["--settings", "monotone"]).settings == "monotone"


def test_monotone_setting_runs_the_monotone_model(tmp_path):
    """The monotone row: MonotoneEquilibrium solved by Peaceman–Rachford, diagnosed against a
    Peaceman–Rachford / AID-GMRES reference."""
    cells = stability.main(["--modes", "aid-gmres,itd", "--settings", "monotone", "--seeds", "0", "--epochs", "1",
                            "--batch-size", "50", "--train-limit", "100", "--test-limit", "100", "--width", "16",
                            "--t", "30", "--k", "20", "--diag-every", "100", "--diag-batch", "4", "--no-progress",
                            "--out", str(tmp_path)])
    assert set(cells) == {"monotone|aid-gmres", "monotone|itd"}
    assert "monotone (monDEQ, PR)" in open(os.path.join(tmp_path, "stability_table.md")).read()
    for mode in ("aid-gmres", "itd"):
        run = json.load(open(os.path.join(tmp_path, "runs", f"{mode}__monotone__seed0.json")))
        assert run["steps"] == 2 and run["skipped"] == [] and all(math.isfinite(v) for v in run["loss"])
        assert all(c["ref_valid"] for c in run["checkpoints"])
        first = run["checkpoints"][0]
        assert first["hypergrad_error"] < 1e-3  # 30 PR iterations: close to the reference
        assert 0 < first["norm_worst"] <= first["lipschitz"] * (1 + 1e-6)
