"""What inference writes for each input, and where: a class-id mask, a colour image, an overlay.

Outputs mirror the inputs' sub-folders under ``--out-path``. ``photos/2024/a.jpg`` gives
``2024/a.png`` (mask), ``2024/a_color.png`` and ``2024/a_overlay.png`` (or ``.jpg``) and
``2024/a_confidence.png`` (grey, the chosen class's probability); a video ``clip.mp4`` gives
folders of per-frame PNGs and MP4s (:func:`video_output_paths`, :mod:`deploy.video_writer`). Before
anything is written the whole plan is checked: two inputs that would write one file (names
compared case-folded, as macOS and Windows compare them), a file that would land on an input or
inside the input folder, or a name the file system cannot hold stop the run in one line.

Every file written here carries a mark (a PNG ``Software`` text chunk, a JPEG comment, an MP4
``comment`` tag), so a
later run can tell its own outputs from anybody else's: a planned output path that holds
anything else is never replaced (:func:`check_existing`). A :class:`Writer` encodes and writes
the outputs on background threads while the model runs.
"""
from __future__ import annotations

import argparse
import os
import re
import stat
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import av
import numpy as np
import torch
from PIL import Image

from PIL.PngImagePlugin import PngInfo

from dataloader.images import InputImage
from dataloader.video import is_video
from dataloader.utils import summarize_names
from utils.errors import UserError
from utils.fileio import atomic_write, name_limit
from utils.labels import colorize, palette_image

OUTPUT_KINDS = ("mask", "color", "overlay", "confidence")
IMAGE_FORMATS = ("png", "jpg")
JPEG_QUALITY = 90
#: The mark every output carries: the value of a PNG ``Software`` text chunk, a JPEG comment.
MARKER = "DeepLabV3+ for COCO inference.py"
_PNG_SIGNATURE, _JPEG_START = b"\x89PNG\r\n\x1a\n", b"\xff\xd8"
_PNG_MARK = b"tEXtSoftware\x00" + MARKER.encode()
_JPEG_MARK = b"\xff\xfe" + (len(MARKER) + 2).to_bytes(2, "big") + MARKER.encode()
#: Both marks are written within the first hundred bytes of a file (after IHDR, after JFIF).
_MARK_WINDOW = 4096
#: Pixels of an overlay blended at once (float32 per strip, not per photo).
_OVERLAY_STRIP_PIXELS = 2**18


def parse_kinds(text: str) -> list[str]:
    """``"mask,overlay"`` -> ``["mask", "overlay"]``.

    Raises:
        UserError: an unknown or repeated kind.
    """
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in OUTPUT_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise UserError(f"--save {text!r}: give one or more of {','.join(OUTPUT_KINDS)}, "
                        f"comma-separated, each once")
    return kinds


def output_paths(relative: Path, out_dir: Path, kinds: Sequence[str],
                 image_format: str) -> dict[str, Path]:
    """Where each requested kind of output of the input at ``relative`` goes."""
    if is_video(relative):
        return video_output_paths(relative, out_dir, kinds)
    base = out_dir / relative.parent
    names = {"confidence": f"{relative.stem}_confidence.png",
             "mask": f"{relative.stem}.png", "color": f"{relative.stem}_color.{image_format}",
             "overlay": f"{relative.stem}_overlay.{image_format}"}
    return {kind: base / names[kind] for kind in kinds}


#: Outputs of a video that are folders of per-frame PNGs; the others are MP4 videos.
FRAME_FOLDER_KINDS = ("mask", "confidence")
#: The names of the PNGs in a frame folder: the frame's index in the video.
FRAME_NAME = re.compile(r"[0-9]{6}\.png")


def video_output_paths(relative: Path, out_dir: Path, kinds: Sequence[str]) -> dict[str, Path]:
    """Where each kind of output of the video at ``relative`` goes: ``clip.mp4`` gives the
    folders ``clip/`` (masks) and ``clip_confidence/`` of per-frame PNGs ``000000.png``...,
    and the videos ``clip_color.mp4`` and ``clip_overlay.mp4``."""
    base = out_dir / relative.parent
    names = {"mask": relative.stem, "confidence": f"{relative.stem}_confidence",
             "color": f"{relative.stem}_color.mp4", "overlay": f"{relative.stem}_overlay.mp4"}
    return {kind: base / names[kind] for kind in kinds}


def _folded(path: Path, resolved: dict[Path, str]) -> str:
    """``path`` with its folders resolved (cached in ``resolved``), case-folded: its identity as
    a case-insensitive file system (macOS, Windows) sees it."""
    if path.parent not in resolved:
        resolved[path.parent] = str(path.parent.resolve())
    return os.path.join(resolved[path.parent], path.name).casefold()


def output_folders(plans: list[dict[str, Path]], out_dir: Path) -> list[Path]:
    """Every folder below ``out_dir`` that outputs go into (parents included), sorted."""
    folders = set()
    for parent in {path.parent for plan in plans for path in plan.values()}:
        while len(parent.parts) > len(out_dir.parts) and parent not in folders:
            folders.add(parent)
            parent = parent.parent
    return sorted(folders)


def assign_outputs(inputs: list[InputImage], in_path: Path, out_dir: Path, kinds: Sequence[str],
                 image_format: str) -> list[dict[str, Path]]:
    """The output paths of every input, checked as a whole (names compared case-folded).

    Raises:
        UserError: two inputs would write the same file (e.g. ``a.jpg`` and ``A.png``), or
            ``out_dir`` lies inside the input folder, or an output would replace an input, or
            one output's name is another's folder, or a name is too long for the file system.
    """
    in_root = in_path.resolve()
    out_root = out_dir.resolve()
    if in_path.is_dir() and (out_root == in_root or in_root in out_root.parents):
        raise UserError(f"--out-path {out_dir} is inside --in-path {in_path}: outputs would mix "
                        f"with the inputs (and be read as inputs next time); choose a folder "
                        f"outside it")
    plans = [output_paths(item.relative, out_dir, kinds, image_format) for item in inputs]
    resolved: dict[Path, str] = {}
    inputs_by_path = {}
    for item in inputs:  # a listed link and the file it points to
        inputs_by_path[_folded(item.path, resolved)] = item.path
        inputs_by_path[str(item.path.resolve()).casefold()] = item.path
    writers: dict[str, Path] = {}
    limit = name_limit(out_dir)
    for item, plan in zip(inputs, plans):
        for path in plan.values():
            target = _folded(path, resolved)
            if target in inputs_by_path:
                raise UserError(f"{item.path}: its output {path} would overwrite the input "
                                f"{inputs_by_path[target]}; choose another --out-path")
            if target in writers:
                raise UserError(f"{writers[target]} and {item.path} would both write {path} "
                                f"(outputs are named after the input without its suffix, and "
                                f"macOS and Windows do not tell A from a): rename one of them")
            if len(os.fsencode(path.name)) > limit:
                raise UserError(f"{item.path}: its output name {path.name} is longer than the "
                                f"file system's {limit} bytes; rename the input")
            writers[target] = item.path
    for folder in output_folders(plans, out_dir):
        if _folded(folder, resolved) in writers:
            raise UserError(f"{writers[_folded(folder, resolved)]} would write {folder}, the "
                            f"folder of other outputs (an input folder named like an image): "
                            f"rename one of them")
    return plans


def _existing(path: Path, decode: bool) -> str:
    """What ``path`` holds: ``absent``, ``empty``, ``ours`` (marked; with ``decode``, also
    complete), ``broken`` (marked but not decodable: a cut-off copy) or ``foreign``."""
    try:
        status = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # a file where its folder should be is
        return "absent"                              # reported as the folder's problem
    if stat.S_ISDIR(status.st_mode) and path.suffix not in (".png", ".jpg"):
        return _existing_frames(path)  # a video's masks; a photo's output is never a folder
    if not stat.S_ISREG(status.st_mode):  # a link, a device: never ours
        return "foreign"
    if status.st_size == 0:
        return "empty"
    if path.suffix == ".mp4":
        return _existing_video(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(_MARK_WINDOW)
    except OSError:  # unreadable: nothing tells it is ours
        return "foreign"
    marked = (head.startswith(_PNG_SIGNATURE) and _PNG_MARK in head
              or head.startswith(_JPEG_START) and _JPEG_MARK in head)
    if not marked:
        return "foreign"
    if decode:
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return "broken"
    return "ours"


def _existing_frames(folder: Path) -> str:
    """A folder is ours when it holds only marked frame PNGs (a video's masks): it got its name
    when complete (its frames are written under a temporary name), so it is not decoded."""
    try:
        names = os.listdir(folder)
    except OSError:
        return "foreign"
    if not names:
        return "empty"
    if not all(FRAME_NAME.fullmatch(name) for name in names):
        return "foreign"
    return "ours" if all(_existing(folder / name, decode=False) == "ours"
                         for name in names) else "foreign"


def _existing_video(path: Path) -> str:
    """An MP4 is ours when its container's comment is :data:`MARKER`; it is renamed into place
    once closed, so it is not decoded further (an MP4 without its index does not open)."""
    try:
        with av.open(str(path)) as container:
            return "ours" if container.metadata.get("comment") == MARKER else "foreign"
    except (OSError, av.FFmpegError):
        return "foreign"


def replaceable(path: Path) -> bool:
    """Whether ``path`` holds nothing or only an earlier output of this tool."""
    return _existing(path, decode=False) in ("absent", "empty", "ours")


def check_existing(plans: list[dict[str, Path]], out_dir: Path, *, skip_existing: bool,
                   overwrite: bool) -> list[bool]:
    """Which inputs are done (``--skip-existing``: every output there, marked and decodable),
    after checking that nothing but this tool's own outputs would be replaced.

    An empty file holds nothing to lose and counts as an unfinished output.

    Raises:
        UserError: a planned output path (or a folder outputs go into) holds something this
            tool did not write; or earlier outputs exist and neither ``skip_existing`` nor
            ``overwrite`` says what to do with them.
    """
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decoding
        found = iter(list(pool.map(lambda path: _existing(path, decode=skip_existing),
                                   [path for plan in plans for path in plan.values()])))
    states = [{kind: next(found) for kind in plan} for plan in plans]
    foreign = [str(plan[kind]) for plan, state in zip(plans, states)
               for kind, value in state.items() if value == "foreign"]
    foreign += [str(folder) for folder in output_folders(plans, out_dir)
                if os.path.lexists(folder) and not os.path.isdir(folder)]
    if foreign:
        raise UserError(f"{len(foreign)} output path(s) hold files this tool did not write: "
                        f"{summarize_names(foreign, 3)}; they are never replaced: move them "
                        f"away or choose another --out-path")
    earlier = [str(plan[kind]) for plan, state in zip(plans, states)
               for kind, value in state.items() if value != "absent"]
    if earlier and not (skip_existing or overwrite):
        raise UserError(f"--out-path {out_dir} already holds {len(earlier)} output(s) of an "
                        f"earlier run ({summarize_names(earlier, 3)}): add --skip-existing to "
                        f"keep the complete ones and do the rest, or --overwrite to replace them")
    if overwrite and not skip_existing:
        return [False] * len(plans)
    return [all(value == "ours" for value in state.values()) for state in states]


def _strips(height: int, width: int) -> list[slice]:
    """Row ranges of about :data:`_OVERLAY_STRIP_PIXELS` pixels each."""
    step = max(1, _OVERLAY_STRIP_PIXELS // max(width, 1))
    return [slice(top, top + step) for top in range(0, height, step)]


def _blend(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colours``, rounded, as uint8."""
    mix = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(np.rint(mix), 0, 255).astype(np.uint8)


#: Percentiles of each shown band mapped to 0 and 255 (a display stretch, as GIS viewers do).
STRETCH_PERCENTILES = (2.0, 98.0)


def parse_bands(text: str) -> tuple[int, ...]:
    """``"3,2,1"`` -> ``(3, 2, 1)``: three (or one) 1-based band numbers, as GDAL and QGIS
    number bands (``--rgb-bands``)."""
    try:
        bands = tuple(int(word) for word in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1-based band numbers like 3,2,1, got "
                                         f"{text!r}") from None
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise argparse.ArgumentTypeError(f"give three band numbers (red,green,blue) or one "
                                         f"(grey), each 1 or more; got {text!r}")
    return bands


def display_rgb(pixels: torch.Tensor, bands: Sequence[int] | None = None) -> np.ndarray:
    """What an overlay is drawn on: ``(H, W, 3)`` uint8 from a decoded ``(C, H, W)`` image.

    8-bit RGB is shown as it is and 8-bit grey as grey. Other images (16-bit, float, N bands)
    show ``bands`` (1-based; default: the first three, or grey from the first of fewer), each
    stretched from its 2nd-98th percentile to 0-255.

    Raises:
        ValueError: a band number beyond the image's bands.
    """
    channels = pixels.shape[0]
    if bands is not None and max(bands) > channels:
        raise ValueError(f"--rgb-bands {','.join(map(str, bands))}: the image has {channels} "
                         f"band(s)")
    if pixels.dtype == torch.uint8 and bands is None and channels in (1, 3):
        return pixels.expand(3, -1, -1).permute(1, 2, 0).numpy()
    chosen = [band - 1 for band in bands] if bands else ([0, 1, 2] if channels >= 3 else [0])
    shown = []
    for band in (chosen * 3)[:3] if len(chosen) == 1 else chosen:
        values = pixels[band].double().numpy()
        low, high = np.percentile(values, STRETCH_PERCENTILES)
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        shown.append(np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8))
    return np.stack(shown, axis=-1)


def render(kind: str, labels: np.ndarray, palette: Sequence[Sequence[int]],
           image: np.ndarray | None, alpha: float,
           confidence: np.ndarray | None = None) -> Image.Image:
    """One output as a PIL image: ``"mask"`` a palette image whose values are class ids,
    ``"color"`` RGB colours, ``"overlay"`` the photo blended with them,
    ``(1 - alpha) * image + alpha * colour`` rounded (needs ``image``, ``(H, W, 3)`` uint8 of
    the labels' size). Colours are :func:`utils.labels.colour_table`'s (ignore white, an id
    beyond the palette black).

    Colours and overlays are drawn into the PIL image a strip of rows at a time, so no
    full-size array is held beside it (the float32 copies a whole 24-megapixel photo would need
    are about 1 GB). ``"confidence"`` is the grey ``(H, W)`` uint8 ``confidence``, 255 =
    certain."""
    if kind == "confidence":
        return Image.fromarray(confidence, mode="L")
    if kind == "mask":
        return palette_image(labels, palette)
    picture = Image.new("RGB", (labels.shape[1], labels.shape[0]))
    for rows in _strips(*labels.shape):
        colours = colorize(labels[rows], palette)
        strip = colours if kind == "color" else _blend(image[rows], colours, alpha)
        picture.paste(Image.fromarray(strip, mode="RGB"), (0, rows.start))
    return picture


def write_outputs(plan: dict[str, Path], labels: np.ndarray, palette: Sequence[Sequence[int]],
                  image: np.ndarray | None, alpha: float,
                  confidence: np.ndarray | None = None) -> None:
    """Render and atomically write every output of one input, each marked as this tool's (no
    half-written file remains after an interruption)."""
    for kind, path in plan.items():
        picture = render(kind, labels, palette, image, alpha, confidence)
        if path.suffix == ".jpg":
            options = {"format": "JPEG", "quality": JPEG_QUALITY, "comment": MARKER}
        else:
            mark = PngInfo()
            mark.add_text("Software", MARKER)
            options = {"format": "PNG", "pnginfo": mark}
        atomic_write(path, lambda handle, picture=picture: picture.save(handle, **options))
        del picture


#: Inputs waiting to be written may hold this many bytes of class ids and photos at most
#: (besides at least one input), so a folder of 24-megapixel photos does not queue gigabytes.
PENDING_BYTES = 128 * 2**20


@dataclass
class Writer:
    """Encodes and writes outputs on background threads (Pillow releases the GIL while it
    encodes), keeping at most ``4 * threads`` inputs and :data:`PENDING_BYTES` in flight so
    memory stays bounded.

    A write that fails (disk full, no permission) is reported through ``on_error`` and counted
    in ``failures``; the other inputs go on. ``written`` counts the inputs whose outputs are all
    written.
    """

    plans: list[dict[str, Path]]
    names: list[Path]
    palette: list[list[int]]
    alpha: float
    threads: int
    on_error: Callable[[str], None]
    rgb_bands: Sequence[int] | None = None  # shown bands of non-RGB images (display_rgb)
    pending: deque = field(default_factory=deque)
    failures: int = 0
    written: int = 0
    pending_bytes: int = 0

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=self.threads)
        self.limit = 4 * self.threads
        self.lock = threading.Lock()

    def submit(self, index: int, labels: np.ndarray, image: np.ndarray | None,
               confidence: np.ndarray | None = None) -> None:
        """Write the outputs of input ``index``: ``(H, W)`` class ids and, for overlays, the
        ``(H, W, 3)`` uint8 photo, for confidence maps the ``(H, W)`` uint8 confidence."""
        size = sum(part.nbytes for part in (labels, image, confidence) if part is not None)
        self.pending.append((index, size, self.pool.submit(self._write, index, labels, image,
                                                           confidence)))
        self.pending_bytes += size
        while len(self.pending) > self.limit or (len(self.pending) > 1
                                                 and self.pending_bytes > PENDING_BYTES):
            self._collect()

    def add(self, sample: dict[str, Any], labels: Any) -> None:
        """:meth:`submit` one predicted sample (``labels``: ``(H, W)`` uint8 tensor), with the
        pixels an overlay is drawn on when one is planned: the decoded image before ``--size``
        resized it. The ``emit`` of :meth:`deploy.predictor.Predictor.predict_all`."""
        image = None
        if "overlay" in self.plans[sample["index"]]:
            try:
                image = display_rgb(sample.get("original", sample["image"]), self.rgb_bands)
            except ValueError as error:  # --rgb-bands beyond this image's bands
                self.on_error(f"cannot draw the overlay of {self.names[sample['index']]}: {error}")
                self.failures += 1
                return
        confidence = sample.get("confidence")
        self.submit(sample["index"], labels.numpy(), image,
                    None if confidence is None else confidence.numpy())

    def _write(self, index: int, labels: np.ndarray, image: np.ndarray | None,
               confidence: np.ndarray | None) -> None:
        write_outputs(self.plans[index], labels, self.palette, image, self.alpha, confidence)
        with self.lock:  # counted here, so the count is right however the main thread stops
            self.written += 1

    def _collect(self) -> None:
        index, size, future = self.pending.popleft()
        self.pending_bytes -= size
        try:
            future.result()
        except OSError as error:
            self.on_error(f"cannot write the outputs of {self.names[index]}: {error}")
            self.failures += 1

    def close(self) -> None:
        """Wait for every submitted write, also when interrupted while collecting them."""
        try:
            while self.pending:
                self._collect()
        finally:
            self.pool.shutdown()
