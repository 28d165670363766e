"""The images inference reads: a file, a folder walked recursively, or a text file listing
paths; decoded (EXIF orientation applied by default) into uint8 tensors by loader workers.

Nothing here knows the model: a sample is the image's pixels and its size, or the reason it
could not be read.
"""
from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from dataloader.custom_transforms import ResizeShortSide, pil_to_uint8_tensor
from dataloader.utils import DatasetError, _to_rgb, read_pixels, unit_scaled
from dataloader.video import VIDEO_SUFFIXES

#: What a folder is searched for: every still-image format Pillow decodes that cameras, phones
#: and the web use (a GIF gives its first frame).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
#: 8-bit grey images stay one band (a 3-channel model sees them as RGB, as Pillow converts them).
_GREY_MODES = ("1", "L")
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
    - a folder: every file with an image suffix below it (hidden files and folders skipped),
      also through symbolic links to folders (each folder once, so a link loop ends) and inside
      folders whose names end like images (``trip.2024.png/``); a folder inside ``in_path``
      reached also through a link is named by its own path, a folder outside it by the first
      link to it in sorted order (outputs mirror that name);
    - a ``.txt`` / ``.lst`` file (UTF-8, with or without a byte-order mark): one path per line,
      taken as written but for the line end (spaces are part of the name; blank lines and
      lines starting with ``#`` skipped), relative paths taken from the list's folder and
      resolved as the file system resolves them (``link/../a.jpg`` is the ``a.jpg`` beside the
      link's target); outputs mirror the paths below the deepest folder they share. Listed
      paths are not checked here: a missing one fails when read.

    Raises:
        DatasetError: ``in_path`` is missing or is another kind of file, a folder holds no
            image, or a list is not UTF-8, names nothing or names one file twice.
    """
    in_path = Path(in_path)
    if in_path.is_dir():
        return _walk(in_path)
    if not in_path.is_file():
        raise DatasetError(f"--in-path {in_path} does not exist")
    if in_path.suffix.lower() in LIST_SUFFIXES:
        return _read_list(in_path)
    if in_path.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        return [InputImage(in_path, Path(in_path.name))]
    raise DatasetError(f"--in-path {in_path} is neither an image ({', '.join(IMAGE_SUFFIXES)}), "
                       f"a video ({', '.join(VIDEO_SUFFIXES)}), a folder, nor a list of paths "
                       f"({', '.join(LIST_SUFFIXES)})")


def _is_image_name(name: str) -> bool:
    return (not name.startswith(".")
            and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)


def _identity(folder: str) -> object:
    try:
        status = os.stat(folder)
    except OSError:
        return folder
    return status.st_dev, status.st_ino


def _walk(root: Path) -> list[InputImage]:
    # A folder inside root is named by its own path, never by a link to it (whatever sorts
    # first); a folder outside root, by the first link to it in sorted order.
    own = {_identity(folder) for folder, _, _ in os.walk(root)}
    found = []
    walked = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        identity = _identity(folder)
        if identity in walked:  # a link back up (a loop) or a second way into one folder
            subfolders[:] = []
            continue
        walked.add(identity)
        subfolders[:] = sorted(
            name for name in subfolders if not name.startswith(".")
            and not (os.path.islink(os.path.join(folder, name))
                     and _identity(os.path.join(folder, name)) in own))
        found += [Path(folder) / name for name in files if _is_image_name(name)]
    if not found:
        raise DatasetError(f"--in-path {root} holds no image: looked for "
                           f"{', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)} files (any case; "
                           f"hidden files and folders skipped)")
    return [InputImage(path, path.relative_to(root)) for path in sorted(found)]


def _read_text(list_file: Path) -> str:
    try:
        data = list_file.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read --in-path {list_file}: {error.strerror}") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not a path
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DatasetError(f"--in-path {list_file} is not UTF-8 text (line {line} holds the byte "
                           f"{data[error.start]:#04x}): save the list as UTF-8") from None


def _as_opened(path: Path) -> Path:
    """``path`` with its folders resolved as the file system resolves them when it opens the
    file (``link/../a.jpg``: ``..`` of the link's target); the file's own name is kept, so a
    listed link to ``IMG_0001.jpg`` still gives outputs named after the link."""
    if path.name in ("", ".", ".."):
        return Path(os.path.realpath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def _read_list(list_file: Path) -> list[InputImage]:
    # Only the line end is taken off: " lead space.jpg" is a legal file name.
    entries = [(number, line)
               for number, line in enumerate(_read_text(list_file).splitlines(), start=1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise DatasetError(f"--in-path {list_file} lists no image paths (one per line)")
    paths, first_line = [], {}
    for number, line in entries:
        path = _as_opened(list_file.parent.absolute() / line)
        try:
            status = os.stat(path)
            identity: object = (status.st_dev, status.st_ino)
        except OSError:  # missing: reported when read
            identity = path
        if identity in first_line:
            raise DatasetError(f"--in-path {list_file} names {path} twice (lines "
                               f"{first_line[identity]} and {number}): remove one of them")
        first_line[identity] = number
        paths.append(path)
    common = Path(os.path.commonpath([path.parent for path in paths]))
    return [InputImage(path, path.relative_to(common)) for path in paths]


def _pixels_tensor(pixels: Any) -> torch.Tensor:
    """8-bit colour -> uint8 ``(3, h, w)``, 8-bit grey -> uint8 ``(1, h, w)``, other images
    (16-bit, float, multi-band TIFF) -> float32 ``(C, h, w)`` on the unit scale."""
    if isinstance(pixels, torch.Tensor):
        return pixels
    if not hasattr(pixels, "mode"):  # an (H, W, C) array
        return unit_scaled(pixels)
    if pixels.mode in _GREY_MODES:
        return torch.from_numpy(np.array(pixels, dtype=np.uint8))[None]
    return pil_to_uint8_tensor(_to_rgb(pixels))


class ImageFiles(Dataset):
    """Decoded inputs for a DataLoader: sample ``i`` is ``{"index": i, "path": str, "image":
    (C, h, w) pixels (see :func:`_pixels_tensor`), "size": (H, W)}``, or ``{"index": i, "error": message}`` for a file that cannot be
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
            pixels = read_pixels(self.paths[index], exif_transpose=self.exif_transpose)
            image = _pixels_tensor(pixels)
        except (DatasetError, ValueError) as error:
            return {"index": index, "error": f"{self.paths[index]}: {error}" if isinstance(
                error, ValueError) else str(error)}
        sample: dict[str, Any] = {"index": index, "path": str(self.paths[index]),
                                  "size": tuple(image.shape[-2:])}
        if self.resize is not None:
            if self.keep_original:
                sample["original"] = image
            # An 8-bit image is resized as a PIL image, as evaluation's transform resizes it, so
            # that inference writes the masks --eval-only scores; other images as tensors.
            pil = hasattr(pixels, "mode")
            image = _pixels_tensor(self.resize({"image": pixels if pil else image})["image"])
        sample["image"] = image
        return sample


def keep_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader ``collate_fn`` for unbatched samples: take them as they are."""
    return sample


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A Ctrl-C reaches every process of the terminal's group, and SLURM's SIGTERM every
    process of the job: the main process decides when to stop and ends its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader_for(dataset: ImageFiles, workers: int) -> torch.utils.data.DataLoader:
    """Samples one by one (batches are formed by image size later), decoded by ``workers``
    processes while the model runs (none: in this process)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=keep_sample,
        prefetch_factor=4 if workers else None, persistent_workers=False,
        worker_init_fn=_leave_stop_signals_to_the_main_process if workers else None)


@contextlib.contextmanager
def decoded_samples(dataset: ImageFiles, workers: int) -> Iterator[Iterator[dict[str, Any]]]:
    """The samples of :func:`loader_for`, its worker processes stopped when the block ends,
    however it ends.

    The workers ignore SIGTERM (see :func:`_leave_stop_signals_to_the_main_process`), so after
    an error (a worker's MemoryError re-raised here) neither the DataLoader's own shutdown nor
    Python's exit could end one still busy: they would wait for it for ever. Those still alive
    after the DataLoader's shutdown are killed.
    """
    samples = iter(loader_for(dataset, workers))
    try:
        yield samples
    finally:
        # The DataLoader iterator has no public shutdown; a reference in a traceback keeps it
        # alive, so its own __del__ would come too late.
        shutdown = getattr(samples, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        for process in getattr(samples, "_workers", []):
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
