"""Per-channel input statistics and the normalisation of a run (issue 26).

8-bit colour datasets (COCO, VOC, the demo, RGB folders) are normalised with ImageNet's mean and
std, as the torchvision backbones expect. Other images (1 or N bands, 16-bit, float) are
normalised with their own train split's per-channel mean and std, computed exactly (float64,
streaming over the images, Chan et al.'s pairwise update) on the unit scale of
:func:`dataloader.utils.unit_scaled`, cached by the dataset's content as the class weights
are, unless ``--mean/--std`` give them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dataloader import custom_transforms as tr
from dataloader.datasets.base import SegmentationDataset
from dataloader.utils import (IMAGENET_MEAN, IMAGENET_STD, DatasetError, default_cache_dir,
                              unit_array)
from utils.fileio import atomic_write_text

logger = logging.getLogger(__name__)


def channel_statistics(dataset: SegmentationDataset) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of every pixel of every image of ``dataset``.

    Each image's float64 sum and sum of squared deviations are merged into the running ones
    (Chan, Golub and LeVeque's update), so the result is exact to float64 rounding however many
    pixels there are, and the images are read one at a time.
    """
    count, mean, squares = 0, None, None
    for index in range(len(dataset)):
        # The stored pixels, scaled in float64 (the float32 model input would round them).
        image = (dataset.image_pixels(index) if hasattr(dataset, "image_pixels")
                 else dataset.load_sample(index)[0])
        pixels = unit_array(image, np.float64)
        pixels = pixels.reshape(-1, pixels.shape[-1]).T  # (C, H * W)
        image_count = pixels.shape[1]
        image_mean = pixels.mean(axis=1)
        image_squares = ((pixels - image_mean[:, None]) ** 2).sum(axis=1)
        if mean is None:
            count, mean, squares = image_count, image_mean, image_squares
            continue
        total = count + image_count
        delta = image_mean - mean
        mean = mean + delta * image_count / total
        squares = squares + image_squares + delta ** 2 * count * image_count / total
        count = total
    if mean is None or count == 0:
        raise DatasetError("no image to compute the channel statistics of")
    return mean.tolist(), np.sqrt(squares / count).tolist()


def cached_channel_statistics(dataset: SegmentationDataset, cache_dir: str | os.PathLike | None
                              ) -> tuple[list[float], list[float]]:
    """:func:`channel_statistics`, computed once per dataset content (``cache_key``)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"{type(dataset).__name__}|{dataset.cache_key()}|unit-scale-1"
    path = cache_dir / f"channel_stats-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored["key"] == key:
            logger.info("channel statistics read from %s", path)
            return stored["mean"], stored["std"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring unreadable channel statistics cache %s: %s", path, error)
    logger.info("computing per-channel mean and std over %d images", len(dataset))
    mean, std = channel_statistics(dataset)
    try:
        atomic_write_text(path, json.dumps({"key": key, "mean": mean, "std": std}))
    except OSError as error:
        logger.warning("could not cache channel statistics in %s: %s", path, error)
    return mean, std


def statistics_flags(mean: Sequence[float], std: Sequence[float]) -> str:
    """The ``--mean ... --std ...`` line that gives these statistics to train.py."""
    return (f"--mean {' '.join(f'{value:.6g}' for value in mean)} "
            f"--std {' '.join(f'{value:.6g}' for value in std)}")


def resolve_normalization(dataset: SegmentationDataset, *, mean: Sequence[float] | None,
                          std: Sequence[float] | None, stored: dict | None = None,
                          cache_dir: str | os.PathLike | None = None
                          ) -> tuple[list[float], list[float]]:
    """The mean and std a run normalises with: ``--mean/--std`` when given, else a checkpoint's
    (``stored`` settings: --resume, --eval-only), else ImageNet's for 8-bit colour data, else
    ``dataset``'s own (cached).

    Raises:
        DatasetError: only one of mean and std, or a length other than the channel count.
    """
    channels = dataset.in_channels
    if (mean is None) != (std is None):
        raise DatasetError("give --mean and --std together (one value per image channel)")
    if mean is None and stored is not None and "mean" in stored:
        mean, std = stored["mean"], stored["std"]
    if mean is None:
        if dataset.rgb8:
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        mean, std = cached_channel_statistics(dataset, cache_dir)
        if min(std) <= 0:  # a constant band carries nothing: shifted to 0, not divided by 0
            logger.warning("a band is constant in every train image; its std is taken as 1")
            std = [value if value > 0 else 1.0 for value in std]
        return mean, std
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise DatasetError(f"--mean/--std need {channels} values each (the images have "
                           f"{channels} channels), std > 0; got {list(mean)} and {list(std)}")
    return [float(value) for value in mean], [float(value) for value in std]


def set_inputs(train_set: SegmentationDataset | None, val_set: SegmentationDataset, *,
               sizes: tuple[int, int, int | None], mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, stored: dict | None = None,
               cache_dir: str | os.PathLike | None = None) -> None:
    """Check that the splits (and a checkpoint's ``stored`` settings) agree on the channels,
    then give both splits the normalisation and their transforms.

    Args:
        sizes: ``(base_size, crop_size, eval_size)`` of the train and eval transforms.

    Raises:
        DatasetError: channel counts that differ, naming the splits (and checkpoint).
    """
    reference = train_set if train_set is not None else val_set
    if (val_set.in_channels, val_set.rgb8) != (reference.in_channels, reference.rgb8):
        raise DatasetError(f"the val images have {val_set.in_channels} channels but the train "
                           f"images {reference.in_channels}: give both splits the same bands")
    if stored is not None and stored.get("in_channels", 3) != reference.in_channels:
        raise DatasetError(f"the checkpoint takes {stored.get('in_channels', 3)}-channel images "
                           f"but the dataset's have {reference.in_channels}")
    mean, std = resolve_normalization(reference, mean=mean, std=std, stored=stored,
                                      cache_dir=cache_dir)
    for dataset in (train_set, val_set):
        if dataset is not None:
            dataset.mean, dataset.std = mean, std
    val_set.transform = tr.eval_transform(sizes[2], mean=mean, std=std)
    if train_set is not None:
        train_set.transform = tr.train_transform(sizes[0], sizes[1], mean=mean, std=std)
