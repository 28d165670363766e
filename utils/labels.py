"""Label conventions every package shares: the ignore value, and the one colour table.

:func:`colour_table` is the only place that turns a class id into a colour: a palette PNG's
palette, the colour and overlay outputs, the TensorBoard image grid and the figures all draw
through it, so they agree on every id:

- an id the palette has: its palette colour;
- the ignore value 255: white;
- any other id (a class the palette lacks): black.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch only for the figures' helper, which receives tensors
    import torch

#: Label value for pixels that are never learned nor scored: crop padding, overlaps, borders.
IGNORE_INDEX = 255
#: Colour of the ignore value in every drawing.
IGNORE_COLOUR = (255, 255, 255)


def color_map(num_colors: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: class ``i`` gets the bit-interleaved colour of ``i``.

    Returns:
        ``(num_colors, 3)`` uint8 array; entry 0 is black, entry 15 (person) is (192, 128, 128).
    """
    cmap = np.zeros((num_colors, 3), dtype=np.uint8)
    for i in range(num_colors):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def palette_for(num_classes: int) -> list[list[int]]:
    """Per-class RGB colours as plain lists (storable in a checkpoint); 255 stays the ignore
    value's (white)."""
    if num_classes > 255:
        raise ValueError(f"at most 255 classes can be coloured, got {num_classes}")
    return color_map(num_classes).tolist()


def colour_table(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Every label value's colour, as a ``(256, 3)`` uint8 array indexed by the value.

    Args:
        palette: RGB triple (0-255) per class id, at most 255 of them.

    Returns:
        ``palette[i]`` at row ``i``, white at :data:`IGNORE_INDEX`, black at every other row.
    """
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    table[IGNORE_INDEX] = IGNORE_COLOUR
    return table


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """The colours of a label map, by :func:`colour_table`.

    Args:
        labels: integer class ids of any shape, e.g. ``(H, W)`` or ``(N, H, W)``, each in
            ``[0, 255]``.
        palette: RGB triple (0-255) per class id.

    Returns:
        ``labels.shape + (3,)`` uint8 RGB.

    Raises:
        ValueError: an id below 0 or above 255 (no label value; NumPy would wrap a negative one).
    """
    labels = np.asarray(labels)
    if labels.dtype != np.uint8 and labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"label values run from {labels.min()} to {labels.max()}, not within "
                         f"0-255")
    return colour_table(palette)[labels]


def palette_image(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A palette ("P") PNG-ready image: pixel values stay class ids, :func:`colour_table` gives
    the colours a viewer shows.

    Args:
        labels: ``(H, W)`` integer array of class ids in ``[0, 255]``.
        palette: RGB triple (0-255) per class id.
    """
    image = Image.fromarray(np.asarray(labels).astype(np.uint8), mode="P")
    image.putpalette(colour_table(palette).reshape(-1).tolist())
    return image


def shown_channels(images: "torch.Tensor") -> "torch.Tensor":
    """``(..., C, H, W)`` images -> ``(..., 3, H, W)`` for figures: RGB as it is, the first
    three bands of N-band images, one band as grey (the figures of a run, not a display
    choice: inference.py's ``--rgb-bands`` chooses bands for its overlays)."""
    channels = images.shape[-3]
    if channels >= 3:
        return images[..., :3, :, :]
    return images[..., :1, :, :].expand(*images.shape[:-3], 3, *images.shape[-2:])
