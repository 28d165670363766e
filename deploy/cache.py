"""What inference keeps between runs so that the next one starts sooner.

- The ONNX graph a ``.pth.tar`` checkpoint is exported to for the ONNX runtimes, keyed by the
  checkpoint's content and by the code and PyTorch version that export it: a retrained or
  edited checkpoint, or a change to ``modeling/``, gives a new key, never a stale graph
  (:func:`deploy.predictor.export_in_child` writes it).
- OpenVINO's compiled models (its ``CACHE_DIR``), which it keys itself.
- The int8 models ``inference.py --int8`` quantizes, with their agreement with fp32
  (:mod:`deploy.int8`), keyed by the graph's key and the calibration images' contents.

They live in the cache folder the datasets use (``$DEEPLAB_CACHE_DIR``, else
``~/.cache/deeplab``), and only the most recently used few are kept. Neither runtime notices a
damaged file that still parses (4 MB of a compiled model overwritten gives other masks, not an
error), so every cached file has its SHA-256 written beside it (``<file>.sha256``) and is
checked before use: a file that no longer matches, or has no hash, is deleted and built again,
with one warning line for a damaged one.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Iterator

import torch

from deploy.onnx_model import OPSET
from utils.fileio import atomic_write_text

logger = logging.getLogger(__name__)

#: Exported graphs kept (a ResNet-101 graph is about 240 MB); the least recently used go first.
GRAPHS_KEPT = 4
#: OpenVINO compiled-model files kept.
COMPILED_KEPT = 8
#: The suffix of the file holding a cached file's SHA-256 (hex), beside it.
DIGEST_SUFFIX = ".sha256"


def modeling_folder() -> Path:
    """The folder of the ``modeling`` package: every file below it shapes the exported graph."""
    return Path(importlib.util.find_spec("modeling").submodule_search_locations[0])


def _exporter_version() -> bytes:
    """What besides the weights decides the exported graph: the model and export code (the
    whole ``modeling`` package, sub-packages included), the PyTorch version and the opset."""
    digest = hashlib.sha256(f"{torch.__version__}|opset {OPSET}".encode())
    sources = [Path(importlib.util.find_spec("deploy.onnx_model").origin)]
    sources += sorted(modeling_folder().rglob("*.py"))
    for source in sources:
        digest.update(source.read_bytes())
    return digest.digest()


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 4 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def record_digest(path: Path, digest: str | None = None) -> None:
    """Write ``path``'s SHA-256 (``digest``, or computed now) beside it, atomically."""
    atomic_write_text(digest_path(path), (digest or file_digest(path)) + "\n")


def _forget(path: Path) -> None:
    path.unlink(missing_ok=True)
    digest_path(path).unlink(missing_ok=True)


def verified(path: Path, what: str) -> bool:
    """Whether ``path`` exists and still has the content whose hash was written beside it.

    A file that does not is deleted (with its hash): one without a hash was never finished (a
    killed run) or comes from an older version; one whose content changed is damaged, and
    said so in one warning line naming ``what`` it is.
    """
    if not path.is_file():
        digest_path(path).unlink(missing_ok=True)
        return False
    try:
        recorded = digest_path(path).read_text().strip()
    except FileNotFoundError:
        recorded = None
    if recorded is not None and file_digest(path) == recorded:
        return True
    if recorded is not None:
        logger.warning("%s %s is damaged (its content no longer matches the hash written beside "
                       "it): building it again", what, path)
    _forget(path)
    return False


def graph_key(ckpt: str | os.PathLike) -> str:
    """A name for the graph exported from ``ckpt``: a hash of its bytes and of the exporter."""
    status = os.stat(ckpt)
    digest = hashlib.sha256(_exporter_version())
    digest.update(_checkpoint_digest(os.path.realpath(ckpt), status.st_ino, status.st_size,
                                     status.st_mtime_ns).encode())
    return digest.hexdigest()[:32]


@functools.lru_cache(maxsize=4)
def _checkpoint_digest(path: str, inode: int, size: int, mtime_ns: int) -> str:
    """:func:`file_digest` of a checkpoint, computed once per process while it has not changed
    (same inode, size and modification time): a run names its graph more than once."""
    return file_digest(path)


def graph_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "onnx" / f"{key}.onnx"


def cached_graph(cache_dir: Path, key: str) -> Path | None:
    """The cached graph of ``key`` if it is intact (:func:`verified`), marked as just used;
    None when there is none."""
    path = graph_path(cache_dir, key)
    if not verified(path, "the cached ONNX graph"):
        return None
    os.utime(path)
    return path


def prune_graphs(cache_dir: Path) -> None:
    """Drop the least recently used graphs beyond :data:`GRAPHS_KEPT`."""
    prune(Path(cache_dir) / "onnx", "*.onnx", GRAPHS_KEPT)


def compiled_models_dir(cache_dir: Path) -> Path:
    """OpenVINO's ``CACHE_DIR``, pruned to the :data:`COMPILED_KEPT` newest files."""
    folder = Path(cache_dir) / "openvino"
    prune(folder, "*.blob", COMPILED_KEPT)
    return folder


@contextlib.contextmanager
def checked_compiled_models(folder: Path, model_key: str) -> Iterator[bool]:
    """Around OpenVINO's ``compile_model`` with ``CACHE_DIR`` ``folder``: the compiled model
    it may read is checked first, the one it writes gets its hash after. Yields whether
    ``folder`` may be used (False: a damaged file could not be deleted, e.g. a read-only cache).

    OpenVINO names its files itself, so which one a model reads is learnt when it is written:
    ``<model_key>.uses`` names it. A model whose file is not known yet has every file in
    ``folder`` checked (:func:`verified`: a file without a hash is deleted, as is a damaged
    one, and compiled again).

    Args:
        model_key: what the compiled file depends on (the ONNX model, the precision, the
            threads; see :class:`deploy.engines.OpenVinoEngine`), as a file-name-safe string.
    """
    pointer = folder / f"{model_key}.uses"
    try:
        known = folder / pointer.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        known = None
    try:
        checked = ([known] if known is not None and digest_path(known).is_file()
                   else sorted(folder.glob("*.blob")))
        for blob in checked:
            verified(blob, "OpenVINO's compiled model")
    except OSError as error:
        logger.warning("not using OpenVINO's cache %s: %s", folder, error)
        yield False
        return
    before = {blob.name for blob in folder.glob("*.blob")}
    yield True
    written = [blob for blob in sorted(folder.glob("*.blob")) if blob.name not in before]
    try:
        for blob in written:
            record_digest(blob)
        if len(written) == 1:
            atomic_write_text(pointer, written[0].name + "\n")
        elif known is not None and known.is_file():
            os.utime(known)  # read again: the most recently used are kept
    except OSError as error:  # unhashed, the files are deleted before they are ever read
        logger.debug("cannot record the hashes of %s: %s", folder, error)


def model_identity(model: str | os.PathLike | bytes) -> str:
    """What names an ONNX model for :func:`checked_compiled_models`: the hash of serialised
    bytes; for a file, the hash written beside it (a cached graph, just checked) or else its
    path, size and modification time (hashing a user's 240 MB file on every start is not
    needed to find its compiled model)."""
    if isinstance(model, bytes):
        return hashlib.sha256(model).hexdigest()
    path = Path(model)
    if digest_path(path).is_file():
        return digest_path(path).read_text().strip()
    status = path.stat()
    return f"{path.resolve()}|{status.st_size}|{status.st_mtime_ns}"


def prune(folder: Path, pattern: str, keep: int) -> None:
    """Delete all but the ``keep`` most recently modified files matching ``pattern``, with the
    hashes beside them, and the hashes and pointers whose file is gone."""
    try:
        entries = sorted(folder.glob(pattern), key=lambda entry: entry.stat().st_mtime,
                         reverse=True)
        for entry in entries[keep:]:
            _forget(entry)
        for digest in folder.glob("*" + DIGEST_SUFFIX):
            if not digest.with_name(digest.name[:-len(DIGEST_SUFFIX)]).exists():
                digest.unlink(missing_ok=True)
        for pointer in folder.glob("*.uses"):
            if not (folder / pointer.read_text().strip()).exists():
                pointer.unlink(missing_ok=True)
    except OSError as error:  # another process pruned first, or a read-only cache
        logger.debug("cannot prune %s: %s", folder, error)
