"""COCO-Stuff 164k: the 2017 COCO images with dense thing + stuff masks (171 classes).

Paper: https://arxiv.org/abs/1612.03716 -- data: https://github.com/nightrome/cocostuff

Expected layout (``stuffthingmaps_trainval2017.zip`` unpacked into ``annotations/``)::

    root/images/train2017/*.jpg        root/annotations/train2017/*.png
    root/images/val2017/*.jpg          root/annotations/val2017/*.png

A mask pixel holds the COCO category id minus one (0-181) or 255 (unlabeled). Eleven of those
182 ids are never used, so the raw values are remapped to 171 contiguous classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from dataloader.datasets.base import PairedFileDataset
from dataloader.utils import (
    IGNORE_INDEX,
    DatasetError,
    load_label,
    pair_by_stem,
    require_path,
)

#: The 171 COCO-Stuff class names in COCO id order: 80 things (ids 1-90), then 91 stuff (92-182).
COCOSTUFF_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
assert len(COCOSTUFF_CLASS_NAMES) == 171, len(COCOSTUFF_CLASS_NAMES)

#: Mask values are COCO id - 1, so ids 1..182 give 182 raw values.
NUM_RAW_VALUES = 182

#: COCO ids that no COCO-Stuff pixel carries (gaps in the thing ids, and id 91).
UNUSED_COCO_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)


def _raw_to_class_table() -> np.ndarray:
    """256-entry lookup table: raw mask value -> contiguous class id, unused ids -> 255."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    unused_raw = {coco_id - 1 for coco_id in UNUSED_COCO_IDS}
    used_raw = [raw for raw in range(NUM_RAW_VALUES) if raw not in unused_raw]
    table[used_raw] = np.arange(len(used_raw), dtype=np.uint8)
    return table


#: ``RAW_TO_CLASS[raw_value]`` is the training label of a stuffthingmaps pixel.
RAW_TO_CLASS = _raw_to_class_table()
assert int((RAW_TO_CLASS != IGNORE_INDEX).sum()) == len(COCOSTUFF_CLASS_NAMES)

_SPLIT_FOLDERS = {"train": "train2017", "val": "val2017"}


class COCOStuffSegmentation(PairedFileDataset):
    """COCO-Stuff 164k with labels remapped to 171 contiguous classes (255 = ignore).

    Images and masks are paired by file name. An image without a mask (or the reverse) is an error
    when the dataset is built; a mask whose size differs from its image is an error when the
    sample is loaded.
    """

    class_names = COCOSTUFF_CLASS_NAMES
    root_variable = "DEEPLAB_COCOSTUFF_ROOT"  # its entry in the registry reads it

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[dict[str, Any]], Any] | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(transform=transform, skip_bad_images=skip_bad_images)
        if split not in _SPLIT_FOLDERS:
            raise ValueError(
                f"COCO-Stuff split must be one of {sorted(_SPLIT_FOLDERS)}, got {split!r}"
            )
        self.root = Path(root)
        self.split = split
        hint = (
            f"set {self.root_variable} or pass --data-root to the COCO-Stuff folder that holds "
            "images/{train2017,val2017}/ and annotations/{train2017,val2017}/ (stuffthingmaps)"
        )
        require_path(self.root, "folder", hint)
        folder = _SPLIT_FOLDERS[split]
        image_dir = require_path(self.root / "images" / folder, "folder", hint)
        mask_dir = require_path(self.root / "annotations" / folder, "folder", hint)
        self.samples = pair_by_stem(image_dir, mask_dir, image_suffixes=(".jpg",))

    def read_label(self, index: int, size: tuple[int, int]) -> Image.Image:
        mask_path = self.samples[index][1]
        # Range-check the raw values here, so the message speaks of COCO ids, not 182 "classes".
        raw = np.asarray(load_label(mask_path, size, 256, index=index))
        bad = (raw >= NUM_RAW_VALUES) & (raw != IGNORE_INDEX)
        if bad.any():
            raise DatasetError(
                f"mask {mask_path} (sample {index}) has value {int(raw[bad].max())}, which is no "
                f"COCO-Stuff id (valid: 0-{NUM_RAW_VALUES - 1} = COCO id - 1, "
                f"{IGNORE_INDEX} = unlabeled)"
            )
        return Image.fromarray(RAW_TO_CLASS[raw], mode="L")
