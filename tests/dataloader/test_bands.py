"""Images of any channel count and bit depth (issue 26): how they are read, scaled, checked,
transformed and counted."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dataloader import custom_transforms as tr
from dataloader.datasets.folder import FolderSegmentation
from dataloader.statistics import channel_statistics, resolve_normalization, statistics_flags
from dataloader.utils import (IMAGENET_MEAN, DatasetError, pixel_bands, probe_bands,
                              read_pixels, unit_scaled)

tifffile = pytest.importorskip("tifffile")


@pytest.mark.parametrize("dtype, bands, scale", [
    (np.uint16, 5, 65535.0), (np.uint8, 4, 255.0), (np.float32, 3, 1.0), (np.uint16, 1, 65535.0)])
def test_tiffs_keep_every_band_on_the_unit_scale(tmp_path, dtype, bands, scale):
    rng = np.random.default_rng(0)
    pixels = (rng.random((6, 7, bands)) * (scale if scale > 1 else 3.0)).astype(dtype)
    path = tmp_path / "a.tif"
    if bands > 1:
        tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="contig")
    else:
        tifffile.imwrite(path, pixels[..., 0], photometric="minisblack")
    read = read_pixels(path)
    assert probe_bands(path) == pixel_bands(read) == (bands, False)
    expected = torch.from_numpy(pixels.astype(np.float32).transpose(2, 0, 1) / np.float32(scale))
    torch.testing.assert_close(unit_scaled(read), expected, rtol=0, atol=0)


def test_planar_tiff_reads_as_bands_last(tmp_path):
    pixels = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)  # (C, H, W)
    tifffile.imwrite(tmp_path / "p.tif", pixels, photometric="minisblack", planarconfig="separate")
    assert read_pixels(tmp_path / "p.tif").shape == (4, 5, 3)
    assert (read_pixels(tmp_path / "p.tif")[..., 2] == pixels[2]).all()


def test_sixteen_bit_png_is_one_band_over_65535_and_8_bit_rgb_stays_pil(tmp_path):
    Image.fromarray(np.array([[0, 65535], [256, 1]], dtype=np.uint16)).save(tmp_path / "g.png")
    grey = read_pixels(tmp_path / "g.png")
    assert pixel_bands(grey) == (1, False)
    assert unit_scaled(grey)[0].flatten().tolist() == pytest.approx([0, 1, 256 / 65535, 1 / 65535])
    Image.new("RGB", (2, 2), (255, 0, 51)).save(tmp_path / "c.png")
    colour = read_pixels(tmp_path / "c.png")
    assert isinstance(colour, Image.Image) and pixel_bands(colour) == (3, True)
    assert unit_scaled(colour)[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])


def write_folder(root, images: dict[str, np.ndarray]):
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for name, pixels in images.items():
            tifffile.imwrite(root / "images" / split / f"{name}.tif", pixels,
                             photometric="minisblack", planarconfig="contig")
            Image.fromarray(np.zeros(pixels.shape[:2], np.uint8)).save(
                root / "masks" / split / f"{name}.png")
    (root / "classes.txt").write_text("a\nb\n")


def test_a_band_count_mismatch_is_one_line_naming_the_file(tmp_path):
    write_folder(tmp_path, {"a": np.zeros((8, 8, 4), np.uint16), "b": np.zeros((8, 8, 3),
                                                                                np.uint16)})
    dataset = FolderSegmentation(tmp_path, "train")
    assert (dataset.in_channels, dataset.rgb8) == (4, False)
    with pytest.raises(DatasetError, match=r"b\.tif \(sample 1\) has 3 band\(s\) but .*a\.tif"):
        dataset.load_sample(1)


def test_channel_statistics_are_exact_over_all_pixels(tmp_path):
    rng = np.random.default_rng(1)
    images = {name: rng.integers(0, 65536, (5 + i, 7, 2), dtype=np.uint16)
              for i, name in enumerate("abc")}
    write_folder(tmp_path, images)
    mean, std = channel_statistics(FolderSegmentation(tmp_path, "train"))
    values = np.concatenate([image.reshape(-1, 2) for image in images.values()]) / 65535.0
    np.testing.assert_allclose(mean, values.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, values.std(axis=0), rtol=1e-12)
    assert statistics_flags([0.5, 0.25], [0.125, 1.0]) == "--mean 0.5 0.25 --std 0.125 1"


def test_normalization_rules(tmp_path):
    write_folder(tmp_path, {"a": np.full((4, 4, 2), 65535, np.uint16)})
    dataset = FolderSegmentation(tmp_path, "train")
    given = resolve_normalization(dataset, mean=[0.1, 0.2], std=[1.0, 2.0], cache_dir=tmp_path)
    assert given == ([0.1, 0.2], [1.0, 2.0])
    with pytest.raises(DatasetError, match="need 2 values"):
        resolve_normalization(dataset, mean=[0.1], std=[1.0], cache_dir=tmp_path)
    stored = {"mean": [0.3, 0.4], "std": [0.5, 0.6]}
    assert resolve_normalization(dataset, mean=None, std=None, stored=stored) == (
        [0.3, 0.4], [0.5, 0.6])
    assert resolve_normalization(dataset, mean=None, std=None,
                                 cache_dir=tmp_path / "c") == ([1.0, 1.0], [1.0, 1.0])


def test_8_bit_rgb_keeps_imagenet_statistics():
    class Photos:
        rgb8, in_channels = True, 3
    assert resolve_normalization(Photos(), mean=None, std=None)[0] == list(IMAGENET_MEAN)


def test_transforms_work_on_n_channel_float_tensors():
    torch.manual_seed(0)
    image = torch.rand(5, 40, 30)
    label = Image.fromarray(np.arange(40 * 30, dtype=np.uint8).reshape(40, 30) % 3)
    mean, std = [0.5] * 5, [0.25] * 5
    sample = tr.train_transform(32, 24, mean=mean, std=std)({"image": image, "label": label})
    assert sample["image"].shape == (5, 24, 24) and sample["image"].dtype == torch.float32
    assert sample["label"].shape == (24, 24)
    flipped = tr.RandomHorizontalFlip(p=1.0)({"image": image, "label": label})
    assert torch.equal(flipped["image"], image.flip(-1))
    blurred = tr.RandomGaussianBlur(p=1.0)({"image": torch.ones(5, 9, 9), "label": label})
    torch.testing.assert_close(blurred["image"], torch.ones(5, 9, 9))  # flat stays flat
    evaluated = tr.eval_transform(20, mean=mean, std=std)({"image": image, "label": label})
    assert evaluated["image"].shape == (5, 26, 20)
    torch.testing.assert_close(tr.Normalize(mean, std)(torch.full((5, 2, 2), 0.75)),
                               torch.ones(5, 2, 2))


def test_scale_crop_of_a_tensor_matches_the_whole_resize_then_crop():
    image = torch.rand(2, 20, 20)
    label = Image.fromarray(np.zeros((20, 20), np.uint8))
    torch.manual_seed(5)
    out = tr.RandomScaleCrop(20, 20, scale_range=(1.0, 1.0))({"image": image, "label": label})
    torch.testing.assert_close(out["image"], image)  # scale 1, crop = the image
