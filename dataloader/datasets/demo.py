"""A small generated dataset in the official COCO layout, for demos, tests and smoke runs.

Every object class has its own colour and texture and the background another, so a small
network trained from scratch on a CPU learns it in minutes. The files exercise what real COCO
holds: polygons (some in two parts), an uncompressed-RLE crowd region, overlapping instances
(ignored by the labels) and a category that is not a Pascal VOC class (background). The images
are painted from the very masks pycocotools rasterises from the stored polygons, so pixels and
annotations agree exactly. The data is read by :class:`~dataloader.datasets.coco.COCOSegmentation`
like real COCO.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from dataloader.utils import DatasetError

logger = logging.getLogger(__name__)

#: (COCO category id, name, supercategory, RGB colour, texture) of the objects drawn. The ids and
#: names are COCO's; all but the last are Pascal VOC classes.
DEMO_CATEGORIES: tuple[tuple[int, str, str, tuple[int, int, int], str], ...] = (
    (1, "person", "person", (225, 45, 45), "horizontal"),
    (3, "car", "vehicle", (40, 85, 225), "vertical"),
    (16, "bird", "animal", (205, 65, 215), "dots"),
    (17, "cat", "animal", (240, 210, 35), "checker"),
    (18, "dog", "animal", (35, 185, 70), "diagonal"),
    (25, "giraffe", "animal", (165, 110, 55), "spots"),
)
#: COCO id of the category that is not a Pascal VOC class and must read as background.
NON_VOC_CATEGORY_ID = 25
_VOC_CATEGORIES = [entry for entry in DEMO_CATEGORIES if entry[0] != NON_VOC_CATEGORY_ID]
_GIRAFFE = next(entry for entry in DEMO_CATEGORIES if entry[0] == NON_VOC_CATEGORY_ID)
_PERSON = DEMO_CATEGORIES[0]

_SPLIT_STREAMS = {"train": 0, "val": 1}
_FIRST_IMAGE_ID = {"train": 1, "val": 100_001}


def _texture(kind: str, width: int, height: int) -> np.ndarray:
    """``(height, width)`` float pattern in [0, 1] that gives a class its look."""
    y, x = np.mgrid[0:height, 0:width]
    if kind == "horizontal":
        return ((y // 3) % 2).astype(np.float32)
    if kind == "vertical":
        return ((x // 3) % 2).astype(np.float32)
    if kind == "checker":
        return (((x // 4) + (y // 4)) % 2).astype(np.float32)
    if kind == "diagonal":
        return (((x + y) // 3) % 2).astype(np.float32)
    if kind == "dots":
        return (((x % 5) < 2) & ((y % 5) < 2)).astype(np.float32)
    if kind == "spots":
        return (((x // 6) * 7 + (y // 6) * 3) % 4 == 0).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _random_polygon(rng: np.random.Generator, center: tuple[float, float],
                    radius: float) -> list[float]:
    """A star-shaped (hence simple) polygon around ``center``, as a flat list rounded to 0.01 px
    like COCO's coordinates."""
    count = int(rng.integers(6, 13))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = radius * rng.uniform(0.7, 1.3, count)
    points = np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], 1)
    return [round(float(value), 2) for value in points.reshape(-1)]


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of a binary ``(H, W)`` mask: column-major run lengths, starting
    with a (possibly empty) run of zeros."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    boundaries = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], boundaries, [flat.size]])).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _crowd_mask(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A band of small ellipses: a crowd too dense to annotate person by person."""
    y, x = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), dtype=bool)
    band_y = rng.uniform(0.55, 0.8) * height
    start = rng.uniform(0.05, 0.3) * width
    for k in range(int(rng.integers(3, 6))):
        cx = start + k * rng.uniform(0.1, 0.16) * width
        cy = band_y + rng.uniform(-4, 4)
        rx, ry = rng.uniform(5, 9), rng.uniform(9, 15)
        mask |= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    return mask


def _make_image(rng: np.random.Generator, number: int, width: int, height: int,
                is_train: bool) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Paint one image and return it with its annotations (without ids)."""
    while True:
        annotations, masks = _annotate(_place_objects(rng, number, width, height), width, height)
        kept_area = sum(a["area"] for a in annotations if a["category_id"] != NON_VOC_CATEGORY_ID)
        # Train keeps only images with more than 1000 annotated pixels: make every one count.
        if not is_train or kept_area > 1000:
            break
    return _paint(rng, masks, width, height), annotations


def _place_objects(rng: np.random.Generator, number: int, width: int, height: int
                   ) -> list[tuple[tuple, list[list[float]] | None, np.ndarray | None]]:
    """The objects of image ``number``: (category entry, polygon parts or None, crowd mask or
    None)."""
    objects: list[tuple[tuple, list[list[float]] | None, np.ndarray | None]] = []
    if number % 7 == 0:
        objects.append((_PERSON, None, _crowd_mask(rng, width, height)))
    if number % 4 == 2:
        center = (rng.uniform(0.15, 0.85) * width, rng.uniform(0.2, 0.8) * height)
        objects.append((_GIRAFFE, [_random_polygon(rng, center, rng.uniform(12, 22))], None))
    centers = []
    for k in range(1 + int(rng.integers(0, 3))):
        entry = _VOC_CATEGORIES[(number + k) % len(_VOC_CATEGORIES)] if k == 0 else \
            _VOC_CATEGORIES[int(rng.integers(len(_VOC_CATEGORIES)))]
        radius = rng.uniform(14, 28)
        if k == 1 and number % 3 == 1:
            # Overlap the first object on purpose: shared pixels become "ignore".
            first = centers[0]
            center = (first[0] + rng.uniform(-0.8, 0.8) * radius,
                      first[1] + rng.uniform(-0.6, 0.6) * radius)
        else:
            center = (rng.uniform(0.15, 0.85) * width, rng.uniform(0.2, 0.8) * height)
        centers.append(center)
        parts = [_random_polygon(rng, center, radius)]
        if k == 0 and number % 5 == 3:
            # A second, separate part of the same instance (an occluded object).
            offset = (radius * 1.8 if center[0] < width / 2 else -radius * 1.8)
            parts.append(_random_polygon(rng, (center[0] + offset, center[1]), radius * 0.5))
        objects.append((entry, parts, None))
    return objects


def _annotate(objects: list, width: int, height: int
              ) -> tuple[list[dict[str, Any]], list[tuple[tuple, np.ndarray]]]:
    """COCO annotations of ``objects`` and each one's (category entry, boolean mask)."""
    annotations = []
    masks = []
    for entry, parts, crowd in objects:
        if crowd is not None:
            segmentation: Any = _uncompressed_rle(crowd)
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            segmentation = parts
            rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
        mask = mask_utils.decode(rle).astype(bool)
        masks.append((entry, mask))
        annotations.append({
            "category_id": entry[0],
            "segmentation": segmentation,
            "area": float(mask_utils.area(rle)),
            "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
            "iscrowd": int(crowd is not None),
        })
    return annotations, masks


def _paint(rng: np.random.Generator, masks: list[tuple[tuple, np.ndarray]], width: int,
           height: int) -> np.ndarray:
    """The image: a grey, blotchy background unlike any object's, each object in its colour
    and texture, and noise."""
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 2 * np.pi, 2)
    blotches = np.sin(x / 9.0 + phase[0]) * np.cos(y / 7.0 + phase[1])
    grey = rng.uniform(105, 150)
    image = np.empty((height, width, 3), dtype=np.float32)
    image[:] = grey + 18 * blotches[..., None]
    image += rng.uniform(-6, 6, 3)
    for entry, mask in masks:
        colour = np.asarray(entry[3], dtype=np.float32) * rng.uniform(0.85, 1.1)
        pattern = _texture(entry[4], width, height)[..., None]
        painted = colour * (1.0 - 0.3 * pattern)
        image[mask] = painted[mask]
    image += rng.normal(0, 5, image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _write_split(root: Path, split: str, seed: int, count: int,
                 image_size: tuple[int, int]) -> None:
    width, height = image_size
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    annotation_id = _FIRST_IMAGE_ID[split] * 100
    for number in range(count):
        image_id = _FIRST_IMAGE_ID[split] + number
        pixels, image_annotations = _make_image(rng, number, width, height, split == "train")
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(folder / file_name, format="JPEG", quality=92)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width,
                       "license": 0})
        for annotation in image_annotations:
            annotations.append({"id": annotation_id, "image_id": image_id, **annotation})
            annotation_id += 1
    categories = [{"id": category_id, "name": name, "supercategory": supercategory}
                  for category_id, name, supercategory, _, _ in DEMO_CATEGORIES]
    document = {
        "info": {"description": f"deeplab demo dataset ({split}, seed {seed})", "version": "1.0"},
        "licenses": [{"id": 0, "name": "generated, public domain"}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"instances_{split}2017.json", "w", encoding="utf-8") as file:
        json.dump(document, file)


def generate_demo_dataset(
    root: str | os.PathLike,
    seed: int = 0,
    num_train: int = 100,
    num_val: int = 25,
    image_size: tuple[int, int] = (160, 120),
) -> str:
    """Write a demo dataset in the COCO 2017 layout under ``root`` (created if needed).

    ``root/{train2017,val2017}/*.jpg`` and ``root/annotations/instances_{train,val}2017.json``
    with real COCO category ids and names: person, car, bird, cat, dog (Pascal VOC classes) and
    giraffe (not one, so background). The same seed gives byte-identical files. Every train image
    has more than 1000 annotated pixels, so all ``num_train`` images survive the train filter.

    Args:
        image_size: ``(width, height)`` in pixels.

    Returns:
        ``root`` as a string.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got {num_train} and {num_val}")
    root = Path(root)
    _write_split(root, "train", seed, num_train, image_size)
    _write_split(root, "val", seed, num_val, image_size)
    return str(root)


def _is_complete(root: Path) -> bool:
    return all((root / name).is_dir() for name in ("train2017", "val2017")) and all(
        (root / "annotations" / f"instances_{split}2017.json").is_file() for split in _SPLIT_STREAMS
    )


def ensure_demo_dataset(root: str | os.PathLike, seed: int = 0) -> str:
    """Return ``root``, generating the demo dataset there first unless it already holds one.

    The data is written into a temporary folder beside ``root`` and renamed into place, so a
    crash never leaves half a dataset and concurrent callers (several ranks) all end up with one
    complete copy. An existing complete dataset is used as it is, whatever seed made it.

    Raises:
        DatasetError: ``root`` exists, is not empty and is not a complete dataset.
    """
    root = Path(root)
    if _is_complete(root):
        return str(root)
    if root.is_dir() and any(root.iterdir()) or root.exists() and not root.is_dir():
        raise DatasetError(
            f"demo dataset folder {root} exists but is not a complete dataset: delete it, or set "
            "DEEPLAB_DEMO_ROOT / pass --data-root to another folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not mkdtemp, which makes the folder private) so the dataset gets the umask's mode.
    temporary = root.parent / f".{root.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    os.mkdir(temporary)
    try:
        generate_demo_dataset(temporary, seed=seed)
        try:
            # rename() replaces an empty folder and fails on a non-empty one.
            os.rename(temporary, root)
            logger.info("generated the demo dataset in %s", root)
        except OSError as error:
            if not _is_complete(root):
                raise DatasetError(
                    f"demo dataset folder {root} exists but is not a complete dataset ({error}): "
                    "delete it, or set DEEPLAB_DEMO_ROOT / pass --data-root to another folder"
                ) from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return str(root)
