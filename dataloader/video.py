"""Video inputs: frames decoded one at a time with PyAV (FFmpeg's bindings, the library
torchvision's video IO uses), turned as the file's display matrix says, with their timestamps.

Nothing here holds a whole clip: :func:`video_frames` is a generator, so memory follows one
frame, whatever the length. Nothing here knows the model.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, TypeVar

import av
import numpy as np
import torch
from PIL import Image

from dataloader.custom_transforms import ResizeShortSide, pil_to_uint8_tensor
from dataloader.utils import DatasetError

T = TypeVar("T")

#: What a folder is searched for besides images: the containers phones and cameras write.
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm")


def is_video(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoInfo:
    """What the outputs of a video keep of it: the stream's ``time_base`` (timestamps are kept
    in it), its average frame rate, its frame count (0: the container does not say) and
    whether the file holds audio (which the outputs drop)."""

    time_base: Fraction
    average_rate: Fraction | None
    frames: int
    has_audio: bool


@dataclass(frozen=True)
class VideoFrame:
    """One decoded frame: ``pixels`` uint8 ``(3, H, W)`` as displayed (turned by the display
    matrix, as players turn phone videos), ``pts`` in the input stream's ``time_base`` (None
    where the file gives none)."""

    index: int
    pixels: torch.Tensor
    pts: int | None


def open_video(path: str | os.PathLike) -> tuple[av.container.InputContainer, VideoInfo]:
    """The opened file (close it) and what its outputs keep of it.

    Raises:
        DatasetError: the file is missing, not a video, or has no video stream.
    """
    try:
        container = av.open(str(path))
    except (OSError, av.FFmpegError) as error:
        raise DatasetError(f"cannot read the video {path}: {error}") from None
    if not container.streams.video:
        container.close()
        raise DatasetError(f"{path} holds no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg's frame threads: decoding keeps up with the model
    return container, VideoInfo(time_base=stream.time_base, average_rate=stream.average_rate,
                                frames=stream.frames, has_audio=bool(container.streams.audio))


def rotation_of(frame: av.VideoFrame, stream: av.video.VideoStream) -> int:
    """The counter-clockwise angle, a multiple of 90 degrees, that players turn ``frame`` by:
    its display matrix (FFmpeg attaches the stream's to every frame), else the old clockwise
    ``rotate`` tag."""
    angle = int(round(frame.rotation or 0))
    tag = stream.metadata.get("rotate", "")
    if angle == 0 and tag.lstrip("-").isdigit():
        angle = -int(tag)
    return 90 * round(angle / 90) % 360


def displayed(pixels: np.ndarray, rotation: int) -> np.ndarray:
    """``(H, W, 3)`` stored pixels turned counter-clockwise by ``rotation`` degrees (a multiple
    of 90), as players show them."""
    return np.ascontiguousarray(np.rot90(pixels, k=(rotation // 90) % 4))


def video_frames(container: av.container.InputContainer, info: VideoInfo,
                 path: Path) -> Iterator[VideoFrame]:
    """The frames of the file's first video stream, in presentation order, as displayed.

    Raises:
        DatasetError: the stream cannot be decoded further (a cut-off or damaged file); the
            frames before are yielded first.
    """
    stream = container.streams.video[0]
    index = 0
    try:
        for frame in container.decode(stream):
            pixels = displayed(frame.to_ndarray(format="rgb24"), rotation_of(frame, stream))
            yield VideoFrame(index, torch.from_numpy(pixels).permute(2, 0, 1), frame.pts)
            index += 1
    except av.FFmpegError as error:
        raise DatasetError(f"{path}: cannot decode past frame {index}: {error}") from None
    if info.frames and index < info.frames:
        raise DatasetError(f"{path}: only {index} of its {info.frames} frames decode (the file "
                           f"is cut off or damaged)")


def frame_samples(container: av.container.InputContainer, info: VideoInfo, path: Path, *,
                  short_side: int | None, failures: list[str]) -> Iterator[dict[str, Any]]:
    """The frames as the samples :class:`dataloader.images.ImageFiles` gives for photos
    (``index``, ``image``, ``size``; with ``short_side``, ``image`` resized as photos are and
    ``original`` the frame), plus ``pts``.

    A frame that cannot be decoded ends the samples normally, its reason appended to
    ``failures``, so that whatever waits downstream (a batch being formed, an encoder) still
    receives every frame decoded before it.
    """
    resize = ResizeShortSide(short_side) if short_side else None
    try:
        for frame in video_frames(container, info, path):
            sample = {"index": frame.index, "pts": frame.pts, "image": frame.pixels,
                      "size": tuple(frame.pixels.shape[-2:])}
            if resize is not None:
                image = Image.fromarray(frame.pixels.permute(1, 2, 0).numpy())
                sample["original"] = frame.pixels
                sample["image"] = pil_to_uint8_tensor(resize({"image": image})["image"])
            yield sample
    except DatasetError as error:
        failures.append(str(error))


_END = object()


@contextlib.contextmanager
def read_ahead(items: Iterator[T], depth: int) -> Iterator[Iterator[T]]:
    """``items``, produced by a background thread up to ``depth`` ahead of the reader: frames
    decode (FFmpeg releases the GIL) while the model predicts the ones before, as the photo
    path's loader workers decode photos. An exception of ``items`` reaches the reader where it
    happened in the order. Leaving the block stops the thread and waits for it, so whatever
    ``items`` reads from (an open container) can be closed after.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as error:  # handed to the reader, raised there
            put((_END, error))
            return
        finally:  # a generator is closed here, before what it reads from is
            close = getattr(items, "close", None)
            if close is not None:
                close()
        put((_END, None))

    def consume() -> Iterator[T]:
        while True:
            item, error = ready.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()
