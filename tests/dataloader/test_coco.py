"""COCOSegmentation: labels against hand-made geometry, the train filter, the index cache, errors,
and (with DEEPLAB_COCO_ROOT) every real image against a direct pycocotools rasterisation."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import rectangle, write_tiny_coco
from dataloader.custom_transforms import ToTensorNormalize
from dataloader.datasets import coco as coco_module
from dataloader.datasets.coco import COCO_CATEGORY_IDS, COCOSegmentation
from dataloader.utils import VOC_CLASS_NAMES, DatasetError, collate_skipping_bad

# pycocotools 2.0.x warns about numpy 2's copy keyword on every decode; nothing to act on.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Pascal VOC class indices used below.
BACKGROUND, BIRD, BOAT, CAR, CAT, DOG, PERSON, SHEEP = 0, 3, 4, 7, 8, 12, 15, 17


def expected_image_1() -> np.ndarray:
    """Label of tiny image 1, written down from its rectangles (see conftest.TINY_COCO_IMAGES)."""
    label = np.zeros((40, 48), dtype=np.uint8)
    label[2:25, 2:22] = PERSON      # the giraffe on top of it is not a VOC class: no overlap
    label[2:8, 26:32] = DOG         # dog, first part
    label[2:8, 36:44] = DOG         # dog, second part
    label[12:22, 24:34] = CAT
    label[16:26, 30:40] = DOG
    label[16:22, 30:34] = 255       # cat and dog overlap
    label[26:38, 2:18] = CAR        # crowd region, painted like an instance
    label[30:40, 40:48] = BOAT      # clipped at the bottom-right corner
    label[0:2, 0:2] = BOAT          # clipped at the top-left corner
    return label                    # the degenerate bird paints nothing


def test_class_table_is_torchvisions():
    assert COCO_CATEGORY_IDS == [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20,
                                 63, 7, 72]
    dataset_class_names = COCOSegmentation.class_names
    assert tuple(dataset_class_names) == VOC_CLASS_NAMES
    assert dataset_class_names[PERSON] == "person" and dataset_class_names[DOG] == "dog"


def test_labels_match_hand_made_geometry(tiny_coco_root, cache_dir):
    dataset = COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir)
    assert list(dataset.ids) == [1, 2, 3, 4, 5]
    sample = dataset[0]
    np.testing.assert_array_equal(np.asarray(sample["label"]), expected_image_1())

    bird = np.zeros((30, 40), dtype=np.uint8)
    bird[5:15, 5:15] = BIRD
    np.testing.assert_array_equal(np.asarray(dataset[1]["label"]), bird)
    # A giraffe-only image and an image without annotations are all background.
    np.testing.assert_array_equal(np.asarray(dataset[2]["label"]), np.zeros((30, 40), np.uint8))
    np.testing.assert_array_equal(np.asarray(dataset[3]["label"]), np.zeros((30, 40), np.uint8))
    np.testing.assert_array_equal(np.asarray(dataset[4]["label"]), np.full((30, 40), SHEEP))


def test_train_keeps_images_with_more_than_1000_annotated_pixels(tiny_coco_root, cache_dir):
    # Kept areas: image 1 -> 1016, image 5 -> 1200, image 2 -> 100, image 3 -> 0 (giraffe only),
    # image 4 -> no annotation.
    train = COCOSegmentation(tiny_coco_root, split="train", cache_dir=cache_dir)
    assert [int(i) for i in train.ids] == [1, 5]
    assert len(train) == 2
    np.testing.assert_array_equal(np.asarray(train[0]["label"]), expected_image_1())


def test_item_types_and_modes(tiny_coco_root, cache_dir):
    dataset = COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir)
    sample = dataset[0]
    assert set(sample) == {"image", "label"}
    assert dataset.sample_name(0) == "000000000001.jpg"  # figures name images by their file
    assert isinstance(sample["image"], Image.Image) and sample["image"].mode == "RGB"
    assert isinstance(sample["label"], Image.Image) and sample["label"].mode == "L"
    assert sample["image"].size == sample["label"].size == (48, 40)
    assert dataset.num_classes == 21
    assert dataset[-1]["image"].size == (40, 30)
    with pytest.raises(IndexError):
        dataset[5]
    assert dataset.image_path(0) == tiny_coco_root / "val2017" / "000000000001.jpg"


def test_transform_receives_the_sample(tiny_coco_root, cache_dir):
    def transform(sample):
        return {"label_sum": int(np.asarray(sample["label"], dtype=np.int64).sum())}

    dataset = COCOSegmentation(tiny_coco_root, "val", transform=transform, cache_dir=cache_dir)
    assert dataset[4] == {"label_sum": SHEEP * 1200}


def test_label_at_does_not_need_the_image(tiny_coco_root, cache_dir):
    dataset = COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir)
    os.remove(dataset.image_path(0))
    label = dataset.label_at(0)
    assert label.mode == "L"
    np.testing.assert_array_equal(np.asarray(label), expected_image_1())
    with pytest.raises(DatasetError, match="000000000001.jpg"):
        dataset[0]


def test_compressed_rle_and_malformed_rle(tmp_path, cache_dir):
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[3:9, 10:30] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask))
    compressed["counts"] = compressed["counts"].decode("ascii")  # as a JSON file stores it
    images = {
        1: (40, 30, [(17, compressed, 120.0, 1)]),
        2: (40, 30, [(17, {"counts": [5, 10], "size": [30, 40]}, 10.0, 1)]),  # 15 of 1200 px
        3: (40, 30, [(17, {"counts": "0000", "size": [30, 40]}, 10.0, 1)]),    # sums to zero
    }
    dataset = COCOSegmentation(write_tiny_coco(tmp_path / "coco", images), "val",
                               cache_dir=cache_dir)
    expected = np.zeros((30, 40), dtype=np.uint8)
    expected[3:9, 10:30] = CAT
    np.testing.assert_array_equal(np.asarray(dataset.label_at(0)), expected)
    for index in (1, 2):
        with pytest.raises(DatasetError, match=r"image [23] .*instances_val2017.json.*add up"):
            dataset.label_at(index)


def test_skip_bad_images_turns_a_bad_sample_into_none(tiny_coco_root, cache_dir):
    dataset = COCOSegmentation(tiny_coco_root, "val", skip_bad_images=True, cache_dir=cache_dir,
                               transform=ToTensorNormalize())
    (tiny_coco_root / "val2017" / "000000000002.jpg").write_bytes(b"not a jpeg")
    assert dataset[1] is None
    batch = collate_skipping_bad([dataset[1], dataset[2]])
    assert batch["skipped"] == 1


def test_image_size_mismatch_names_the_file(tiny_coco_root, cache_dir):
    Image.new("RGB", (41, 30)).save(tiny_coco_root / "val2017" / "000000000003.jpg", "JPEG")
    dataset = COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir)
    with pytest.raises(DatasetError, match=r"000000000003\.jpg.*41x30.*40x30"):
        dataset[2]


def test_index_cache_is_reused_and_invalidated(tiny_coco_root, cache_dir, monkeypatch):
    first = COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir)
    cached = list((cache_dir / "coco").glob("*.npz"))
    assert len(cached) == 1
    # Nothing derived is written into the dataset folder.
    assert not [p for p in tiny_coco_root.rglob("*") if p.suffix not in (".jpg", ".json")
                and p.is_file()]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the index was rebuilt although the cache is valid")

    monkeypatch.setattr(coco_module, "build_index", no_rebuild)
    second = COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir)
    assert list(second.ids) == list(first.ids)
    assert second.cache_key() == first.cache_key()
    np.testing.assert_array_equal(np.asarray(second[0]["label"]), expected_image_1())
    monkeypatch.undo()

    # Change the file: the sheep of image 5 becomes a giraffe (background).
    annotation_file = tiny_coco_root / "annotations" / "instances_val2017.json"
    document = json.loads(annotation_file.read_text())
    for annotation in document["annotations"]:
        if annotation["image_id"] == 5:
            annotation["category_id"] = 25
    annotation_file.write_text(json.dumps(document, indent=1))
    third = COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir)
    assert third.cache_key() != first.cache_key()
    np.testing.assert_array_equal(np.asarray(third[4]["label"]), np.zeros((30, 40), np.uint8))
    # The stale cache of that file was replaced, not kept beside the new one.
    assert [p.name for p in (cache_dir / "coco").glob("*.npz")] != [cached[0].name]
    assert len(list((cache_dir / "coco").glob("*.npz"))) == 1


def test_corrupt_cache_is_rebuilt(tiny_coco_root, cache_dir):
    COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir)
    (cache_file,) = (cache_dir / "coco").glob("*.npz")
    cache_file.write_bytes(b"garbage")
    dataset = COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir)
    assert len(dataset) == 5


def test_index_is_flat_arrays_and_pickles(tiny_coco_root, cache_dir):
    # Workers started with "spawn" receive the dataset pickled; forked ones share its arrays.
    dataset = COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir)
    python_containers = [name for name, value in vars(dataset).items()
                         if isinstance(value, (list, dict, tuple, set))]
    assert python_containers == []
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(np.asarray(clone.label_at(0)), expected_image_1())


def test_works_in_dataloader_workers(tiny_coco_root, cache_dir):
    dataset = COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir,
                               transform=lambda s: torch.as_tensor(np.asarray(s["label"])).sum())
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2)
    sums = [int(x) for x in loader]
    assert sums[4] == SHEEP * 1200 and sums[2] == sums[3] == 0


@pytest.mark.parametrize("missing", ["root", "images", "annotations"])
def test_missing_paths_name_the_path_and_the_fix(tmp_path, cache_dir, missing):
    root = write_tiny_coco(tmp_path / "coco")
    target = {
        "root": tmp_path / "nowhere",
        "images": root / "val2017",
        "annotations": root / "annotations" / "instances_val2017.json",
    }[missing]
    if missing == "images":
        for path in target.iterdir():
            path.unlink()
        target.rmdir()
    elif missing == "annotations":
        target.unlink()
    with pytest.raises(DatasetError) as error:
        COCOSegmentation(target if missing == "root" else root, split="val", cache_dir=cache_dir)
    message = str(error.value)
    assert str(target) in message
    assert "DEEPLAB_COCO_ROOT" in message and "--data-root" in message
    assert "\n" not in message


def test_corrupt_json_names_the_file(tiny_coco_root, cache_dir):
    annotation_file = tiny_coco_root / "annotations" / "instances_train2017.json"
    annotation_file.write_text('{"images": [')
    with pytest.raises(DatasetError, match="instances_train2017.json"):
        COCOSegmentation(tiny_coco_root, split="train", cache_dir=cache_dir)
    # An image entry without its size.
    annotation_file = tiny_coco_root / "annotations" / "instances_val2017.json"
    annotation_file.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}')
    with pytest.raises(DatasetError, match="instances_val2017.json.*height"):
        COCOSegmentation(tiny_coco_root, split="val", cache_dir=cache_dir)


def test_unknown_split_is_a_value_error(tiny_coco_root, cache_dir):
    with pytest.raises(ValueError, match="'test'"):
        COCOSegmentation(tiny_coco_root, split="test", cache_dir=cache_dir)


def test_absurd_polygon_is_clipped_without_blowing_up(tmp_path, cache_dir):
    images = {1: (40, 30, [(1, [rectangle(10, 10, 1e12, 20), [1, 1, 3, 1, float("nan")]],
                            100.0, 0)])}
    dataset = COCOSegmentation(write_tiny_coco(tmp_path / "coco", images), "val",
                               cache_dir=cache_dir)
    expected = np.zeros((30, 40), dtype=np.uint8)
    expected[10:20, 10:40] = PERSON
    # The NaN part has 2 points (5 numbers) and is dropped as degenerate.
    np.testing.assert_array_equal(np.asarray(dataset.label_at(0)), expected)


# ---------------------------------------------------------------------------------------------
# Real COCO data: every image against pycocotools, following torchvision's rules by hand.

@pytest.fixture(scope="module")
def real_coco_root() -> Path:
    root = os.environ.get("DEEPLAB_COCO_ROOT")
    if not root:
        pytest.skip("set DEEPLAB_COCO_ROOT to a COCO 2017 folder (e.g. shared/data/coco_tiny) "
                    "to compare every label with pycocotools")
    return Path(root)


def reference_label(coco, image_id: int, kept_ids: list[int]) -> np.ndarray:
    info = coco.imgs[image_id]
    annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
                   if a["category_id"] in kept_ids]
    label = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    count = np.zeros(label.shape, dtype=np.int64)
    for annotation in annotations:
        mask = coco.annToMask(annotation)
        label = np.maximum(label, mask * kept_ids.index(annotation["category_id"]))
        count += mask
    label[count > 1] = 255
    return label


@pytest.mark.coco
@pytest.mark.parametrize("split", ["train", "val"])
def test_every_real_label_matches_pycocotools(real_coco_root, split, tmp_path):
    from pycocotools.coco import COCO

    annotation_file = real_coco_root / "annotations" / f"instances_{split}2017.json"
    if not annotation_file.is_file():
        pytest.skip(f"{real_coco_root} has no {split} split ({annotation_file} is missing)")
    kept_ids = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]
    coco = COCO(str(annotation_file))
    expected_ids = []
    for image_id in sorted(coco.imgs):
        annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
                       if a["category_id"] in kept_ids]
        if split == "val" or sum(a["area"] for a in annotations) > 1000:
            expected_ids.append(image_id)

    dataset = COCOSegmentation(real_coco_root, split=split, cache_dir=tmp_path)
    assert [int(i) for i in dataset.ids] == expected_ids
    assert len(dataset) > 0
    mismatched = [int(image_id) for index, image_id in enumerate(dataset.ids)
                  if not np.array_equal(np.asarray(dataset.label_at(index)),
                                        reference_label(coco, int(image_id), kept_ids))]
    assert mismatched == []
    # Decoded images agree with the index sizes (a few, to keep the test fast).
    for index in range(0, len(dataset), max(1, len(dataset) // 5)):
        sample = dataset[index]
        assert sample["image"].size == sample["label"].size
