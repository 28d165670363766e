"""Property tests of test-time prediction: window by window equals whole-image for a model that
sees one pixel at a time, and the strip-by-strip resize and argmax equal the whole-tensor ones.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import modeling.inference_ops as predict
from modeling.inference_ops import (_windows, predict_labels, predict_labels_tiled,
                              predict_probabilities, resize_rows)


class PerPixel:
    """A position-independent model: a 1x1 convolution with integer weights on integer pixels.

    Logits are ``num_classes * (weights @ pixel) + class id``: exact integers in float32 (so no
    rounding depends on the window's size) and never tied, so the argmax is the same whatever
    the tensor it is computed in.
    """

    def __init__(self, weights: torch.Tensor):
        self.weight = weights.float()[:, :, None, None]
        self.offsets = torch.arange(weights.shape[0], dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = F.conv2d(x.float(), self.weight) * self.weight.shape[0] + self.offsets
        return {"out": logits}


def per_pixel_model(num_classes: int) -> st.SearchStrategy[PerPixel]:
    weights = st.lists(st.integers(-3, 3), min_size=3 * num_classes, max_size=3 * num_classes)
    return weights.map(lambda values: PerPixel(torch.tensor(values).view(num_classes, 3)))


@st.composite
def tiled_cases(draw):
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    tile = draw(st.integers(2, 28))
    overlap = draw(st.integers(0, tile - 1))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    model = draw(per_pixel_model(draw(st.integers(2, 5))))
    return image, model, tile, overlap, draw(st.integers(1, 4)), draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(tiled_cases())
def test_windowed_prediction_equals_whole_image_prediction(case):
    image, model, tile, overlap, batch_size, flip = case
    whole = predict_labels(model, image[None].float(), tuple(image.shape[-2:]), flip=flip)[0]
    tiled = predict_labels_tiled(model, image, lambda crops: crops.float(), tile=tile,
                                 overlap=overlap, batch_size=batch_size, flip=flip)
    assert tiled.dtype == torch.uint8
    assert torch.equal(tiled.long(), whole)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 80), tile=st.integers(1, 40), overlap=st.integers(0, 45))
def test_windows_own_a_partition_and_each_pixel_its_most_central_window(length, tile, overlap):
    tile = min(tile, length)  # predict_labels_tiled clips the window to the image
    windows = _windows(length, tile, overlap)
    starts = [start for start, _ in windows]
    assert starts[0] == 0 and starts[-1] + tile == length
    if len(starts) > 1:  # neighbours overlap by at least the asked overlap (clipped below tile)
        assert all(b - a <= tile - min(overlap, tile - 1) for a, b in zip(starts, starts[1:]))
    owner = [None] * length
    for number, (start, (begin, end)) in enumerate(windows):
        assert start <= begin <= end <= start + tile
        for pixel in range(begin, end):
            assert owner[pixel] is None, f"pixel {pixel} written twice"
            owner[pixel] = number
    assert None not in owner, "a pixel no window writes"

    def margin(start: int, pixel: int) -> int:  # distance to the window's nearest border
        return min(pixel - start, start + tile - 1 - pixel)

    for pixel, number in enumerate(owner):
        best = max(margin(start, pixel) for start, _ in windows if start <= pixel < start + tile)
        assert margin(windows[number][0], pixel) == best


@st.composite
def logits_and_rows(draw):
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 12)),
             draw(st.integers(1, 12)))
    out_size = (draw(st.integers(1, 30)), draw(st.integers(1, 30)))
    top = draw(st.integers(0, out_size[0] - 1))
    bottom = draw(st.integers(top + 1, out_size[0]))
    return torch.randn(shape, generator=generator), out_size, top, bottom


@settings(max_examples=150, deadline=None)
@given(logits_and_rows())
def test_resize_rows_equals_rows_of_the_whole_resize(case):
    logits, out_size, top, bottom = case
    whole = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    strip = resize_rows(logits, out_size, top, bottom)
    assert strip.shape == (*logits.shape[:2], bottom - top, out_size[1])
    torch.testing.assert_close(strip, whole[:, :, top:bottom], rtol=0, atol=1e-5)


def clear_argmax(scores: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(argmax over dim 1, mask of pixels whose best class leads the next by > margin)``:
    float rounding may only decide the near ties."""
    if scores.shape[1] == 1:
        return scores.argmax(dim=1), torch.ones_like(scores[:, 0], dtype=torch.bool)
    top2 = scores.topk(2, dim=1).values
    return scores.argmax(dim=1), (top2[:, 0] - top2[:, 1]) > margin


@st.composite
def strip_cases(draw):
    num_classes = draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    image = torch.randn(draw(st.integers(1, 2)), 3, draw(st.integers(2, 10)),
                        draw(st.integers(2, 10)), generator=generator)
    weights = torch.randn(num_classes, 3, 3, 3, generator=generator)
    out_size = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    scales = tuple(draw(st.lists(st.sampled_from([0.5, 0.75, 1.0, 1.5, 2.0]), min_size=1,
                                 max_size=2, unique=True)))
    return (image, weights, out_size, scales, draw(st.booleans()),
            draw(st.integers(1, 300)))


@settings(max_examples=80, deadline=None)
@given(strip_cases())
def test_strip_by_strip_labels_equal_the_whole_tensor_argmax(case):
    image, weights, out_size, scales, flip, strip_elements = case

    def model(x: torch.Tensor) -> dict[str, torch.Tensor]:  # a 3x3 conv: scales matter
        return {"out": F.conv2d(x, weights, padding=1)}

    if scales == (1.0,) and not flip:
        whole = F.interpolate(model(image)["out"], size=out_size, mode="bilinear",
                              align_corners=False)
    else:
        whole = predict_probabilities(model, image, out_size, scales, flip)
    expected, clear = clear_argmax(whole, margin=1e-4)
    with pytest.MonkeyPatch.context() as patch:  # strips of at most strip_elements
        patch.setattr(predict, "STRIP_ELEMENTS", strip_elements)
        labels = predict_labels(model, image, out_size, scales, flip, dtype=torch.uint8)
    assert labels.shape == (image.shape[0], *out_size) and labels.dtype == torch.uint8
    assert torch.equal(labels.long()[clear], expected[clear])

