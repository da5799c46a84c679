"""Atomic file writes: a reader never sees a half-written checkpoint, CSV or figure.

Each writer goes through a temporary file in the target's folder and ``os.replace``; a
process killed mid-write leaves at most a ``.tmp-*`` file, never a truncated target.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Sequence

__all__ = ["write_atomic", "write_csv", "write_png", "pyplot", "TEMP_PREFIX"]

TEMP_PREFIX = ".tmp-"


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, ``fsync`` and
    ``os.replace`` (atomic on POSIX and Windows); the temporary file is removed on failure.
    The file gets the mode a plain ``open(path, "w")`` would give it (0666 less the umask)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_csv(path: str, rows: Sequence[dict]) -> None:
    """``rows`` (dicts with the same keys, in column order) as a CSV file with a header line."""
    if not rows:
        raise ValueError(f"write_csv({path!r}): no rows")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue().encode())


def write_png(fig, *paths: str, dpi: int = 100) -> None:
    """Render the matplotlib figure ``fig`` once, write it to every path, and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    for path in paths:
        write_atomic(path, buffer.getvalue())


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
