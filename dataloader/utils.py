"""Helpers shared by every dataset: the ignore value, robust image and mask loading, palettes,
cache locations and a collate function that drops skipped samples.

The ignore value and the palettes are defined once in :mod:`utils.labels` and re-exported here
for the dataset code; the scripts, bench/ and deploy/ import this module for the image readers
and cache locations too.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.labels import IGNORE_INDEX, color_map, palette_for  # noqa: F401  (public names here)

logger = logging.getLogger(__name__)

_Decoded = TypeVar("_Decoded")

#: ImageNet statistics used to normalise every input (torchvision backbones expect them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Pascal VOC class names, in the order of the 21-class COCO subset.
VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


class DatasetError(Exception):
    """A problem with the user's data (missing path, bad file) that a script reports in one line."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, scaling 16/32-bit data instead of clipping it."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        # 16-bit data may arrive as "I;16" or (older Pillow) as 32-bit "I": scale by the range
        # of the data type the values fit, never by the image's own maximum.
        peak = float(array.max()) if array.size else 0.0
        if image.mode.startswith("I;16") or 255 < peak <= 65535:
            max_value = 65535.0
        elif peak <= 255:
            max_value = 255.0
        else:
            max_value = peak
        array = np.clip(array / max_value * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite onto black rather than dropping alpha arbitrarily: transparent = no content.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


#: What Pillow raises for a file it cannot read. DecompressionBombError is not an OSError: without
#: it a huge image escaped as a traceback.
_DECODE_ERRORS = (
    UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError
)


def _decode_image(path: str | os.PathLike, index: int | None,
                  decode: Callable[[Image.Image], _Decoded]) -> _Decoded:
    """Open image ``path`` and return ``decode(image)``; every failure is a DatasetError."""
    where = f" (sample {index})" if index is not None else ""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path}{where} is a folder, not an image file")
    if not path.is_file():
        raise DatasetError(f"image file not found: {path}{where}")
    if path.stat().st_size == 0:
        raise DatasetError(f"image file is empty: {path}{where}")
    try:
        with Image.open(path) as image:
            return decode(image)
    except UnidentifiedImageError as error:  # Pillow's message repeats the path
        raise DatasetError(f"cannot decode image {path}{where}: not an image, or of a format "
                           f"Pillow cannot read") from error
    except _DECODE_ERRORS as error:
        raise DatasetError(f"cannot decode image {path}{where}: {error}") from error


def _full_rgb(image: Image.Image) -> Image.Image:
    image.load()
    return _to_rgb(image)


def _reduced_size(image: Image.Image) -> tuple[int, int]:
    size = image.size  # draft() changes it to the reduced size
    # JPEG: libjpeg's DCT scaling to 1/8 per side. The whole entropy-coded stream is still
    # decoded, so truncated or corrupt data fails as in a full decode; colour conversion and
    # most of the inverse DCT are skipped. Other formats ignore draft() and decode fully.
    image.draft(None, (max(size[0] // 8, 1), max(size[1] // 8, 1)))
    _full_rgb(image)
    return size


def load_image(
    path: str | os.PathLike, index: int | None = None, exif_transpose: bool = False
) -> Image.Image:
    """Load an image as 8-bit RGB.

    By default in stored-pixel orientation (EXIF rotation is not applied: dataset labels are drawn
    on the stored pixels); ``exif_transpose`` turns it as its EXIF orientation says, i.e. as image
    viewers display it. Grayscale, CMYK, palette, RGBA and 16-bit files are converted to correct
    RGB. Missing, empty, truncated or undecodable files and folders raise :class:`DatasetError`
    naming the file (and the sample index when given); truncated files are never padded silently.
    """
    if exif_transpose:
        return _decode_image(path, index, lambda image: _full_rgb(ImageOps.exif_transpose(image)))
    return _decode_image(path, index, _full_rgb)


#: Pillow modes of 8-bit images, read as today: converted to RGB (grey "L" and "1" are one band
#: when a dataset's first image is grey).
_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA", "LAB", "HSV")
#: TIFF modes Pillow reads with every band; others (RGBA, 16-bit, multi-band) go to tifffile.
_PILLOW_TIFF_MODES = ("1", "L", "P", "RGB")
_TIFF_SUFFIXES = (".tif", ".tiff")
#: The pixel scale, one rule in training, evaluation, inference and export: integers divided by
#: their type's largest value (uint8 / 255, uint16 / 65535), floats as they are.
_UNIT_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def _tiff_bands(path: Path) -> np.ndarray:
    """A TIFF's first image as ``(H, W, C)`` with tifffile (multi-band, 16-bit, float)."""
    import tifffile  # only TIFFs Pillow cannot read need it

    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        array, axes = series.asarray(), series.axes
    if array.ndim == 2:
        return array[..., None]
    if array.ndim == 3 and axes[-1] in "SC":  # samples last: (H, W, C)
        return array
    if array.ndim == 3:  # planar: (C, H, W)
        return np.moveaxis(array, 0, -1)
    raise ValueError(f"holds a {array.ndim}-d image of axes {axes}; expected 2-d or 3-d")


def _pillow_pixels(image: Image.Image) -> Image.Image | np.ndarray:
    if image.mode in _EIGHT_BIT_MODES:
        image.load()
        return image
    array = np.asarray(image)
    if image.mode == "I" and array.size and 0 <= array.min() and array.max() <= 65535:
        array = array.astype(np.uint16)  # what older Pillow makes of a 16-bit grey PNG
    return array[..., None] if array.ndim == 2 else array


def read_pixels(path: str | os.PathLike, index: int | None = None,
                exif_transpose: bool = False) -> Image.Image | np.ndarray:
    """An image as stored: an 8-bit image as a PIL image (callers convert it as
    :func:`load_image` does), anything else as an ``(H, W, C)`` array of its own dtype: 16-bit
    and float grey images through Pillow, multi-band, 16-bit and float TIFFs through tifffile.

    Raises:
        DatasetError: as :func:`load_image`, naming the file.
    """
    def decode(image: Image.Image) -> Image.Image | np.ndarray:
        is_tiff = Path(path).suffix.lower() in _TIFF_SUFFIXES
        if is_tiff and image.mode not in _PILLOW_TIFF_MODES:
            raise OSError("not for Pillow")  # to tifffile, below
        return _pillow_pixels(ImageOps.exif_transpose(image) if exif_transpose else image)

    try:
        return _decode_image(path, index, decode)
    except DatasetError:
        if Path(path).suffix.lower() not in _TIFF_SUFFIXES or not Path(path).is_file():
            raise
        where = f" (sample {index})" if index is not None else ""
        try:
            return _tiff_bands(Path(path))
        except Exception as error:  # tifffile raises many kinds for a bad file
            raise DatasetError(f"cannot decode TIFF {path}{where}: {error}") from None


def pixel_bands(pixels: Image.Image | np.ndarray) -> tuple[int, bool]:
    """``(channels, is 8-bit colour)`` of what :func:`read_pixels` returned: 8-bit colour
    images count as RGB (3), 8-bit grey ones as 1 band, arrays by their last axis."""
    if isinstance(pixels, Image.Image):
        return (1, False) if pixels.mode in ("1", "L") else (3, True)
    return pixels.shape[-1], False


def probe_bands(path: str | os.PathLike) -> tuple[int, bool] | None:
    """:func:`pixel_bands` of ``path`` from its header alone (no pixel is decoded), or None
    for a file that cannot be read (its reader names it later)."""
    is_tiff = Path(path).suffix.lower() in _TIFF_SUFFIXES
    try:
        with Image.open(path) as image:
            mode = image.mode
        if not is_tiff or mode in _PILLOW_TIFF_MODES:
            if mode in ("1", "L") or mode not in _EIGHT_BIT_MODES:
                return 1, False
            return 3, True
    except _DECODE_ERRORS:
        if not is_tiff:
            return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            shape, axes = tiff.series[0].shape, tiff.series[0].axes
    except Exception:  # tifffile raises many kinds for a bad file
        return None
    if len(shape) == 2:
        return 1, False
    return (shape[-1] if axes[-1] in "SC" else shape[0]), False


def unit_array(pixels: Image.Image | np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """``(H, W, C)`` pixels on the one scale (:data:`_UNIT_SCALE`: uint8 / 255, uint16 / 65535,
    floats as they are; an 8-bit grey PIL image is one band), in ``dtype``.

    Raises:
        ValueError: an integer type other than uint8 and uint16.
    """
    if isinstance(pixels, Image.Image):
        pixels = np.asarray(pixels, dtype=np.uint8)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if pixels.dtype.kind == "f":
        return pixels.astype(dtype)
    if pixels.dtype in _UNIT_SCALE:
        return pixels.astype(dtype) / dtype(_UNIT_SCALE[pixels.dtype])
    raise ValueError(f"pixels of type {pixels.dtype}: read are uint8, uint16 and float")


def unit_scaled(pixels: Image.Image | np.ndarray) -> torch.Tensor:
    """:func:`unit_array` as a float32 ``(C, H, W)`` tensor, the model's input before
    normalisation."""
    array = unit_array(pixels, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def verify_image(path: str | os.PathLike, index: int | None = None) -> tuple[int, int]:
    """Check that :func:`load_image` would read ``path``, at a fraction of its cost.

    JPEGs are decoded at 1/8 scale (which still reads every byte of compressed data, so a
    truncated file is found), other formats in full.

    Returns:
        ``(width, height)`` of the full-size image.

    Raises:
        DatasetError: as :func:`load_image` would, naming the file.
    """
    return _decode_image(path, index, _reduced_size)


def load_label(
    path: str | os.PathLike,
    size: tuple[int, int],
    num_classes: int,
    index: int | None = None,
) -> Image.Image:
    """Load a class-index mask (PNG, one class id per pixel, 255 = ignore) as a PIL "L" image.

    Args:
        path: mask file; palette PNGs are read as indices, not colours, and 1-bit PNGs as 0/1.
        size: ``(width, height)`` of the matching image; a different size is an error.
        num_classes: ids ``>= num_classes`` other than 255 are an error.
    """
    where = f" (sample {index})" if index is not None else ""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"mask file not found: {path}{where}")
    try:
        with Image.open(path) as mask:
            mask.load()
            if mask.mode not in ("1", "P", "L", "I", "I;16", "I;16B", "I;16L"):
                raise DatasetError(
                    f"mask {path}{where} has mode {mask.mode}; expected one class index per pixel "
                    "(a palette or grayscale PNG; --dataset folder reads colour masks with "
                    "--mask-format color, see doc/custom_dataset.md)"
                )
            # A 1-bit mask (PIL's mode "1", what it writes for a boolean array) reads as booleans:
            # as uint8 they are the classes 0 and 1.
            array = np.asarray(mask, dtype=np.uint8 if mask.mode == "1" else None)
    except _DECODE_ERRORS as error:
        raise DatasetError(f"cannot decode mask {path}{where}: {error}") from error
    if (array.shape[1], array.shape[0]) != tuple(size):
        raise DatasetError(
            f"mask {path}{where} is {array.shape[1]}x{array.shape[0]} but its image is "
            f"{size[0]}x{size[1]}"
        )
    bad = (array >= num_classes) & (array != IGNORE_INDEX)
    if bad.any():
        raise DatasetError(
            f"mask {path}{where} has class index {int(array[bad].max())} but the dataset has "
            f"{num_classes} classes (valid: 0-{num_classes - 1} and {IGNORE_INDEX} = ignore)"
        )
    return Image.fromarray(array.astype(np.uint8), mode="L")


def default_cache_dir() -> Path:
    """Where derived data (index caches, class weights) goes unless ``--cache-dir`` says otherwise.

    Never the dataset folder: ``$DEEPLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/deeplab``, else
    ``~/.cache/deeplab``.
    """
    if os.environ.get("DEEPLAB_CACHE_DIR"):
        return Path(os.environ["DEEPLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deeplab"


def file_fingerprint(*paths: str | os.PathLike) -> str:
    """A short key that changes when any of the files changes (path, size and mtime in ns)."""
    digest = hashlib.sha1()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def collate_skipping_bad(batch: list[Any]) -> dict[str, Any]:
    """Collate samples, dropping those a dataset returned as ``None`` (``--skip-bad-images``).

    Returns the default-collated batch plus ``"skipped"``: how many samples were dropped, so the
    training loop can report the count however many workers produced the batch. A batch whose
    samples were all skipped has no ``"image"`` key.
    """
    kept = [sample for sample in batch if sample is not None]
    out: dict[str, Any] = torch.utils.data.default_collate(kept) if kept else {}
    out["skipped"] = len(batch) - len(kept)
    return out


def require_path(path: str | os.PathLike, kind: str, hint: str) -> Path:
    """Return ``path`` if it exists, else raise a one-line :class:`DatasetError`.

    Args:
        path: the folder or file a dataset needs.
        kind: ``"folder"`` or ``"file"``; what ``path`` must be.
        hint: the fix, e.g. ``"set DEEPLAB_VOC_ROOT=... or pass --data-root"``.
    """
    path = Path(path)
    exists = path.is_dir() if kind == "folder" else path.is_file()
    if not exists:
        raise DatasetError(f"{kind} not found: {path}; {hint}")
    return path


def image_size(path: str | os.PathLike, index: int | None = None) -> tuple[int, int]:
    """``(width, height)`` of an image or mask from its header alone, without decoding pixels."""
    where = f" (sample {index})" if index is not None else ""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError as error:
        raise DatasetError(f"file not found: {path}{where}") from error
    except _DECODE_ERRORS as error:
        raise DatasetError(f"cannot read {path}{where}: {error}") from error


def summarize_names(names: Sequence[str], limit: int = 5) -> str:
    """``"a, b, c, ... (12 in all)"``: the first ``limit`` names for a one-line error message."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def pair_by_stem(
    image_dir: Path,
    mask_dir: Path,
    image_suffixes: Sequence[str],
    mask_suffixes: Sequence[str] = (".png",),
) -> list[tuple[str, str]]:
    """Pair ``image_dir/<name>.<image suffix>`` with ``mask_dir/<name>.<mask suffix>``.

    Suffixes match case-insensitively; hidden files and other suffixes are ignored. An image
    without a mask, a mask without an image, or two images with one name raise a one-line
    :class:`DatasetError` that lists the first few names.

    Returns:
        ``(image path, mask path)`` pairs as strings, sorted by name.
    """

    def by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if entry.name.startswith(".") or suffix.lower() not in suffixes:
                    continue
                if stem in found:
                    raise DatasetError(
                        f"two files named {stem} in {folder}: {os.path.basename(found[stem])} and "
                        f"{entry.name}; keep one"
                    )
                found[stem] = entry.path
        return found

    images = by_stem(image_dir, [s.lower() for s in image_suffixes])
    masks = by_stem(mask_dir, [s.lower() for s in mask_suffixes])
    if not images:
        raise DatasetError(
            f"no images ({', '.join(image_suffixes)}) found in {image_dir}; check --data-root"
        )
    without_mask = sorted(set(images) - set(masks))
    if without_mask:
        raise DatasetError(
            f"{len(without_mask)} image(s) in {image_dir} have no mask in {mask_dir}: "
            f"{summarize_names(without_mask)}; add <name>{mask_suffixes[0]} masks or remove "
            "the images"
        )
    without_image = sorted(set(masks) - set(images))
    if without_image:
        raise DatasetError(
            f"{len(without_image)} mask(s) in {mask_dir} have no image in {image_dir}: "
            f"{summarize_names(without_image)}; image files must end in "
            f"{', '.join(image_suffixes)}"
        )
    return [(images[stem], masks[stem]) for stem in sorted(images)]
