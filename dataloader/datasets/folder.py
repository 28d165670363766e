"""Your own data: a folder of images and masks paired by file name.

Layout (see doc/custom_dataset.md for a worked example)::

    root/classes.txt                 optional: one class per line, line i = class id i
    root/images/<split>/<name>.jpg   also .jpeg, .png, .bmp, .tif, .tiff (any bands, 8/16-bit, float)
    root/masks/<split>/<name>.png    a mask per image, in one of the MASK_FORMATS

Mask formats (``mask_format``, ``--mask-format``):

- ``index``: one class id per pixel, 255 = ignore. With ``reduce_zero_label`` (mmsegmentation's
  option), 0 means unlabelled and becomes 255, and id ``k`` becomes class ``k - 1``.
- ``binary``: 0 is class 0 (background), any other value class 1 (foreground): 0/255 and 0/1
  masks both read. Classes: ``background, foreground`` unless ``classes.txt`` names two.
- ``color``: RGB colours, one per class, listed in ``classes.txt`` as ``name R G B`` or
  ``name #RRGGBB``; a colour not listed is an error naming the mask.

Images: the first image of the split sets the channel count. 8-bit colour images are read as RGB,
exactly as COCO's (ImageNet normalisation). Others are read with every band: 8-bit grey (1
band), 16-bit grey PNG, and TIFFs of any band count in uint8, uint16 or float32 (tifffile), on
one scale: uint8 / 255, uint16 / 65535, floats as they are. An image whose band count or kind
differs from the first is an error naming both files.

Number of classes: the number of names in ``classes.txt``. Without it (index masks), every mask
of every split under ``root/masks/`` is read once and the classes are ``class_0 .. class_<largest
id>``, so train and val agree even when a split lacks the last class. A class id at or beyond the
class count is an error that names the mask.

When the format is not given, the first masks of the split are looked at: 0/255 masks, RGB masks
and ids that start at 1 stop the build with one line naming the flag that reads them (a run would
otherwise learn 255 as ignore, fail on every colour mask, or shift every class by one).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from dataloader.datasets.base import PairedFileDataset
from dataloader.utils import (
    IGNORE_INDEX,
    DatasetError,
    file_fingerprint,
    image_size,
    load_label,
    pair_by_stem,
    palette_for,
    pixel_bands,
    probe_bands,
    read_pixels,
    require_path,
    summarize_names,
    unit_scaled,
)
from dataloader.utils import _DECODE_ERRORS  # what Pillow raises for a bad file, defined once

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = (".png",)
CLASSES_FILE = "classes.txt"
#: Class ids 0-254; 255 is the ignore value.
MAX_CLASSES = IGNORE_INDEX
#: How masks encode classes (``--mask-format``); see the module docstring.
MASK_FORMATS = ("index", "binary", "color")
#: Masks of a split looked at to recognise an encoding the flags do not name.
SNIFFED_MASKS = 16
BINARY_CLASS_NAMES = ("background", "foreground")
_COLOUR_SYNTAX = "lines 'name R G B' or 'name #RRGGBB'"

# Class-id scans already done in this process, keyed by the masks' fingerprint, so building the
# val split after the train split does not read every mask again.
_class_ids_by_fingerprint: dict[str, "ClassIds"] = {}


class ClassIds(NamedTuple):
    """What a scan of every index mask found (255 excluded)."""

    largest: int
    has_zero: bool


def _named_colour(line: str) -> tuple[str, tuple[int, int, int]] | None:
    """``(name, RGB)`` of a classes.txt line that ends in a colour, or None."""
    words = line.split()
    if len(words) >= 2 and re.fullmatch(r"#[0-9a-fA-F]{6}", words[-1]):
        rgb = tuple(int(words[-1][i:i + 2], 16) for i in (1, 3, 5))
        return " ".join(words[:-1]), rgb  # type: ignore[return-value]
    if len(words) >= 4 and all(re.fullmatch(r"\d{1,3}", word) for word in words[-3:]):
        rgb = tuple(int(word) for word in words[-3:])
        if max(rgb) <= 255:
            return " ".join(words[:-3]), rgb  # type: ignore[return-value]
    return None


def read_classes(path: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...] | None]:
    """Class names and, when every line gives one, their RGB colours from ``classes.txt``.

    A line is ``name``, ``name R G B`` (0-255 each) or ``name #RRGGBB``; outer spaces and blank
    lines are ignored, and a name may hold spaces. Either every line has a colour or none does.

    Raises:
        DatasetError: no classes, too many, repeated names or colours, or colours on some lines
            only; the message names the file.
    """
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    if not lines:
        raise DatasetError(f"{path} names no classes; write one class name per line")
    if len(lines) > MAX_CLASSES:
        raise DatasetError(
            f"{path} names {len(lines)} classes; at most {MAX_CLASSES} are supported "
            f"({IGNORE_INDEX} is the ignore value)"
        )
    named = [_named_colour(line) for line in lines]
    with_colour = sum(pair is not None for pair in named)
    if 0 < with_colour < len(lines):
        raise DatasetError(f"{path}: {with_colour} of {len(lines)} lines give a colour; give "
                           f"every class a colour ({_COLOUR_SYNTAX}) or none")
    names = tuple(pair[0] for pair in named) if with_colour else tuple(lines)  # type: ignore
    colours = tuple(pair[1] for pair in named) if with_colour else None  # type: ignore
    for what, values in (("class names", names), ("colours", colours or ())):
        duplicates = sorted({str(value) for value in values if values.count(value) > 1})
        if duplicates:
            raise DatasetError(f"{path} repeats {what}: {summarize_names(duplicates)}")
    return names, colours


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from ``classes.txt`` (see :func:`read_classes`; colours are dropped)."""
    return read_classes(path)[0]


def _mask_paths(masks_root: Path) -> list[str]:
    paths = []
    for split_dir in sorted(masks_root.iterdir()):
        if split_dir.is_dir() and not split_dir.name.startswith("."):
            paths += sorted(
                str(path) for path in split_dir.iterdir()
                if path.suffix.lower() in MASK_SUFFIXES and not path.name.startswith(".")
            )
    return paths


def scan_class_ids(masks_root: Path, skip_bad_images: bool = False) -> ClassIds:
    """The largest class id (255 excluded) in any index mask of any split under ``masks_root``,
    and whether any mask holds id 0.

    Raises:
        DatasetError: a mask is not an index image, holds an id above 254, or no mask holds any
            id but 255. Unreadable masks are skipped with a warning when ``skip_bad_images``.
    """
    paths = _mask_paths(masks_root)
    fingerprint = file_fingerprint(*paths)
    if fingerprint in _class_ids_by_fingerprint:
        return _class_ids_by_fingerprint[fingerprint]
    logger.warning(
        "no %s in %s: reading all %d masks to count the classes; write the class names there "
        "to skip this and name the classes", CLASSES_FILE, masks_root.parent, len(paths)
    )
    largest, has_zero = -1, False
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
            largest, has_zero = max(largest, int(values.max())), has_zero or values[0] == 0
    if largest < 0:
        raise DatasetError(
            f"no mask under {masks_root} has a class id other than {IGNORE_INDEX}; "
            f"check the masks or write {masks_root.parent / CLASSES_FILE}"
        )
    _class_ids_by_fingerprint[fingerprint] = ClassIds(largest, has_zero)
    return _class_ids_by_fingerprint[fingerprint]


def largest_class_id(masks_root: Path, skip_bad_images: bool = False) -> int:
    """The largest class id (255 excluded) in any mask of any split (see
    :func:`scan_class_ids`)."""
    return scan_class_ids(masks_root, skip_bad_images).largest


def sniff_masks(paths: list[str]) -> tuple[str | None, set[int]]:
    """Look at the first :data:`SNIFFED_MASKS` masks: ``(the first RGB one or None, the values
    of the single-channel ones)``. Unreadable files are passed over: the reader names them."""
    values: set[int] = set()
    for path in paths[:SNIFFED_MASKS]:
        try:
            with Image.open(path) as mask:
                if mask.mode in ("RGB", "RGBA"):
                    return path, values
                if mask.mode in ("1", "P", "L"):
                    array = np.asarray(mask, dtype=np.uint8 if mask.mode == "1" else None)
                    values.update(np.unique(array).tolist())
        except _DECODE_ERRORS:
            continue
    return None, values


def read_mask_array(path: str, size: tuple[int, int], mode: str,
                    index: int | None = None) -> np.ndarray:
    """The pixels of mask ``path`` converted to PIL ``mode`` ("L" or "RGB").

    Raises:
        DatasetError: the file is missing or unreadable, or its size differs from ``size`` =
            ``(width, height)`` of its image.
    """
    where = f" (sample {index})" if index is not None else ""
    if not Path(path).is_file():
        raise DatasetError(f"mask file not found: {path}{where}")
    try:
        with Image.open(path) as mask:
            array = np.asarray(mask.convert(mode))
    except _DECODE_ERRORS as error:
        raise DatasetError(f"cannot decode mask {path}{where}: {error}") from error
    if (array.shape[1], array.shape[0]) != tuple(size):
        raise DatasetError(f"mask {path}{where} is {array.shape[1]}x{array.shape[0]} but its "
                           f"image is {size[0]}x{size[1]}")
    return array


def colours_to_class_ids(rgb: np.ndarray, colours: tuple[tuple[int, int, int], ...],
                         path: str, index: int | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 colours -> ``(H, W)`` uint8 class ids, class ``i`` being
    ``colours[i]``.

    Raises:
        DatasetError: a colour that is no class's, naming the mask, the colour and its pixels.
    """
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    table = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], dtype=np.int32)
    order = np.argsort(table)
    position = np.searchsorted(table[order], codes).clip(0, len(table) - 1)
    known = table[order][position] == codes
    if not known.all():
        code = int(codes[~known][0])
        colour = (code >> 16, (code >> 8) & 255, code & 255)
        where = f" (sample {index})" if index is not None else ""
        raise DatasetError(
            f"mask {path}{where} has {int((codes == code).sum())} pixels of colour "
            f"{' '.join(map(str, colour))} (#{code:06x}) that {CLASSES_FILE} gives no class; "
            f"add a line 'name {' '.join(map(str, colour))}' for it"
        )
    return order[position].astype(np.uint8)


def reduce_zero_label(ids: np.ndarray) -> np.ndarray:
    """mmsegmentation's ``reduce_zero_label``: 0 (unlabelled) -> 255 (ignore), ``k`` -> ``k - 1``,
    255 stays ignored."""
    ids = ids.astype(np.int16)
    return np.where((ids == 0) | (ids == IGNORE_INDEX), IGNORE_INDEX, ids - 1).astype(np.uint8)


def _binary_hint(mask_dir: Path, count: int) -> str:
    return (f"the first {count} masks in {mask_dir} hold only 0 and 255: binary masks, read them "
            f"with --mask-format binary (0 = background, other values = foreground); "
            f"--mask-format index keeps 255 as the ignore value")


def _colour_hint(path: str, classes_file: Path) -> str:
    return (f"mask {path} is an RGB colour image: read colour masks with --mask-format color "
            f"and a colour per class in {classes_file} ({_COLOUR_SYNTAX})")


def _one_based_hint(where: str, ids: str) -> str:
    return (f"{where} holds class 0 ({ids}): labels that start at 1, read them with "
            f"--reduce-zero-label (0 = unlabelled -> ignored, k -> class k-1); "
            f"--no-reduce-zero-label keeps the ids as they are")


class FolderSegmentation(PairedFileDataset):
    """Images and masks in ``root/images/<split>`` and ``root/masks/<split>``.

    ``class_names`` come from ``root/classes.txt`` or, without it, from the masks (see the module
    docstring, which also describes the mask formats and the checks of an unnamed format).

    Args:
        mask_format: one of :data:`MASK_FORMATS`; ``None`` reads index masks after checking that
            the first ones are not binary (0/255) or RGB colour masks.
        reduce_zero_label: index masks store class ``k`` as ``k + 1`` and 0 = unlabelled;
            ``None`` reads them as they are after checking that the ids do not start at 1.
    """

    root_variable = "DEEPLAB_FOLDER_ROOT"  # its entry in the registry reads it

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[dict[str, Any]], Any] | None = None,
        skip_bad_images: bool = False,
        mask_format: str | None = None,
        reduce_zero_label: bool | None = None,
    ) -> None:
        super().__init__(transform=transform, skip_bad_images=skip_bad_images)
        if mask_format not in (None, *MASK_FORMATS):
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
        self.root, self.split = Path(root), split
        self.mask_format, self.reduce_zero_label = mask_format or "index", bool(reduce_zero_label)
        if self.reduce_zero_label and self.mask_format != "index":
            raise DatasetError(f"--reduce-zero-label reads index masks; it does not apply to "
                               f"--mask-format {self.mask_format}")
        hint = (
            f"set {self.root_variable} or pass --data-root to the folder that holds "
            f"images/{split}/ and masks/{split}/ (see doc/custom_dataset.md)"
        )
        require_path(self.root, "folder", hint)
        image_dir = require_path(self.root / "images" / split, "folder", hint)
        self.mask_dir = require_path(self.root / "masks" / split, "folder", hint)
        self.samples = pair_by_stem(image_dir, self.mask_dir, IMAGE_SUFFIXES, MASK_SUFFIXES)

        self.classes_file: Path | None = self.root / CLASSES_FILE
        names, self.colours = None, None
        if self.classes_file.is_file():
            names, self.colours = read_classes(self.classes_file)
        else:
            self.classes_file = None
        self._refuse_unnamed_encoding(names, mask_format, reduce_zero_label)
        self.class_names = self._read_class_names(names, reduce_zero_label)
        # The first readable image's header sets the bands (a bad file is named when read).
        self.in_channels, self.rgb8 = next(filter(None, map(probe_bands, (
            image for image, _ in self.samples[:SNIFFED_MASKS]))), (3, True))

    def _describe(self, bands: int, rgb8: bool) -> str:
        return "8-bit colour (RGB)" if rgb8 else f"{bands} band(s)"

    def image_pixels(self, index: int) -> Image.Image | np.ndarray:
        """Image ``index`` as stored (:func:`dataloader.utils.read_pixels`), for statistics."""
        pixels = read_pixels(self.samples[index][0], index)
        self._check_bands(index, pixels)
        return pixels

    def _check_bands(self, index: int, pixels: Image.Image | np.ndarray) -> None:
        bands, rgb8 = pixel_bands(pixels)
        if (bands, rgb8) != (self.in_channels, self.rgb8) and not self.rgb8:
            raise DatasetError(
                f"image {self.samples[index][0]} (sample {index}) has "
                f"{self._describe(bands, rgb8)} but the split's first images (e.g. "
                f"{self.samples[0][0]}) have {self._describe(self.in_channels, self.rgb8)}: "
                f"give every image the same bands")

    def load_image(self, index: int) -> torch.Tensor:
        """Image ``index`` as ``(C, H, W)`` float32 on the unit scale (non-RGB datasets).

        Raises:
            DatasetError: unreadable, or other bands than the split's first image, naming both.
        """
        pixels = self.image_pixels(index)
        try:
            return unit_scaled(pixels)
        except ValueError as error:
            raise DatasetError(f"image {self.samples[index][0]} (sample {index}): "
                               f"{error}") from None

    def load_sample(self, index: int) -> tuple[Any, Image.Image]:
        if self.rgb8:  # exactly as every 8-bit colour dataset is read
            return super().load_sample(index)
        image = self.load_image(index)
        return image, self.read_label(index, (image.shape[2], image.shape[1]))

    def check_sample(self, index: int) -> np.ndarray:
        if self.rgb8:
            return super().check_sample(index)
        return np.asarray(self.load_sample(index)[1])

    def _refuse_unnamed_encoding(self, names: tuple[str, ...] | None, mask_format: str | None,
                                 reduce_zero_label: bool | None) -> None:
        """Stop on masks that look binary, colour or 1-based when the flags do not say so."""
        if mask_format not in (None, "index") or (mask_format and reduce_zero_label is not None):
            return
        colour_path, values = sniff_masks([mask for _, mask in self.samples])
        looked_at = min(len(self.samples), SNIFFED_MASKS)
        if mask_format is None and colour_path is not None:
            raise DatasetError(_colour_hint(colour_path, self.root / CLASSES_FILE))
        if mask_format is None and values == {0, IGNORE_INDEX}:
            raise DatasetError(_binary_hint(self.mask_dir, looked_at))
        ids = values - {IGNORE_INDEX}
        # Ids 1..k with k classes named: read as they are, id k is out of range; shifted, all fit.
        if reduce_zero_label is None and names is not None and ids and 0 not in ids and \
                max(ids) == len(names):
            raise DatasetError(_one_based_hint(
                f"none of the first {looked_at} masks in {self.mask_dir}",
                f"ids {min(ids)}-{max(ids)}, {len(names)} classes in {self.classes_file}"))

    def _read_class_names(self, names: tuple[str, ...] | None,
                          reduce_zero_label: bool | None) -> tuple[str, ...]:
        if self.mask_format == "binary":
            if names is not None and len(names) != 2:
                raise DatasetError(f"--mask-format binary reads two classes but "
                                   f"{self.classes_file} names {len(names)}")
            return names or BINARY_CLASS_NAMES
        if self.mask_format == "color" and self.colours is None:
            raise DatasetError(f"--mask-format color needs a colour per class in "
                               f"{self.root / CLASSES_FILE} ({_COLOUR_SYNTAX})")
        if names is not None:
            return names
        ids = scan_class_ids(self.root / "masks", skip_bad_images=self.skip_bad_images)
        if not ids.has_zero and reduce_zero_label is None:
            raise DatasetError(_one_based_hint(f"no mask under {self.root / 'masks'}",
                                               f"ids up to {ids.largest}"))
        count = ids.largest + 1 - int(self.reduce_zero_label)
        if count < 1:
            raise DatasetError(f"with --reduce-zero-label no mask under {self.root / 'masks'} "
                               f"has a class (ids 1-254)")
        return tuple(f"class_{i}" for i in range(count))

    @property
    def palette(self) -> list[list[int]]:
        """The colours of ``classes.txt`` when it gives them, else the default table."""
        if self.colours is not None:
            return [list(colour) for colour in self.colours]
        return palette_for(self.num_classes)

    def read_label(self, index: int, size: tuple[int, int]) -> Image.Image:
        """The label of item ``index`` in class ids (255 = ignore), whatever the mask format."""
        path = self.samples[index][1]
        if self.mask_format == "binary":
            ids = (read_mask_array(path, size, "L", index) != 0).astype(np.uint8)
        elif self.mask_format == "color":
            ids = colours_to_class_ids(read_mask_array(path, size, "RGB", index), self.colours,
                                       path, index)
        elif not self.reduce_zero_label:
            return super().read_label(index, size)
        else:
            ids = reduce_zero_label(np.asarray(load_label(path, size, MAX_CLASSES, index=index)))
            bad = (ids >= self.num_classes) & (ids != IGNORE_INDEX)
            if bad.any():
                largest = int(ids[bad].max())
                raise DatasetError(
                    f"mask {path} (sample {index}) has id {largest + 1}, class {largest} after "
                    f"--reduce-zero-label, but the dataset has {self.num_classes} classes")
        return Image.fromarray(ids, mode="L")

    def mask_reading(self) -> str:
        if self.mask_format == "binary":
            return "binary (--mask-format binary): 0 -> class 0, any other value -> class 1"
        if self.mask_format == "color":
            return (f"colour (--mask-format color): the {len(self.colours or ())} colours of "
                    f"{self.classes_file} -> their classes")
        if self.reduce_zero_label:
            return "index with --reduce-zero-label: 0 -> 255 (ignore), id k -> class k-1"
        return "index: a class id per pixel, 255 = ignore"

    def extra_cache_files(self) -> list[str | os.PathLike]:
        return [self.classes_file] if self.classes_file is not None else []

    def cache_key(self) -> str:
        # The same files read in another format are other labels (other class weights).
        return f"{super().cache_key()}|{self.mask_format}|reduce={self.reduce_zero_label}"
