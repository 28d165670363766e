"""Crash-safe file writing, shared by checkpoints, caches, metrics and predicted masks.

A file is written to a temporary file in the same folder, flushed and fsync'ed, then renamed over
the target with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsync'ed: a crash,
a kill or a full disk leaves either the previous file or the new one, never half of one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable; platforms without directory fds skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a binary temporary file next to ``path``, then atomically move it there.

    The folder is created if needed. If ``write`` (or the rename) fails, the temporary file is
    removed, the error propagates and an existing ``path`` is left untouched.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    # Same folder as the target: os.replace is only atomic within one file system.
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text file."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
