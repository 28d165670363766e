"""COCO-Stuff, Pascal VOC and folder datasets on tiny generated files (plus the real VOC mask)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataloader.datasets.cocostuff import (
    COCOSTUFF_CLASS_NAMES,
    RAW_TO_CLASS,
    COCOStuffSegmentation,
)
from dataloader.datasets.folder import FolderSegmentation
from dataloader.datasets.pascal import VOCSegmentation
from dataloader.utils import VOC_CLASS_NAMES, DatasetError, color_map

WIDTH, HEIGHT = 20, 16


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (WIDTH, HEIGHT)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path)


def write_mask(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(values.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        mask.putpalette(color_map(256).reshape(-1).tolist())
    mask.save(path)


def touch_later(path: Path) -> None:
    """Move the mtime forward, so a rewrite is seen even on file systems with coarse mtimes."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))


def tree(root: Path) -> list[tuple[str, int, int]]:
    """Every file under ``root`` with its size and mtime, to prove nothing was written there."""
    return sorted(
        (str(path.relative_to(root)), path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
    )


# --------------------------------------------------------------------------------- COCO-Stuff

# (x, y) -> (raw stuffthingmaps value, expected contiguous class) -- worked out from the id list:
# raw = COCO id - 1; raw 11 (id 12) is unused; raw 12 (id 13, "stop sign") is the 12th used
# value -> class 11; raw 90 (id 91) unused; raw 91 (id 92, "banner") follows the 80 things ->
# class 80; raw 181 (id 182, "wood") is the last -> class 170.
COCOSTUFF_PIXELS = {
    (0, 0): (0, 0),
    (1, 0): (11, 255),
    (2, 0): (12, 11),
    (3, 0): (90, 255),
    (4, 0): (91, 80),
    (5, 0): (181, 170),
    (6, 0): (255, 255),
}


def make_cocostuff(root: Path) -> Path:
    splits = {"train2017": ("000000000001", "000000000002"), "val2017": ("000000000003",)}
    for split, names in splits.items():
        for seed, name in enumerate(names):
            write_image(root / "images" / split / f"{name}.jpg", seed)
            raw = np.full((HEIGHT, WIDTH), 255, dtype=np.uint8)
            for (x, y), (value, _) in COCOSTUFF_PIXELS.items():
                raw[y, x] = value
            raw[5:, :] = 20  # COCO id 21 = cow, the 20th used value (no gap before it) -> 19
            write_mask(root / "annotations" / split / f"{name}.png", raw)
    return root


def test_cocostuff_names_and_lookup_table():
    assert len(COCOSTUFF_CLASS_NAMES) == 171
    assert len(set(COCOSTUFF_CLASS_NAMES)) == 171
    assert COCOSTUFF_CLASS_NAMES[0] == "person"
    assert COCOSTUFF_CLASS_NAMES[11] == "stop sign"
    assert COCOSTUFF_CLASS_NAMES[79] == "toothbrush"
    assert COCOSTUFF_CLASS_NAMES[80] == "banner"
    assert COCOSTUFF_CLASS_NAMES[170] == "wood"
    assert RAW_TO_CLASS.shape == (256,) and RAW_TO_CLASS.dtype == np.uint8
    # The 11 unused COCO ids (raw = id - 1) and everything past 181 map to ignore.
    unused_raw = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    assert (RAW_TO_CLASS[unused_raw] == 255).all()
    assert (RAW_TO_CLASS[182:] == 255).all()
    used = RAW_TO_CLASS[RAW_TO_CLASS != 255]
    assert used.tolist() == list(range(171))


def test_cocostuff_maps_raw_values_to_contiguous_classes(tmp_path):
    root = make_cocostuff(tmp_path / "cocostuff")
    dataset = COCOStuffSegmentation(root, split="train")
    assert len(dataset) == 2
    assert dataset.num_classes == 171 and len(dataset.palette) == 171
    sample = dataset[0]
    assert sample["image"].mode == "RGB" and sample["label"].mode == "L"
    assert sample["image"].size == sample["label"].size == (WIDTH, HEIGHT)
    label = np.asarray(sample["label"])
    for (x, y), (_, expected) in COCOSTUFF_PIXELS.items():
        assert label[y, x] == expected, (x, y)
    assert (label[5:] == 19).all()
    assert COCOSTUFF_CLASS_NAMES[19] == "cow"
    np.testing.assert_array_equal(np.asarray(dataset.label_at(0)), label)
    assert len(COCOStuffSegmentation(root, split="val")) == 1


def test_cocostuff_errors_name_the_file(tmp_path):
    root = make_cocostuff(tmp_path / "cocostuff")
    mask = root / "annotations" / "train2017" / "000000000002.png"
    write_mask(mask, np.full((HEIGHT, WIDTH), 200))  # 200 is no COCO id - 1
    with pytest.raises(DatasetError, match=r"000000000002\.png \(sample 1\) has value 200, which"):
        COCOStuffSegmentation(root)[1]

    write_mask(mask, np.zeros((HEIGHT + 1, WIDTH)))
    with pytest.raises(DatasetError, match=r"000000000002\.png \(sample 1\) is 20x17"):
        COCOStuffSegmentation(root)[1]

    mask.unlink()
    with pytest.raises(DatasetError, match=r"have no mask.*000000000002"):
        COCOStuffSegmentation(root)


def test_cocostuff_missing_root_is_one_line(tmp_path):
    with pytest.raises(DatasetError) as error:
        COCOStuffSegmentation(tmp_path / "nowhere")
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere") in message
    assert "DEEPLAB_COCOSTUFF_ROOT" in message and "--data-root" in message
    (tmp_path / "cocostuff" / "images" / "train2017").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"annotations.train2017"):
        COCOStuffSegmentation(tmp_path / "cocostuff")


@pytest.mark.coco
def test_cocostuff_thing_names_and_ids_match_real_coco():
    root = os.environ.get("DEEPLAB_COCO_ROOT")
    if not root:
        pytest.skip("set DEEPLAB_COCO_ROOT (e.g. /work/shared/data/coco_tiny) to compare with COCO")
    with open(Path(root) / "annotations" / "instances_val2017.json", encoding="utf-8") as handle:
        categories = sorted(json.load(handle)["categories"], key=lambda c: c["id"])
    assert [c["name"] for c in categories] == list(COCOSTUFF_CLASS_NAMES[:80])
    # The mask holds id - 1; the lookup table must send it to the category's position.
    assert [int(RAW_TO_CLASS[c["id"] - 1]) for c in categories] == list(range(80))


# ------------------------------------------------------------------------------ Pascal VOC


def make_voc(root: Path) -> Path:
    for seed, image_id in enumerate(("2007_000001", "2007_000002", "2008_000003")):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", seed)
        values = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        values[4:12, 5:15] = 255  # the border VOC draws around objects
        values[5:11, 6:14] = 15 + seed  # person, pottedplant, sheep
        write_mask(root / "SegmentationClass" / f"{image_id}.png", values, palette=True)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000001\n2007_000002\n\n")
    (lists / "val.txt").write_text("2008_000003\n")
    return root


def test_voc_reads_palette_indices_and_split_lists(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    train = VOCSegmentation(root, split="train")
    val = VOCSegmentation(root, split="val")
    assert train.image_ids == ["2007_000001", "2007_000002"]
    assert val.image_ids == ["2008_000003"]
    assert train.class_names == VOC_CLASS_NAMES and train.num_classes == 21
    sample = train[1]
    assert sample["image"].mode == "RGB" and sample["label"].mode == "L"
    label = np.asarray(sample["label"])
    # Indices, not the palette colours (class 16 is drawn (0, 64, 0)).
    assert label[0, 0] == 0 and label[4, 5] == 255 and label[8, 10] == 16
    assert set(np.unique(label).tolist()) == {0, 16, 255}
    np.testing.assert_array_equal(np.asarray(train.label_at(1)), label)
    assert np.asarray(val[0]["label"])[8, 10] == 17


def test_voc_missing_list_and_files(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    with pytest.raises(DatasetError) as error:
        VOCSegmentation(root, split="trainval")
    message = str(error.value)
    assert str(root / "ImageSets" / "Segmentation" / "trainval.txt") in message
    assert "\n" not in message and "DEEPLAB_VOC_ROOT" in message

    (root / "SegmentationClass" / "2007_000002.png").unlink()
    with pytest.raises(DatasetError, match=r"missing: .*2007_000002\.png"):
        VOCSegmentation(root, split="train")
    with pytest.raises(DatasetError, match=r"DEEPLAB_VOC_ROOT.*--data-root"):
        VOCSegmentation(tmp_path / "VOCdevkit")


def test_voc_real_sample_mask(tmp_path):
    root = os.environ.get("DEEPLAB_VOC_SAMPLE")
    if not root or not Path(root, "SegmentationClass", "2007_000063.png").is_file():
        pytest.skip(
            "set DEEPLAB_VOC_SAMPLE to the VOC2012 folder of the shared sample "
            "(/work/shared/data/voc2012_sample/VOC2012) to read the real mask"
        )
    before = tree(Path(root))
    # The sample has no ImageSets: the list lives outside the read-only folder.
    list_file = tmp_path / "sample.txt"
    list_file.write_text("2007_000063\n")
    dataset = VOCSegmentation(root, split="sample", list_file=list_file)
    sample = dataset[0]
    assert sample["image"].mode == "RGB" and sample["image"].size == (500, 375)
    assert sample["label"].size == (500, 375)
    # 9 = chair, 12 = dog, 255 = the object borders.
    assert np.unique(np.asarray(sample["label"])).tolist() == [0, 9, 12, 255]
    assert tree(Path(root)) == before


# ---------------------------------------------------------------------------------- folder


def make_folder(root: Path, largest_val_id: int = 2, classes: str | None = None) -> Path:
    for split, count in (("train", 2), ("val", 1)):
        for i in range(count):
            write_image(root / "images" / split / f"img{i}.png", i)
            values = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
            values[:, 10:] = 1
            values[0, :] = 255
            if split == "val":
                values[8:, :] = largest_val_id
            write_mask(root / "masks" / split / f"img{i}.png", values)
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    return root


def test_folder_with_classes_txt(tmp_path):
    root = make_folder(tmp_path / "mine", classes="background\n\n  road \nbuilding\n")
    dataset = FolderSegmentation(root, split="train")
    assert dataset.class_names == ("background", "road", "building")
    assert dataset.num_classes == 3 and len(dataset.palette) == 3
    assert len(dataset) == 2
    sample = dataset[1]
    assert sample["image"].mode == "RGB" and sample["label"].mode == "L"
    assert sample["image"].size == (WIDTH, HEIGHT)
    label = np.asarray(sample["label"])
    assert label[0, 0] == 255 and label[5, 2] == 0 and label[5, 12] == 1
    assert dataset.sample_name(1) == "img1.png"  # figures name images by their file


def test_folder_without_classes_txt_counts_all_splits(tmp_path):
    # Only val holds id 4, yet both splits must agree on five classes.
    root = make_folder(tmp_path / "mine", largest_val_id=4)
    train = FolderSegmentation(root, split="train")
    val = FolderSegmentation(root, split="val")
    assert train.class_names == val.class_names == tuple(f"class_{i}" for i in range(5))
    assert np.asarray(val[0]["label"])[10, 3] == 4


def test_folder_transform_gets_the_pair(tmp_path):
    root = make_folder(tmp_path / "mine", classes="a\nb\nc\n")
    dataset = FolderSegmentation(root, transform=lambda sample: (sample["image"].size, "seen"))
    assert dataset[0] == ((WIDTH, HEIGHT), "seen")


def test_folder_pairing_errors_list_names(tmp_path):
    root = make_folder(tmp_path / "mine", classes="a\nb\n")
    write_image(root / "images" / "train" / "lonely.jpg")
    with pytest.raises(DatasetError, match=r"1 image\(s\) in .* have no mask .*: lonely;"):
        FolderSegmentation(root)
    (root / "images" / "train" / "lonely.jpg").unlink()
    write_mask(root / "masks" / "train" / "orphan.png", np.zeros((HEIGHT, WIDTH)))
    (root / "images" / "train" / "img0.png").rename(root / "images" / "train" / "img0.webp")
    with pytest.raises(DatasetError, match=r"have no image .*: img0, orphan; image files must end"):
        FolderSegmentation(root)


def test_folder_missing_split_names_fix(tmp_path):
    root = make_folder(tmp_path / "mine", classes="a\nb\n")
    with pytest.raises(DatasetError) as error:
        FolderSegmentation(root, split="test")
    message = str(error.value)
    assert str(root / "images" / "test") in message
    assert "DEEPLAB_FOLDER_ROOT" in message and "--data-root" in message and "\n" not in message


# ------------------------------------------------------------------- cache keys, no writes


@pytest.mark.parametrize("kind", ["cocostuff", "pascal", "folder"])
def test_cache_key_follows_the_files_and_nothing_is_written(tmp_path, kind):
    if kind == "cocostuff":
        root = make_cocostuff(tmp_path / "data")
        build = lambda: COCOStuffSegmentation(root)  # noqa: E731
        mask = root / "annotations" / "train2017" / "000000000001.png"
    elif kind == "pascal":
        root = make_voc(tmp_path / "data")
        build = lambda: VOCSegmentation(root)  # noqa: E731
        mask = root / "SegmentationClass" / "2007_000001.png"
    else:
        root = make_folder(tmp_path / "data", classes="a\nb\nc\n")
        build = lambda: FolderSegmentation(root)  # noqa: E731
        mask = root / "masks" / "train" / "img0.png"
    before = tree(root)
    dataset = build()
    key = dataset.cache_key()
    for index in range(len(dataset)):
        dataset[index]
        dataset.label_at(index)
    assert tree(root) == before
    assert build().cache_key() == key

    write_mask(mask, np.zeros((HEIGHT, WIDTH)), palette=kind == "pascal")
    touch_later(mask)
    assert build().cache_key() != key
