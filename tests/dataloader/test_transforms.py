"""Joint transforms: image and label stay aligned, padding is 0 / 255, labels keep their values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dataloader import custom_transforms as tr
from dataloader.utils import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

# Label value -> image colour. No channel is 0, so a black pixel can only be padding.
COLOURS = np.array([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30),
                    (200, 30, 200), (30, 200, 200)], dtype=np.uint8)


def block_sample(width: int = 120, height: int = 90, block: int = 30, seed: int = 0) -> dict:
    """Blocks of random classes 0-5; the image colour of a pixel is COLOURS[label]."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, len(COLOURS), (height // block + 1, width // block + 1))
    label = np.kron(classes, np.ones((block, block), dtype=np.int64))[:height, :width]
    label = label.astype(np.uint8)
    return {"image": Image.fromarray(COLOURS[label]), "label": Image.fromarray(label)}


def check_alignment(image: np.ndarray, label: np.ndarray, radius: int) -> int:
    """Check that the transformed ``image`` and ``label`` still agree.

    Padding is black with label 255, and where a pixel and all its neighbours up to ``radius``
    pixels away share one label, resampling can only have mixed that label's colour, so the image
    must show it exactly (a one-pixel shift between image and label breaks this along every block
    edge). ``radius`` must cover the bilinear blend: one source pixel, i.e. the upscale factor.

    Returns:
        How many pixels were checked against their colour.
    """
    padded = label == IGNORE_INDEX
    np.testing.assert_array_equal(image.max(axis=-1) == 0, padded)
    assert set(np.unique(label)) <= set(range(len(COLOURS))) | {IGNORE_INDEX}
    size = 2 * radius + 1
    padded_label = np.pad(label.astype(np.int64), radius, constant_values=-1)
    windows = np.lib.stride_tricks.sliding_window_view(padded_label, (size, size))
    uniform = (windows == label[..., None, None]).all(axis=(-1, -2)) & ~padded
    difference = np.abs(image[uniform].astype(int) - COLOURS[label[uniform]].astype(int))
    assert difference.size == 0 or difference.max() <= 2
    return int(uniform.sum())


@pytest.mark.parametrize("base_size, crop_size", [(90, 64), (40, 64), (200, 48), (30, 100)])
def test_scale_crop_flip_keep_image_and_label_aligned(base_size, crop_size):
    torch.manual_seed(0)
    transform = tr.Compose([tr.RandomScaleCrop(base_size, crop_size), tr.RandomHorizontalFlip()])
    padded = []
    checked = 0
    # Largest upscale of the 90-pixel short side, plus one pixel of slack.
    radius = math.ceil(2 * base_size / 90) + 1
    for seed in range(12):
        out = transform(block_sample(seed=seed))
        image, label = np.asarray(out["image"]), np.asarray(out["label"])
        assert out["image"].mode == "RGB" and out["label"].mode == "L"
        assert image.shape == (crop_size, crop_size, 3) and label.shape == (crop_size, crop_size)
        checked += check_alignment(image, label, radius)
        padded.append(bool((label == IGNORE_INDEX).any()))
    assert checked > 0.2 * 12 * crop_size**2 * (0.3 if crop_size > 2 * base_size else 1)
    # The short side (the image's height) is drawn from [base / 2, 2 base]: padded exactly when
    # it is below the crop size.
    if crop_size > 2 * base_size:
        assert all(padded)
    if crop_size <= base_size // 2:
        assert not any(padded)


def reference_scale_crop(sample: dict, base_size: int, crop_size: int) -> dict:
    """The textbook version: resize the whole pair, pad right/bottom, crop. It draws the same
    numbers from torch's generator in the same order (short side, left, top)."""
    image, label = sample["image"], sample["label"]
    width, height = image.size
    short_side = int(torch.randint(base_size // 2, 2 * base_size + 1, ()))
    if height > width:
        size = (short_side, int(height * short_side / width + 0.5))
    else:
        size = (int(width * short_side / height + 0.5), short_side)
    image = image.resize(size, Image.Resampling.BILINEAR)
    # NEAREST: the source pixel under each output pixel's centre, in exact integer arithmetic.
    columns = (2 * np.arange(size[0]) + 1) * width // (2 * size[0])
    rows = (2 * np.arange(size[1]) + 1) * height // (2 * size[1])
    label = Image.fromarray(np.asarray(label)[rows[:, None], columns[None, :]])
    padded_size = (max(size[0], crop_size), max(size[1], crop_size))
    canvas_image = Image.new("RGB", padded_size, 0)
    canvas_image.paste(image, (0, 0))
    canvas_label = Image.new("L", padded_size, IGNORE_INDEX)
    canvas_label.paste(label, (0, 0))
    left = int(torch.randint(0, padded_size[0] - crop_size + 1, ()))
    top = int(torch.randint(0, padded_size[1] - crop_size + 1, ()))
    box = (left, top, left + crop_size, top + crop_size)
    return {"image": canvas_image.crop(box), "label": canvas_label.crop(box)}


@pytest.mark.parametrize("base_size, crop_size", [(90, 64), (40, 64), (200, 48), (30, 100)])
def test_scale_crop_equals_resize_pad_crop(base_size, crop_size):
    # The transform resamples only the cropped region; it must give the pixels of the textbook
    # resize -> pad -> crop, so image and label are exactly as aligned as there.
    transform = tr.RandomScaleCrop(base_size, crop_size)
    for seed in range(8):
        sample = block_sample(seed=seed, block=7)
        torch.manual_seed(seed)
        out = transform(sample)
        torch.manual_seed(seed)
        expected = reference_scale_crop(sample, base_size, crop_size)
        np.testing.assert_array_equal(np.asarray(out["label"]), np.asarray(expected["label"]))
        difference = np.abs(np.asarray(out["image"], dtype=int) - np.asarray(expected["image"]))
        assert difference.max() <= 1


def test_scale_crop_at_scale_one_is_an_exact_window():
    sample = block_sample(seed=3)
    source_image, source_label = np.asarray(sample["image"]), np.asarray(sample["label"])
    torch.manual_seed(1)
    transform = tr.RandomScaleCrop(base_size=90, crop_size=90, scale_range=(1.0, 1.0))
    offsets = set()
    for _ in range(8):
        out = transform(sample)
        image, label = np.asarray(out["image"]), np.asarray(out["label"])
        matches = [left for left in range(120 - 90 + 1)
                   if np.array_equal(label, source_label[:, left:left + 90])
                   and np.array_equal(image, source_image[:, left:left + 90])]
        assert matches, "the crop is not a window of the source"
        offsets.add(matches[0])
    assert len(offsets) > 1  # the window position is random


def test_scale_range_sets_the_short_side():
    # Without cropping (huge crop) the valid part of the output is the rescaled image.
    torch.manual_seed(0)
    transform = tr.RandomScaleCrop(base_size=40, crop_size=300)
    short_sides = []
    for _ in range(30):
        label = np.asarray(transform(block_sample())["label"])
        valid = label != IGNORE_INDEX
        height, width = valid.any(1).sum(), valid.any(0).sum()
        assert width == round(height * 120 / 90) or abs(width - height * 120 / 90) <= 1
        short_sides.append(height)
    assert 20 <= min(short_sides) and max(short_sides) <= 80
    assert max(short_sides) - min(short_sides) > 20


def test_flip_is_exact_and_joint():
    sample = block_sample(seed=1)
    flipped = tr.RandomHorizontalFlip(p=1.0)(sample)
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.asarray(flipped[key]), np.asarray(sample[key])[:, ::-1])
    assert tr.RandomHorizontalFlip(p=0.0)(sample) is sample


def test_blur_changes_the_image_only():
    sample = block_sample(seed=2)
    torch.manual_seed(0)
    blurred = tr.RandomGaussianBlur(p=1.0, sigma_range=(1.0, 1.0))(sample)
    assert blurred["label"] is sample["label"]
    assert not np.array_equal(np.asarray(blurred["image"]), np.asarray(sample["image"]))
    assert blurred["image"].size == sample["image"].size
    assert tr.RandomGaussianBlur(p=0.0)(sample) is sample


def test_to_tensor_normalize_values_and_types():
    image = Image.new("RGB", (5, 4), (124, 116, 104))
    label = Image.fromarray(np.array([[0, 1, 255, 20, 7]] * 4, dtype=np.uint8))
    out = tr.ToTensorNormalize()({"image": image, "label": label})
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 4, 5)
    assert out["image"].is_contiguous()
    expected = [(v / 255 - m) / s for v, m, s in zip((124, 116, 104), IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(out["image"][:, 2, 3], torch.tensor(expected), atol=1e-5, rtol=0)
    assert out["label"].dtype == torch.int64 and out["label"].shape == (4, 5)
    assert out["label"][0].tolist() == [0, 1, 255, 20, 7]


def test_train_transform_outputs():
    torch.manual_seed(0)
    transform = tr.train_transform(base_size=64, crop_size=48)
    for seed in range(4):
        source_label = np.asarray(block_sample(seed=seed)["label"])
        out = transform(block_sample(seed=seed))
        assert out["image"].shape == (3, 48, 48) and out["image"].dtype == torch.float32
        assert out["label"].shape == (48, 48) and out["label"].dtype == torch.int64
        assert set(out["label"].unique().tolist()) <= set(np.unique(source_label)) | {255}
        assert torch.isfinite(out["image"]).all()


def test_train_transform_is_reproducible_from_torch_seed():
    transform = tr.train_transform(base_size=64, crop_size=48)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append([transform(block_sample(seed=s)) for s in range(3)])
    for first, second in zip(*runs):
        torch.testing.assert_close(first["image"], second["image"], rtol=0, atol=0)
        assert torch.equal(first["label"], second["label"])


def test_eval_transform_keeps_the_label_at_full_resolution():
    sample = block_sample()
    out = tr.eval_transform(45)(sample)
    assert out["image"].shape == (3, 45, 60)
    assert out["label"].shape == (90, 120)
    np.testing.assert_array_equal(out["label"].numpy(), np.asarray(sample["label"]))
    full = tr.eval_transform(None)(sample)
    assert full["image"].shape == (3, 90, 120) and full["label"].shape == (90, 120)


def test_extra_keys_pass_through():
    sample = dict(block_sample(), name="x")
    torch.manual_seed(0)
    assert tr.train_transform(64, 32)(sample)["name"] == "x"


@pytest.mark.parametrize("make", [
    lambda: tr.RandomScaleCrop(0, 10),
    lambda: tr.RandomScaleCrop(10, 10, scale_range=(2.0, 1.0)),
    lambda: tr.RandomHorizontalFlip(p=1.5),
    lambda: tr.RandomGaussianBlur(sigma_range=(0.0, 1.0)),
    lambda: tr.ResizeShortSide(0),
    lambda: tr.ToTensorNormalize(std=(0.2, 0.0, 0.2)),
])
def test_bad_arguments_are_value_errors(make):
    with pytest.raises(ValueError):
        make()
