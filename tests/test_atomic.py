"""train.atomic.write_atomic: all or nothing, no temporary files left, the usual file mode."""

from __future__ import annotations

import os
import stat

import pytest

from train.atomic import write_atomic


def test_writes_content_with_the_umask_mode(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_atomic(str(path), b"{}\n")
    assert path.read_bytes() == b"{}\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(path.parent) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    write_atomic(str(path), b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
