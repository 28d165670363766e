"""Test-time prediction shared by evaluation and inference: multi-scale and flip averaging,
class ids without a full-size softmax, and window-by-window prediction of large images."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Inputs with more pixels than this (after --size) are predicted in windows (--tile auto):
#: ResNet-101 stays under about 3 GB at this size, and a 24-megapixel photo too, in windows.
TILE_PIXEL_BUDGET = 2048 * 2048
DEFAULT_TILE = 1024


def predict_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    out_size: tuple[int, int],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class probabilities for a normalised batch, averaged over scales and flips.

    Args:
        model: a segmentation model returning ``{"out": logits}``; put it in eval mode first.
        image: ``(N, 3, H, W)`` normalised input.
        out_size: ``(height, width)`` of the returned map (e.g. the full-resolution label).
        scales: input scale factors; each prediction is resized to ``out_size`` before averaging.
        flip: also predict the horizontally flipped input and flip the result back.

    Returns:
        ``(N, C, out_height, out_width)`` float32 probabilities (each pixel sums to 1).
    """
    total = None
    views = 0
    for scale in scales:
        if scale == 1.0:
            scaled = image
        else:
            size = [max(int(round(side * scale)), 1) for side in image.shape[-2:]]
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            x = torch.flip(scaled, dims=[3]) if flipped else scaled
            logits = model(x)["out"].float()
            if flipped:
                logits = torch.flip(logits, dims=[3])
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            probabilities = logits.softmax(dim=1)
            total = probabilities if total is None else total + probabilities
            views += 1
    return total / views


def predict_labels(
    model: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    image: torch.Tensor,
    out_size: tuple[int, int],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class ids for a normalised batch: the prediction evaluation scores and inference writes.

    With one scale of 1 and no flip this is the argmax of the logits resized to ``out_size``
    (softmax is monotonic, so the full-size softmax that averaging needs is skipped); otherwise
    the argmax of :func:`predict_probabilities`.

    Args:
        model: returns ``{"out": logits}``; a module in eval mode, or an exported-model runner.
        image: ``(N, 3, H, W)`` normalised input.
        out_size: ``(height, width)`` of the returned map.
        scales: input scale factors (see :func:`predict_probabilities`).
        flip: also average the horizontally flipped input.

    Returns:
        ``(N, out_height, out_width)`` int64 class ids.
    """
    if tuple(scales) != (1.0,) or flip:
        return predict_probabilities(model, image, out_size, scales, flip).argmax(dim=1)
    logits = model(image)["out"]
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits.float(), size=out_size, mode="bilinear",
                               align_corners=False)
    return logits.argmax(dim=1)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``tile`` pixels covering ``[0, length)``, neighbours
    overlapping by at least ``overlap``; the last window ends exactly at ``length``, so every
    window has the full size (one window of ``length`` when ``length <= tile``).

    Raises:
        ValueError: ``overlap`` not in ``[0, tile)``.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, {tile}), got {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    # Spread the windows evenly: the overlaps differ by at most one pixel.
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _owned_spans(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """``[begin, end)`` each window writes: overlaps are split at their middle, so every pixel
    comes from the window in which it lies farthest from a border."""
    cuts = [0] + [(starts[i + 1] + starts[i] + tile) // 2 for i in range(len(starts) - 1)]
    cuts.append(length)
    return [(cuts[i], cuts[i + 1]) for i in range(len(starts))]


def _windows(length: int, tile: int, overlap: int) -> list[tuple[int, tuple[int, int]]]:
    """``(start, owned span)`` of each window along one side."""
    starts = tile_starts(length, tile, min(overlap, tile - 1))
    return list(zip(starts, _owned_spans(starts, tile, length)))


def predict_labels_tiled(
    model: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    image: torch.Tensor,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    *,
    tile: int,
    overlap: int,
    batch_size: int = 1,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class ids of a large image predicted window by window, in memory bounded by the window.

    Windows of ``tile x tile`` pixels overlap by ``overlap``; each pixel takes the prediction of
    the window whose centre part it lies in, so a window's unreliable border (less context, zero
    padding) is only used at the image's own border. The image is only ever normalised window
    by window (``prepare``), so a 24-megapixel photo costs its uint8 pixels, one uint8 label map
    and a few windows of activations.

    Args:
        model: returns ``{"out": logits}`` (see :func:`predict_labels`).
        image: ``(3, H, W)`` pixels, any dtype (typically uint8 on the CPU).
        prepare: turns a ``(n, 3, h, w)`` crop of ``image`` into the model's input (normalise,
            move to the device, memory format).
        tile: window side in pixels (clipped to the image's sides).
        overlap: minimum overlap of neighbouring windows, ``0 <= overlap < tile``.
        batch_size: windows per model call (they all have the same size).
        scales: input scale factors per window (see :func:`predict_probabilities`).
        flip: also average the horizontally flipped window.

    Returns:
        ``(H, W)`` uint8 class ids on the CPU.
    """
    height, width = image.shape[-2:]
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows = _windows(height, tile_h, overlap)
    columns = _windows(width, tile_w, overlap)
    windows = [(row, column) for row in rows for column in columns]
    labels = torch.empty((height, width), dtype=torch.uint8)
    for first in range(0, len(windows), max(batch_size, 1)):
        chunk = windows[first:first + max(batch_size, 1)]
        crops = torch.stack([image[:, top:top + tile_h, left:left + tile_w]
                             for (top, _), (left, _) in chunk])
        predicted = predict_labels(model, prepare(crops), (tile_h, tile_w), scales, flip).cpu()
        for window, (row, column) in zip(predicted, chunk):
            (top, (y0, y1)), (left, (x0, x1)) = row, column
            labels[y0:y1, x0:x1] = window[y0 - top:y1 - top, x0 - left:x1 - left].to(torch.uint8)
    return labels
