"""Test-time prediction shared by evaluation and inference: multi-scale and flip averaging,
class ids without a full-size softmax, and window-by-window prediction of large images."""
from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Inputs with more pixels than this (after --size) are predicted in windows (--tile auto):
#: ResNet-101 stays under about 3 GB at this size, and a 24-megapixel photo too, in windows.
TILE_PIXEL_BUDGET = 2048 * 2048
DEFAULT_TILE = 1024
#: The smallest window: the widest 3x3 ASPP branch (rate 18 at output stride 16, 36 at 8;
#: :func:`modeling.backbone.atrous_settings`) spans ``(2 * 18 + 1) * 16 = 592`` input pixels
#: (``(2 * 36 + 1) * 8 = 584`` at 8).
#: In a smaller window that branch sees mostly zero padding, and the masks follow the window
#: grid instead of the image.
MIN_TILE = 592


#: A full-size float map (classes x output pixels) of more elements than this is never built:
#: it is upsampled and reduced in strips of rows of about this many elements (--size on a
#: 24-megapixel photo would otherwise hold 21 x 24 M float32 logits, and more per scale).
STRIP_ELEMENTS = 2**22


def _view_logits(model: Callable[[torch.Tensor], dict[str, torch.Tensor]], image: torch.Tensor,
                 scales: Sequence[float], flip: bool) -> Iterator[torch.Tensor]:
    """float32 logits of each view (scale, flip), flipped back, at the view's own size."""
    for scale in scales:
        if scale == 1.0:
            scaled = image
        else:
            size = [max(int(round(side * scale)), 1) for side in image.shape[-2:]]
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            x = torch.flip(scaled, dims=[3]) if flipped else scaled
            logits = model(x)["out"].float()
            yield torch.flip(logits, dims=[3]) if flipped else logits


def _averaged_probabilities(views: Iterable[torch.Tensor], out_size: tuple[int, int]
                            ) -> torch.Tensor:
    total = None
    count = 0
    for logits in views:
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        probabilities = logits.softmax(dim=1)
        total = probabilities if total is None else total + probabilities
        count += 1
    return total / count


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
        image: ``(N, C, H, W)`` normalised input.
        out_size: ``(height, width)`` of the returned map (e.g. the full-resolution label).
        scales: input scale factors; each prediction is resized to ``out_size`` before averaging.
        flip: also predict the horizontally flipped input and flip the result back.

    Returns:
        ``(N, C, out_height, out_width)`` float32 probabilities (each pixel sums to 1).
    """
    return _averaged_probabilities(_view_logits(model, image, scales, flip), out_size)


def resize_rows(logits: torch.Tensor, out_size: tuple[int, int], top: int,
                bottom: int) -> torch.Tensor:
    """Rows ``top:bottom`` of ``F.interpolate(logits, out_size, mode="bilinear",
    align_corners=False)``, computed from the few input rows they need (equal up to float
    rounding: the same weights, the height blend done separately).

    Args:
        logits: ``(N, C, h, w)``.

    Returns:
        ``(N, C, bottom - top, out_width)`` float32.
    """
    height = logits.shape[-2]
    # Source rows and weights as PyTorch's kernel computes them, in float32.
    scale = torch.tensor(height, dtype=torch.float32) / out_size[0]
    rows = torch.arange(top, bottom, dtype=torch.float32)
    source = ((rows + 0.5) * scale - 0.5).clamp(min=0)
    upper = source.floor().long().clamp(max=height - 1)
    lower = (upper + 1).clamp(max=height - 1)
    weight = (source - upper).clamp(0, 1).to(logits.device).view(1, 1, -1, 1)
    first, last = int(upper[0]), int(lower[-1]) + 1
    widened = F.interpolate(logits[:, :, first:last].float(), size=(last - first, out_size[1]),
                            mode="bilinear", align_corners=False)
    upper_rows = widened.index_select(2, (upper - first).to(logits.device))
    lower_rows = widened.index_select(2, (lower - first).to(logits.device))
    return upper_rows.mul_(1 - weight).add_(lower_rows.mul_(weight))


def _strips(batch: int, classes: int, out_size: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """``(top, bottom)`` row ranges whose ``(batch, classes, rows, width)`` maps stay within
    :data:`STRIP_ELEMENTS`."""
    rows = max(1, STRIP_ELEMENTS // max(batch * classes * out_size[1], 1))
    for top in range(0, out_size[0], rows):
        yield top, min(top + rows, out_size[0])


def _ids(scores: torch.Tensor, *, probabilities: bool, dtype: torch.dtype,
         confidence: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class ids of ``(N, C, h, w)`` scores (logits, or ``probabilities``) and, with
    ``confidence``, the probability of the chosen class as uint8 ``round(255 * p)``.

    From logits the probability is ``1 / sum(exp(logits - max))``: the softmax's largest entry
    without the full softmax, read from the same strip as the argmax."""
    # max's indices are argmax's (the first of equal maxima), and on CPUs a channel reduction
    # by max runs about 4x as fast as by argmax (python -m bench.inference_ops).
    top, labels = scores.max(dim=1)
    if not confidence:
        return labels.to(dtype), None
    chosen = top if probabilities else (scores - top[:, None]).exp().sum(dim=1).reciprocal()
    return labels.to(dtype), chosen.mul(255).round_().to(torch.uint8)


class _Maps:
    """The ``(N, H, W)`` class ids being filled strip by strip, and their confidence."""

    def __init__(self, batch: int, out_size: tuple[int, int], dtype: torch.dtype,
                 device: torch.device, confidence: bool) -> None:
        self.labels = torch.empty((batch, *out_size), dtype=dtype, device=device)
        self.confidence = (torch.empty((batch, *out_size), dtype=torch.uint8, device=device)
                           if confidence else None)

    def fill(self, top: int, bottom: int, scores: torch.Tensor, probabilities: bool) -> None:
        labels, confidence = _ids(scores, probabilities=probabilities, dtype=self.labels.dtype,
                                  confidence=self.confidence is not None)
        self.labels[:, top:bottom] = labels
        if self.confidence is not None:
            self.confidence[:, top:bottom] = confidence

    def result(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.labels if self.confidence is None else (self.labels, self.confidence)


def _labels_in_strips(views: list[torch.Tensor], out_size: tuple[int, int], average: bool,
                      dtype: torch.dtype, confidence: bool = False):
    """Class ids (and confidence) of the views' averaged probabilities (``average``) or of the
    one view's logits, strip by strip: views at their own sizes plus one strip at a time."""
    batch, classes = views[0].shape[:2]
    maps = _Maps(batch, out_size, dtype, views[0].device, confidence)
    for top, bottom in _strips(batch, classes, out_size):
        if not average:
            maps.fill(top, bottom, resize_rows(views[0], out_size, top, bottom), False)
            continue
        total = None
        for logits in views:
            probabilities = resize_rows(logits, out_size, top, bottom).softmax(dim=1)
            total = probabilities if total is None else total.add_(probabilities)
        maps.fill(top, bottom, total.div_(len(views)), True)
    return maps.result()


def _labels_of_accumulated(views: Iterable[torch.Tensor], out_size: tuple[int, int],
                           dtype: torch.dtype, confidence: bool = False):
    """Class ids (and confidence) of averaged probabilities summed at ``out_size`` one view at
    a time, each view resized strip by strip: for views larger than the output (scales above
    1)."""
    total = None
    count = 0
    for logits in views:
        if total is None:
            total = torch.zeros((logits.shape[0], logits.shape[1], *out_size),
                                dtype=torch.float32, device=logits.device)
        for top, bottom in _strips(logits.shape[0], logits.shape[1], out_size):
            total[:, :, top:bottom] += resize_rows(logits, out_size, top, bottom).softmax(dim=1)
        count += 1
    maps = _Maps(total.shape[0], out_size, dtype, total.device, confidence)
    for top, bottom in _strips(total.shape[0], total.shape[1], out_size):
        maps.fill(top, bottom, total[:, :, top:bottom].div_(count), True)
    return maps.result()


def predict_labels(
    model: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    image: torch.Tensor,
    out_size: tuple[int, int],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    *,
    dtype: torch.dtype = torch.int64,
    with_confidence: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Class ids for a normalised batch: the prediction evaluation scores and inference writes.

    With one scale of 1 and no flip this is the argmax of the logits resized to ``out_size``
    (softmax is monotonic, so the full-size softmax that averaging needs is skipped); otherwise
    the argmax of :func:`predict_probabilities`. Whatever ``out_size``, the classes x output
    pixels float maps are only built whole up to :data:`STRIP_ELEMENTS`; larger ones are
    resized and reduced strip by strip (:func:`resize_rows`), so memory follows the model's
    input, not the output (``--size`` on a large photo).

    Args:
        model: returns ``{"out": logits}``; a module in eval mode, or an exported-model runner.
        image: ``(N, C, H, W)`` normalised input.
        out_size: ``(height, width)`` of the returned map.
        scales: input scale factors (see :func:`predict_probabilities`).
        flip: also average the horizontally flipped input.
        dtype: of the returned ids (``torch.uint8`` takes an eighth of int64's memory).
        with_confidence: also return the (averaged) softmax probability of the chosen class,
            as uint8 ``round(255 * p)``, computed in the same strips as the ids.

    Returns:
        ``(N, out_height, out_width)`` class ids; with ``with_confidence``, the ids and the
        ``(N, out_height, out_width)`` uint8 confidence.
    """
    out_size = (int(out_size[0]), int(out_size[1]))
    keep = functools.partial(_pick, with_confidence)
    if tuple(scales) == (1.0,) and not flip:  # one view: the model is called here
        logits = model(image)["out"].float()
        if tuple(logits.shape[-2:]) != out_size:
            if logits.shape[0] * logits.shape[1] * out_size[0] * out_size[1] > STRIP_ELEMENTS:
                return _labels_in_strips([logits], out_size, average=False, dtype=dtype,
                                         confidence=with_confidence)
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return keep(*_ids(logits, probabilities=False, dtype=dtype, confidence=with_confidence))
    views = _view_logits(model, image, scales, flip)
    first = next(views)
    batch, classes = first.shape[:2]
    full_size = batch * classes * out_size[0] * out_size[1]
    if full_size <= STRIP_ELEMENTS:
        return keep(*_ids(_averaged_probabilities(itertools.chain([first], views), out_size),
                          probabilities=True, dtype=dtype, confidence=with_confidence))
    height, width = image.shape[-2:]
    views_size = batch * classes * (2 if flip else 1) * sum(
        max(int(round(height * scale)), 1) * max(int(round(width * scale)), 1)
        for scale in scales)
    if views_size <= full_size:  # keep the views (smaller), resize them strip by strip
        return _labels_in_strips([first, *views], out_size, average=True, dtype=dtype,
                                 confidence=with_confidence)
    return _labels_of_accumulated(itertools.chain([first], views), out_size, dtype,
                                  with_confidence)


def _pick(with_confidence: bool, labels: torch.Tensor, confidence: torch.Tensor | None):
    return (labels, confidence) if with_confidence else labels


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(H, W)`` class ids resized (nearest) to ``size``, in their own dtype (uint8 ids of a
    24-megapixel photo take 24 MB, where float32 would take four times that)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[None, None], size=tuple(size), mode="nearest")[0, 0]


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
    return predict_maps_tiled(model, image, prepare, windows=(tile, overlap, batch_size),
                              scales=scales, flip=flip)


def predict_maps_tiled(
    model: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    image: torch.Tensor,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    *,
    windows: tuple[int, int, int],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    with_confidence: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`predict_labels_tiled` with ``windows`` = ``(tile, overlap, batch_size)``; with
    ``with_confidence`` also the ``(H, W)`` uint8 confidence (:func:`predict_labels`), each
    pixel's from the window its class id comes from."""
    tile, overlap, batch_size = windows
    height, width = image.shape[-2:]
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows = _windows(height, tile_h, overlap)
    columns = _windows(width, tile_w, overlap)
    windows_ = [(row, column) for row in rows for column in columns]
    maps = _Maps(1, (height, width), torch.uint8, torch.device("cpu"), with_confidence)
    for first in range(0, len(windows_), max(batch_size, 1)):
        chunk = windows_[first:first + max(batch_size, 1)]
        crops = torch.stack([image[:, top:top + tile_h, left:left + tile_w]
                             for (top, _), (left, _) in chunk])
        predicted = predict_labels(model, prepare(crops), (tile_h, tile_w), scales, flip,
                                   dtype=torch.uint8, with_confidence=with_confidence)
        labels, confidence = predicted if with_confidence else (predicted, None)
        for k, (row, column) in enumerate(chunk):
            (top, (y0, y1)), (left, (x0, x1)) = row, column
            crop = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
            maps.labels[0, y0:y1, x0:x1] = labels[k][crop].cpu()
            if maps.confidence is not None:
                maps.confidence[0, y0:y1, x0:x1] = confidence[k][crop].cpu()
    return (maps.labels[0], maps.confidence[0]) if with_confidence else maps.labels[0]
