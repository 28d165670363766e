"""The random states a checkpoint holds to resume exactly: Python's, NumPy's and torch's.

Checkpoint files themselves are written and read by :mod:`utils.checkpoint`; what a training
checkpoint holds and the run folder it is written into: :mod:`utils.run_folder`.
"""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


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
