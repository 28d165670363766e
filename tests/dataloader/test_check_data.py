"""``train.py --check-data``: every bad sample named on its own line, the class pixel histogram,
exit status 1 on bad data and 0 on clean data, and no model built."""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from dataloader.check import check_datasets
from dataloader.datasets.coco import COCOSegmentation
from dataloader.datasets.demo import generate_demo_dataset
from dataloader.datasets.folder import FolderSegmentation
from dataloader.utils import DatasetError, verify_image

COCO_ROOT = os.environ.get("DEEPLAB_COCO_ROOT")
WIDTH, HEIGHT = 24, 20


def noisy_jpeg(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> bytes:
    # Noise does not compress: a cut file misses scan data, not only its end marker.
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def square_mask(side: int, class_id: int) -> np.ndarray:
    """Background with a ``side x side`` square of ``class_id`` and one ignored row (24 pixels)."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[2:2 + side, 3:3 + side] = class_id
    mask[HEIGHT - 1, :] = 255
    return mask


#: split -> name -> (square side, class id) of each sample's mask.
SQUARES = {"train": {"a": (4, 1), "b": (5, 2), "c": (6, 1)}, "val": {"d": (3, 2), "e": (2, 1)}}


def make_folder_dataset(root: Path) -> Path:
    (root / "classes.txt").parent.mkdir(parents=True)
    (root / "classes.txt").write_text("background\nsquare\ndisc\n")
    for split, samples in SQUARES.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i, (name, (side, class_id)) in enumerate(samples.items()):
            (root / "images" / split / f"{name}.jpg").write_bytes(noisy_jpeg(seed=i))
            mask = Image.fromarray(square_mask(side, class_id))
            mask.save(root / "masks" / split / f"{name}.png")
    return root


def check(root: Path, *extra: str) -> list[str]:
    return ["--check-data", "--dataset", "folder", "--data-root", str(root), "--no-cuda",
            "--workers", "0", *extra]


def problem_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("train: ", "val: "))]


def test_histogram_of_a_clean_folder_dataset_by_hand(tmp_path):
    root = make_folder_dataset(tmp_path / "mine")
    report = check_datasets({split: FolderSegmentation(root, split) for split in SQUARES})
    assert report.ok and report.problems == []
    assert report.samples == {"train": 3, "val": 2}
    # train: squares 16 + 36 of class 1, 25 of class 2; 3 masks x 24 ignored pixels
    # val: 4 of class 1, 9 of class 2; 2 x 24 ignored
    pixels = WIDTH * HEIGHT
    expected = {"train": {1: 16 + 36, 2: 25, 255: 3 * 24}, "val": {1: 4, 2: 9, 255: 2 * 24}}
    for split, counts in expected.items():
        counts[0] = len(SQUARES[split]) * pixels - sum(counts.values())
        got = report.pixels[split]
        assert {value: int(got[value]) for value in counts} == counts
        assert int(got.sum()) == len(SQUARES[split]) * pixels
    rows = {line.split()[0]: line.split()[1:] for line in report.histogram_lines()[1:]}
    assert rows["square"] == ["52", f"{52 / (3 * pixels):.2%}", "4", f"{4 / (2 * pixels):.2%}"]


def test_clean_data_exits_0_and_builds_no_model(tmp_path, monkeypatch, capsys):
    root = make_folder_dataset(tmp_path / "mine")

    def no_model(*args, **kwargs):
        raise AssertionError("--check-data built a model")

    monkeypatch.setattr(train, "build_model", no_model)
    assert train.cli(check(root)) == 0
    out = capsys.readouterr().out
    assert "checked 3 train + 2 val samples" in out
    assert problem_lines(out) == []
    assert out.strip().splitlines()[-1] == "data check passed"
    assert not (tmp_path / "run").exists() and not Path("run", "folder").exists()


def test_bad_image_wrong_size_mask_and_label_99_are_each_named(tmp_path, capsys):
    root = make_folder_dataset(tmp_path / "mine")
    truncated = root / "images" / "train" / "a.jpg"
    truncated.write_bytes(noisy_jpeg()[: len(noisy_jpeg()) // 2])
    wrong_size = root / "masks" / "val" / "d.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH - 1), dtype=np.uint8)).save(wrong_size)
    label_99 = root / "masks" / "train" / "c.png"
    mask = square_mask(6, 1)
    mask[5, 5] = 99
    Image.fromarray(mask).save(label_99)
    not_an_image = root / "images" / "val" / "e.jpg"
    not_an_image.write_bytes(b"this is not an image")

    assert train.cli(check(root, "--workers", "2")) == 1
    out = capsys.readouterr().out
    lines = problem_lines(out)
    assert len(lines) == 4, out
    assert lines[0].startswith(f"train: cannot decode image {truncated} (sample 0)")
    assert lines[1].startswith(f"train: mask {label_99} (sample 2) has class index 99")
    assert lines[2] == (f"val: mask {wrong_size} (sample 0) is {WIDTH - 1}x{HEIGHT} but its "
                        f"image is {WIDTH}x{HEIGHT}")
    assert lines[3].startswith(f"val: cannot decode image {not_an_image} (sample 1)")
    assert "4 bad sample(s)" in out.splitlines()[-1]
    # the good sample (b: a 5 x 5 square of class 2) is still counted
    disc = next(line for line in out.splitlines() if line.startswith("disc "))
    assert disc.split()[1] == "25"


def test_verify_image_finds_truncation_and_reads_the_full_size(tmp_path):
    path = tmp_path / "photo.jpg"
    data = noisy_jpeg(64, 48)
    path.write_bytes(data)
    assert verify_image(path) == (64, 48)  # the full size, not the 1/8 decode's
    for cut in (0.2, 0.5, 0.9):
        path.write_bytes(data[: int(len(data) * cut)])
        with pytest.raises(DatasetError, match=f"cannot decode image {path}"):
            verify_image(path, index=3)


def test_generated_coco_with_a_truncated_and_a_resized_image(tmp_path, capsys):
    root = Path(generate_demo_dataset(tmp_path / "demo", seed=3, num_train=4, num_val=2,
                                      image_size=(64, 48)))
    cache = ["--cache-dir", str(tmp_path / "cache")]
    args = ["--check-data", "--dataset", "demo", "--data-root", str(root), "--no-cuda",
            "--workers", "0"] + cache
    assert train.cli(args) == 0
    clean = capsys.readouterr().out
    # The histogram equals the labels as training loads them (full decode, separate code path).
    val = COCOSegmentation(root, "val", cache_dir=tmp_path / "cache")
    counts = sum(np.bincount(np.asarray(val[i]["label"]).ravel(), minlength=256)
                 for i in range(len(val)))
    person = next(line for line in clean.splitlines() if line.startswith("person "))
    assert person.split()[3] == f"{counts[15]:,}"

    train_images = sorted((root / "train2017").glob("*.jpg"))
    data = train_images[1].read_bytes()
    train_images[1].write_bytes(data[: len(data) // 2])
    Image.new("RGB", (50, 48)).save(train_images[3], format="JPEG")
    assert train.cli(args) == 1
    lines = problem_lines(capsys.readouterr().out)
    assert len(lines) == 2
    assert lines[0].startswith(f"train: cannot decode image {train_images[1]} (sample 1)")
    assert lines[1].startswith(f"train: image {train_images[3]} (sample 3) is 50x48 but ")


@pytest.mark.coco
@pytest.mark.skipif(not COCO_ROOT, reason="set DEEPLAB_COCO_ROOT to a COCO 2017 folder "
                                          "(e.g. ../shared/data/coco_tiny) to run on real COCO")
def test_real_coco_copy_with_a_truncated_image(tmp_path, capsys):
    root = tmp_path / "coco"
    shutil.copytree(COCO_ROOT, root)
    args = ["--check-data", "--dataset", "coco", "--data-root", str(root), "--no-cuda",
            "--workers", "2", "--cache-dir", str(tmp_path / "cache")]
    assert train.cli(args) == 0
    assert problem_lines(capsys.readouterr().out) == []
    victim = sorted((root / "val2017").glob("*.jpg"))[5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    assert train.cli(args) == 1
    lines = problem_lines(capsys.readouterr().out)
    assert len(lines) == 1 and lines[0].startswith(f"val: cannot decode image {victim} (sample ")
