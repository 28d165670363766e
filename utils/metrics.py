"""Segmentation metrics from a confusion matrix accumulated on the device.

The :class:`Evaluator` counts (ground truth, prediction) pairs with one ``torch.bincount`` per
batch, so evaluation never copies label maps to the host; only the small ``(C, C)`` matrix is read
back when the scores are computed. In distributed evaluation, call :meth:`Evaluator.all_reduce`
once, after the last batch and before reading any score.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)


def _nanmean(values: Tensor) -> float:
    """Mean of the non-NaN entries; NaN when there are none (no warning, unlike numpy)."""
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def _plain(value: float) -> float | None:
    """A JSON-safe number: NaN (undefined score) becomes ``None``."""
    return None if math.isnan(value) else float(value)


class Evaluator:
    """Accumulates a confusion matrix and derives the usual segmentation scores from it.

    ``confusion_matrix[i, j]`` counts pixels of ground-truth class ``i`` predicted as class ``j``
    (rows = ground truth, columns = prediction), as an int64 ``(C, C)`` tensor on ``device``.

    Args:
        num_classes: number of classes ``C``; ground-truth ids outside ``[0, C)`` (such as the
            ignore value 255) are not counted.
        device: where the matrix lives; put it on the device of the predictions (and on the GPU
            when the NCCL backend has to reduce it). Defaults to the CPU.
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.confusion_matrix = torch.zeros(
            num_classes, num_classes, dtype=torch.int64, device=self.device
        )

    def reset(self) -> None:
        """Forget every counted pixel (call before each evaluation pass)."""
        self.confusion_matrix.zero_()

    @torch.no_grad()
    def add_batch(self, target: Tensor, prediction: Tensor) -> None:
        """Count one batch.

        Args:
            target: ground-truth class ids of any shape, e.g. ``(N, H, W)``; pixels equal to the
                ignore value (255) or otherwise outside ``[0, C)`` are skipped.
            prediction: predicted class ids (e.g. ``logits.argmax(1)``), same shape as ``target``,
                all in ``[0, C)``.

        Raises:
            ValueError: shapes differ, or a prediction lies outside ``[0, C)`` (that would shift
                counts into another class's row silently, so it is treated as a bug).
        """
        if target.shape != prediction.shape:
            raise ValueError(
                f"target {tuple(target.shape)} and prediction {tuple(prediction.shape)} differ in "
                "shape"
            )
        target = target.to(self.device, torch.int64).reshape(-1)
        prediction = prediction.to(self.device, torch.int64).reshape(-1)
        scored = (target >= 0) & (target < self.num_classes)
        target, prediction = target[scored], prediction[scored]
        if prediction.numel() and (
            int(prediction.min()) < 0 or int(prediction.max()) >= self.num_classes
        ):
            raise ValueError(
                f"predictions must be class ids in [0, {self.num_classes}), got values in "
                f"[{int(prediction.min())}, {int(prediction.max())}]"
            )
        counts = torch.bincount(
            target * self.num_classes + prediction, minlength=self.num_classes**2
        )
        self.confusion_matrix += counts.reshape(self.num_classes, self.num_classes)

    def all_reduce(self) -> None:
        """Sum the matrix over all processes when ``torch.distributed`` is initialised.

        A no-op in a single process. Call it exactly once per evaluation pass: each call adds the
        other processes' counts again.
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.confusion_matrix, op=dist.ReduceOp.SUM)

    def _matrix(self) -> Tensor:
        return self.confusion_matrix.detach().to("cpu", torch.float64)

    def pixel_accuracy(self) -> float:
        """Correct pixels / scored pixels, in ``[0, 1]``; NaN when nothing was counted."""
        matrix = self._matrix()
        total = matrix.sum()
        return float(matrix.diagonal().sum() / total) if total > 0 else math.nan

    def per_class_accuracy(self) -> Tensor:
        """``(C,)`` float64 recall per class; NaN for a class without ground-truth pixels."""
        matrix = self._matrix()
        return matrix.diagonal() / matrix.sum(dim=1)  # 0 / 0 = NaN for absent classes

    def mean_class_accuracy(self) -> float:
        """Mean of :meth:`per_class_accuracy` over classes that have ground-truth pixels."""
        return _nanmean(self.per_class_accuracy())

    def per_class_iou(self) -> Tensor:
        """``(C,)`` float64 intersection over union, in ``[0, 1]``.

        NaN for a class absent from both ground truth and prediction (its IoU is undefined, not
        0); a class only predicted, never present, has IoU 0.
        """
        matrix = self._matrix()
        intersection = matrix.diagonal()
        union = matrix.sum(dim=0) + matrix.sum(dim=1) - intersection
        return intersection / union

    def mean_iou(self) -> float:
        """Mean of :meth:`per_class_iou`, skipping undefined (NaN) classes."""
        return _nanmean(self.per_class_iou())

    def frequency_weighted_iou(self) -> float:
        """Per-class IoU weighted by each class's share of the ground-truth pixels."""
        matrix = self._matrix()
        total = matrix.sum()
        if total == 0:
            return math.nan
        frequency = matrix.sum(dim=1) / total
        present = frequency > 0  # a present class always has a defined IoU
        return float((frequency[present] * self.per_class_iou()[present]).sum())

    def _check_names(self, class_names: Sequence[str]) -> None:
        if len(class_names) != self.num_classes:
            raise ValueError(
                f"{len(class_names)} class names given for an evaluator of {self.num_classes} "
                "classes"
            )

    def results(self, class_names: Sequence[str]) -> dict[str, Any]:
        """All scores as plain Python values, ready for ``json.dump`` and the summaries.

        Returns:
            ``{"pixel_accuracy", "mean_class_accuracy", "mean_iou", "fw_iou": float in [0, 1],
            "per_class_iou": {class name: float in [0, 1] or None}, "pixels": int}``, where
            ``pixels`` counts the scored (not ignored) pixels. A score that is undefined
            (a class seen in neither ground truth nor prediction, or no pixels at all) is ``None``.
        """
        self._check_names(class_names)
        per_class = self.per_class_iou().tolist()
        return {
            "pixel_accuracy": _plain(self.pixel_accuracy()),
            "mean_class_accuracy": _plain(self.mean_class_accuracy()),
            "mean_iou": _plain(self.mean_iou()),
            "fw_iou": _plain(self.frequency_weighted_iou()),
            "per_class_iou": {name: _plain(iou) for name, iou in zip(class_names, per_class)},
            "pixels": int(self.confusion_matrix.sum().item()),
        }

    def format_table(self, class_names: Sequence[str]) -> str:
        """A fixed-width text table: IoU per class, then the four summary scores, in percent."""
        results = self.results(class_names)
        summary = (
            ("pixel accuracy", results["pixel_accuracy"]),
            ("mean class accuracy", results["mean_class_accuracy"]),
            ("mean IoU", results["mean_iou"]),
            ("frequency-weighted IoU", results["fw_iou"]),
        )
        width = max(len(name) for name in [*class_names, *(label for label, _ in summary)])

        def row(label: str, value: float | None) -> str:
            shown = "n/a" if value is None else f"{100.0 * value:.2f}"
            return f"{label:<{width}}  {shown:>7}"

        rule = "-" * (width + 9)
        lines = [f"{'class':<{width}}  {'IoU (%)':>7}", rule]
        lines += [row(name, iou) for name, iou in results["per_class_iou"].items()]
        lines += [rule, *(row(label, value) for label, value in summary)]
        return "\n".join(lines)
