"""Segmentation metrics from a confusion matrix accumulated on the device.

The :class:`Evaluator` counts (ground truth, prediction) pairs with one ``torch.bincount`` per
batch, so evaluation never copies label maps to the host; only the small ``(C, C)`` matrix is read
back when the scores are computed. In distributed evaluation, call :meth:`Evaluator.all_reduce`
once, after the last batch and before reading any score.

:class:`WorstImages` scores each image on its own during the same pass and keeps small
thumbnails of the ``k`` lowest-scoring ones, for the evaluation figures.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from utils.labels import shown_channels

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
        """Forget every counted pixel, to count another pass with the same evaluator (a new
        one starts at zero, as each of train.py's evaluations does)."""
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
            "per_class_iou": {class name: float in [0, 1] or None}, "pixels": int,
            "confusion_matrix": C lists of C ints}``, where ``pixels`` counts the scored (not
            ignored) pixels and ``confusion_matrix[i][j]`` the pixels of true class ``i``
            predicted as ``j`` (row ``i`` sums to class ``i``'s scored pixels). A score that is
            undefined (a class seen in neither ground truth nor prediction, or no pixels at all)
            is ``None``.
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
            "confusion_matrix": self.confusion_matrix.cpu().tolist(),
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


def metrics_json(results: dict[str, Any]) -> str:
    """``results`` as indented JSON (keys sorted) with the confusion matrix one row per line.

    Plain ``json.dumps(indent=2)`` would put each of the ``C * C`` counts on a line of its own
    (29241 lines at 171 classes); a row per line keeps the file readable and diffable.
    """
    matrix = results.get("confusion_matrix")
    if matrix is None:
        return json.dumps(results, indent=2, sort_keys=True)
    placeholder = "@confusion_matrix@"
    text = json.dumps(dict(results, confusion_matrix=placeholder), indent=2, sort_keys=True)
    rows = ",\n".join(f"    {json.dumps(row)}" for row in matrix)
    return text.replace(json.dumps(placeholder), f"[\n{rows}\n  ]" if matrix else "[]", 1)


@dataclass(order=True)
class ScoredImage:
    """One val image's score and thumbnails (see :class:`WorstImages`).

    Ordered by ``(score, index)``: worst first, ties broken by dataset index so that the choice
    does not depend on the number of processes.
    """

    score: float  # mIoU over the classes present in the label or the prediction, in [0, 1]
    index: int  # position in the val dataset
    name: str = field(compare=False)  # the image's file name (or another label of it)
    image: np.ndarray = field(compare=False, repr=False)  # (h, w, 3) uint8 RGB
    target: np.ndarray = field(compare=False, repr=False)  # (h, w) uint8 ids, 255 = ignore
    prediction: np.ndarray = field(compare=False, repr=False)  # (h, w) uint8 ids


class WorstImages:
    """Keeps the ``k`` val images with the lowest per-image mIoU, as small thumbnails.

    An image's score is the mean IoU of the classes present in its label or its prediction,
    counted on its scored pixels only (as the dataset mIoU is, restricted to the image): a class
    the image lacks and the model does not predict there is left out, not counted as 1 or 0.
    An image without scored pixels (all ignore) has no score and is never kept.

    Memory is bounded by ``k`` thumbnails (longest side ``thumbnail_size``); an image is only
    downscaled when it enters the ``k`` worst. In distributed evaluation each rank tracks its
    own images; :meth:`all_gather` then leaves every rank with the ``k`` worst of all.

    Args:
        k: how many images to keep (>= 1).
        num_classes: ``C``; label ids outside ``[0, C)`` (255) are not scored.
        mean, std: the normalisation of the images passed to :meth:`add` (``[0, 1]`` scale),
            undone for the thumbnails.
        name_of: the name of a dataset index, asked only for images that are kept.
        thumbnail_size: longest side of the thumbnails in pixels.
    """

    def __init__(self, k: int, num_classes: int, *, mean: Sequence[float], std: Sequence[float],
                 name_of: Callable[[int], str] = lambda index: f"#{index}",
                 thumbnail_size: int = 256):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.num_classes = k, num_classes
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.name_of, self.thumbnail_size = name_of, thumbnail_size
        self.entries: list[ScoredImage] = []  # sorted, worst first, at most k

    @staticmethod
    def image_score(target: Tensor, prediction: Tensor, num_classes: int) -> float:
        """Per-image mIoU (see the class docstring); NaN when no pixel is scored."""
        evaluator = Evaluator(num_classes, device=target.device)
        evaluator.add_batch(target, prediction)
        return evaluator.mean_iou()

    def _enters(self, score: float, index: int) -> bool:
        return len(self.entries) < self.k or (score, index) < (self.entries[-1].score,
                                                               self.entries[-1].index)

    @torch.no_grad()
    def add(self, indices: Sequence[int], images: Tensor, targets: Tensor,
            predictions: Tensor) -> None:
        """Score a batch and keep the images among the ``k`` worst so far.

        Args:
            indices: dataset index of each image (its name comes from ``name_of``).
            images: ``(N, 3, h, w)`` normalised inputs; ``h, w`` may differ from the label's
                (``--eval-size``): the thumbnail is resized to the label's aspect.
            targets: ``(N, H, W)`` class ids, 255 = ignore.
            predictions: ``(N, H, W)`` predicted class ids.
        """
        for i, index in enumerate(indices):
            index = int(index)
            score = self.image_score(targets[i], predictions[i], self.num_classes)
            if math.isnan(score) or not self._enters(score, index):
                continue
            entry = ScoredImage(score, index, self.name_of(index),
                                *self._thumbnails(images[i], targets[i], predictions[i]))
            bisect.insort(self.entries, entry)
            del self.entries[self.k:]

    def _thumbnails(self, image: Tensor, target: Tensor,
                    prediction: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        height, width = target.shape[-2:]
        scale = min(1.0, self.thumbnail_size / max(height, width))
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = F.interpolate(image[None].float(), size=size, mode="bilinear",
                              align_corners=False, antialias=True)[0].cpu()
        image = shown_channels(image * self.std + self.mean)
        image = image.clamp(0, 1).mul(255).round().to(torch.uint8)

        def labels(ids: Tensor) -> np.ndarray:  # nearest: never blend two class ids
            resized = F.interpolate(ids[None, None].float(), size=size, mode="nearest-exact")
            return resized[0, 0].to(torch.uint8).cpu().numpy()

        return image.permute(1, 2, 0).numpy(), labels(target), labels(prediction)

    def all_gather(self) -> None:
        """Merge the ranks' candidates when ``torch.distributed`` is initialised (every rank
        ends with the same ``k`` worst); a no-op in a single process. Call it once per pass."""
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[ScoredImage] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.entries)
            self.entries = sorted(entry for entries in gathered for entry in entries or [])
            del self.entries[self.k:]

    def worst(self) -> list[ScoredImage]:
        """The kept images, worst (lowest score) first."""
        return list(self.entries)
