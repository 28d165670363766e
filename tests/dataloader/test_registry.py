"""The dataset registry: a new dataset is its module plus one entry in ``DATASETS``, and
``mypath.py`` keeps the roots a user edits."""
from __future__ import annotations

import json

import pytest
from PIL import Image

import mypath
import train
from dataloader.datasets import DATASETS, DatasetEntry, build_dataset
from dataloader.datasets.base import SegmentationDataset

# The tiny settings of tests/e2e/test_train.py: resnet18 on 64-pixel crops, CPU only.
TINY = ["--backbone", "resnet18", "--no-pretrained", "--amp", "off", "--workers", "0",
        "--crop-size", "64", "--base-size", "64", "--eval-size", "64", "--no-cuda"]


class Halves(SegmentationDataset):
    """A dataset no module of the project knows: the right half of each image is class 1."""

    class_names = ("background", "right")

    def __init__(self, root: str, size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.size = root, size

    def __len__(self) -> int:
        return self.size

    def load_sample(self, index: int) -> tuple[Image.Image, Image.Image]:
        label = Image.new("L", (64, 64), 0)
        label.paste(1, (32, 0, 64, 64))
        image = Image.new("RGB", (64, 64), (index, 0, 0))
        image.paste((255, 255, 255), (32, 0, 64, 64))
        return image, label

    def cache_key(self) -> str:
        return f"halves-{self.size}"


def build_halves(root: str, split: str, cache_dir: str | None = None, **kwargs) -> Halves:
    del cache_dir
    return Halves(root, size=8 if split == "train" else 2, **kwargs)


@pytest.fixture
def halves_registered(monkeypatch, tmp_path):
    """``halves`` registered with 2 default epochs, its root named by DEEPLAB_HALVES_ROOT."""
    monkeypatch.setitem(DATASETS, "halves", DatasetEntry(build_halves,
                                                         variable="DEEPLAB_HALVES_ROOT", epochs=2))
    monkeypatch.setenv("DEEPLAB_HALVES_ROOT", str(tmp_path))
    return tmp_path


def test_a_new_entry_is_a_dataset_choice_with_its_default_epochs(halves_registered):
    parser = train.get_args_parser()
    assert parser.parse_args(["--dataset", "halves"]).dataset == "halves"
    assert "halves 2" in parser.format_help()


def test_an_unregistered_dataset_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--dataset", "halves"])
    assert "invalid choice: 'halves'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_registered_dataset_trains_for_its_default_epochs(halves_registered, tmp_path):
    run_dir = tmp_path / "run"
    args = train.get_args_parser().parse_args(
        TINY + ["--dataset", "halves", "--batch-size", "4", "--run-dir", str(run_dir)])
    result = train.main(args)
    # 8 training images in batches of 4 for the entry's 2 epochs: 2 x 2 steps.
    assert result["iteration"] == 4
    assert json.loads((run_dir / "settings.json").read_text())["dataset"] == "halves"


def test_root_comes_from_the_variable_the_entry_names(halves_registered):
    assert mypath.db_root_dir("halves") == str(halves_registered)
    assert build_dataset("halves", mypath.db_root_dir("halves"), "val").root == str(
        halves_registered)


def test_a_new_dataset_without_a_root_names_its_variable_and_mypath(halves_registered,
                                                                     monkeypatch):
    monkeypatch.delenv("DEEPLAB_HALVES_ROOT")
    with pytest.raises(FileNotFoundError, match="set DEEPLAB_HALVES_ROOT=.*"
                       "DEFAULT_ROOTS in mypath.py or pass --data-root"):
        mypath.db_root_dir("halves")


def test_a_root_edited_in_mypath_is_used_below_the_variable_and_the_flag(monkeypatch, tmp_path):
    edited, variable, flag = (tmp_path / name for name in ("edited", "variable", "flag"))
    for folder in (edited, variable, flag):
        folder.mkdir()
    monkeypatch.delenv("DEEPLAB_VOC_ROOT", raising=False)
    monkeypatch.setitem(mypath.DEFAULT_ROOTS, "pascal", str(edited))
    assert mypath.db_root_dir("pascal") == str(edited)
    monkeypatch.setenv("DEEPLAB_VOC_ROOT", str(variable))
    assert mypath.db_root_dir("pascal") == str(variable)
    assert mypath.db_root_dir("pascal", root=str(flag)) == str(flag)


def test_an_unknown_dataset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'nope'; known: coco, cocostuff, demo"):
        mypath.db_root_dir("nope")


def test_every_root_in_mypath_belongs_to_a_registered_dataset():
    assert set(mypath.DEFAULT_ROOTS) <= set(DATASETS)


def test_the_shipped_datasets_keep_their_variables_and_epochs():
    assert {name: (entry.variable, entry.epochs) for name, entry in DATASETS.items()} == {
        "coco": ("DEEPLAB_COCO_ROOT", 30), "cocostuff": ("DEEPLAB_COCOSTUFF_ROOT", 30),
        "pascal": ("DEEPLAB_VOC_ROOT", 50), "folder": ("DEEPLAB_FOLDER_ROOT", 50),
        "demo": ("DEEPLAB_DEMO_ROOT", 15)}
