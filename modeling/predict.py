"""Test-time prediction shared by evaluation and inference: multi-scale and flip averaging."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
