"""Checkpoint files: written atomically, read safely, checked for the entries a caller needs.

Infrastructure, not training: the predictor, export.py and the tools read checkpoints through
this module without importing the training code (:mod:`utils.run_folder` writes a run's checkpoints
through it too).

Every file is written with :func:`utils.fileio.atomic_write`, so a crash or a full disk leaves
either the previous file or the new one, never half of one. Files are read with
``torch.load(..., weights_only=True)`` only, never with an unsafe fallback: a checkpoint must hold
plain types (tensors, numbers, strings, lists, tuples, dicts), never pickled Python objects.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from utils.errors import UserError
from utils.fileio import atomic_write

logger = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, corrupt, unsafe, not describing a model); the
    message is one line, and a script reports it as any :class:`UserError` (exit status 2)."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` ``state`` to ``path``.

    Args:
        state: plain types only (tensors, numbers, strings, lists, tuples, dicts), so that
            :func:`load_checkpoint` can read it back with ``weights_only=True``.
        path: target file; its folder is created if needed. An existing file is replaced only once
            the new one is completely on disk.
    """
    atomic_write(path, lambda handle: torch.save(state, handle))
    logger.debug("saved checkpoint %s", path)


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    required_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(..., weights_only=True)``; never unsafely.

    Args:
        path: a file written by :func:`save_checkpoint` (or any plain-types ``torch.save`` file).
        map_location: where tensors go, as in :func:`torch.load`.
        required_keys: entries the caller needs (e.g. ``("model", "settings")``); a file without
            them (a bare state dict, another project's checkpoint) is a CheckpointError.

    Raises:
        CheckpointError: the file is missing, is corrupt or truncated, or holds pickled Python
            objects that only unsafe loading could rebuild (refused: unpickling can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that need unsafe (weights_only=False) "
                "loading; refused. Re-save it with plain types (tensors, numbers, strings, "
                "lists, dicts)"
            ) from error
        raise CheckpointError(_unreadable(path, error)) from error
    except Exception as error:  # noqa: BLE001 - torch reports corruption with many types
        raise CheckpointError(_unreadable(path, error)) from error
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, expected a dict of named entries"
        )
    check_keys(state, required_keys, str(path))
    return state


def check_keys(state: dict[str, Any], required_keys: tuple[str, ...], source: str) -> None:
    """Raise a one-line :class:`CheckpointError` naming ``source`` when ``state`` lacks one of
    ``required_keys``."""
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {source} has no {', '.join(repr(k) for k in missing)} entry: it was not "
            "written by this project's train.py"
        )


def _unreadable(path: Path, error: BaseException) -> str:
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    return (
        f"cannot read checkpoint {path}: corrupt, truncated or not a PyTorch file "
        f"({type(error).__name__}: {reason})"
    )
