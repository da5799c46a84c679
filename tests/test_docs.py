"""Every ```python block of README.md and of the documentation site (docs/**/*.md) runs as
written, without a warning: the blocks of one page in order, in one namespace, as a reader
pasting them into one session would.  Blocks not meant to run are fenced as ```text or ```bash."""

from __future__ import annotations

import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_without_warnings(page):
    torch.manual_seed(0)
    module = types.ModuleType("docs_examples")  # dataclasses defined in a block look up their module
    sys.modules[module.__name__] = module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            # torch's own deprecation notice, raised inside torch.func.jacfwd on its first call
            warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
            for i, block in enumerate(python_blocks(page)):
                exec(compile(block, f"{page.name} python block {i}", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]


def test_the_readme_and_the_site_have_examples():
    assert python_blocks(ROOT / "README.md")
    assert sum(len(python_blocks(p)) for p in PAGES) >= 10
