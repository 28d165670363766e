"""Class weights for an imbalanced segmentation dataset (``--use-balanced-weights``).

The ENet rule (https://arxiv.org/abs/1606.02147, section 5.2), as the DeepLab ports use it:
``w_c = 1 / ln(1.02 + p_c)`` with ``p_c`` the share of labelled pixels that belong to class ``c``.
Weights lie between ``1 / ln(2.02) ~ 1.42`` (a class covering every pixel) and
``1 / ln(1.02) ~ 50.5`` (an absent class). Counting reads every mask once, so the result is cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dataloader.utils import IGNORE_INDEX, DatasetError, default_cache_dir
from utils.fileio import atomic_write_text

if TYPE_CHECKING:
    from dataloader.datasets.base import SegmentationDataset

logger = logging.getLogger(__name__)

#: ``c`` in ``1 / ln(c + p)``: bounds the weight of rare classes at ``1 / ln(1.02) ~ 50.5``.
ENET_C = 1.02


def class_pixel_counts(dataset: SegmentationDataset, num_classes: int) -> np.ndarray:
    """Labelled pixels per class over ``dataset`` (255 not counted), as an int64 ``(num_classes,)``.

    Reads only the masks, through ``dataset.label_at``. A sample whose mask cannot be read is
    skipped with a warning when the dataset was built with ``skip_bad_images``.
    """
    counts = np.zeros(256, dtype=np.int64)
    skipped = 0
    for index in range(len(dataset)):
        try:
            label = np.asarray(dataset.label_at(index))
        except DatasetError as error:
            if not dataset.skip_bad_images:
                raise
            logger.warning("class weights: skipping bad sample: %s", error)
            skipped += 1
            continue
        counts += np.bincount(label.ravel(), minlength=256)[:256]
    out_of_range = np.flatnonzero(counts[num_classes:IGNORE_INDEX])
    if out_of_range.size:
        raise ValueError(
            f"labels hold class id {num_classes + int(out_of_range[-1])} but num_classes is "
            f"{num_classes}"
        )
    if skipped:
        logger.warning("class weights: %d of %d samples skipped", skipped, len(dataset))
    return counts[:num_classes]


def enet_weights(counts: np.ndarray) -> np.ndarray:
    """``1 / ln(1.02 + p_c)`` from per-class pixel counts, as float64."""
    total = counts.sum()
    if total == 0:
        raise DatasetError("cannot compute class weights: no mask has a labelled pixel")
    return 1.0 / np.log(ENET_C + counts / total)


def _cache_file(
    dataset: SegmentationDataset, num_classes: int, cache_dir: Path
) -> tuple[Path, str]:
    key = f"{type(dataset).__name__}|{dataset.cache_key()}|{num_classes}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / f"class_weights-{type(dataset).__name__}-{num_classes}-{digest}.json", key


def _read_cache(path: Path, key: str, num_classes: int) -> torch.Tensor | None:
    try:
        with open(path, encoding="utf-8") as handle:
            stored = json.load(handle)
        weights = stored["weights"]
        if stored["key"] != key or len(weights) != num_classes:
            return None
        return torch.tensor(weights, dtype=torch.float32)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring unreadable class-weight cache %s: %s", path, error)
        return None


def compute_class_weights(
    dataset: SegmentationDataset,
    num_classes: int,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """ENet class weights for ``dataset``, computed once and then read from a cache file.

    Args:
        dataset: any :class:`SegmentationDataset`; only ``label_at`` and ``cache_key`` are used.
        num_classes: length of the result; label ids must be below it (255 is ignored).
        cache_dir: folder for the cache file, default :func:`default_cache_dir`. It must not be
            inside the dataset folder. The file name holds a hash of the dataset class,
            ``dataset.cache_key()`` and ``num_classes``, so changed masks give a new file.

    Returns:
        float32 tensor ``(num_classes,)`` of weights in ``[1.42, 50.5]``, for
        ``CrossEntropyLoss(weight=...)``.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = getattr(dataset, "root", None)
    if root is not None and cache_dir.resolve().is_relative_to(Path(root).resolve()):
        raise DatasetError(
            f"cache folder {cache_dir} is inside the dataset folder {root}; "
            "pass a --cache-dir outside it"
        )
    path, key = _cache_file(dataset, num_classes, cache_dir)
    cached = _read_cache(path, key, num_classes)
    if cached is not None:
        logger.info("class weights read from %s", path)
        return cached

    logger.info("computing class weights over %d masks", len(dataset))
    counts = class_pixel_counts(dataset, num_classes)
    weights = enet_weights(counts)
    content = json.dumps(
        {"key": key, "weights": weights.tolist(), "pixel_counts": counts.tolist()}, indent=1
    )
    try:
        atomic_write_text(path, content)
        logger.info("class weights cached in %s", path)
    except OSError as error:
        # The weights are still right; only the next run has to count again.
        logger.warning("could not cache class weights in %s: %s", path, error)
    return torch.tensor(weights, dtype=torch.float32)
