"""Prediction shared by evaluation and inference (:mod:`modeling.inference_ops`): class ids,
scales and flips, windows, and the bounded memory of large outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import modeling.inference_ops
from dataloader.custom_transforms import Normalize
from modeling.inference_ops import (predict_labels, predict_labels_tiled, predict_maps_tiled,
                                    predict_probabilities, tile_starts)


class Pointwise(torch.nn.Module):
    """A per-pixel model (1x1 convolution): its prediction of a pixel ignores the neighbours,
    so any tiling must reproduce the whole-image prediction exactly."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def test_tile_starts_known_values():
    assert tile_starts(100, 40, 10) == [0, 30, 60]      # stride 30 fits exactly
    # 4 windows over 61 pixels of travel: round(61 * i / 3) = 0, 20, 41, 61
    assert tile_starts(101, 40, 10) == [0, 20, 41, 61]
    assert tile_starts(40, 40, 10) == [0]
    assert tile_starts(7, 40, 10) == [0]
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 40, 40)


@pytest.mark.parametrize("length,tile,overlap", [(100, 40, 10), (101, 40, 10), (1000, 256, 64),
                                                 (41, 40, 0), (300, 64, 63)])
def test_windows_cover_everything_and_overlap_enough(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("size,tile,overlap,batch", [((97, 131), 32, 8, 1), ((97, 131), 32, 8, 3),
                                                     ((20, 300), 64, 16, 2), ((50, 50), 64, 16, 1)])
def test_tiled_prediction_of_a_pointwise_model_equals_the_whole_image(size, tile, overlap, batch):
    model = Pointwise()
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8)
    normalize = Normalize()
    with torch.no_grad():
        whole = predict_labels(model, normalize(image)[None], size)[0]
        tiled = predict_labels_tiled(model, image, normalize, tile=tile, overlap=overlap,
                                     batch_size=batch)
    assert tiled.dtype == torch.uint8 and tuple(tiled.shape) == size
    assert torch.equal(tiled.long(), whole)


def test_each_pixel_comes_from_the_window_it_is_deepest_in():
    """A model that answers 'how far is this pixel from my window's left edge' (in classes):
    with windows at 0 and 60 of width 100 (length 160), column 79 is 79 from the first window's
    edge and 19 from the second's; the overlap [60, 100) is split at 80."""

    def distance_from_left(x: torch.Tensor) -> dict[str, torch.Tensor]:
        width = x.shape[-1]
        classes = torch.arange(width, dtype=torch.float32)
        logits = -(classes.view(1, width, 1, 1) - classes.view(1, 1, 1, width)).abs()
        return {"out": logits.expand(x.shape[0], width, x.shape[2], width)}

    image = torch.zeros(3, 2, 160, dtype=torch.uint8)
    labels = predict_labels_tiled(distance_from_left, image, lambda c: c.float(), tile=100,
                                  overlap=40)
    expected = list(range(80)) + [column - 60 for column in range(80, 160)]
    assert labels[0].tolist() == expected


def test_labels_equal_the_argmax_of_averaged_probabilities():
    model = Pointwise(classes=6)
    image = torch.randn(2, 3, 17, 23)
    with torch.no_grad():
        for out_size, scales, flip in [((17, 23), (1.0,), False), ((34, 40), (1.0,), False),
                                       ((17, 23), (0.5, 1.0), True)]:
            expected = predict_probabilities(model, image, out_size, scales, flip).argmax(1)
            assert torch.equal(predict_labels(model, image, out_size, scales, flip), expected)


class LargestTensor(TorchDispatchMode):
    """Records the most elements any floating-point tensor an operation returns has."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.largest = max(self.largest, value.numel())
        return result


@pytest.mark.parametrize("scales,flip", [((1.0,), False), ((0.5, 1.0), True), ((1.5,), False)])
def test_labels_of_a_small_input_at_a_large_size_never_build_the_full_size_map(
        monkeypatch, scales, flip):
    model = Pointwise(classes=6)
    image = torch.randn(2, 3, 20, 30, generator=torch.Generator().manual_seed(1))
    out_size = (200, 330)  # 2 x 6 classes x 66,000 pixels at full size
    with torch.no_grad():
        expected = modeling.inference_ops.predict_probabilities(model, image, out_size, scales,
                                                                flip).argmax(1)
    monkeypatch.setattr(modeling.inference_ops, "STRIP_ELEMENTS", 2**14)
    with torch.no_grad(), LargestTensor() as largest:
        labels = modeling.inference_ops.predict_labels(model, image, out_size, scales, flip,
                                                       dtype=torch.uint8)
    assert labels.dtype == torch.uint8 and tuple(labels.shape) == (2, *out_size)
    assert (labels.long() == expected).float().mean().item() > 0.9999
    views = 2 * 6 * round(20 * max(scales)) * round(30 * max(scales))
    assert largest.largest <= max(4 * 2**14, views)  # a strip or a view, never 792,000


class _Conv(torch.nn.Module):
    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


@pytest.mark.parametrize("scales,flip,strip_elements", [
    ((1.0,), False, None), ((1.0,), False, 64),       # whole; one view in strips
    ((0.5, 1.0), True, None), ((0.5, 1.0), True, 64),  # averaged; averaged in strips
    ((1.0, 1.5), False, 64)])                          # views larger than the output
def test_confidence_is_the_rounded_largest_softmax_probability(monkeypatch, scales, flip,
                                                                strip_elements):
    """By hand: every view's logits resized to the output, softmax in float64, averaged, the
    largest entry times 255 rounded; the ids are the mask's, unchanged."""
    import modeling.inference_ops as ops

    torch.manual_seed(0)
    model = _Conv(torch.nn.Conv2d(3, 4, 3, padding=1)).eval()
    image = torch.randn(2, 3, 12, 10)
    out_size = (23, 17)
    if strip_elements:
        monkeypatch.setattr(ops, "STRIP_ELEMENTS", strip_elements)
    with torch.no_grad():
        labels, confidence = ops.predict_labels(model, image, out_size, scales, flip,
                                                with_confidence=True)
        total = torch.zeros(2, 4, *out_size, dtype=torch.float64)
        for scale in scales:
            size = [round(side * scale) for side in image.shape[-2:]]
            scaled = F.interpolate(image, size=size, mode="bilinear",
                                   align_corners=False) if scale != 1 else image
            for flipped in (False, True) if flip else (False,):
                logits = model(scaled.flip(3) if flipped else scaled)["out"]
                logits = logits.flip(3) if flipped else logits
                total += F.interpolate(logits, size=out_size, mode="bilinear",
                                       align_corners=False).double().softmax(dim=1)
        probability = total / (len(scales) * (2 if flip else 1))
    scaled = probability.max(dim=1).values * 255
    expected = scaled.round().to(torch.uint8)
    assert confidence.dtype == torch.uint8 and confidence.shape == (2, *out_size)
    # float32 against float64: only a value within rounding error of a half may round apart.
    differs = confidence != expected
    assert (confidence.int() - expected.int()).abs().max() <= 1
    assert ((scaled[differs] - scaled[differs].floor() - 0.5).abs() < 1e-3).all()
    assert torch.equal(labels, ops.predict_labels(model, image, out_size, scales, flip))
    assert torch.equal(labels, probability.argmax(dim=1))


def test_tiled_confidence_equals_the_whole_image_of_a_pointwise_model():
    torch.manual_seed(0)
    model = _Conv(torch.nn.Conv2d(3, 5, 1)).eval()
    image = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)
    with torch.no_grad():
        labels, confidence = predict_maps_tiled(model, image, lambda c: c.float() / 255,
                                                windows=(32, 8, 3), with_confidence=True)
        whole = predict_labels(model, image[None].float() / 255, (70, 90),
                               with_confidence=True)
    assert torch.equal(labels, whole[0][0].to(torch.uint8))
    assert torch.equal(confidence, whole[1][0])


@pytest.mark.parametrize("with_confidence", [False, True])
def test_equal_scores_give_the_first_class_as_argmax_does(with_confidence):
    # Ties are rare in float logits but certain in a quantized model's: every pixel holds the
    # maximum in several classes, and the first of them is argmax's (PyTorch's documented rule).
    logits = torch.zeros(2, 5, 6, 7)
    logits[:, 1] = logits[:, 3] = 2.0   # classes 1 and 3 tie everywhere ...
    logits[0, 4, :3] = 2.0              # ... and class 4 too in some rows
    logits[1, 0, :, :2] = 2.0           # class 0 ties with them in some columns
    found = predict_labels(lambda _: {"out": logits}, torch.zeros(2, 3, 24, 28), (6, 7),
                           dtype=torch.uint8, with_confidence=with_confidence)
    labels = found[0] if with_confidence else found
    assert torch.equal(labels.long(), logits.argmax(dim=1))
    assert set(labels.unique().tolist()) == {0, 1}
    if with_confidence:  # k tied classes at e^2, 5 - k at 1: e^2 / (k e^2 + 5 - k)
        share = {k: torch.e ** 2 / (k * torch.e ** 2 + 5 - k) for k in (2, 3)}
        tied = (logits == 2.0).sum(dim=1)
        expected = torch.where(tied == 2, round(255 * share[2]), round(255 * share[3]))
        assert set(tied.unique().tolist()) == {2, 3}
        assert torch.equal(found[1], expected.to(torch.uint8))
