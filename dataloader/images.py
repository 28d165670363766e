"""The images inference reads: a file, a folder walked recursively, or a text file listing
paths; decoded (EXIF orientation applied by default) into uint8 tensors by loader workers.

Nothing here knows the model: a sample is the image's pixels and its size, or the reason it
could not be read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dataloader.custom_transforms import ResizeShortSide, pil_to_uint8_tensor
from dataloader.utils import DatasetError, load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: An --in-path with one of these suffixes lists one image path per line.
LIST_SUFFIXES = (".txt", ".lst")


@dataclass(frozen=True)
class InputImage:
    """One input: where it is, and its path relative to the input root (outputs mirror it)."""

    path: Path
    relative: Path


def list_inputs(in_path: str | os.PathLike) -> list[InputImage]:
    """Every input ``in_path`` names, sorted.

    - an image file: itself;
    - a folder: every file with an image suffix below it (hidden files and folders skipped);
      a folder whose name has an image suffix is listed too, so that it is reported as bad
      rather than silently read as a folder;
    - a ``.txt`` / ``.lst`` file: one path per line (blank lines and ``#`` comments skipped),
      relative paths taken from the list's folder; outputs mirror the paths below the deepest
      folder they share. Listed paths are not checked here: a missing one fails when read.

    Raises:
        DatasetError: ``in_path`` is missing or is another kind of file.
    """
    in_path = Path(in_path)
    if in_path.is_dir():
        return _walk(in_path)
    if not in_path.is_file():
        raise DatasetError(f"--in-path {in_path} does not exist")
    if in_path.suffix.lower() in LIST_SUFFIXES:
        return _read_list(in_path)
    if in_path.suffix.lower() in IMAGE_SUFFIXES:
        return [InputImage(in_path, Path(in_path.name))]
    raise DatasetError(f"--in-path {in_path} is neither an image ({', '.join(IMAGE_SUFFIXES)}), "
                       f"a folder, nor a list of paths ({', '.join(LIST_SUFFIXES)})")


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _walk(root: Path) -> list[InputImage]:
    found = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        # Folders named like images are inputs (reported bad when read), not walked into.
        found += [here / name for name in subfolders if _is_image_name(name)]
        subfolders[:] = sorted(name for name in subfolders
                               if not name.startswith(".") and not _is_image_name(name))
        found += [here / name for name in files if _is_image_name(name)]
    return [InputImage(path, path.relative_to(root)) for path in sorted(found)]


def _read_list(list_file: Path) -> list[InputImage]:
    lines = list_file.read_text(encoding="utf-8").splitlines()
    paths = [Path(line.strip()) for line in lines
             if line.strip() and not line.strip().startswith("#")]
    paths = [path if path.is_absolute() else list_file.parent / path for path in paths]
    if not paths:
        raise DatasetError(f"--in-path {list_file} lists no image paths (one per line)")
    paths = [Path(os.path.normpath(path.absolute())) for path in paths]
    common = Path(os.path.commonpath([path.parent for path in paths]))
    return [InputImage(path, path.relative_to(common)) for path in paths]


class ImageFiles(Dataset):
    """Decoded inputs for a DataLoader: sample ``i`` is ``{"index": i, "image": (3, h, w)
    uint8, "size": (H, W)}``, or ``{"index": i, "error": message}`` for a file that cannot be
    read (missing, empty, truncated, not an image, a folder), so that one bad file costs only its
    own output.

    ``size`` is the image's size as displayed (after EXIF rotation, unless turned off); with
    ``short_side`` the pixels are resized so that their short side has that length, and the
    original pixels are also returned as ``"original"`` when ``keep_original``.
    """

    def __init__(self, paths: list[Path], *, exif_transpose: bool = True,
                 short_side: int | None = None, keep_original: bool = False) -> None:
        self.paths = list(paths)
        self.exif_transpose = exif_transpose
        self.resize = ResizeShortSide(short_side) if short_side else None
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = load_image(self.paths[index], exif_transpose=self.exif_transpose)
        except DatasetError as error:
            return {"index": index, "error": str(error)}
        sample: dict[str, Any] = {"index": index, "size": (image.height, image.width)}
        if self.resize is not None:
            if self.keep_original:
                sample["original"] = pil_to_uint8_tensor(image)
            image = self.resize({"image": image})["image"]
        sample["image"] = pil_to_uint8_tensor(image)
        return sample


def keep_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader ``collate_fn`` for unbatched samples: take them as they are."""
    return sample


def loader_for(dataset: ImageFiles, workers: int) -> torch.utils.data.DataLoader:
    """Samples one by one (batches are formed by image size later), decoded by ``workers``
    processes while the model runs (none: in this process)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=keep_sample,
        prefetch_factor=4 if workers else None, persistent_workers=False)
