"""The folder of a training run: which folder a command continues, the lock that keeps it one
run's, its settings.json, and the checkpoints written into it.

train.py calls two functions, one on each side of its builders: :func:`locate_run` before them
(``--auto-resume`` decides which checkpoint they read, and a folder that would be overwritten is
refused before anything is built), :func:`open_run` after them (the training progress restored,
a finished run reported, the folder locked and settings.json written).

Run layout::

    <run_root>/<dataset>/<checkname>/experiment_<k>/
        settings.json        the run's settings, sorted keys
        checkpoint.pth.tar   the latest state
        model_best.pth.tar   the state with the best validation score so far
        metrics.json         the scores of the latest evaluation
        <figure>.png         the figures of the latest evaluation (utils/figures.py)
        .lock                held by the live run (see :class:`utils.fileio.FolderLock`)

Names: a :class:`RunFolder` owns the folder (lock, settings.json, the checkpoint files), a
:class:`Checkpointer` turns the training objects into a checkpoint and has the folder write it,
:class:`TrainProgress` is how far the run got, :func:`checkpoint_contents` what a checkpoint holds,
and :func:`resume_training` loads a checkpoint's training state back.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
from torch import nn

from utils.distributed import DistributedContext, any_true
from utils.errors import UserError
from utils.figures import EVALUATION_FIGURES
from utils.fileio import FolderInUse, FolderLock, atomic_write, atomic_write_text, \
    remove_stale_temporaries_of
from utils.hardware import Placement
from utils.optim import Optimisation, load_optimizer_state
from utils.plan import TrainPlan
from utils.checkpoint import save_checkpoint
from utils.random_state import get_rng_state, set_rng_state
from utils.slurm import DEFAULT_REQUEUE_SIGNAL, parse_signal

if TYPE_CHECKING:  # TensorBoard is imported by the training run that writes it, not to read one
    from utils.summaries import TensorboardSummary

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"
SETTINGS_NAME = "settings.json"
METRICS_NAME = "metrics.json"
_EXPERIMENT = re.compile(r"experiment_(\d+)")


# --------------------------------------------------------------------------- the folder


class RunFolder:
    """The folder of one training run, locked for this process: settings.json and the latest
    and best checkpoints.

    Args:
        dataset: dataset name, the second level of the layout.
        checkname: name of the model configuration, the third level.
        run_root: top folder of all runs.
        experiment_dir: reuse this folder (resuming a run); by default a new
            ``run_root/dataset/checkname/experiment_<k>`` is created, ``k`` one more than the
            largest existing number (0 for the first run). Creation is race-free: two runs
            started together get different folders.

    Raises:
        UserError: another live process holds the folder.
    """

    def __init__(self, *, dataset: str, checkname: str, run_root: str | os.PathLike = "run",
                 experiment_dir: str | os.PathLike | None = None):
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
        names = (CHECKPOINT_NAME, BEST_NAME, SETTINGS_NAME, METRICS_NAME,
                 *(f"{figure}.png" for figure in EVALUATION_FIGURES))
        for stale in remove_stale_temporaries_of(self.experiment_dir / name for name in names):
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
        numbers = [int(match.group(1))
                   for match in (_EXPERIMENT.fullmatch(entry.name) for entry in parent.iterdir())
                   if match]
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

    @property
    def metrics_path(self) -> Path:
        """``experiment_dir/metrics.json``: the scores of the latest evaluation."""
        return self.experiment_dir / METRICS_NAME

    def write_settings(self, settings: dict[str, Any]) -> None:
        """Atomically write ``settings`` as indented JSON with sorted keys.

        Paths are written as strings; any other value JSON cannot hold raises ``TypeError``.
        A settings.json that says otherwise (a run resumed with other flags) is kept as
        ``settings.json.<k>``, ``k`` = 1, 2, ... in the order of the run's segments.
        """
        text = json.dumps(settings, sort_keys=True, indent=2, default=_json_path) + "\n"
        if self.settings_path.is_file() and self.settings_path.read_text() != text:
            number = 1
            while self.settings_path.with_name(f"{SETTINGS_NAME}.{number}").exists():
                number += 1
            os.link(self.settings_path, self.settings_path.with_name(f"{SETTINGS_NAME}.{number}"))
        atomic_write_text(self.settings_path, text)

    def write_checkpoint(self, contents: dict[str, Any], is_best: bool) -> None:
        """Atomically write ``contents`` as the latest checkpoint and, if ``is_best``, as the
        best.

        The best checkpoint is written first and the latest is a byte copy of it (not a second
        serialisation), made atomically too. In this order a kill or a full disk between the two
        writes leaves the previous latest checkpoint, whose ``best_pred`` is the older score: the
        resumed run evaluates again and rewrites the best. In the other order the latest would
        carry the new score and the best file would stay at the old one for good.
        """
        if not is_best:
            with _disk_full_is_one_line(self.checkpoint_path):
                save_checkpoint(contents, self.checkpoint_path)
            return
        with _disk_full_is_one_line(self.best_path):
            save_checkpoint(contents, self.best_path)
        with open(self.best_path, "rb") as source, _disk_full_is_one_line(self.checkpoint_path):
            atomic_write(self.checkpoint_path, lambda handle: shutil.copyfileobj(source, handle))
        logger.info("new best checkpoint: %s", self.best_path)


#: What torch.save says when the disk fills under its zip writer (not an OSError).
_TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed writing")


@contextlib.contextmanager
def _disk_full_is_one_line(path: Path) -> Iterator[None]:
    """A full disk (or quota) while writing ``path`` becomes a UserError that says so; the
    atomic write left the previous file in place."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
            isinstance(error, RuntimeError) and any(text in str(error)
                                                    for text in _TORCH_WRITE_FAILED))
        if not full:
            raise
        raise UserError(f"no space left on device writing {path}: the last checkpoint is kept; "
                        f"free space and --resume") from None


def _json_path(value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"setting of type {type(value).__name__} is not JSON serialisable: {value!r}")


# --------------------------------------------------------------------------- the checkpoints


@dataclass
class TrainProgress:
    """How far a run got, saved in every checkpoint."""

    epoch: int = 0  # epoch in progress
    iteration: int = 0  # optimiser steps completed since the start of training
    best_pred: float = 0.0  # best val mIoU so far
    eval_pending: bool = False  # the epoch has trained; its evaluation was interrupted


def checkpoint_contents(*, model: nn.Module, optimisation: Optimisation, progress: TrainProgress,
                        plan: TrainPlan, settings: dict) -> dict[str, Any]:
    """Everything a checkpoint holds to continue exactly: weights, optimiser, schedule, scaler,
    progress, RNG states and the model settings. Plain types only (``weights_only`` loading)."""
    scaler = optimisation.scaler
    return {
        "model": model.state_dict(),
        "optimizer": optimisation.optimizer.state_dict(),
        "scheduler": optimisation.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": progress.epoch,
        "iteration": progress.iteration,
        "iters_per_epoch": plan.iters_per_epoch,
        "best_pred": progress.best_pred,
        "eval_pending": progress.eval_pending,
        "rng": get_rng_state(),
        "settings": settings,
    }


def resume_training(checkpoint: dict[str, Any], *, optimisation: Optimisation,
                    plan: TrainPlan, seed: int, rank: int = 0) -> TrainProgress:
    """Load what :func:`checkpoint_contents` saved into ``optimisation`` and the RNGs (the
    model's weights were loaded when it was built); returns the progress to continue from.

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
    return TrainProgress(epoch=checkpoint["epoch"] if pending else
                         plan.epoch_of(checkpoint["iteration"]),
                         iteration=checkpoint["iteration"], best_pred=checkpoint["best_pred"],
                         eval_pending=pending)


@dataclass
class Checkpointer:
    """Writes the training state as checkpoints: on rank 0 into its run folder (``folder``),
    with the TensorBoard writer (``summary``) flushed first; on other ranks both are None and
    saving is a no-op."""

    model: nn.Module  # the plain (unwrapped) model
    optimisation: Optimisation
    plan: TrainPlan
    settings: dict  # the model's and the dataset's, stored in every checkpoint
    folder: RunFolder | None = None
    summary: TensorboardSummary | None = None

    def save(self, progress: TrainProgress, is_best: bool = False) -> None:
        if self.folder is None:
            return
        # Events up to the checkpoint are on disk; a resumed run purges the ones after it.
        if self.summary is not None:
            self.summary.flush()
        self.folder.write_checkpoint(
            checkpoint_contents(model=self.model, optimisation=self.optimisation,
                                progress=progress, plan=self.plan, settings=self.settings),
            is_best=is_best)

    def save_evaluated(self, progress: TrainProgress, mean_iou: float | None) -> None:
        """Record an epoch's evaluation in ``progress`` (its best score, nothing owed) and save
        it; as model_best too when ``mean_iou`` beats every earlier one."""
        is_best = mean_iou is not None and mean_iou > progress.best_pred
        progress.best_pred = mean_iou if is_best else progress.best_pred
        progress.eval_pending = False
        self.save(progress, is_best=is_best)

    def close(self) -> None:
        if self.summary is not None:
            self.summary.close()
        if self.folder is not None:
            self.folder.close()


# --------------------------------------------------------------------------- which folder


def add_run_folder_args(parser: argparse.ArgumentParser) -> None:
    """train.py's flags for :class:`RunFolderOptions` and the run's pace: where its files go, what
    it continues, how often it saves and reports, and the signal that requeues it."""
    run = parser.add_argument_group("run")
    run.add_argument("--resume", metavar="CKPT", help="continue training from a checkpoint")
    run.add_argument("--auto-resume", action="store_true", help="continue from the checkpoint of "
                     "--run-dir (or the newest experiment) if any, else start there")
    run.add_argument("--ft", action="store_true",
                     help="with --resume: fine-tune from its weights only (new optimiser, epoch 0)")
    run.add_argument("--checkname", help="run name (default deeplab-<backbone>)")
    run.add_argument("--run-root", default="run", help="folder holding all runs")
    run.add_argument("--run-dir", help="exact experiment folder (default: next experiment_<k>)")
    run.add_argument("--save-interval", type=int, default=0,
                     help="also save the latest checkpoint every N iterations (0: per epoch)")
    run.add_argument("--print-freq", type=int, default=20,
                     help="iterations between progress updates, TensorBoard writes and NaN "
                          "checks (every iteration's loss is logged)")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--requeue-signal", type=parse_signal, metavar="SIGNAL",
                     default=DEFAULT_REQUEUE_SIGNAL.name, help="save at the next step, requeue "
                     "the SLURM job (scontrol requeue) and exit on this signal (sbatch "
                     "--signal=USR1@120); SIGTERM saves and exits without requeueing")


@dataclass(frozen=True)
class RunFolderOptions:
    """Where a run's files go and what it continues, as the flags say.

    Attributes:
        dataset, run_root, run_dir: ``--dataset``, ``--run-root``, ``--run-dir``.
        checkname: ``--checkname`` or its default, ``deeplab-<backbone>``.
        resume, auto_resume, ft, eval_only, seed: the flags of the same names.
        flags: every flag of the command, by its argparse name: settings.json records them.
    """

    dataset: str
    run_root: str
    run_dir: str | None
    checkname: str
    resume: str | None
    auto_resume: bool
    ft: bool
    eval_only: bool
    seed: int
    flags: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], *, backbone: str) -> "RunFolderOptions":
        """The options train.py's flags (``vars(args)``) give; ``backbone``, the canonical name,
        names the run when ``--checkname`` does not.

        Raises:
            UserError: ``--ft`` or ``--eval-only`` without ``--resume``, or both; a file where
                ``--run-dir`` or ``--run-root`` needs a folder.
        """
        if flags["ft"] and not flags["resume"]:
            raise UserError("--ft needs --resume CKPT: the checkpoint to fine-tune from")
        if flags["eval_only"] and not flags["resume"]:
            raise UserError("--eval-only needs --resume CKPT: the checkpoint to evaluate")
        if flags["eval_only"] and flags["ft"]:
            raise UserError("--eval-only --ft would score a freshly initialised classifier: drop "
                            "--ft to evaluate the checkpoint (same classes), or train with --ft "
                            "first")
        for flag, folder in (("--run-dir", flags["run_dir"]), ("--run-root", flags["run_root"])):
            if folder:
                check_folder_path(flag, folder)
        return cls(dataset=flags["dataset"], run_root=flags["run_root"], run_dir=flags["run_dir"],
                   checkname=flags["checkname"] or f"deeplab-{backbone}", resume=flags["resume"],
                   auto_resume=flags["auto_resume"], ft=flags["ft"],
                   eval_only=flags["eval_only"], seed=flags["seed"], flags=dict(flags))

    @property
    def continued_folder(self) -> str | None:
        """The folder this run writes into when it is not a new ``experiment_<k>``: --run-dir,
        or the folder of the checkpoint it continues (not one it fine-tunes from)."""
        if self.run_dir:
            return self.run_dir
        return os.path.dirname(os.path.abspath(self.resume)) if self.resume and not self.ft \
            else None


def check_folder_path(flag: str, folder: str) -> None:
    """A folder that exists or can be created: no file or dangling link where a folder on its path
    should be, and the nearest existing one writable."""
    path = Path(folder).absolute()
    dangling = next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        raise UserError(f"{flag} {folder}: {dangling} is a link to {os.readlink(dangling)}, "
                        f"which does not exist: create it or pick another {flag}")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder: pick another "
                        f"{flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: {existing} is not writable (read-only folder or file "
                        f"system): pick another {flag}")


def locate_run(options: RunFolderOptions) -> RunFolderOptions:
    """Before anything is built: ``--auto-resume`` resolved (:func:`auto_resume`) and a folder
    whose run this command would overwrite refused (:func:`check_run_folder`)."""
    options = auto_resume(options)
    if options.continued_folder and not options.eval_only:  # written into: checked before
        check_folder_path("--run-dir" if options.run_dir else "--resume", options.continued_folder)
    check_run_folder(options)
    return options


def auto_resume(options: RunFolderOptions) -> RunFolderOptions:
    """``--auto-resume``: the options with ``resume`` set to the run folder's checkpoint (no
    ``ft``: that was the first start's), or ``run_dir`` set to the folder to start in.

    With an explicit ``--resume X`` (the first start of a requeued job), ``--run-dir`` is
    required: a folder without a checkpoint starts from X (fine-tuned with ``--ft``), one with a
    checkpoint continues it, with a warning naming X.

    Raises:
        UserError: ``--resume`` without ``--run-dir``.
    """
    if not options.auto_resume:
        return options
    if options.resume and not options.run_dir:
        # The newest experiment may be any earlier run: its checkpoint would silently replace X.
        raise UserError(f"--auto-resume with --resume {options.resume} needs --run-dir: the "
                        f"folder the requeued command continues (its checkpoint once there is "
                        f"one, else --resume)")
    folder = options.run_dir or RunFolder.latest_experiment_dir(
        os.path.join(options.run_root, options.dataset, options.checkname))
    if folder is not None and os.path.isfile(os.path.join(folder, CHECKPOINT_NAME)):
        if options.resume:
            logger.warning("--auto-resume: continuing %s's checkpoint; --resume %s%s was the "
                           "first start's", folder, options.resume, " --ft" if options.ft else "")
        return replace(options, resume=os.path.join(folder, CHECKPOINT_NAME), ft=False,
                       run_dir=str(folder))
    return replace(options, run_dir=folder and str(folder))


def check_run_folder(options: RunFolderOptions) -> None:
    """Refuse to write into a folder whose latest checkpoint is not the one this run continues:
    a new run (or ``--ft``) would replace another run's ``model_best`` and repeat its TensorBoard
    steps, and ``--resume .../model_best.pth.tar`` would replace the newer checkpoint.pth.tar
    beside it (and hide the later TensorBoard events)."""
    resumed = bool(options.resume) and not options.ft
    folder = options.continued_folder
    if options.eval_only or folder is None:
        return
    latest = Path(folder) / CHECKPOINT_NAME
    if not latest.is_file() or (resumed and (not os.path.isfile(options.resume) or
                                             latest.samefile(options.resume))):
        return  # a new folder, or the run's own checkpoint (a missing --resume: reported later)
    if resumed:
        raise UserError(f"--resume {options.resume} would continue in {folder} and replace the "
                        f"{CHECKPOINT_NAME} there: resume {latest} to continue that run, or add "
                        f"--run-dir NEW_FOLDER to continue from {os.path.basename(options.resume)} "
                        f"in a folder of its own")
    raise UserError(f"--run-dir {folder} already holds a run ({CHECKPOINT_NAME}): continue it "
                    f"with --resume {latest} (or --auto-resume), or pick a new --run-dir")


#: Settings a requeued ``--auto-resume`` command may change: where things are, how fast and how
#: often it reports, and the run's length. Any other difference is another experiment.
REQUEUE_MAY_CHANGE = frozenset({
    "resume", "auto_resume", "ft", "run_dir", "run_root", "checkname", "epochs", "total_iters",
    "data_root", "cache_dir", "workers", "print_freq", "save_interval", "dist_timeout",
    "eval_json", "eval_only", "check_data", "no_cuda", "gpu_ids", "amp", "amp_dtype", "device",
    "compile", "channels_last", "model"})


def check_requeued_settings(options: RunFolderOptions, record: dict) -> None:
    """``--auto-resume`` continues only the run whose folder it found: the settings.json there
    must agree with ``record`` (this command's, :func:`settings_record`) but for
    :data:`REQUEUE_MAY_CHANGE` (an explicit ``--resume`` applies changed flags instead, with a
    warning)."""
    if not (options.auto_resume and options.resume):
        return
    folder = os.path.dirname(os.path.abspath(options.resume))
    try:
        previous = json.loads(Path(folder, SETTINGS_NAME).read_text())
    except (OSError, ValueError):
        return  # nothing to compare with (a folder from before settings.json)
    current = json.loads(json.dumps(record, default=os.fspath))
    differing = [f"{'--' + key.replace('_', '-') if key in options.flags else key} "
                 f"{json.dumps(previous[key])} -> {json.dumps(current[key])}"
                 for key in sorted(current) if key not in REQUEUE_MAY_CHANGE and key in previous
                 and previous[key] != current[key]]
    if differing:
        raise UserError(f"--auto-resume found {folder}, a run with other settings "
                        f"({', '.join(differing)}): repeat its flags to continue it, or give "
                        f"another --run-dir or --checkname to start a new run")


#: Settings an explicit ``--resume`` changes without a word here: those of
#: :data:`REQUEUE_MAY_CHANGE` but the run's length, and SGD's, which
#: :func:`utils.optim.load_optimizer_state` warns about.
RESUME_WARNS_ELSEWHERE = (REQUEUE_MAY_CHANGE - {"epochs", "total_iters"}) | {
    "lr", "momentum", "weight_decay", "nesterov", "iters_per_epoch"}


def warn_changed_settings(options: RunFolderOptions, record: dict) -> list[str]:
    """A resumed run whose flags differ from the settings.json beside its checkpoint: one
    warning naming each change (``--crop-size 513 -> 321``); returns the changes. A changed
    ``--seed`` changes the data order and augmentation from the checkpoint's iteration on."""
    folder = os.path.dirname(os.path.abspath(options.resume))
    try:
        previous = json.loads(Path(folder, SETTINGS_NAME).read_text())
    except (OSError, ValueError):
        return []
    current = json.loads(json.dumps(record, default=os.fspath))
    changed = [f"{'--' + key.replace('_', '-') if key in options.flags else key} "
               f"{json.dumps(previous[key])} -> {json.dumps(current[key])}"
               for key in sorted(current) if key not in RESUME_WARNS_ELSEWHERE
               and key in previous and previous[key] != current[key]]
    if changed:
        seed_note = ("; the data order and augmentation from the checkpoint's iteration on "
                     "differ from the earlier run's" if previous.get("seed") != current["seed"]
                     else "")
        logger.warning("resumed with changed settings (%s): they apply from the checkpoint's "
                       "iteration%s; the earlier settings.json is kept as settings.json.<k>",
                       ", ".join(changed), seed_note)
    return changed


# --------------------------------------------------------------------------- opening the run


def settings_record(options: RunFolderOptions, *, plan: TrainPlan, placement: Placement,
                    sync_bn: bool, settings: dict) -> dict:
    """What settings.json records: the flags, with the values that run where they were resolved
    (batch, learning rate, epochs, SyncBatchNorm) and the model's settings."""
    return dict(options.flags, batch_size=plan.batch_size, lr=plan.lr, epochs=plan.epochs,
                iters_per_epoch=plan.iters_per_epoch, total_iters=plan.total_iters,
                world_size=placement.context.world_size, sync_bn=sync_bn,
                amp_dtype=str(placement.hardware.amp_dtype),
                device=str(placement.hardware.device), model=settings)


@dataclass
class OpenedRun:
    """What :func:`open_run` found: the progress to continue from and the checkpointer to save
    it with; a run with nothing left to do has only ``finished``, the summary ``main`` returns."""

    progress: TrainProgress
    checkpointer: Checkpointer | None = None
    finished: dict | None = None

    def done(self, *, metrics: dict | None, lr: float, context: DistributedContext) -> dict:
        """The end of training: rank 0 says where the checkpoints are; the summary ``main``
        returns (``metrics``: the last evaluation's, ``lr``: the next step's rate)."""
        folder = self.checkpointer.folder and self.checkpointer.folder.experiment_dir
        if context.is_main:
            print(f"done: best mIoU {100 * self.progress.best_pred:.2f}; checkpoints in {folder}")
        return {"iteration": self.progress.iteration, "best_pred": self.progress.best_pred,
                "metrics": metrics, "experiment_dir": folder, "lr": lr}


def open_run(options: RunFolderOptions, checkpointer: Checkpointer, *,
             checkpoint: dict | None, placement: Placement, sync_bn: bool) -> OpenedRun:
    """Continue ``checkpoint``'s training (unless ``options.ft``) or start one, in the run folder.

    The progress comes back from ``checkpoint`` into ``checkpointer.optimisation`` and the RNGs;
    a requeued ``--auto-resume`` must have kept its settings; a run that has nothing left to do
    says so and writes nothing. Otherwise rank 0 locks the run folder, writes settings.json,
    opens the TensorBoard writer into ``checkpointer`` and prints what the run will do.

    Raises:
        UserError: the settings differ from those of the run ``--auto-resume`` found, the
            checkpoint cannot continue with this set-up, or the folder is another live run's.
    """
    plan, context = checkpointer.plan, placement.context
    record = settings_record(options, plan=plan, placement=placement, sync_bn=sync_bn,
                             settings=checkpointer.settings)
    check_requeued_settings(options, record)
    resumed = checkpoint is not None and not options.ft
    if resumed and context.is_main:
        warn_changed_settings(options, record)
    progress = resume_training(checkpoint, optimisation=checkpointer.optimisation, plan=plan,
                               seed=options.seed, rank=context.rank) if resumed \
        else TrainProgress()
    if resumed and progress.iteration >= plan.total_iters and not progress.eval_pending:
        return OpenedRun(progress, finished=report_finished(options, progress, plan, context))
    _open_folder(options, checkpointer, progress=progress, record=record, placement=placement)
    return OpenedRun(progress, checkpointer)


def report_finished(options: RunFolderOptions, progress: TrainProgress, plan: TrainPlan,
                    context: DistributedContext) -> dict:
    """A resumed run with nothing left to do says so and writes nothing."""
    folder = os.path.dirname(os.path.abspath(options.resume))
    if context.is_main:
        print(f"{folder}: finished at iteration {progress.iteration} of {plan.total_iters}, best "
              f"mIoU {100 * progress.best_pred:.2f}; nothing to do (a larger --epochs trains on)")
    return {"iteration": progress.iteration, "best_pred": progress.best_pred, "metrics": None,
            "experiment_dir": folder, "lr": None, "finished": True}


def _open_folder(options: RunFolderOptions, checkpointer: Checkpointer, *,
                 progress: TrainProgress, record: dict, placement: Placement) -> None:
    """Rank 0 takes the run folder and the TensorBoard writer into ``checkpointer``; every rank
    fails together when it cannot."""
    from utils.summaries import TensorboardSummary  # TensorBoard: only a training run needs it

    hardware, context = placement.hardware, placement.context
    refused = None
    if context.is_main:
        try:
            checkpointer.folder = RunFolder(run_root=options.run_root, dataset=options.dataset,
                                            checkname=options.checkname,
                                            experiment_dir=options.continued_folder)
        except UserError as error:  # the folder is another live run's
            refused = error
    # The other ranks stop with rank 0 instead of waiting for it in the first step.
    if any_true(refused is not None, context, hardware.device):
        raise refused or UserError("rank 0 could not open the run folder (its error says why)")
    if not context.is_main:
        return
    folder, plan = checkpointer.folder, checkpointer.plan
    try:
        folder.write_settings(record)
        # Events past the checkpoint (a killed run's, or those of a run killed before its first
        # checkpoint) are dropped by readers (purge_step), so each step appears once; events up
        # to the checkpoint were flushed before it was saved.
        checkpointer.summary = TensorboardSummary(folder.experiment_dir,
                                                  purge_step=progress.iteration + 1)
    except BaseException:
        folder.close()
        raise
    print(f"run folder: {folder.experiment_dir}\n{plan.iters_per_epoch * plan.total_batch} train "
          f"images per epoch, {checkpointer.settings['num_classes']} classes; {plan}; "
          f"{record['lr_scheduler']}; device {hardware.device} x{hardware.devices_per_process}, "
          f"{context.world_size} process(es), amp {hardware.amp_dtype}")
