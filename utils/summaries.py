"""TensorBoard logging for training and validation.

Stable tag names (dashboards and comparisons across runs rely on them):

- ``train/loss``: training loss of every iteration (written by the training loop via
  ``add_scalar``)
- ``train/lr``: learning rate of the first parameter group, every iteration (training loop)
- ``train/images_per_second``: training throughput (training loop)
- ``val/mIoU``, ``val/pixel_accuracy``, ``val/mean_class_accuracy``, ``val/fwIoU``: validation
  scores in ``[0, 1]`` (:meth:`TensorboardSummary.log_metrics`)
- ``val_iou/<class name>``: validation IoU per class in ``[0, 1]``; classes whose IoU is undefined
  are not written (:meth:`TensorboardSummary.log_metrics`)
- ``val/input_gt_prediction``: image grid, one row per sample: input, ground truth, prediction
  (:meth:`TensorboardSummary.visualize`)
- ``val/confusion_matrix``, ``val/per_class_iou``, ``val/worst_images``: the evaluation figures
  of :mod:`utils.figures` (:meth:`TensorboardSummary.add_figures`)

Steps are whatever the caller counts (iterations for ``train/*``, epochs or iterations for
``val*``); pass ``purge_step`` when resuming so events logged after the checkpoint by the
interrupted run are hidden instead of duplicated.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from utils.losses import NonFiniteLoss

from utils.figures import EVALUATION_FIGURES
from utils.labels import colorize, shown_channels

logger = logging.getLogger(__name__)

#: Summary scores of :meth:`utils.metrics.Evaluator.results` and the tags they are written under.
METRIC_TAGS = {
    "mean_iou": "val/mIoU",
    "pixel_accuracy": "val/pixel_accuracy",
    "mean_class_accuracy": "val/mean_class_accuracy",
    "fw_iou": "val/fwIoU",
}
IMAGE_TAG = "val/input_gt_prediction"
#: Tag of each evaluation figure (:data:`utils.figures.EVALUATION_FIGURES`).
FIGURE_TAGS = {name: f"val/{name}" for name in EVALUATION_FIGURES}

class TensorboardSummary:
    """A thin wrapper over :class:`~torch.utils.tensorboard.SummaryWriter` with the run's tags.

    Args:
        log_dir: folder for the event files (usually the experiment folder).
        purge_step: TensorBoard discards events with step ``>= purge_step`` from earlier event
            files in ``log_dir``. When resuming from a checkpoint taken after step ``k`` was
            logged (and flushed), pass ``k + 1``: the interrupted run's later events disappear
            and the resumed run's curves have no duplicated steps.
    """

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None):
        self.log_dir = os.fspath(log_dir)
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge_step)
        self.failed = False  # an OSError (a full disk) ended the events; training goes on

    def _write(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Call the writer's ``method``; its first OSError (a full disk, raised from the writer's
        thread) is one warning and the events of the rest of the run are dropped."""
        if self.failed:
            return
        try:
            getattr(self.writer, method)(*args, **kwargs)
        except OSError as error:
            self.failed = True
            logger.warning("TensorBoard stopped writing to %s (%s); training and checkpoints "
                           "go on", self.log_dir, error.strerror or error)

    def add_scalar(self, tag: str, value: float | Tensor, step: int) -> None:
        """Write one scalar (a 0-d tensor is read with ``float``, one host sync)."""
        self._write("add_scalar", tag, float(value), global_step=step)

    def log_metrics(
        self, results: dict[str, Any], step: int, class_names: Sequence[str] | None = None
    ) -> None:
        """Write the validation scores of :meth:`utils.metrics.Evaluator.results`.

        Args:
            results: the ``results()`` dict; ``None`` scores (undefined) are skipped.
            step: global step (epoch or iteration) of this validation.
            class_names: which classes to write, in order; all of ``results["per_class_iou"]``
                by default.
        """
        for key, tag in METRIC_TAGS.items():
            if results.get(key) is not None:
                self.add_scalar(tag, results[key], step)
        per_class = results.get("per_class_iou", {})
        for name in class_names if class_names is not None else per_class:
            if per_class.get(name) is not None:
                self.add_scalar(f"val_iou/{name}", per_class[name], step)

    @torch.no_grad()
    def visualize(
        self,
        images: Tensor,
        targets: Tensor,
        predictions: Tensor,
        palette: Sequence[Sequence[int]],
        mean: Sequence[float],
        std: Sequence[float],
        step: int,
        max_images: int = 4,
    ) -> None:
        """Write an image grid: per sample, the input, the ground truth and the prediction.

        Args:
            images: ``(N, 3, H, W)`` float inputs normalised with ``mean`` and ``std``.
            targets: ``(N, H, W)`` class ids, coloured by :func:`utils.labels.colour_table`
                (255, ignore, white; an id without a palette colour black).
            predictions: ``(N, H, W)`` predicted class ids.
            palette: RGB triple (0-255) per class id.
            mean, std: per-channel normalisation applied to ``images`` (values in ``[0, 1]`` scale).
            step: global step of this validation.
            max_images: at most this many samples (rows) are drawn.
        """
        count = min(max_images, images.shape[0])
        if count == 0:
            return
        images = images[:count].detach().float().cpu()
        mean_tensor = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_tensor = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        inputs = shown_channels(images * std_tensor + mean_tensor).clamp(0.0, 1.0)
        rows = torch.stack([inputs, _colours(targets[:count], palette),
                            _colours(predictions[:count], palette)], dim=1)
        grid = make_grid(rows.flatten(0, 1), nrow=3, padding=2)
        self._write("add_image", IMAGE_TAG, grid, global_step=step)

    def add_figures(self, figures: dict[str, np.ndarray], step: int) -> None:
        """Write figures (``(H, W, 3)`` uint8 RGB arrays, by name) as images under
        :data:`FIGURE_TAGS` (``val/<name>`` for any other name)."""
        for name, rgb in figures.items():
            self._write("add_image", FIGURE_TAGS.get(name, f"val/{name}"), rgb,
                        global_step=step, dataformats="HWC")

    def flush(self) -> None:
        """Push pending events to disk."""
        self._write("flush")

    def close(self) -> None:
        """Flush and close the event file."""
        self._write("close")


def _colours(labels: Tensor, palette: Sequence[Sequence[int]]) -> Tensor:
    """``(N, H, W)`` class ids -> ``(N, 3, H, W)`` float colours in ``[0, 1]``."""
    rgb = colorize(labels.detach().cpu().numpy(), palette)
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0


class LossWindow:
    """Per-iteration losses kept on the device until the next log point, so that the NaN check
    and per-iteration TensorBoard scalars cost one host-device synchronisation per window."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, torch.Tensor, float]] = []

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.entries.append((step, loss.detach().float(), lr))

    def drain(self) -> list[tuple[int, float, float]]:
        """``(step, loss, lr)`` of every iteration since the last drain.

        Raises:
            NonFiniteLoss: naming the first iteration whose loss is NaN or infinite.
        """
        if not self.entries:
            return []
        values = torch.stack([loss for _, loss, _ in self.entries]).cpu().tolist()
        entries = [(step, value, lr) for (step, _, lr), value in zip(self.entries, values)]
        self.entries = []
        for step, value, _ in entries:
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at iteration {step}")
        return entries


class TrainLog:
    """The loss window plus images-per-second, written to TensorBoard (rank 0's ``summary``;
    None elsewhere) and the progress bar."""

    def __init__(self, summary: TensorboardSummary | None, progress: tqdm, world_size: int):
        self.window = LossWindow()
        self.summary, self.progress, self.world_size = summary, progress, world_size
        self.images_seen, self.tic = 0, time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, lr: float, images: int) -> None:
        self.window.add(step, loss, lr)
        self.images_seen += images

    def flush(self, iteration: int) -> None:
        """Check and write the window. Also called before every save: weights a NaN has reached
        are never written."""
        entries = self.window.drain()
        if entries and self.summary is not None:
            for step, value, lr in entries:
                self.summary.add_scalar("train/loss", value, step)
                self.summary.add_scalar("train/lr", lr, step)
            elapsed = max(time.perf_counter() - self.tic, 1e-9)
            self.summary.add_scalar("train/images_per_second",
                                    self.images_seen * self.world_size / elapsed, iteration)
            self.progress.set_postfix(loss=f"{entries[-1][1]:.4f}")
        self.images_seen, self.tic = 0, time.perf_counter()
