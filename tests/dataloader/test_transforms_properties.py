"""Property tests of the joint transforms: for any image size, base and crop size and random
draw, labels keep their values (the classes and 255) and stay aligned with the image.

The image encodes each pixel's own position (red = x + 8, green = y + 8; 0 only in padding),
and the label is a grid of blocks whose class follows from the position. After a transform, the
position read back from the image must fall in a block of the label's class: a label shifted,
flipped or scaled apart from its image breaks this. Bilinear resampling of the position ramp
keeps it (up to rounding) except within about one source pixel per downscale step of the
image's border, which the tolerance covers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dataloader import custom_transforms as tr
from dataloader.utils import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

OFFSET = 8  # position + 8: a blend of image pixels with 0 padding stays > 0 (blur)
BLOCK = 10


def block_class(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """The class of source pixel (x, y): blocks of BLOCK pixels, ids 0..C-1 and 255."""
    ids = (x // BLOCK + 2 * (y // BLOCK)) % (num_classes + 1)
    return np.where(ids == num_classes, IGNORE_INDEX, ids)


def position_sample(width: int, height: int, num_classes: int) -> dict:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x + OFFSET, y + OFFSET, np.full_like(x, 100)], axis=-1)
    label = block_class(x, y, num_classes)
    return {"image": Image.fromarray(pixels.astype(np.uint8)),
            "label": Image.fromarray(label.astype(np.uint8))}


def pixels_of(image: torch.Tensor) -> np.ndarray:
    """Undo ToTensorNormalize: ``(H, W, 3)`` integer 0-255 values."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std * 255 + mean * 255).round().permute(1, 2, 0).numpy().astype(np.int64)


def check_labels_follow_the_image(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int],
                                  num_classes: int, tolerance: int) -> None:
    """``image`` (normalised) and ``label`` of one transformed position sample of ``size``
    (width, height): label values, padding, and every label pixel away from 255 in the class of
    the block under the position its image pixel reads, give or take ``tolerance`` pixels."""
    label = label.numpy()
    assert set(np.unique(label).tolist()) <= {*range(num_classes), IGNORE_INDEX}
    pixels = pixels_of(image)
    padding = (pixels[..., 0] == 0) & (pixels[..., 1] == 0)
    assert (label[padding] == IGNORE_INDEX).all(), "padding must be ignored"
    # Pixels whose 3x3 neighbourhood holds no 255: away from padding (blurred into its
    # neighbours) and from ignored blocks.
    ignored = np.pad(label == IGNORE_INDEX, 1, constant_values=True)
    near_ignore = np.zeros_like(label, dtype=bool)
    for dy in range(3):
        for dx in range(3):
            near_ignore |= ignored[dy:dy + label.shape[0], dx:dx + label.shape[1]]
    width, height = size
    for row, column in zip(*np.nonzero(~near_ignore)):
        x, y = pixels[row, column, :2] - OFFSET
        xs = np.clip(np.arange(x - tolerance, x + tolerance + 1), 0, width - 1)
        ys = np.clip(np.arange(y - tolerance, y + tolerance + 1), 0, height - 1)
        allowed = set(block_class(xs[None, :], ys[:, None], num_classes).ravel().tolist())
        assert label[row, column] in allowed, (
            f"label {label[row, column]} at ({column}, {row}) but the image there shows "
            f"source pixel ({x}, {y}), whose classes around are {sorted(allowed)}")


@st.composite
def train_cases(draw):
    return (draw(st.integers(16, 80)), draw(st.integers(16, 80)), draw(st.integers(24, 64)),
            draw(st.integers(8, 48)), draw(st.integers(1, 5)), draw(st.integers(0, 2**31)),
            draw(st.sampled_from(["train", "scale_crop", "flip", "blur"])))


@settings(max_examples=60, deadline=None)
@given(train_cases())
def test_train_transforms_keep_label_values_and_alignment(case):
    width, height, base_size, crop_size, num_classes, seed, steps = case
    transform = {
        "train": tr.train_transform(base_size, crop_size),
        "scale_crop": tr.Compose([tr.RandomScaleCrop(base_size, crop_size),
                                  tr.ToTensorNormalize()]),
        "flip": tr.Compose([tr.RandomHorizontalFlip(p=1.0), tr.ToTensorNormalize()]),
        "blur": tr.Compose([tr.RandomGaussianBlur(p=1.0), tr.ToTensorNormalize()]),
    }[steps]
    torch.manual_seed(seed)
    sample = transform(position_sample(width, height, num_classes))
    image, label = sample["image"], sample["label"]
    expected = (crop_size,) * 2 if steps in ("train", "scale_crop") else (height, width)
    assert tuple(image.shape) == (3, *expected) and tuple(label.shape) == expected
    assert label.dtype == torch.int64
    # The largest downscale: the short side drawn down to half the base size.
    downscale = min(width, height) / max(1, int(0.5 * base_size))
    check_labels_follow_the_image(image, label, (width, height), num_classes,
                                  tolerance=2 + math.ceil(downscale))
    if steps == "flip":  # and the flip did happen: column 0 shows the last source column
        assert (pixels_of(image)[:, 0, 0] == width - 1 + OFFSET).all()


@settings(max_examples=30, deadline=None)
@given(width=st.integers(8, 80), height=st.integers(8, 80), eval_size=st.integers(4, 100),
       num_classes=st.integers(1, 5), resize=st.booleans())
def test_eval_transform_keeps_the_label_and_resizes_the_image_over_it(width, height, eval_size,
                                                                      num_classes, resize):
    sample = position_sample(width, height, num_classes)
    out = tr.eval_transform(eval_size if resize else None)(dict(sample))
    np.testing.assert_array_equal(out["label"].numpy(), np.asarray(sample["label"]))
    image_height, image_width = out["image"].shape[-2:]
    if not resize:
        assert (image_height, image_width) == (height, width)
    else:
        assert min(image_height, image_width) == eval_size
    # Image pixel (i, j) covers label pixel ((i + 0.5) * H / h, (j + 0.5) * W / w).
    pixels = pixels_of(out["image"]) - OFFSET
    downscale = max(width / image_width, height / image_height, 1.0)
    tolerance = 1.5 + downscale
    columns = (np.arange(image_width) + 0.5) * width / image_width - 0.5
    rows = (np.arange(image_height) + 0.5) * height / image_height - 0.5
    assert np.abs(pixels[..., 0] - columns[None, :]).max() <= tolerance
    assert np.abs(pixels[..., 1] - rows[:, None]).max() <= tolerance
