"""Label conventions every package shares: the ignore value, and how a label map is coloured."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

#: Label value for pixels that are never learned nor scored: crop padding, overlaps, borders.
IGNORE_INDEX = 255


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A palette ("P") PNG-ready image: pixel values stay class ids, the palette gives colours.

    Args:
        label: ``(H, W)`` integer array of class ids (255 = ignore, drawn white).
        palette: per-class RGB triples.
    """
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    flat[IGNORE_INDEX] = (255, 255, 255)
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette(flat.reshape(-1).tolist())
    return image
