"""Pascal VOC 2012 semantic segmentation (21 classes, 255 = object borders and difficult pixels).

Data: http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ -- ``root`` is the ``VOC2012`` folder::

    root/JPEGImages/<id>.jpg
    root/SegmentationClass/<id>.png        palette PNG; the pixel values are the class ids
    root/ImageSets/Segmentation/{train,val,trainval}.txt    one <id> per line
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from dataloader.datasets.base import PairedFileDataset
from dataloader.utils import (
    VOC_CLASS_NAMES,
    DatasetError,
    require_path,
    summarize_names,
)


class VOCSegmentation(PairedFileDataset):
    """Pascal VOC 2012 segmentation split, read from its ``ImageSets/Segmentation`` list.

    Args:
        root: the ``VOC2012`` folder.
        split: name of the list file, ``"train"``, ``"val"`` or ``"trainval"``.
        transform: called with ``{"image", "label"}``; its result is the item.
        skip_bad_images: return ``None`` for samples whose files cannot be read.
        list_file: read the image ids from this file instead of
            ``root/ImageSets/Segmentation/<split>.txt`` (for a custom subset, or a copy of VOC
            without ``ImageSets``).
    """

    class_names = VOC_CLASS_NAMES
    root_variable = "DEEPLAB_VOC_ROOT"  # its entry in the registry reads it

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[dict[str, Any]], Any] | None = None,
        skip_bad_images: bool = False,
        *,
        list_file: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(transform=transform, skip_bad_images=skip_bad_images)
        self.root = Path(root)
        self.split = split
        hint = (
            f"set {self.root_variable} or pass --data-root to the VOC2012 folder that holds "
            "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/"
        )
        require_path(self.root, "folder", hint)
        image_dir = require_path(self.root / "JPEGImages", "folder", hint)
        mask_dir = require_path(self.root / "SegmentationClass", "folder", hint)
        if list_file is None:
            list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
            list_hint = f"the {split!r} split list is missing; {hint}"
        else:
            list_hint = "list_file must be a text file with one image id per line"
        self.list_file = require_path(list_file, "file", list_hint)

        with open(self.list_file, encoding="utf-8") as handle:
            self.image_ids = [line.strip() for line in handle if line.strip()]
        if not self.image_ids:
            raise DatasetError(f"split list {self.list_file} names no images")
        self.samples = [
            (str(image_dir / f"{image_id}.jpg"), str(mask_dir / f"{image_id}.png"))
            for image_id in self.image_ids
        ]
        # Check every listed file now, so a wrong root fails before training starts.
        missing = [path for pair in self.samples for path in pair if not os.path.isfile(path)]
        if missing:
            raise DatasetError(
                f"files listed in {self.list_file} are missing: {summarize_names(missing, 3)}"
            )

    def extra_cache_files(self) -> list[str | os.PathLike]:
        return [self.list_file]
