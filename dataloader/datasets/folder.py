"""Your own data: a folder of images and index masks paired by file name.

Layout (see doc/custom_dataset.md for a worked example)::

    root/classes.txt                 optional: one class name per line, line i = class id i
    root/images/<split>/<name>.jpg   also .jpeg, .png, .bmp, .tif, .tiff
    root/masks/<split>/<name>.png    one class id per pixel, 255 = ignore

Number of classes: the number of names in ``classes.txt``. Without it, every mask of every split
under ``root/masks/`` is read once and the classes are ``class_0 .. class_<largest id>``, so
train and val agree even when a split lacks the last class. A class id at or beyond the class
count is an error that names the mask.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dataloader.datasets.base import PairedFileDataset
from dataloader.utils import (
    IGNORE_INDEX,
    DatasetError,
    file_fingerprint,
    image_size,
    load_label,
    pair_by_stem,
    require_path,
    summarize_names,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = (".png",)
CLASSES_FILE = "classes.txt"
#: Class ids 0-254; 255 is the ignore value.
MAX_CLASSES = IGNORE_INDEX

# Largest-id scans already done in this process, keyed by the masks' fingerprint, so building the
# val split after the train split does not read every mask again.
_largest_id_by_fingerprint: dict[str, int] = {}


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from ``classes.txt``: one per line; outer spaces and blank lines are ignored."""
    with open(path, encoding="utf-8") as handle:
        names = tuple(line.strip() for line in handle if line.strip())
    if not names:
        raise DatasetError(f"{path} names no classes; write one class name per line")
    if len(names) > MAX_CLASSES:
        raise DatasetError(
            f"{path} names {len(names)} classes; at most {MAX_CLASSES} are supported "
            f"({IGNORE_INDEX} is the ignore value)"
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetError(f"{path} repeats class names: {summarize_names(duplicates)}")
    return names


def _mask_paths(masks_root: Path) -> list[str]:
    paths = []
    for split_dir in sorted(masks_root.iterdir()):
        if split_dir.is_dir() and not split_dir.name.startswith("."):
            paths += sorted(
                str(path) for path in split_dir.iterdir()
                if path.suffix.lower() in MASK_SUFFIXES and not path.name.startswith(".")
            )
    return paths


def largest_class_id(masks_root: Path, skip_bad_images: bool = False) -> int:
    """The largest class id (255 excluded) in any mask of any split under ``masks_root``.

    Raises:
        DatasetError: a mask is not an index image, holds an id above 254, or no mask holds any
            id but 255. Unreadable masks are skipped with a warning when ``skip_bad_images``.
    """
    paths = _mask_paths(masks_root)
    fingerprint = file_fingerprint(*paths)
    if fingerprint in _largest_id_by_fingerprint:
        return _largest_id_by_fingerprint[fingerprint]
    logger.warning(
        "no %s in %s: reading all %d masks to count the classes; write the class names there "
        "to skip this and name the classes", CLASSES_FILE, masks_root.parent, len(paths)
    )
    largest = -1
    for path in paths:
        try:
            # MAX_CLASSES as the class count: load_label rejects ids above it (255 = ignore).
            values = np.unique(np.asarray(load_label(path, image_size(path), MAX_CLASSES)))
        except DatasetError as error:
            if not skip_bad_images:
                raise
            logger.warning("skipping bad mask while counting classes: %s", error)
            continue
        values = values[values != IGNORE_INDEX]
        if values.size:
            largest = max(largest, int(values.max()))
    if largest < 0:
        raise DatasetError(
            f"no mask under {masks_root} has a class id other than {IGNORE_INDEX}; "
            f"check the masks or write {masks_root.parent / CLASSES_FILE}"
        )
    _largest_id_by_fingerprint[fingerprint] = largest
    return largest


class FolderSegmentation(PairedFileDataset):
    """Images and index masks in ``root/images/<split>`` and ``root/masks/<split>``.

    ``class_names`` come from ``root/classes.txt`` or, without it, from the largest id in the
    masks of all splits (names ``class_0``, ``class_1``, ...); see the module docstring.
    """

    root_variable = "DEEPLAB_FOLDER_ROOT"  # its entry in the registry reads it

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[dict[str, Any]], Any] | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(transform=transform, skip_bad_images=skip_bad_images)
        self.root = Path(root)
        self.split = split
        hint = (
            f"set {self.root_variable} or pass --data-root to the folder that holds "
            f"images/{split}/ and masks/{split}/ (see doc/custom_dataset.md)"
        )
        require_path(self.root, "folder", hint)
        image_dir = require_path(self.root / "images" / split, "folder", hint)
        mask_dir = require_path(self.root / "masks" / split, "folder", hint)
        self.samples = pair_by_stem(image_dir, mask_dir, IMAGE_SUFFIXES, MASK_SUFFIXES)

        self.classes_file: Path | None = self.root / CLASSES_FILE
        if self.classes_file.is_file():
            self.class_names = read_class_names(self.classes_file)
        else:
            self.classes_file = None
            largest = largest_class_id(self.root / "masks", skip_bad_images=skip_bad_images)
            self.class_names = tuple(f"class_{i}" for i in range(largest + 1))

    def extra_cache_files(self) -> list[str | os.PathLike]:
        return [self.classes_file] if self.classes_file is not None else []
