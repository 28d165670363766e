"""Masks that are not class indices: 0/255 binary masks, RGB colour masks and 1-based labels.

Without the flag that reads them, building the folder dataset (so ``--check-data`` and a training
run alike) stops with one line naming the encoding and the flag; with it, the dataset yields the
class ids worked out here by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from dataloader.datasets import build_dataset
from dataloader.datasets.folder import FolderSegmentation, read_classes, reduce_zero_label
from dataloader.utils import DatasetError

WIDTH, HEIGHT = 24, 20
ROAD, BUILDING = (128, 64, 128), (70, 70, 70)
COLOUR_CLASSES = "background 0 0 0\nroad 128 64 128\nbuilding #464646\n"


def write_images(root: Path, counts=(("train", 3), ("val", 2))) -> list[tuple[str, str]]:
    """Noise PNG images; returns the ``(split, name)`` of each sample."""
    samples = []
    for split, count in counts:
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            pixels = np.random.default_rng(i).integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"s{i}.png")
            samples.append((split, f"s{i}"))
    return samples


def square(i: int) -> tuple[slice, slice]:
    """Sample i's square: rows 2..7, columns 3+i..10+i."""
    return slice(2, 8), slice(3 + i, 11 + i)


def make_binary(root: Path) -> Path:
    """0 background, a 255 square per mask: the usual binary-segmentation export."""
    for split, name in write_images(root):
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        mask[square(int(name[1:]))] = 255
        Image.fromarray(mask).save(root / "masks" / split / f"{name}.png")
    return root


def make_colour(root: Path) -> Path:
    """Black background, a road square and a building bar (last two rows), as RGB PNGs."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(COLOUR_CLASSES)
    for split, name in write_images(root):
        mask = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        mask[square(int(name[1:]))] = ROAD
        mask[HEIGHT - 2:, :] = BUILDING
        Image.fromarray(mask).save(root / "masks" / split / f"{name}.png")
    return root


def make_one_based(root: Path, classes: bool = True) -> Path:
    """Ids 1 (everywhere), 2 (a square) and 3 (the last row), 255 in the first row; no 0."""
    for split, name in write_images(root):
        mask = np.ones((HEIGHT, WIDTH), np.uint8)
        mask[square(int(name[1:]))] = 2
        mask[HEIGHT - 1, :] = 3
        mask[0, :] = 255
        Image.fromarray(mask).save(root / "masks" / split / f"{name}.png")
    if classes:
        (root / "classes.txt").write_text("sky\ntree\nroad\n")
    return root


TINY = ["--backbone", "resnet18", "--no-pretrained", "--workers", "0", "--crop-size", "32",
        "--base-size", "32", "--epochs", "1", "--batch-size", "3", "--no-cuda",
        "--eval-worst", "0"]

# kind -> (maker, the flag that reads it, words of the one line)
KINDS = {
    "binary": (make_binary, ["--mask-format", "binary"], "hold only 0 and 255: binary masks"),
    "colour": (make_colour, ["--mask-format", "color"], "is an RGB colour image"),
    "one-based": (make_one_based, ["--reduce-zero-label"], "labels that start at 1"),
}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("kind", KINDS)
def test_check_data_names_the_encoding_and_the_flag(kind, tmp_path, capsys):
    maker, flag, words = KINDS[kind]
    root = maker(tmp_path / kind)
    argv = ["--check-data", "--dataset", "folder", "--data-root", str(root), "--no-cuda",
            "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
    assert train.cli(argv) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert words in line and " ".join(flag) in line
    # With the flag the same data checks clean and the report says how it was read.
    assert train.cli(argv + flag) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "data check passed"
    assert "masks read as " in out and (" ".join(flag) in out)


@pytest.mark.parametrize("kind", KINDS)
def test_training_without_the_flag_stops_with_one_line(kind, tmp_path, monkeypatch, capsys):
    maker, flag, words = KINDS[kind]
    root = maker(tmp_path / kind)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for data read wrongly")

    monkeypatch.setattr(train, "build_model", no_model)
    argv = TINY + ["--dataset", "folder", "--data-root", str(root),
                   "--run-dir", str(tmp_path / "run")]
    assert train.cli(argv) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert words in line and " ".join(flag) in line
    assert not (tmp_path / "run").exists()


def test_binary_masks_read_as_classes_0_and_1_and_train(tmp_path):
    root = make_binary(tmp_path / "binary")
    dataset = FolderSegmentation(root, "train", mask_format="binary")
    assert dataset.class_names == ("background", "foreground")
    for i in range(3):
        expected = np.zeros((HEIGHT, WIDTH), np.uint8)
        expected[square(i)] = 1
        np.testing.assert_array_equal(np.asarray(dataset[i]["label"]), expected)
    # 0/1 masks and 1-bit masks are binary too: any value but 0 is the foreground.
    Image.fromarray(np.asarray(dataset[0]["label"]).astype(bool)).save(
        root / "masks" / "train" / "s0.png")
    np.testing.assert_array_equal(
        np.asarray(FolderSegmentation(root, "train", mask_format="binary")[0]["label"]),
        np.asarray(dataset[0]["label"]))
    # End to end, with a sum of losses: two classes learned, the flag recorded.
    result = train.main(train.get_args_parser().parse_args(TINY + [
        "--dataset", "folder", "--data-root", str(root), "--mask-format", "binary",
        "--loss-type", "ce+dice", "--run-dir", str(tmp_path / "run"),
        "--cache-dir", str(tmp_path / "cache")]))
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["model"]["class_names"] == ["background", "foreground"]
    assert settings["mask_format"] == "binary" and settings["loss_type"] == "ce+dice"
    assert np.isfinite(result["metrics"]["mean_iou"])


def test_binary_reads_the_two_names_of_classes_txt(tmp_path):
    root = make_binary(tmp_path / "binary")
    (root / "classes.txt").write_text("sea\nship\n")
    assert FolderSegmentation(root, mask_format="binary").class_names == ("sea", "ship")
    (root / "classes.txt").write_text("sea\nship\nwake\n")
    with pytest.raises(DatasetError, match="binary reads two classes but .* names 3"):
        FolderSegmentation(root, mask_format="binary")


def test_colour_masks_read_as_their_classes(tmp_path):
    root = make_colour(tmp_path / "colour")
    dataset = FolderSegmentation(root, "val", mask_format="color")
    assert dataset.class_names == ("background", "road", "building")
    assert dataset.palette == [[0, 0, 0], list(ROAD), list(BUILDING)]
    for i in range(2):
        expected = np.zeros((HEIGHT, WIDTH), np.uint8)
        expected[square(i)] = 1
        expected[HEIGHT - 2:, :] = 2
        np.testing.assert_array_equal(np.asarray(dataset[i]["label"]), expected)
        np.testing.assert_array_equal(dataset.check_sample(i), expected)


def test_an_unlisted_colour_names_the_mask_and_the_colour(tmp_path):
    root = make_colour(tmp_path / "colour")
    mask_path = root / "masks" / "train" / "s1.png"
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[5, 5] = mask[5, 6] = (250, 170, 30)
    Image.fromarray(mask).save(mask_path)
    dataset = FolderSegmentation(root, "train", mask_format="color")
    with pytest.raises(DatasetError, match=rf"{mask_path} \(sample 1\) has 2 pixels of colour "
                                           r"250 170 30 \(#faaa1e\)"):
        dataset[1]


def test_colour_format_needs_colours_in_classes_txt(tmp_path):
    root = make_colour(tmp_path / "colour")
    (root / "classes.txt").write_text("background\nroad\nbuilding\n")
    with pytest.raises(DatasetError, match="--mask-format color needs a colour per class"):
        FolderSegmentation(root, mask_format="color")


def test_one_based_labels_shift_down_with_0_ignored(tmp_path):
    root = make_one_based(tmp_path / "one")
    mask_path = root / "masks" / "train" / "s2.png"
    raw = np.asarray(Image.open(mask_path)).copy()
    raw[10, :4] = 0  # unlabelled pixels
    Image.fromarray(raw).save(mask_path)
    dataset = FolderSegmentation(root, "train", reduce_zero_label=True)
    assert dataset.class_names == ("sky", "tree", "road")
    expected = np.zeros((HEIGHT, WIDTH), np.uint8)
    expected[square(2)] = 1
    expected[HEIGHT - 1, :] = 2
    expected[0, :] = 255
    expected[10, :4] = 255
    np.testing.assert_array_equal(np.asarray(dataset[2]["label"]), expected)
    assert reduce_zero_label(np.array([0, 1, 2, 254, 255])).tolist() == [255, 0, 1, 253, 255]


def test_one_based_labels_without_classes_txt(tmp_path):
    root = make_one_based(tmp_path / "one", classes=False)
    with pytest.raises(DatasetError, match=r"no mask under .* holds class 0 .*--reduce-zero-lab"):
        FolderSegmentation(root)
    assert FolderSegmentation(root, reduce_zero_label=True).class_names == (
        "class_0", "class_1", "class_2")
    # Told that the ids are what they are: four classes, the first never seen.
    assert FolderSegmentation(root, reduce_zero_label=False).num_classes == 4


def test_an_explicit_index_format_is_read_as_given(tmp_path):
    root = make_binary(tmp_path / "binary")
    dataset = FolderSegmentation(root, mask_format="index")
    assert dataset.class_names == ("class_0",)  # 255 is the ignore value, as asked
    root = make_one_based(tmp_path / "one")
    with pytest.raises(DatasetError, match="has class index 3 but the dataset has 3 classes"):
        FolderSegmentation(root, reduce_zero_label=False)[0]


def test_reduce_zero_label_is_for_index_masks(tmp_path):
    root = make_binary(tmp_path / "binary")
    with pytest.raises(DatasetError, match="--reduce-zero-label reads index masks"):
        FolderSegmentation(root, mask_format="binary", reduce_zero_label=True)


def test_formats_have_their_own_cache_keys(tmp_path):
    root = make_binary(tmp_path / "binary")
    keys = {FolderSegmentation(root, mask_format=fmt).cache_key() for fmt in ("index", "binary")}
    assert len(keys) == 2


def test_classes_txt_lines(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background 0 0 0\n\n  traffic sign  #DCDC00 \nroad 128 64 128\n")
    assert read_classes(path) == (("background", "traffic sign", "road"),
                                  ((0, 0, 0), (220, 220, 0), (128, 64, 128)))
    path.write_text("background\nroad\n")
    assert read_classes(path) == (("background", "road"), None)
    path.write_text("background 0 0 0\nroad\n")
    with pytest.raises(DatasetError, match="1 of 2 lines give a colour"):
        read_classes(path)
    path.write_text("background 0 0 0\nroad #000000\n")
    with pytest.raises(DatasetError, match=r"repeats colours: \(0, 0, 0\)"):
        read_classes(path)


def test_other_datasets_refuse_the_folder_options(tmp_path):
    with pytest.raises(DatasetError, match=r"--mask-format is not read by --dataset pascal "
                                           r"\(only by folder\)"):
        build_dataset("pascal", str(tmp_path), "train", mask_format="binary")
