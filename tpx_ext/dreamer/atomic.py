"""Atomic file writes: a crash mid-write leaves the previous file intact."""

import os
import tempfile


def atomic_write(path, write, suffix: str = ".tmp") -> None:
    """Call write(f) on a temporary binary file in path's directory, fsync it, then
    os.replace it onto path."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
