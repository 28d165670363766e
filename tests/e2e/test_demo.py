"""The generated demo dataset: deterministic, COCO-shaped, and read by COCOSegmentation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dataloader.datasets import demo
from dataloader.datasets.coco import COCOSegmentation
from dataloader.datasets.demo import ensure_demo_dataset, generate_demo_dataset
from dataloader.utils import DatasetError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Pascal VOC classes of the demo objects: person 15, car 7, bird 3, cat 8, dog 12.
DEMO_CLASSES = {0, 3, 7, 8, 12, 15}
REAL_COCO_NAMES = {1: "person", 3: "car", 16: "bird", 17: "cat", 18: "dog", 25: "giraffe"}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path):
    first = files_of(Path(generate_demo_dataset(tmp_path / "a", seed=3, num_train=6, num_val=3)))
    second = files_of(Path(generate_demo_dataset(tmp_path / "b", seed=3, num_train=6, num_val=3)))
    other = files_of(Path(generate_demo_dataset(tmp_path / "c", seed=4, num_train=6, num_val=3)))
    assert len(first) == 6 + 3 + 2
    assert first == second
    assert first.keys() == other.keys() and first != other


def test_layout_and_coco_fields(demo_coco_root):
    for split, count in (("train", 100), ("val", 25)):
        document = json.loads(
            (demo_coco_root / "annotations" / f"instances_{split}2017.json").read_text())
        assert len(document["images"]) == count
        assert {c["id"]: c["name"] for c in document["categories"]} == REAL_COCO_NAMES
        for image in document["images"]:
            assert (demo_coco_root / f"{split}2017" / image["file_name"]).is_file()
            assert (image["width"], image["height"]) == (160, 120)
        for annotation in document["annotations"]:
            assert set(annotation) >= {"id", "image_id", "category_id", "segmentation", "area",
                                       "bbox", "iscrowd"}
        annotations = document["annotations"]
        assert len({a["id"] for a in annotations}) == len(annotations)
        crowds = [a for a in annotations if a["iscrowd"]]
        assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
        assert any(not a["iscrowd"] and len(a["segmentation"]) > 1 for a in annotations)
        assert any(a["category_id"] == demo.NON_VOC_CATEGORY_ID for a in annotations)


def test_loads_through_coco_segmentation(demo_coco_root, tmp_path):
    train = COCOSegmentation(demo_coco_root, split="train", cache_dir=tmp_path)
    val = COCOSegmentation(demo_coco_root, split="val", cache_dir=tmp_path)
    assert len(train) == 100 and len(val) == 25  # every train image passes the area filter
    for dataset in (train, val):
        counts = np.zeros(256, dtype=np.int64)
        for index in range(len(dataset)):
            counts += np.bincount(np.asarray(dataset.label_at(index)).ravel(), minlength=256)
        present = set(np.flatnonzero(counts).tolist())
        assert present == DEMO_CLASSES | {255}  # 255: overlapping instances
        # Objects are a sizeable share of the pixels, so "all background" is a poor model.
        assert 0.05 < counts[1:21].sum() / counts[:21].sum() < 0.5
    sample = val[0]
    assert sample["image"].mode == "RGB" and sample["label"].mode == "L"


def test_non_voc_objects_are_background_and_pixels_follow_annotations(demo_coco_root, tmp_path):
    val = COCOSegmentation(demo_coco_root, split="val", cache_dir=tmp_path)
    document = json.loads((demo_coco_root / "annotations" / "instances_val2017.json").read_text())
    colours = {entry[0]: np.array(entry[3], dtype=float) for entry in demo.DEMO_CATEGORIES}
    index_of = {int(image_id): index for index, image_id in enumerate(val.ids)}
    checked_giraffe = False
    for annotation in document["annotations"]:
        index = index_of[annotation["image_id"]]
        segmentation = annotation["segmentation"]
        rle = (mask_utils.frPyObjects(segmentation, 120, 160) if annotation["iscrowd"]
               else mask_utils.merge(mask_utils.frPyObjects(segmentation, 120, 160)))
        mask = mask_utils.decode(rle).astype(bool)
        label = np.asarray(val.label_at(index))
        image = np.asarray(val[index]["image"], dtype=float)
        if annotation["category_id"] == demo.NON_VOC_CATEGORY_ID:
            # Giraffe pixels are background unless a kept object lies on top.
            assert set(np.unique(label[mask])) <= {0, 3, 7, 8, 12, 15, 255}
            assert (label[mask] == 0).mean() > 0.5
            checked_giraffe = True
        # Away from edges and other objects, the painted colour is the category's colour
        # (textures darken it by at most 30 %; noise and JPEG add a little).
        others = np.zeros_like(mask)
        for other in document["annotations"]:
            if other["image_id"] == annotation["image_id"] and other["id"] > annotation["id"]:
                seg = other["segmentation"]
                rle2 = (mask_utils.frPyObjects(seg, 120, 160) if other["iscrowd"]
                        else mask_utils.merge(mask_utils.frPyObjects(seg, 120, 160)))
                others |= mask_utils.decode(rle2).astype(bool)
        inner = mask.copy()
        for axis in (0, 1):
            for shift in (-2, 2):
                inner &= np.roll(mask, shift, axis=axis)
        inner &= ~others
        if inner.sum() < 20:
            continue
        colour = colours[annotation["category_id"]]
        ratio = image[inner].mean(0) / colour
        assert np.all((ratio > 0.6) & (ratio < 1.2)), (annotation["id"], ratio)
    assert checked_giraffe


def test_overlaps_are_ignored(demo_coco_root, tmp_path):
    val = COCOSegmentation(demo_coco_root, split="val", cache_dir=tmp_path)
    assert any((np.asarray(val.label_at(i)) == 255).any() for i in range(len(val)))


def test_ensure_generates_once_and_atomically(tmp_path):
    root = tmp_path / "data" / "demo"
    assert ensure_demo_dataset(root) == str(root)
    annotation_file = root / "annotations" / "instances_train2017.json"
    stamp = annotation_file.stat().st_mtime_ns
    assert ensure_demo_dataset(root) == str(root)
    assert annotation_file.stat().st_mtime_ns == stamp  # not regenerated
    # No temporary folder is left beside it.
    assert [p.name for p in root.parent.iterdir()] == ["demo"]
    assert len(COCOSegmentation(root, "val", cache_dir=tmp_path / "cache")) == 25


def test_ensure_fills_an_empty_folder_and_refuses_a_foreign_one(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    ensure_demo_dataset(empty)
    assert (empty / "annotations" / "instances_val2017.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="foreign"):
        ensure_demo_dataset(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
