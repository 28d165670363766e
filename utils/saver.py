"""Crash-safe checkpoint files and the random states a checkpoint holds to resume exactly.

Every file is written with :func:`utils.fileio.atomic_write`, so a crash or a full disk leaves
either the previous file or the new one, never half of one.

Checkpoints are read with ``torch.load(..., weights_only=True)`` only: a checkpoint must hold
plain types (tensors, numbers, strings, lists, tuples, dicts), never pickled Python objects.

What a training checkpoint holds and the run folder it is written into: :mod:`utils.run_folder`.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.fileio import atomic_write

logger = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint that cannot be used (missing, corrupt, unsafe); the message is one line."""


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
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no {', '.join(repr(k) for k in missing)} entry: it was not "
            "written by this project's train.py"
        )
    return state


def _unreadable(path: Path, error: BaseException) -> str:
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    return (
        f"cannot read checkpoint {path}: corrupt, truncated or not a PyTorch file "
        f"({type(error).__name__}: {reason})"
    )


def get_rng_state() -> dict[str, Any]:
    """Capture Python's, NumPy's (global) and torch's CPU and CUDA random states.

    Returns:
        A dict of plain types and tensors, storable in a checkpoint loaded with
        ``weights_only=True``; give it back to :func:`set_rng_state`.
    """
    version, internal_state, gauss_next = random.getstate()
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal_state), gauss_next],
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random states captured by :func:`get_rng_state`.

    CUDA states are restored for as many devices as both the saved state and this machine have;
    a mismatch in the device count is logged as a warning.
    """
    version, internal_state, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(value) for value in internal_state), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            np.asarray(torch.as_tensor(numpy_state["keys"]).cpu().numpy(), dtype=np.uint32),
            int(numpy_state["position"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    )
    # set_rng_state needs a CPU ByteTensor, whatever map_location the checkpoint was loaded with.
    torch.set_rng_state(torch.as_tensor(state["torch"]).to("cpu", torch.uint8))
    cuda_states = list(state.get("cuda", []))
    device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != device_count:
        logger.warning(
            "checkpoint has CUDA random states for %d devices, this machine has %d; restoring %d",
            len(cuda_states), device_count, min(len(cuda_states), device_count),
        )
    for device, cuda_state in enumerate(cuda_states[:device_count]):
        torch.cuda.set_rng_state(torch.as_tensor(cuda_state).to("cpu", torch.uint8), device)
