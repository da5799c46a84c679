"""mkdocs hook: the PNGs the training scripts write into ``train/results/`` are served as
``figures/<path under train/results>``, so the site shows the committed figures themselves."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "train" / "results"


def on_files(files, config):
    for png in sorted(RESULTS.rglob("*.png")):
        uri = "figures/" + png.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files
