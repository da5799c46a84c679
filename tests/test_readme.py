"""The README's Python examples run as written (in order, in one namespace, as a reader
pasting them into one session would)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 3
    torch.manual_seed(0)
    module = types.ModuleType("readme_examples")  # dataclasses defined there look up their module
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    finally:
        del sys.modules[module.__name__]
    assert namespace["result"].grads[0].isfinite().all()
    torch.testing.assert_close(namespace["again"].grads[0], namespace["result"].grads[0])
