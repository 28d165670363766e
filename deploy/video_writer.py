"""The outputs of a video, written as its frames are predicted: MP4 videos (colours, overlays)
and folders of per-frame PNGs (masks, confidence), each frame drawn by the code that draws a
photo's outputs (:func:`deploy.outputs.render`).

Frames stream through: :func:`dataloader.video.frame_samples` decodes one at a time, the
:class:`~deploy.predictor.Predictor` batches a few, and :class:`VideoOutputs` encodes each as it
comes, so memory does not grow with the length of the clip. The outputs keep every frame and its
timestamp (in the input's time base, so a variable frame rate stays as it was); frames are turned
as the input's display matrix says before prediction, so the outputs carry no rotation of their
own and show the right way up in every player. Audio is not copied.

Each output is written under a temporary name (removed by the next run if this one is killed)
and renamed into place when complete; an interrupted video is closed as a playable file named
``<name>.partial.mp4`` (a folder ``<name>.partial``), which ``--skip-existing`` does not count
as done.
"""
from __future__ import annotations

import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import av
import numpy as np
import torch
from PIL.PngImagePlugin import PngInfo

from dataloader.utils import DatasetError
from dataloader.video import VideoInfo, frame_samples, open_video, read_ahead
from deploy.outputs import FRAME_FOLDER_KINDS, MARKER, render, replaceable
from utils.fileio import temporary_prefix

#: libx264's constant rate factor: 18 is visually lossless for colours and overlays.
CRF = "18"
#: Decoded frames waiting for the model, and predicted frames waiting to be drawn and encoded:
#: a few each, so that decoding and encoding overlap the model and memory stays a few frames.
FRAMES_AHEAD = 2
FRAMES_BEHIND = 2


def _temporary(path: Path) -> Path:
    """A new name beside ``path`` that :func:`utils.fileio.remove_stale_temporaries_of`
    recognises as a temporary of it."""
    return path.parent / f"{temporary_prefix(path)}{os.urandom(6).hex()}.tmp"


def partial_path(path: Path) -> Path:
    """Where an interrupted output goes: ``clip_overlay.partial.mp4``, ``clip.partial``."""
    return path.with_name(f"{path.stem}.partial{path.suffix}" if path.suffix == ".mp4"
                          else f"{path.name}.partial")


class _Encoder:
    """One MP4 being written: H.264 frames at the input's timestamps, marked as this tool's."""

    def __init__(self, path: Path, info: VideoInfo, width: int, height: int) -> None:
        self.path = path
        self.container = av.open(str(path), "w", format="mp4")
        self.container.metadata["comment"] = MARKER
        self.stream = self.container.add_stream("libx264", rate=info.average_rate or 25,
                                                options={"crf": CRF})
        # 4:2:0 chroma takes even sides: an odd side is padded by its last row or column.
        self.width, self.height = width + width % 2, height + height % 2
        self.stream.width, self.stream.height = self.width, self.height
        self.stream.pix_fmt = "yuv420p"
        self.stream.time_base = self.stream.codec_context.time_base = info.time_base

    def write(self, pixels: np.ndarray, pts: int) -> None:
        """Encode ``(H, W, 3)`` uint8 ``pixels`` shown at ``pts`` (in the input's time base)."""
        pad = ((0, self.height - pixels.shape[0]), (0, self.width - pixels.shape[1]), (0, 0))
        if any(after for _, after in pad):
            pixels = np.pad(pixels, pad, mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
        frame.pts, frame.time_base = pts, self.stream.time_base
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        """Flush the frames the encoder holds and write the index: the file plays."""
        try:
            self.container.mux(self.stream.encode(None))
        finally:
            self.container.close()


@dataclass
class VideoOutputs:
    """The outputs ``plan`` names of one video (:func:`deploy.outputs.video_output_paths`),
    written frame by frame: :meth:`add` is the ``emit`` of
    :meth:`deploy.predictor.Predictor.predict_all`, :meth:`close` puts the files in place."""

    plan: dict[str, Path]
    info: VideoInfo
    palette: Sequence[Sequence[int]]
    alpha: float
    frames: int = 0
    temporaries: dict[str, Path] = field(default_factory=dict)
    encoders: dict[str, _Encoder] = field(default_factory=dict)
    last_pts: int = -1

    def _open(self, height: int, width: int) -> None:
        for kind, path in self.plan.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.temporaries[kind] = _temporary(path)
            if kind in FRAME_FOLDER_KINDS:
                self.temporaries[kind].mkdir()
            else:
                self.encoders[kind] = _Encoder(self.temporaries[kind], self.info, width, height)

    def add(self, sample: dict[str, Any], labels: torch.Tensor) -> None:
        """Write one predicted frame: ``(H, W)`` uint8 ``labels`` of the sample's frame."""
        image = sample.get("original", sample["image"]).permute(1, 2, 0).numpy()
        if not self.temporaries:
            self._open(*labels.shape)
        # Timestamps must grow: a frame without one (or a repeated one) takes the next tick.
        pts = sample["pts"] if sample["pts"] is not None else self.last_pts + 1
        self.last_pts = pts = max(pts, self.last_pts + 1)
        confidence = sample.get("confidence")
        for kind, temporary in self.temporaries.items():
            picture = render(kind, labels.numpy(), self.palette, image, self.alpha,
                             None if confidence is None else confidence.numpy())
            if kind in self.encoders:
                self.encoders[kind].write(np.asarray(picture), pts)
            else:
                mark = PngInfo()
                mark.add_text("Software", MARKER)
                picture.save(temporary / f"{self.frames:06d}.png", format="PNG", pnginfo=mark)
        self.frames += 1

    def close(self, complete: bool) -> list[Path]:
        """Close the encoders and move every output to its name (``complete``) or its
        :func:`partial_path`; returns where they went (nothing when no frame came)."""
        try:
            for encoder in self.encoders.values():
                encoder.close()
        finally:
            placed = [] if not self.frames else [
                _replace(temporary, self.plan[kind] if complete else partial_path(self.plan[kind]))
                for kind, temporary in self.temporaries.items()]
            for temporary in self.temporaries.values():  # left when no frame came
                _remove(temporary)
        return [path for path in placed if path is not None]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def _replace(temporary: Path, path: Path) -> Path | None:
    """Move ``temporary`` to ``path``, replacing only this tool's own earlier output (checked
    before the run for planned names, here again for partial ones); None if left."""
    if not replaceable(path):
        return None
    if path.is_dir() and not path.is_symlink():  # a folder is not replaced by a rename
        old = _temporary(path)
        path.rename(old)
        temporary.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.replace(path)
    return path


class InOrder:
    """Calls ``write(sample, labels)`` on one background thread, in the order given, at most
    :data:`FRAMES_BEHIND` calls behind: a frame is drawn and encoded while the model predicts
    the next. A failed call raises in the caller's thread at a later :meth:`add` or on leaving
    the block, which waits for every call given (the frames predicted before an interruption
    are written too)."""

    def __init__(self, write: Callable[[dict[str, Any], torch.Tensor], None]) -> None:
        self.write = write
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="video-writer")
        self.pending: deque[Future] = deque()

    def add(self, sample: dict[str, Any], labels: torch.Tensor) -> None:
        self.pending.append(self.pool.submit(self.write, sample, labels))
        while len(self.pending) > FRAMES_BEHIND:
            self.pending.popleft().result()

    def __enter__(self) -> "InOrder":
        return self

    def __exit__(self, kind: type | None, *exc_info: Any) -> None:
        try:
            while self.pending:
                future = self.pending.popleft()
                if kind is None:
                    future.result()
                else:  # what stopped the run is raised, not a write that failed after it
                    future.exception()
        finally:
            self.pool.shutdown(cancel_futures=True)


@dataclass
class VideoSegmenter:
    """Segments whole videos with ``predictor`` (:meth:`run`), frames batched as photos are.

    ``progress(frames, total, name)`` wraps the frame samples (a progress bar in frames per
    second); ``report`` takes the one-line notes and errors."""

    predictor: Any
    palette: Sequence[Sequence[int]]
    alpha: float
    short_side: int | None
    report: Callable[[str], None]
    progress: Callable[[Iterable, int | None, str], Iterable]
    partial: list[Path] = field(default_factory=list)  # where an interrupted video's went

    def run(self, path: Path, plan: dict[str, Path]) -> bool:
        """Write ``plan``'s outputs of the video at ``path``; False when it could not be read
        whole (one line through ``report``; the frames before the fault are written, as a
        playable file). An interruption (:class:`utils.signals.Interrupted`) leaves playable
        partial outputs and goes on up."""
        try:
            container, info = open_video(path)
        except DatasetError as error:
            self.report(f"error: {error}; skipped")
            return False
        failures: list[str] = []
        outputs = VideoOutputs(plan=plan, info=info, palette=self.palette, alpha=self.alpha)
        finished = False
        try:
            if info.has_audio:
                self.report(f"note: {path}: its audio is not copied to the outputs")
            samples = frame_samples(container, info, path, short_side=self.short_side,
                                    failures=failures)
            with read_ahead(samples, FRAMES_AHEAD) as ahead, InOrder(outputs.add) as behind:
                self.predictor.predict_all(self.progress(ahead, info.frames or None, path.name),
                                           behind.add, on_error=self.report)
            finished = True
        finally:
            container.close()
            placed = outputs.close(complete=finished)
            if not finished:
                self.partial = placed
        if failures:
            self.report(f"error: {failures[0]}; the {outputs.frames} frames before are written")
        return not failures
