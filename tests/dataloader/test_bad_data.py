"""Bad and unusual files: clear errors that name the file and sample, skipping, correct RGB."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from dataloader.datasets.folder import FolderSegmentation
from dataloader.utils import DatasetError, collate_skipping_bad, load_image, load_label

WIDTH, HEIGHT = 20, 16
CLASSES = "background\nroad\nbuilding\n"


def noisy_jpeg_bytes() -> bytes:
    # Noise does not compress, so half of the file is missing most of the scan data.
    pixels = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_dataset_root(root: Path, names: list[str]) -> Path:
    """``root`` with one noisy JPEG and one all-class-1 mask per name, and three classes."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    (root / "classes.txt").write_text(CLASSES)
    for name in names:
        (root / "images" / "train" / f"{name}.jpg").write_bytes(noisy_jpeg_bytes())
        Image.new("L", (WIDTH, HEIGHT), 1).save(root / "masks" / "train" / f"{name}.png")
    return root


def to_tensors(sample: dict) -> dict:
    return {
        "image": torch.from_numpy(np.asarray(sample["image"]).copy()),
        "label": torch.from_numpy(np.asarray(sample["label"]).copy()),
    }


# name -> (how to spoil the file, words the message must hold)
BAD_IMAGES = {
    "missing": (lambda path: path.unlink(), "image file not found"),
    "empty": (lambda path: path.write_bytes(b""), "image file is empty"),
    "truncated": (
        lambda path: path.write_bytes(noisy_jpeg_bytes()[: len(noisy_jpeg_bytes()) // 2]),
        "cannot decode image",
    ),
    "undecodable": (lambda path: path.write_bytes(b"this is not an image at all"), "cannot decode"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_names_file_and_index_or_is_skipped(tmp_path, kind):
    root = make_dataset_root(tmp_path / "data", ["a", "b", "c"])
    bad_path = root / "images" / "train" / "b.jpg"
    strict = FolderSegmentation(root)
    lenient = FolderSegmentation(root, transform=to_tensors, skip_bad_images=True)
    spoil, words = BAD_IMAGES[kind]
    spoil(bad_path)  # after construction, so "missing" is a file that vanished mid-run

    with pytest.raises(DatasetError) as error:
        strict[1]
    message = str(error.value)
    assert words in message
    assert f"{bad_path} (sample 1)" in message
    assert "\n" not in message
    assert strict[0]["image"].size == (WIDTH, HEIGHT)  # the good ones still load

    assert lenient[1] is None
    loader = torch.utils.data.DataLoader(lenient, batch_size=3, collate_fn=collate_skipping_bad)
    (batch,) = list(loader)
    assert batch["skipped"] == 1
    assert batch["image"].shape == (2, HEIGHT, WIDTH, 3)
    assert batch["label"].shape == (2, HEIGHT, WIDTH)


def test_truncated_images_are_never_padded():
    # Pillow pads truncated JPEGs with grey only when this global flag is set; nothing may set it.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_huge_image_is_a_dataset_error(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (WIDTH, HEIGHT)).save(path)
    # Pillow refuses images over twice this many pixels as a possible decompression bomb.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", WIDTH * HEIGHT // 4)
    with pytest.raises(DatasetError, match=r"cannot decode image .*huge\.png \(sample 7\)"):
        load_image(path, index=7)


def test_unusual_modes_load_as_correct_rgb(tmp_path):
    root = make_dataset_root(tmp_path / "data", [])
    images = root / "images" / "train"
    size = (4, 2)

    Image.new("L", size, 77).save(images / "gray.png")

    # CMYK -> RGB is R = (255 - K) * (1 - C / 255), likewise G from M and B from Y:
    # (0, 255, 255, 0) -> (255, 0, 0); (100, 50, 0, 128) -> (127 * 155/255, 127 * 205/255, 127)
    # = (77.2, 102.1, 127) -> (77, 102, 127).
    cmyk = Image.new("CMYK", size, (0, 255, 255, 0))
    cmyk.putpixel((1, 0), (100, 50, 0, 128))
    cmyk.save(images / "cmyk_lossless.tif")
    # JPEG stores CMYK inverted (Adobe); a flat colour survives compression within a few levels.
    Image.new("CMYK", size, (0, 0, 0, 128)).save(images / "cmyk.jpg", quality=100)

    rgba = Image.new("RGBA", size, (200, 100, 50, 0))  # fully transparent -> black
    rgba.putpixel((1, 0), (10, 200, 30, 255))  # opaque -> itself
    rgba.putpixel((2, 0), (200, 100, 50, 128))  # half over black: 200 * 128/255 = 100.4 -> 100
    rgba.save(images / "rgba.png")

    # 16-bit: value * 255 / 65535 rounded; 32768 -> 127.502 -> 128, 1000 -> 3.89 -> 4.
    deep = np.array([[0, 65535, 32768, 1000]] * 2, dtype=np.uint16)
    Image.fromarray(deep).save(images / "deep16.png")
    assert Image.open(images / "deep16.png").mode == "I;16"

    for name in ("gray", "cmyk_lossless", "cmyk", "rgba", "deep16"):
        Image.new("L", size, 0).save(root / "masks" / "train" / f"{name}.png")
    dataset = FolderSegmentation(root)
    loaded = {
        Path(image_path).stem: np.asarray(dataset[index]["image"])
        for index, (image_path, _) in enumerate(dataset.samples)
    }
    for array in loaded.values():
        assert array.shape == (2, 4, 3) and array.dtype == np.uint8

    assert loaded["gray"][0, 0].tolist() == [77, 77, 77]
    assert loaded["cmyk_lossless"][0, 0].tolist() == [255, 0, 0]
    assert loaded["cmyk_lossless"][0, 1].tolist() == [77, 102, 127]
    assert np.abs(loaded["cmyk"].astype(int) - 127).max() <= 3
    assert loaded["rgba"][0, 0].tolist() == [0, 0, 0]
    assert loaded["rgba"][0, 1].tolist() == [10, 200, 30]
    assert loaded["rgba"][0, 2].tolist() == [100, 50, 25]
    assert loaded["deep16"][0, :, 0].tolist() == [0, 255, 128, 4]


def test_mask_size_differing_from_image_names_the_mask(tmp_path):
    root = make_dataset_root(tmp_path / "data", ["a", "b"])
    mask = root / "masks" / "train" / "b.png"
    Image.new("L", (WIDTH - 1, HEIGHT), 0).save(mask)
    with pytest.raises(DatasetError) as error:
        FolderSegmentation(root)[1]
    assert f"{mask} (sample 1) is 19x16 but its image is 20x16" in str(error.value)
    assert FolderSegmentation(root, skip_bad_images=True)[1] is None


def test_class_index_beyond_class_count_names_the_mask(tmp_path):
    root = make_dataset_root(tmp_path / "data", ["a", "b"])
    mask = root / "masks" / "train" / "a.png"
    values = np.ones((HEIGHT, WIDTH), dtype=np.uint8)
    values[0, 0] = 0  # ids 1..3 alone would read as 1-based labels (--reduce-zero-label)
    values[3, 4] = 3  # classes.txt names three classes: 0, 1, 2
    Image.fromarray(values, mode="L").save(mask)
    dataset = FolderSegmentation(root)
    expected = rf"{re.escape(str(mask))} \(sample 0\) has class index 3 but the dataset has 3 cl"
    for read in (lambda: dataset[0], lambda: dataset.label_at(0)):
        with pytest.raises(DatasetError, match=expected):
            read()


def test_largest_id_rule_rejects_colour_masks_and_empty_masks(tmp_path):
    root = make_dataset_root(tmp_path / "data", ["a"])
    (root / "classes.txt").unlink()
    mask = root / "masks" / "train" / "a.png"
    Image.new("RGB", (WIDTH, HEIGHT), (128, 0, 0)).save(mask)
    expected = rf"{re.escape(str(mask))} is an RGB colour image: .* --mask-format color"
    with pytest.raises(DatasetError, match=expected):
        FolderSegmentation(root)
    Image.new("L", (WIDTH, HEIGHT), 255).save(mask)
    with pytest.raises(DatasetError, match=r"no mask under .* has a class id other than 255"):
        FolderSegmentation(root)


def test_one_bit_masks_read_as_classes_0_and_1(tmp_path):
    """PIL writes a boolean array as a 1-bit PNG (mode "1"): a common binary-segmentation mask."""
    root = make_dataset_root(tmp_path / "data", ["a"])
    (root / "classes.txt").unlink()  # the class count then comes from the masks themselves
    foreground = np.zeros((HEIGHT, WIDTH), dtype=bool)
    foreground[2:9, 5:17] = True
    mask = root / "masks" / "train" / "a.png"
    Image.fromarray(foreground).save(mask)
    # Really a 1-bit file: the PNG header (IHDR) says bit depth 1, colour type 0 (grayscale).
    assert mask.read_bytes()[24:26] == bytes([1, 0])
    assert Image.open(mask).mode == "1"
    label = load_label(mask, (WIDTH, HEIGHT), num_classes=2)
    assert label.mode == "L"
    np.testing.assert_array_equal(np.asarray(label), foreground.astype(np.uint8))
    dataset = FolderSegmentation(root)
    assert dataset.class_names == ("class_0", "class_1")
    np.testing.assert_array_equal(np.asarray(dataset[0]["label"]), foreground.astype(np.uint8))
    with pytest.raises(DatasetError, match="has class index 1 but the dataset has 1 classes"):
        load_label(mask, (WIDTH, HEIGHT), num_classes=1)
