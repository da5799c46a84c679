"""Every script in train/: writes under runs/ unless told otherwise, and its --help names only
folders a fresh clone has."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["mnist", "stability", "hypergrad_error", "logistic_hpo", "ridge_hpo", "multinomial_sid", "chains", "imaml"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_runs_write_under_runs_by_default(name):
    script = importlib.import_module(f"train.{name}")
    assert script.parse_args([]).out.startswith("runs/")
    if hasattr(script, "QUICK"):
        assert script.parse_args(["--quick"]).out.startswith("runs/")


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_names_only_folders_that_exist(name):
    doc = importlib.import_module(f"train.{name}").__doc__
    for folder in (f.strip("`") for f in re.findall(r"--(?:out|figures|data-root) (\S+)", doc)):
        assert folder.startswith("runs/") or folder == "DIR" or (ROOT / folder).is_dir(), folder
