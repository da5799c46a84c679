"""train.chains --quick: the implicit graph layer reaches the nodes a 4-layer GCN cannot."""

from __future__ import annotations

import json
import math

import pytest

from train import chains

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_implicit_layer_labels_far_nodes_and_the_gcn_does_not(tmp_path):
    rows = chains.main(["--quick", "--out", str(tmp_path)])
    by_model = {r["model"]: r for r in rows}
    implicit, gcn = by_model["implicit"], by_model["gcn"]
    assert abs(implicit["parameters"] - gcn["parameters"]) <= 0.15 * implicit["parameters"]  # equal budgets
    assert implicit["far_acc"] >= 0.95, implicit  # nodes more than 4 hops from the class signal
    assert gcn["far_acc"] <= 0.65, gcn  # about chance (0.5): the signal never reaches them
    assert implicit["well_posedness"] < 1 and math.isfinite(implicit["train_loss"])
    assert 1 <= implicit["forward_iterations"] <= 200
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rows"]) == 2 and (tmp_path / "chains.png").is_file()
