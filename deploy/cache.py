"""What inference keeps between runs so that the next one starts sooner.

- The ONNX graph a ``.pth.tar`` checkpoint is exported to for the ONNX runtimes, keyed by the
  checkpoint's content and by the code and PyTorch version that export it: a retrained or
  edited checkpoint, or a change to ``modeling/``, gives a new key, never a stale graph
  (:func:`deploy.predictor.export_in_child` writes it).
- OpenVINO's compiled models (its ``CACHE_DIR``), which it keys itself.

Both live in the cache folder the datasets use (``$DEEPLAB_CACHE_DIR``, else
``~/.cache/deeplab``), and only the most recently used few are kept.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from deploy.onnx_model import OPSET

logger = logging.getLogger(__name__)

#: Exported graphs kept (a ResNet-101 graph is about 240 MB); the least recently used go first.
GRAPHS_KEPT = 4
#: OpenVINO compiled-model files kept.
COMPILED_KEPT = 8


def _exporter_version() -> bytes:
    """What besides the weights decides the exported graph: the model and export code, the
    PyTorch version and the opset."""
    digest = hashlib.sha256(f"{torch.__version__}|opset {OPSET}".encode())
    sources = [Path(importlib.util.find_spec("deploy.onnx_model").origin)]
    modeling = importlib.util.find_spec("modeling").submodule_search_locations[0]
    sources += sorted(Path(modeling).rglob("*.py"))
    for source in sources:
        digest.update(source.read_bytes())
    return digest.digest()


def graph_key(ckpt: str | os.PathLike) -> str:
    """A name for the graph exported from ``ckpt``: a hash of its bytes and of the exporter."""
    digest = hashlib.sha256(_exporter_version())
    with open(ckpt, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def graph_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "onnx" / f"{key}.onnx"


def cached_graph(cache_dir: Path, key: str) -> Path | None:
    """The cached graph of ``key``, marked as just used; None when there is none."""
    path = graph_path(cache_dir, key)
    if not path.is_file():
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


def prune(folder: Path, pattern: str, keep: int) -> None:
    """Delete all but the ``keep`` most recently modified files matching ``pattern``."""
    try:
        entries = sorted(folder.glob(pattern), key=lambda entry: entry.stat().st_mtime,
                         reverse=True)
        for entry in entries[keep:]:
            entry.unlink(missing_ok=True)
    except OSError as error:  # another process pruned first, or a read-only cache
        logger.debug("cannot prune %s: %s", folder, error)
