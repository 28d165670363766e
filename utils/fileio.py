"""Crash-safe file writing, shared by checkpoints, caches, metrics and predicted masks.

A file is written to a temporary file in the same folder, flushed and fsync'ed, then renamed over
the target with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsync'ed: a crash,
a kill or a full disk leaves either the previous file or the new one, never half of one.

Files get the permissions any other program's files get: ``0o666`` less the umask (0644 under the
usual 022, so the group of a shared cluster account can read checkpoints and masks; 0600 under
077 for users who want that).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
from pathlib import Path
from typing import IO, Callable, Iterable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

#: Permission bits a new file asks for; the kernel removes the umask's bits (as ``open()`` does).
_NEW_FILE_MODE = 0o666
_CREATE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
                 | getattr(os, "O_CLOEXEC", 0))


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


#: Bytes a temporary name adds to its target's: ``.`` before, ``.<12 hex digits>.tmp`` after.
_TEMPORARY_EXTRA = 18
#: A file name's limit in bytes where the file system does not say (ext4, NTFS, APFS: 255).
_DEFAULT_NAME_MAX = 255


def _name_max(directory: Path) -> int:
    """The longest file name ``directory`` takes, in bytes."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf
        return _DEFAULT_NAME_MAX


def name_limit(path: str | os.PathLike) -> int:
    """The longest file name, in bytes, the folder ``path`` (or its nearest existing parent)
    takes."""
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return _name_max(folder)


def temporary_prefix(path: str | os.PathLike) -> str:
    """The start of every temporary name :func:`atomic_write` uses for ``path``: ``.<name>.``,
    or, where that would pass the folder's name limit (a legal name of 240 bytes plus 18), the
    name cut short and made unique again by a hash of the whole name: ``.<start>~<hash>.``."""
    path = Path(path)
    limit = _name_max(path.parent) if path.parent.is_dir() else _DEFAULT_NAME_MAX
    if len(os.fsencode(path.name)) + _TEMPORARY_EXTRA <= limit:
        return f".{path.name}."
    digest = hashlib.sha1(os.fsencode(path.name)).hexdigest()[:8]
    keep = max(limit - _TEMPORARY_EXTRA - len(digest) - 1, 1)
    start = path.name
    while len(os.fsencode(start)) > keep:  # cut whole characters, never half of one
        start = start[:-1]
    return f".{start}~{digest}."


def _create_temporary(directory: Path, name: str) -> tuple[int, str]:
    """Open a new, uniquely named file in ``directory`` for writing; returns ``(fd, path)``.

    Like :func:`tempfile.mkstemp` (``O_EXCL``, a random name) but created with mode ``0o666``,
    so the kernel applies the umask: mkstemp's fixed 0600 would survive the rename and lock the
    group out. Asking the kernel avoids reading the umask, which ``os.umask`` can only do by
    changing it for every thread for a moment.
    """
    prefix = temporary_prefix(directory / name)
    for _ in range(100):
        temp_name = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}.tmp")
        try:
            return os.open(temp_name, _CREATE_FLAGS, _NEW_FILE_MODE), temp_name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name for {name} in {directory}")


_RANDOM_PART = re.compile(r"[0-9a-f]{12}\.tmp")


def remove_stale_temporaries_of(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the temporary files killed :func:`atomic_write` calls of any of ``paths`` left.

    Each folder is listed once, however many of ``paths`` it holds. Call this only when no
    other process is writing those paths.
    """
    prefixes: dict[Path, set[str]] = {}
    for path in map(Path, paths):
        prefixes.setdefault(path.parent, set()).add(temporary_prefix(path))
    stale = []
    for folder, wanted in prefixes.items():
        try:
            names = os.listdir(folder)
        except OSError:  # no folder yet (nothing was written there), or not a folder
            continue
        stale += [folder / name for name in names
                  if name[:-16] in wanted and _RANDOM_PART.fullmatch(name[-16:])]
    for entry in stale:  # a folder: a video's frames being written (deploy.video_writer)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return stale


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` of ``path`` left behind.

    A SIGKILL (or a power cut) during a write leaves ``.<name>.<random>.tmp`` next to ``path``;
    a requeued job that is killed again and again would fill the disk with them. Call this only
    when no other process is writing ``path``.
    """
    return remove_stale_temporaries_of([path])


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a binary temporary file next to ``path``, then atomically move it there.

    The file's mode is ``0o666`` less the umask, as for any newly created file. The folder is
    created if needed. If ``write`` (or the rename) fails, the temporary file is
    removed, the error propagates and an existing ``path`` is left untouched.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    # Same folder as the target: os.replace is only atomic within one file system.
    fd, temp_name = _create_temporary(directory, path.name)
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


class FolderInUse(Exception):
    """Another live process holds the folder's lock; the message is one line."""


class FolderLock:
    """An exclusive lock on a folder, held by one process at a time (``fcntl.flock`` on a lock
    file inside it).

    The operating system releases the lock when its holder exits, however it ends (SIGKILL and
    out-of-memory kills included), so a killed run never leaves a folder locked; the lock file
    itself stays and only says which process held it last. Linux NFS clients map ``flock`` to
    POSIX locks, so this holds across the nodes of a cluster too. Platforms without ``fcntl``
    (Windows) are not locked.

    Args:
        wait: wait for another holder to release it instead of raising FolderInUse.

    Raises:
        FolderInUse: another process holds the lock (and ``wait`` is False).
        OSError: the lock file cannot be created (a read-only folder).
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike, *, wait: bool = False) -> None:
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                     _NEW_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by another process ({holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Unlock (also done by the operating system when the process ends)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases a flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
