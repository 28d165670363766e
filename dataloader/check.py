"""Read every sample once and report what is wrong (``train.py --check-data``).

A long run should not stop in its third hour on the one truncated JPEG of 118k images, nor learn
from a mask of the wrong size. The check reads each sample as training would, minus the work that
cannot find a problem: no augmentation, images decoded at reduced size
(:func:`dataloader.utils.verify_image`), labels in full (their size and class ids are what can be
wrong). DataLoader workers share the samples. Every bad sample is listed, one line naming the
file, and the pixels of every class are counted.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from dataloader.datasets.base import SegmentationDataset
from dataloader.statistics import channel_statistics, statistics_flags
from dataloader.utils import IGNORE_INDEX, DatasetError
from utils.distributed import DistributedContext

logger = logging.getLogger(__name__)

#: Samples a worker checks per task: fewer round trips than one at a time.
SAMPLES_PER_TASK = 16
#: Seconds between progress lines in the log.
_LOG_EVERY = 30.0


@dataclass
class DataReport:
    """What :func:`check_datasets` found.

    Attributes:
        class_names: label value ``i`` is class ``class_names[i]``.
        pixels: per split, a ``(256,)`` int64 array: how many pixels hold each label value (255 =
            ignore), over the samples that loaded.
        samples: per split, how many samples were read.
        problems: one line per bad sample, ``"<split>: <what is wrong, naming the file>"``.
        seconds: wall time of the whole check.
        workers: DataLoader worker processes used (0: the calling process).
        mask_reading: how the masks became class ids (e.g. binary, with its flag), or empty.
    """

    class_names: tuple[str, ...]
    pixels: dict[str, np.ndarray]
    samples: dict[str, int]
    problems: list[str]
    seconds: float
    workers: int
    mask_reading: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def histogram_lines(self) -> list[str]:
        """A table: per class (and ignore) and per split, pixels and share of the split's pixels."""
        names = list(self.class_names) + [f"ignore ({IGNORE_INDEX})"]
        values = list(range(len(self.class_names))) + [IGNORE_INDEX]
        width = max(len(name) for name in names + ["class"])
        header = f"{'class':<{width}}" + "".join(
            f"  {split + ' pixels':>16}  {'share':>7}" for split in self.pixels)
        lines = [header]
        for name, value in zip(names, values):
            row = f"{name:<{width}}"
            for counts in self.pixels.values():
                share = counts[value] / max(int(counts.sum()), 1)
                row += f"  {int(counts[value]):>16,}  {share:>7.2%}"
            lines.append(row)
        return lines

    def format(self) -> str:
        """The whole report: what was read, every problem, the histogram and the verdict."""
        total = sum(self.samples.values())
        read = " + ".join(f"{count} {split}" for split, count in self.samples.items())
        lines = [f"checked {read} samples in {self.seconds:.1f} s "
                 f"({total / max(self.seconds, 1e-9):.0f} samples/s, {self.workers} workers)"]
        if self.mask_reading:
            lines.append(f"masks read as {self.mask_reading}")
        if self.problems:
            lines += [f"{len(self.problems)} bad sample(s):"] + self.problems
        lines += ["class pixels:"] + self.histogram_lines()
        lines.append("data check passed" if self.ok else
                     f"data check FAILED: {len(self.problems)} bad sample(s), listed above")
        return "\n".join(lines)


class _SampleChecks(torch.utils.data.Dataset):
    """``[i]`` is ``(label histogram or None, problem or None)`` for sample ``i``."""

    def __init__(self, dataset: SegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, str | None]:
        try:
            label = self.dataset.check_sample(index)
        except DatasetError as error:  # the user's data; anything else is a bug and raises
            return None, str(error)
        return np.bincount(label.reshape(-1), minlength=256), None


def _merge(results: list[tuple[np.ndarray | None, str | None]]
           ) -> tuple[np.ndarray, list[str], int]:
    """One task's samples as ``(summed histogram, problems, sample count)``: little to send."""
    pixels = np.zeros(256, dtype=np.int64)
    problems = []
    for histogram, problem in results:
        if problem is None:
            pixels += histogram
        else:
            problems.append(problem)
    return pixels, problems, len(results)


def check_split(dataset: SegmentationDataset, *, workers: int = 0,
                name: str = "") -> tuple[np.ndarray, list[str]]:
    """Check every sample of one dataset (see :meth:`SegmentationDataset.check_sample`).

    Returns:
        The ``(256,)`` pixel count per label value over the good samples, and one message per bad
        sample, in dataset order.
    """
    loader = torch.utils.data.DataLoader(_SampleChecks(dataset), batch_size=SAMPLES_PER_TASK,
                                         num_workers=workers, collate_fn=_merge)
    pixels = np.zeros(256, dtype=np.int64)
    problems: list[str] = []
    done, last_log = 0, time.perf_counter()
    for task_pixels, task_problems, count in loader:
        pixels += task_pixels
        problems += task_problems
        done += count
        if time.perf_counter() - last_log > _LOG_EVERY:
            logger.info("%s: checked %d of %d samples, %d bad", name, done, len(dataset),
                        len(problems))
            last_log = time.perf_counter()
    return pixels, problems


def check_datasets(splits: Mapping[str, SegmentationDataset | None], *,
                   workers: int = 0) -> DataReport:
    """Read every sample of every split and report the bad ones and the class pixel counts.

    Args:
        splits: split name -> dataset (``None`` entries are left out), e.g. train and val.
        workers: DataLoader worker processes sharing the samples.
    """
    start = time.perf_counter()
    present = {name: dataset for name, dataset in splits.items() if dataset is not None}
    if not present:
        raise ValueError("no dataset to check")
    pixels, problems = {}, []
    for name, dataset in present.items():
        pixels[name], found = check_split(dataset, workers=workers, name=name)
        problems += [f"{name}: {message}" for message in found]
    first = next(iter(present.values()))
    return DataReport(class_names=tuple(first.class_names), pixels=pixels,
                      samples={name: len(dataset) for name, dataset in present.items()},
                      problems=problems, seconds=time.perf_counter() - start, workers=workers,
                      mask_reading=first.mask_reading())


def check_data(train_set, val_set, *, workers: int, context: DistributedContext) -> dict:
    """``--check-data``: rank 0 reads every sample and reports (its exit status is torchrun's)."""
    if not context.is_main:
        return {"data_ok": True}
    report = check_datasets({"train": train_set, "val": val_set}, workers=workers)
    print(report.format())
    result = {"data_ok": report.ok, "data_report": report}
    if report.ok and train_set is not None and not train_set.rgb8:
        # Images that are not 8-bit RGB are normalised with their own statistics: exact ones,
        # to pass to train.py (which would otherwise compute and cache the same numbers).
        mean, std = channel_statistics(train_set)
        print(f"{train_set.in_channels}-channel images; per-channel statistics of the "
              f"{len(train_set)} train images:\n  {statistics_flags(mean, std)}")
        result.update(mean=mean, std=std)
    return result
