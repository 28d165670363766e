"""What inference writes for each input, and where: a class-id mask, a colour image, an overlay.

Outputs mirror the inputs' sub-folders under ``--out-path``. ``photos/2024/a.jpg`` gives
``2024/a.png`` (mask), ``2024/a_color.png`` and ``2024/a_overlay.png`` (or ``.jpg``). Before
anything is written the whole plan is checked: two inputs that would write one file, or a file
that would land on an input or inside the input folder, stop the run in one line. A
:class:`Writer` encodes and writes them on background threads while the model runs.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from dataloader.images import InputImage
from dataloader.utils import IGNORE_INDEX, colorize
from utils.errors import UserError
from utils.fileio import atomic_write

OUTPUT_KINDS = ("mask", "color", "overlay")
IMAGE_FORMATS = ("png", "jpg")
JPEG_QUALITY = 90


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
    base = out_dir / relative.parent
    names = {"mask": f"{relative.stem}.png", "color": f"{relative.stem}_color.{image_format}",
             "overlay": f"{relative.stem}_overlay.{image_format}"}
    return {kind: base / names[kind] for kind in kinds}


def plan_outputs(inputs: list[InputImage], in_path: Path, out_dir: Path, kinds: Sequence[str],
                 image_format: str) -> list[dict[str, Path]]:
    """The output paths of every input, checked as a whole.

    Raises:
        UserError: two inputs would write the same file (e.g. ``a.jpg`` and ``a.png``), or
            ``out_dir`` lies inside the input folder, or an output would replace an input.
    """
    in_root = in_path.resolve()
    out_root = out_dir.resolve()
    if in_path.is_dir() and (out_root == in_root or in_root in out_root.parents):
        raise UserError(f"--out-path {out_dir} is inside --in-path {in_path}: outputs would mix "
                        f"with the inputs (and be read as inputs next time); choose a folder "
                        f"outside it")
    plans = [output_paths(item.relative, out_dir, kinds, image_format) for item in inputs]
    inputs_by_path = {item.path.resolve(): item.path for item in inputs}
    writers: dict[Path, Path] = {}
    for item, plan in zip(inputs, plans):
        for path in plan.values():
            target = path.resolve()
            if target in inputs_by_path:
                raise UserError(f"{item.path}: its output {path} would overwrite the input "
                                f"{inputs_by_path[target]}; choose another --out-path")
            if target in writers:
                raise UserError(f"{writers[target]} and {item.path} would both write {path} "
                                f"(outputs are named after the input without its suffix): "
                                f"rename one of them")
            writers[target] = item.path
    return plans


def already_written(plan: dict[str, Path]) -> bool:
    """Whether every output of one input exists (``--skip-existing``; writes are atomic, so an
    existing file is complete)."""
    return all(os.path.isfile(path) for path in plan.values())


def color_image(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """``(H, W, 3)`` uint8 colours of ``(H, W)`` class ids (ignore = white, unknown = black)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    table[IGNORE_INDEX] = (255, 255, 255)
    return table[labels]


def overlay_image(labels: np.ndarray, image: np.ndarray, palette: Sequence[Sequence[int]],
                  alpha: float) -> np.ndarray:
    """The photo blended with the class colours: ``(1 - alpha) * image + alpha * colour``,
    rounded, as ``(H, W, 3)`` uint8; ``image`` is ``(H, W, 3)`` uint8 of the same size."""
    colours = color_image(labels, palette).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def render(kind: str, labels: np.ndarray, palette: Sequence[Sequence[int]],
           image: np.ndarray | None, alpha: float) -> Image.Image:
    """One output as a PIL image: ``"mask"`` a palette image whose values are class ids,
    ``"color"`` RGB colours, ``"overlay"`` the blended photo (needs ``image``)."""
    if kind == "mask":
        return colorize(labels, palette)
    if kind == "color":
        return Image.fromarray(color_image(labels, palette), mode="RGB")
    return Image.fromarray(overlay_image(labels, image, palette, alpha), mode="RGB")


def write_outputs(plan: dict[str, Path], labels: np.ndarray, palette: Sequence[Sequence[int]],
                  image: np.ndarray | None, alpha: float) -> None:
    """Render and atomically write every output of one input (no half-written file remains
    after an interruption)."""
    for kind, path in plan.items():
        picture = render(kind, labels, palette, image, alpha)
        file_format = "JPEG" if path.suffix == ".jpg" else "PNG"
        options = {"quality": JPEG_QUALITY} if file_format == "JPEG" else {}
        atomic_write(path, lambda handle, picture=picture: picture.save(
            handle, format=file_format, **options))


@dataclass
class Writer:
    """Encodes and writes outputs on background threads (Pillow releases the GIL while it
    encodes), keeping at most ``4 * threads`` inputs in flight so memory stays bounded.

    A write that fails (disk full, no permission) is reported through ``on_error`` and counted
    in ``failures``; the other inputs go on.
    """

    plans: list[dict[str, Path]]
    names: list[Path]
    palette: list[list[int]]
    alpha: float
    threads: int
    on_error: Callable[[str], None]
    pending: deque = field(default_factory=deque)
    failures: int = 0

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=self.threads)
        self.limit = 4 * self.threads

    def submit(self, index: int, labels: np.ndarray, image: np.ndarray | None) -> None:
        """Write the outputs of input ``index``: ``(H, W)`` class ids and, for overlays, the
        ``(H, W, 3)`` uint8 photo."""
        self.pending.append((index, self.pool.submit(
            write_outputs, self.plans[index], labels, self.palette, image, self.alpha)))
        while len(self.pending) > self.limit:
            self._collect()

    def _collect(self) -> None:
        index, future = self.pending.popleft()
        try:
            future.result()
        except OSError as error:
            self.on_error(f"cannot write the outputs of {self.names[index]}: {error}")
            self.failures += 1

    def close(self) -> None:
        while self.pending:
            self._collect()
        self.pool.shutdown()
