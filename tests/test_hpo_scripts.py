"""The hypergradient example scripts on small problems: what each run must show."""

from __future__ import annotations

import math

import pytest
import torch

from train import hypergrad_error, logistic_hpo, multinomial_sid, ridge_hpo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    """The scripts set float64 as the default dtype (their main runs as a program)."""
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)


def test_hypergrad_error_falls_geometrically_and_cg_is_exact_on_the_exact_inner(tmp_path):
    rows = hypergrad_error.main(hypergrad_error.parse_args(
        ["--out", str(tmp_path), "--n", "60", "--p", "8", "--ks", "5,40", "--n-lambda", "1"]))
    err = {(r["problem"], r["setting"], r["method"], r["k"]): r["rel_error"] for r in rows}
    for problem in ("ridge", "logistic"):
        for method in ("ITD", "AID-FP", "AID-CG", "AID-GMRES"):
            assert err[(problem, "t=k", method, 40)] < 0.1 * err[(problem, "t=k", method, 5)], (problem, method)
        # with the inner problem solved, k = 40 >= p CG/GMRES steps are exact
        assert err[(problem, "exact inner", "AID-CG", 40)] < 1e-9
        assert err[(problem, "exact inner", "AID-GMRES", 40)] < 1e-9
    assert (tmp_path / "hypergrad_error.png").is_file() and (tmp_path / "hypergrad_error.csv").is_file()


def test_ridge_hpo_methods_agree_with_the_exact_hypergradient_descent(tmp_path):
    summary = ridge_hpo.main(ridge_hpo.parse_args(
        ["--out", str(tmp_path), "--n", "80", "--p", "10", "--informative", "3", "--outer-steps", "15",
         "--inner-steps", "60", "--linear-steps", "10"]))
    start = summary["single λ (grid)"]["val"]
    for method in ("exact", "aid-cg", "aid-fp", "itd", "hoag"):
        assert math.isfinite(summary[method]["val"]), method
    # CG with k >= p at a warm-started inner solution is the exact hypergradient
    assert abs(summary["aid-cg"]["val"] - summary["exact"]["val"]) < 1e-3 * start
    assert summary["exact"]["val"] < summary["single λ (grid)"]["val"] * 1.5


@pytest.mark.parametrize("method", ["itd", "aid-cg", "itd:20"])
def test_logistic_hpo_lowers_the_validation_loss(tmp_path, method):
    summary = logistic_hpo.main(logistic_hpo.parse_args(
        ["--out", str(tmp_path), "--method", method, "--n", "200", "--d", "5", "--inner-steps", "40",
         "--outer-steps", "25", "--outer-lr", "0.1"]))
    assert summary["final_val"] < 0.95 * summary["initial_val"], summary


def test_multinomial_sid_runs_both_methods_with_falling_validation_loss(tmp_path):
    summary = multinomial_sid.main(multinomial_sid.parse_args(  # the embedded fashion-5k
        ["--out", str(tmp_path), "--n-train", "500", "--n-val", "500",
         "--epochs", "6", "--sid-inner", "5", "--sid-linear", "5"]))
    for method in ("AID", "SID"):
        s = summary[method]
        assert math.isfinite(s["val_loss"]) and s["val_loss"] < s["initial_val_loss"], (method, s)
        assert s["outer_steps"] >= 1
