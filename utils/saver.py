"""The run folder layout, and what a checkpoint holds to resume exactly (weights, optimiser,
schedule, progress, RNG states).

Every file is written with :func:`utils.fileio.atomic_write`, so a crash or a full disk leaves
either the previous file or the new one, never half of one. Checkpoint files are written and read
by :mod:`utils.checkpoint` (safe ``weights_only`` loading), which needs none of this module.

Run layout::

    <run_root>/<dataset>/<checkname>/experiment_<k>/
        settings.json        the run's settings, sorted keys
        checkpoint.pth.tar   the latest state
        model_best.pth.tar   the state with the best validation score so far
        .lock                held by the live run (see :class:`utils.fileio.FolderLock`)
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from utils.checkpoint import save_checkpoint
from utils.errors import UserError
from utils.fileio import (FolderInUse, FolderLock, atomic_write, atomic_write_text,
                          remove_stale_temporaries)
from utils.optim import Optimisation, load_optimizer_state
from utils.plan import TrainPlan

if TYPE_CHECKING:  # TensorBoard is imported by the training run that writes it, not to read one
    from utils.summaries import TensorboardSummary

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"
SETTINGS_NAME = "settings.json"
METRICS_NAME = "metrics.json"
_EXPERIMENT = re.compile(r"experiment_(\d+)")


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


class Saver:
    """The folder of one training run: settings, latest and best checkpoints.

    Args:
        dataset: dataset name, the second level of the layout.
        checkname: name of the model configuration, the third level.
        run_root: top folder of all runs.
        experiment_dir: reuse this folder (resuming a run); by default a new
            ``run_root/dataset/checkname/experiment_<k>`` is created, ``k`` one more than the
            largest existing number (0 for the first run). Creation is race-free: two runs
            started together get different folders.
    """

    def __init__(
        self,
        *,
        dataset: str,
        checkname: str,
        run_root: str | os.PathLike = "run",
        experiment_dir: str | os.PathLike | None = None,
    ):
        if experiment_dir is not None:
            self.experiment_dir = Path(experiment_dir)
            self.experiment_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.experiment_dir = self._new_experiment_dir(Path(run_root) / dataset / checkname)
        # One live run per folder: a second one would delete the first one's temporaries below
        # and interleave checkpoints and TensorBoard steps with it.
        try:
            self._lock = FolderLock(self.experiment_dir)
        except FolderInUse as error:
            raise UserError(f"run folder {error}: wait for that run to end, or pick another "
                            f"--run-dir") from None
        # A run killed while writing (resumed or requeued into this folder) left these.
        for name in (CHECKPOINT_NAME, BEST_NAME, SETTINGS_NAME, METRICS_NAME):
            for stale in remove_stale_temporaries(self.experiment_dir / name):
                logger.info("removed %s, left by a killed write", stale)
        logger.info("run folder: %s", self.experiment_dir)

    def close(self) -> None:
        """Release the folder for another run (the end of the process does too)."""
        self._lock.release()

    @staticmethod
    def latest_experiment_dir(parent: str | os.PathLike) -> Path | None:
        """The ``experiment_<k>`` folder with the largest ``k`` under ``parent``, or None."""
        parent = Path(parent)
        numbered = [(int(match.group(1)), entry) for entry in
                    (parent.iterdir() if parent.is_dir() else [])
                    if (match := _EXPERIMENT.fullmatch(entry.name)) and entry.is_dir()]
        return max(numbered)[1] if numbered else None

    @staticmethod
    def _new_experiment_dir(parent: Path) -> Path:
        parent.mkdir(parents=True, exist_ok=True)
        numbers = [
            int(match.group(1))
            for match in (_EXPERIMENT.fullmatch(entry.name) for entry in parent.iterdir())
            if match
        ]
        number = max(numbers, default=-1) + 1
        while True:
            candidate = parent / f"experiment_{number}"
            try:
                candidate.mkdir()  # atomic: exactly one concurrent caller creates it
                return candidate
            except FileExistsError:
                number += 1

    @property
    def checkpoint_path(self) -> Path:
        """``experiment_dir/checkpoint.pth.tar``: the latest state."""
        return self.experiment_dir / CHECKPOINT_NAME

    @property
    def best_path(self) -> Path:
        """``experiment_dir/model_best.pth.tar``: the best state so far."""
        return self.experiment_dir / BEST_NAME

    @property
    def settings_path(self) -> Path:
        """``experiment_dir/settings.json``."""
        return self.experiment_dir / SETTINGS_NAME

    def save_settings(self, settings: dict[str, Any]) -> None:
        """Atomically write ``settings`` as indented JSON with sorted keys.

        Paths are written as strings; any other value JSON cannot hold raises ``TypeError``.
        """
        text = json.dumps(settings, sort_keys=True, indent=2, default=_json_path) + "\n"
        atomic_write_text(self.settings_path, text)

    def save(self, state: dict[str, Any], is_best: bool) -> None:
        """Atomically write ``state`` as the latest checkpoint and, if ``is_best``, as the best.

        The best checkpoint is written first and the latest is a byte copy of it (not a second
        serialisation), made atomically too. In this order a kill or a full disk between the two
        writes leaves the previous latest checkpoint, whose ``best_pred`` is the older score: the
        resumed run evaluates again and rewrites the best. In the other order the latest would
        carry the new score and the best file would stay at the old one for good.
        """
        if not is_best:
            save_checkpoint(state, self.checkpoint_path)
            return
        save_checkpoint(state, self.best_path)
        with open(self.best_path, "rb") as source:
            atomic_write(self.checkpoint_path, lambda handle: shutil.copyfileobj(source, handle))
        logger.info("new best checkpoint: %s", self.best_path)


def _json_path(value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"setting of type {type(value).__name__} is not JSON serialisable: {value!r}")


@dataclass
class TrainState:
    """Progress of a run, saved in every checkpoint."""

    epoch: int = 0  # epoch in progress
    iteration: int = 0  # optimiser steps completed since the start of training
    best_pred: float = 0.0  # best val mIoU so far
    eval_pending: bool = False  # the epoch has trained; its evaluation was interrupted


def training_state(*, model: nn.Module, optimisation: Optimisation, state: TrainState,
                   plan: TrainPlan, settings: dict) -> dict[str, Any]:
    """Everything a checkpoint holds to continue exactly: weights, optimiser, schedule, scaler,
    progress, RNG states and the model settings. Plain types only (``weights_only`` loading)."""
    scaler = optimisation.scaler
    return {
        "model": model.state_dict(),
        "optimizer": optimisation.optimizer.state_dict(),
        "scheduler": optimisation.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": state.epoch,
        "iteration": state.iteration,
        "iters_per_epoch": plan.iters_per_epoch,
        "best_pred": state.best_pred,
        "eval_pending": state.eval_pending,
        "rng": get_rng_state(),
        "settings": settings,
    }


def restore_training_state(checkpoint: dict[str, Any], *, optimisation: Optimisation,
                           plan: TrainPlan, seed: int, rank: int = 0) -> TrainState:
    """Load what :func:`training_state` saved into ``optimisation`` and the RNGs (the model's
    weights were loaded when it was built); returns the progress to continue from.

    Only rank 0's RNG states are saved: the resume is exact for one process, and other ranks
    re-seed their dropout from ``seed``, their rank and the iteration.

    Raises:
        UserError: the checkpoint holds no training state, or ran another number of iterations
            per epoch.
    """
    if "optimizer" not in checkpoint or "iters_per_epoch" not in checkpoint:
        raise UserError("--resume checkpoint holds weights without a training state (converted "
                        "or exported): fine-tune from it with --ft, or evaluate it with "
                        "--eval-only")
    if checkpoint.get("iters_per_epoch") != plan.iters_per_epoch:
        raise UserError(f"--resume checkpoint ran {checkpoint.get('iters_per_epoch')} "
                        f"iterations per epoch, this set-up {plan.iters_per_epoch}: keep "
                        f"--batch-size, the number of processes and the dataset")
    # The flags of this run win over the checkpoint's, each with a warning: SGD's settings here,
    # the schedule and base learning rates in the scheduler.
    load_optimizer_state(optimisation.optimizer, checkpoint["optimizer"],
                         iteration=checkpoint["iteration"])
    optimisation.scheduler.load_state_dict(checkpoint["scheduler"])
    if optimisation.scaler is not None and checkpoint.get("scaler"):
        optimisation.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    if rank:
        torch.manual_seed(seed + rank + checkpoint["iteration"])
    pending = bool(checkpoint.get("eval_pending", False))
    return TrainState(epoch=checkpoint["epoch"] if pending else
                      plan.epoch_of(checkpoint["iteration"]),
                      iteration=checkpoint["iteration"], best_pred=checkpoint["best_pred"],
                      eval_pending=pending)


@dataclass
class Checkpointer:
    """Rank 0's run folder (``saver``) and TensorBoard writer (``summary``); on other ranks both
    are None and saving is a no-op."""

    saver: Saver | None
    summary: TensorboardSummary | None
    model: nn.Module  # the plain (unwrapped) model
    optimisation: Optimisation
    plan: TrainPlan
    settings: dict

    def save(self, state: TrainState, is_best: bool = False) -> None:
        if self.saver is None:
            return
        # Events up to the checkpoint are on disk; a resumed run purges the ones after it.
        if self.summary is not None:
            self.summary.flush()
        self.saver.save(training_state(model=self.model, optimisation=self.optimisation,
                                       state=state, plan=self.plan, settings=self.settings),
                        is_best=is_best)

    def close(self) -> None:
        if self.summary is not None:
            self.summary.close()
        if self.saver is not None:
            self.saver.close()
