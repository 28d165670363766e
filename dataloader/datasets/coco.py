"""COCO 2017 instance annotations read as 21-class (Pascal VOC) semantic segmentation.

Labels follow torchvision's ``references/segmentation/coco_utils.py``: only the 20 COCO categories
that are also Pascal VOC classes are kept (every other category is background), each kept
annotation is rasterised with pycocotools, the label is the largest class over the instances, and a
pixel covered by two or more kept instances is ignored (255). The train split keeps only images
whose kept annotations declare a total ``area`` above 1000 pixels; val keeps every image.

The index is built from the annotation JSON alone, without rasterising anything, and is held in a
few flat numpy arrays (one byte buffer of per-image annotations plus offsets) rather than Python
dicts, so forked DataLoader workers share it instead of copying it page by page when they read it
(reference counting writes to every Python object it touches). It is cached next to other derived
data, keyed by the annotation file's fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from dataloader.datasets.base import Sample, SegmentationDataset
from dataloader.utils import (
    IGNORE_INDEX,
    VOC_CLASS_NAMES,
    DatasetError,
    default_cache_dir,
    file_fingerprint,
    load_image,
    verify_image,
)
from utils.fileio import atomic_write

logger = logging.getLogger(__name__)

#: COCO category id of each class: class ``i`` is ``COCO_CATEGORY_IDS[i]`` (0 = background).
#: The order is Pascal VOC's, so class names are ``VOC_CLASS_NAMES``.
COCO_CATEGORY_IDS = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]

#: A train image is kept only if its kept annotations declare more than this many pixels in total.
MIN_TRAIN_AREA = 1000

SPLITS = ("train", "val")

#: Bump when the cached index layout or the rules that fill it change.
_INDEX_VERSION = 1
_INDEX_KEYS = ("ids", "heights", "widths", "name_offsets", "name_bytes", "ann_offsets", "ann_bytes")

#: Polygon coordinates are clipped to this many image sizes around the image: pycocotools walks
#: every boundary pixel of a polygon, so one absurd coordinate would otherwise cost unbounded
#: time and memory. Real annotations lie within a pixel or two of the image.
_COORDINATE_MARGIN = 4

_CATEGORY_TO_CLASS = {category: index for index, category in enumerate(COCO_CATEGORY_IDS)}


def _root_hint() -> str:
    return "set DEEPLAB_COCO_ROOT=/path/to/coco or pass --data-root"


def _compressed_rle_counts(counts: bytes) -> list[int]:
    """Decode the counts of a compressed RLE string (pycocotools' ``rleFrString``, in Python).

    Used only to validate a compressed RLE before pycocotools decodes it: its C decoder writes
    ``sum(counts)`` bytes into an ``h * w`` buffer without checking.
    """
    values: list[int] = []
    position = 0
    while position < len(counts):
        value = shift = 0
        more = True
        while more:
            if position >= len(counts):
                raise ValueError("compressed RLE counts end in the middle of a number")
            char = counts[position] - 48
            if not 0 <= char < 64:
                raise ValueError(f"compressed RLE counts contain the byte {counts[position]!r}")
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            position += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return values


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any] | None:
    """The run-length encoding of one annotation's ``segmentation`` on a ``height x width`` image.

    Polygons (a list of flat ``[x0, y0, x1, y1, ...]`` lists, parts OR-ed together), uncompressed
    RLE (``{"counts": [ints], "size": [h, w]}``, used by crowd regions) and compressed RLE
    (``counts`` a string) are accepted. Polygon parts with fewer than 3 points are dropped (they
    cover nothing, and pycocotools would read a 4-number list as a box); a trailing odd
    coordinate is dropped as pycocotools does. Rasterisation clips to the image.

    Returns:
        A pycocotools RLE dict, or ``None`` when no polygon part is left.

    Raises:
        ValueError: a segmentation that is not one of these forms, a non-numeric or non-finite
            coordinate, or an RLE whose size or pixel count does not match the image.
    """
    if isinstance(segmentation, list):
        limit = _COORDINATE_MARGIN * max(height, width)
        polygons = []
        for part in segmentation:
            try:
                coordinates = np.asarray(part, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError) as error:
                raise ValueError(f"polygon with non-numeric coordinates: {error}") from None
            coordinates = coordinates[: coordinates.size - coordinates.size % 2]
            if coordinates.size < 6:
                continue
            if not np.isfinite(coordinates).all():
                raise ValueError("polygon with a non-finite coordinate")
            polygons.append(np.clip(coordinates, -limit, limit))
        if not polygons:
            return None
        rles = mask_utils.frPyObjects(polygons, height, width)
        return rles[0] if len(rles) == 1 else mask_utils.merge(rles)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if list(size) != [height, width]:
            raise ValueError(f"RLE of size {size} on an image of size [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            values = np.asarray(counts)
            if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
                raise ValueError("uncompressed RLE counts must be a flat list of integers")
            if (values < 0).any() or int(values.sum()) != height * width:
                raise ValueError(f"uncompressed RLE counts do not add up to {height} x {width}")
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, (str, bytes)):
            encoded = counts.encode("ascii") if isinstance(counts, str) else counts
            values_list = _compressed_rle_counts(encoded)
            if any(value < 0 for value in values_list) or sum(values_list) != height * width:
                raise ValueError(f"compressed RLE counts do not add up to {height} x {width}")
            return {"size": [height, width], "counts": encoded}
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


def annotations_to_label(
    annotations: Sequence[tuple[int, Any]], height: int, width: int
) -> np.ndarray:
    """Rasterise ``(class index, segmentation)`` pairs into one semantic label.

    Returns:
        ``(height, width)`` uint8 array: the largest class among the instances covering a pixel,
        0 where none does, and 255 where two or more instances overlap.
    """
    rles = []
    classes = []
    for class_index, segmentation in annotations:
        rle = segmentation_to_rle(segmentation, height, width)
        if rle is not None:
            rles.append(rle)
            classes.append(class_index)
    if not rles:
        return np.zeros((height, width), dtype=np.uint8)
    # decode() returns (H, W, N) in Fortran order; transposing gives C-ordered (N, W, H) planes.
    masks = mask_utils.decode(rles).transpose(2, 1, 0)
    label = np.zeros(masks.shape[1:], dtype=np.uint8)
    covered = np.zeros(masks.shape[1:], dtype=bool)
    overlap = np.zeros(masks.shape[1:], dtype=bool)
    for mask, class_index in zip(masks, classes):
        instance = mask.view(bool)
        overlap |= covered & instance
        covered |= instance
        np.maximum(label, mask * np.uint8(class_index), out=label)
    label[overlap] = IGNORE_INDEX
    return np.ascontiguousarray(label.T)


def _join(chunks: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate byte strings into one uint8 buffer plus ``len(chunks) + 1`` int64 offsets."""
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(chunk) for chunk in chunks], out=offsets[1:])
    buffer = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return offsets, buffer


def _read_annotation_file(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """The parsed COCO instances file and its annotations list.

    Raises:
        DatasetError: the file cannot be read, is not valid JSON, or its ``images`` or
            ``annotations`` entry is not a list, naming the file.
    """
    try:
        with open(path, "rb") as file:
            data = json.load(file)
    except (ValueError, RecursionError) as error:
        raise DatasetError(f"cannot parse COCO annotation file {path}: {error}") from None
    except OSError as error:
        raise DatasetError(f"cannot read COCO annotation file {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"COCO annotation file {path} has no 'images' list")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DatasetError(
            f"COCO annotation file {path} has an 'annotations' entry that is not a list"
        )
    return data, annotations


def build_index(annotation_file: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """Read a COCO instances file into the flat arrays :class:`COCOSegmentation` keeps.

    Nothing is rasterised. Images are sorted by id; per image, the kept annotations are stored as
    a compact JSON list of ``[class index, segmentation]``.

    Raises:
        DatasetError: the file is not valid JSON or lacks the COCO fields, naming the file.
    """
    path = Path(annotation_file)
    data, annotations = _read_annotation_file(path)
    try:
        images = {image["id"]: image for image in data["images"]}
        kept: dict[int, list[Any]] = {}
        area: dict[int, float] = {}
        for annotation in annotations:
            class_index = _CATEGORY_TO_CLASS.get(annotation["category_id"])
            if class_index is None:
                continue
            image_id = annotation["image_id"]
            kept.setdefault(image_id, []).append([class_index, annotation["segmentation"]])
            area[image_id] = area.get(image_id, 0.0) + float(annotation["area"])
        del data, annotations
        ids = sorted(images)
        if split == "train":
            ids = [image_id for image_id in ids if area.get(image_id, 0.0) > MIN_TRAIN_AREA]
        heights = np.array([images[image_id]["height"] for image_id in ids], dtype=np.int32)
        widths = np.array([images[image_id]["width"] for image_id in ids], dtype=np.int32)
        names = [str(images[image_id]["file_name"]).encode("utf-8") for image_id in ids]
        id_array = np.array(ids, dtype=np.int64)
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(
            f"COCO annotation file {path} has a malformed image or annotation entry "
            f"({type(error).__name__}: {error})"
        ) from None
    # Non-finite coordinates are kept here and rejected per sample when rasterised.
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    chunks = [dumps(kept.get(image_id, [])).encode("utf-8") for image_id in ids]
    name_offsets, name_bytes = _join(names)
    ann_offsets, ann_bytes = _join(chunks)
    return {
        "ids": id_array,
        "heights": heights,
        "widths": widths,
        "name_offsets": name_offsets,
        "name_bytes": name_bytes,
        "ann_offsets": ann_offsets,
        "ann_bytes": ann_bytes,
    }


def _load_cached_index(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            index = {key: archive[key] for key in _INDEX_KEYS}
    except (OSError, ValueError, KeyError, EOFError) as error:
        logger.warning("ignoring unreadable index cache %s: %s", path, error)
        return None
    return index


def _save_cached_index(path: Path, index: dict[str, np.ndarray]) -> None:
    """Write atomically (temporary file + rename) so a crash or a parallel run never leaves half a
    cache; a cache that cannot be written only costs the next start its speed."""
    try:
        atomic_write(path, lambda file: np.savez(file, **index))
    except OSError as error:
        logger.warning("cannot write index cache %s: %s", path, error)
        return
    # Older caches of the same annotation file are stale now.
    for stale in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.npz"):
        if stale != path:
            try:
                stale.unlink()
            except OSError:
                pass


class COCOSegmentation(SegmentationDataset):
    """COCO 2017 as 21-class segmentation with Pascal VOC classes (torchvision's rules).

    Expects the official layout: ``root/{train2017,val2017}/`` with the images and
    ``root/annotations/instances_{train,val}2017.json``. ``ids[i]`` is the COCO image id of item
    ``i`` (ascending). Without a transform, ``ds[i]`` is ``{"image": PIL RGB, "label": PIL "L"}``
    with label values 0-20 and 255; images are used in stored-pixel orientation (no EXIF
    rotation), as the annotations are.

    Args:
        root: dataset folder.
        split: ``"train"`` or ``"val"``.
        transform: called on the sample dict.
        skip_bad_images: return ``None`` for an unreadable sample instead of raising.
        cache_dir: where the index cache goes (default :func:`dataloader.utils.default_cache_dir`);
            never the dataset folder.
    """

    class_names = VOC_CLASS_NAMES

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable[[Sample], Any] | None = None,
        skip_bad_images: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(transform=transform, skip_bad_images=skip_bad_images)
        if split not in SPLITS:
            raise ValueError(f"COCO split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        self.split = split
        self.image_dir = self.root / f"{split}2017"
        self.annotation_file = self.root / "annotations" / f"instances_{split}2017.json"
        if not self.root.is_dir():
            raise DatasetError(f"COCO root {self.root} does not exist: {_root_hint()}")
        if not self.image_dir.is_dir():
            raise DatasetError(
                f"COCO image folder {self.image_dir} does not exist: {_root_hint()}"
            )
        if not self.annotation_file.is_file():
            raise DatasetError(
                f"COCO annotation file {self.annotation_file} does not exist: {_root_hint()}"
            )
        self._fingerprint = file_fingerprint(self.annotation_file)
        index = self._load_index(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        self.ids: np.ndarray = index["ids"]
        self._heights = index["heights"]
        self._widths = index["widths"]
        self._name_offsets = index["name_offsets"]
        self._name_bytes = index["name_bytes"]
        self._ann_offsets = index["ann_offsets"]
        self._ann_bytes = index["ann_bytes"]

    def _load_index(self, cache_dir: Path) -> dict[str, np.ndarray]:
        path_key = hashlib.sha1(str(self.annotation_file.resolve()).encode()).hexdigest()[:12]
        cache_file = (
            cache_dir / "coco"
            / f"index-v{_INDEX_VERSION}-{self.split}-{path_key}-{self._fingerprint}.npz"
        )
        if cache_file.is_file():
            index = _load_cached_index(cache_file)
            if index is not None:
                logger.info("loaded COCO %s index from %s", self.split, cache_file)
                return index
        start = time.perf_counter()
        index = build_index(self.annotation_file, self.split)
        logger.info(
            "indexed %d COCO %s images from %s in %.1f s",
            len(index["ids"]), self.split, self.annotation_file, time.perf_counter() - start,
        )
        _save_cached_index(cache_file, index)
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += len(self.ids)
        if not 0 <= index < len(self.ids):
            raise IndexError(f"index {index} out of range for {len(self.ids)} COCO images")
        return index

    def image_path(self, index: int) -> Path:
        """The image file of item ``index``."""
        index = self._check_index(index)
        start, end = self._name_offsets[index], self._name_offsets[index + 1]
        return self.image_dir / self._name_bytes[start:end].tobytes().decode("utf-8")

    def sample_name(self, index: int) -> str:
        return self.image_path(index).name

    def image_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of item ``index`` as the annotation file states it."""
        index = self._check_index(index)
        return int(self._widths[index]), int(self._heights[index])

    def annotations(self, index: int) -> list[tuple[int, Any]]:
        """The kept annotations of item ``index`` as ``(class index, COCO segmentation)`` pairs."""
        index = self._check_index(index)
        start, end = self._ann_offsets[index], self._ann_offsets[index + 1]
        return [tuple(pair) for pair in json.loads(self._ann_bytes[start:end].tobytes())]

    def label_array(self, index: int) -> np.ndarray:
        """``(H, W)`` uint8 label of item ``index`` (see :func:`annotations_to_label`).

        Raises:
            DatasetError: an annotation cannot be rasterised, naming the file and the image id.
        """
        index = self._check_index(index)
        width, height = self.image_size(index)
        try:
            return annotations_to_label(self.annotations(index), height, width)
        except ValueError as error:
            raise DatasetError(
                f"bad annotation of image {int(self.ids[index])} (sample {index}) in "
                f"{self.annotation_file}: {error}"
            ) from None

    def label_at(self, index: int) -> Image.Image:
        return Image.fromarray(self.label_array(index))

    def _check_image_size(self, index: int, path: Path, size: tuple[int, int]) -> None:
        if size != self.image_size(index):
            width, height = self.image_size(index)
            raise DatasetError(
                f"image {path} (sample {index}) is {size[0]}x{size[1]} but "
                f"{self.annotation_file} says {width}x{height}"
            )

    def load_sample(self, index: int) -> tuple[Image.Image, Image.Image]:
        index = self._check_index(index)
        path = self.image_path(index)
        image = load_image(path, index=index)
        self._check_image_size(index, path, image.size)
        return image, Image.fromarray(self.label_array(index))

    def check_sample(self, index: int) -> np.ndarray:
        """The image decoded at reduced size (its size from its header), the label in full."""
        index = self._check_index(index)
        path = self.image_path(index)
        self._check_image_size(index, path, verify_image(path, index=index))
        return self.label_array(index)

    def cache_key(self) -> str:
        return f"coco-{self.split}-v{_INDEX_VERSION}-{self._fingerprint}"
