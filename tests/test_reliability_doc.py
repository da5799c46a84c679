"""docs/reliability.md: its Python examples run as written (in order, in one namespace)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def test_reliability_page_python_examples_run():
    text = PAGE.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    fences = [line[3:].strip() for line in text.splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0 and set(fences[::2]) == {"python", "bash"}  # every other block is a bash command
    module = types.ModuleType("reliability_examples")
    sys.modules[module.__name__] = module
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/reliability.md python block {i}", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    assert module.__dict__["layer"].stats.backward_fallback == "ITD"
