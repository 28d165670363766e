"""Shared fixtures: small datasets written into the test's temporary folder.

``tiny_coco_root`` is a hand-made COCO-format dataset whose labels are known pixel for pixel
(every shape is an axis-aligned rectangle with integer corners, and pycocotools covers exactly the
pixels ``x0 <= x < x1, y0 <= y < y1`` of such a polygon). Its geometry is listed in
:data:`TINY_COCO_IMAGES` so tests can build expected labels from it.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
import torch
from PIL import Image

from utils import hardware

# Property tests: a loaded 2-core CI machine must not fail a test for being slow, and CI replays
# the same examples every run (derandomize) so that a submission's result does not depend on the
# draw; locally each run explores new examples.
settings.register_profile("suite", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.register_profile("ci", parent=settings.get_profile("suite"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "suite")


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """A COCO polygon (flat ``[x, y, ...]`` list) for the rectangle ``[x0, x1) x [y0, y1)``."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (column-major run lengths, zeros first) of a binary mask."""
    flat = np.asarray(mask, dtype=np.uint8).reshape(-1, order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _crowd_car_mask() -> np.ndarray:
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[26:38, 2:18] = 1
    return mask


#: image id -> (width, height, annotations as (category id, segmentation, area, iscrowd)).
#: COCO ids: 1 person, 3 car, 9 boat, 16 bird, 17 cat, 18 dog, 20 sheep; 25 giraffe is not a
#: Pascal VOC class. Listed out of id order on purpose (the dataset sorts by id).
TINY_COCO_IMAGES: dict[int, tuple[int, int, list[tuple[int, Any, float, int]]]] = {
    5: (40, 30, [(20, [rectangle(0, 0, 40, 30)], 1200.0, 0)]),           # sheep everywhere
    1: (48, 40, [
        (1, [rectangle(2, 2, 22, 25)], 460.0, 0),                          # person
        (25, [rectangle(16, 4, 26, 10)], 60.0, 0),                         # giraffe over person
        (18, [rectangle(26, 2, 32, 8), rectangle(36, 2, 44, 8)], 84.0, 0),  # dog in two parts
        (17, [rectangle(24, 12, 34, 22)], 100.0, 0),                       # cat ...
        (18, [rectangle(30, 16, 40, 26)], 100.0, 0),                       # ... overlapped by a dog
        (3, uncompressed_rle(_crowd_car_mask()), 192.0, 1),                # crowd of cars
        # Boat: one part runs off the bottom-right corner, one off the top-left corner.
        (9, [rectangle(40, 30, 60, 50), rectangle(-6, -6, 2, 2)], 84.0, 0),
        # Bird with only degenerate parts: 2 points (a "box" to pycocotools), an odd coordinate
        # count and a zero-area line. It must paint nothing.
        (16, [[5, 30, 8, 33], [20, 30, 22, 30, 21], [20, 30, 25, 30, 30, 30]], 0.0, 0),
    ]),
    3: (40, 30, [(25, [rectangle(0, 0, 40, 30)], 1200.0, 0)]),           # giraffe only
    2: (40, 30, [(16, [rectangle(5, 5, 15, 15)], 100.0, 0)]),            # one small bird
    4: (40, 30, []),                                                       # nothing annotated
}

TINY_COCO_CATEGORIES = [
    (1, "person"), (3, "car"), (9, "boat"), (16, "bird"), (17, "cat"), (18, "dog"),
    (20, "sheep"), (25, "giraffe"),
]


def write_tiny_coco(root: str | Path, images: dict | None = None) -> Path:
    """Write :data:`TINY_COCO_IMAGES` (or ``images`` in the same form) as a COCO 2017 dataset.

    Both splits hold the same images and annotations; the loader's train filter then keeps images
    1 and 5 only. Images are flat-coloured JPEGs of the stated size.
    """
    root = Path(root)
    images = TINY_COCO_IMAGES if images is None else images
    document: dict[str, Any] = {
        "info": {"description": "tiny hand-made test set"},
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": name, "supercategory": "thing"}
                       for i, name in TINY_COCO_CATEGORIES],
    }
    annotation_id = 1
    for image_id, (width, height, objects) in images.items():
        document["images"].append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height}
        )
        for category_id, segmentation, area, iscrowd in objects:
            document["annotations"].append({
                "id": annotation_id, "image_id": image_id, "category_id": category_id,
                "segmentation": segmentation, "area": area, "iscrowd": iscrowd,
                "bbox": [0.0, 0.0, float(width), float(height)],
            })
            annotation_id += 1
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        folder = root / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        for image_id, (width, height, _) in images.items():
            colour = (40 * (image_id % 6), 90, 200 - 20 * (image_id % 6))
            Image.new("RGB", (width, height), colour).save(folder / f"{image_id:012d}.jpg")
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(document))
    return root


@pytest.fixture
def tiny_coco_root(tmp_path: Path) -> Path:
    """A hand-made COCO 2017 dataset (see :data:`TINY_COCO_IMAGES`) in ``tmp_path / "coco"``."""
    return write_tiny_coco(tmp_path / "coco")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A private index-cache folder, so tests never write into the user's cache."""
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def demo_coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default generated demo dataset (seed 0), made once per test session. Read-only."""
    from dataloader.datasets.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "demo"
    generate_demo_dataset(root, seed=0)
    return root


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory: pytest.TempPathFactory):
    """Index caches and class weights of every test (and of the scripts the tests start) go to a
    temporary folder, never into the user's ~/.cache. No first run exports a graph in a
    background process that would outlive its test (tests/deploy/test_warmup.py turns it on)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEEPLAB_CACHE_DIR", str(tmp_path_factory.mktemp("deeplab-cache")))
        patch.setenv("DEEPLAB_BACKGROUND_EXPORT", "0")
        yield


@pytest.fixture(params=[False, True], ids=["cpu-without-bf16", "cpu-with-bf16-and-amx"])
def cpu_bf16(request, monkeypatch) -> bool:
    """This CPU reports native bf16 (AVX512-BF16 and AMX) or none, whatever it really has, so a
    test of a default that could follow the CPU runs the same assertions on every CI machine."""
    reports = request.param
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: reports)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: reports, raising=False)
    monkeypatch.setattr(hardware, "cpu_has_amx", lambda: reports)
    return reports


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A 5-class ResNet-18 checkpoint with random weights, one per test module."""
    from inference_testing import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "r18.pth.tar", num_classes=5)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty torch hub cache, and any download fails as it would offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    # torch.hub.load_state_dict_from_url (which torchvision's weights API calls) looks this up
    # as a module global at call time.
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.fixture
def warnings_of(caplog, monkeypatch):
    """``warnings_of("utils.hardware")``: caplog, capturing that logger's warnings even when an
    earlier test in this process left it disabled or its level raised (a library's logging set-up
    run by an in-process CLI call); the records are read from ``caplog`` as usual."""
    def capture(name: str):
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
        caplog.set_level(logging.WARNING, logger=name)
        return caplog
    return capture
