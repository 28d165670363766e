"""inference.py writes the prediction train.py --eval-only scores, and torchrun splits the work
without changing it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import inference
import train

from dataloader.datasets.coco import COCOSegmentation
from dataloader.datasets.demo import generate_demo_dataset
from inference_testing import assert_same_masks, make_checkpoint, read_mask, write_image

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "r18.pth.tar", num_classes=21)


def eval_only_predictions(monkeypatch, ckpt: Path, dataset: str, root: Path, tmp_path: Path,
                          size: int | None) -> list[np.ndarray]:
    """The class ids train.py --eval-only scores, one per val image in dataset order."""
    recorded = []

    class Recording(train.Evaluator):
        def add_batch(self, target, prediction):
            recorded.extend(p.cpu().numpy() for p in prediction)
            return super().add_batch(target, prediction)

    monkeypatch.setattr(train, "Evaluator", Recording)
    args = ["--dataset", dataset, "--data-root", str(root), "--eval-only", "--resume", str(ckpt),
            "--amp", "off", "--workers", "0", "--eval-json", str(tmp_path / "metrics.json")]
    train.main(train.get_args_parser().parse_args(
        args + (["--eval-size", str(size)] if size else [])))
    return recorded


def assert_same_predictions(monkeypatch, ckpt, dataset, root, tmp_path, size):
    tmp_path.mkdir(exist_ok=True)
    expected = eval_only_predictions(monkeypatch, ckpt, dataset, root, tmp_path, size)
    out = tmp_path / "out"
    # The numerics of --eval-only: PyTorch, fp32, contiguous; labels are drawn on stored pixels.
    assert inference.cli(["--in-path", str(root / "val2017"), "--out-path", str(out),
                          "--ckpt", str(ckpt), "--engine", "torch", "--amp", "off",
                          "--no-channels-last", "--no-exif-transpose", "--workers", "0"]
                         + (["--size", str(size)] if size else [])) == 0
    val = COCOSegmentation(str(root), split="val")
    assert len(expected) == len(val) > 0
    for index, prediction in enumerate(expected):
        mask = read_mask(out / val.image_path(index).with_suffix(".png").name)
        assert mask.shape == prediction.shape
        assert np.array_equal(mask, prediction), val.image_path(index)
    assert len(np.unique(np.concatenate([p.ravel() for p in expected]))) > 1


@pytest.mark.parametrize("size", [None, 72])
def test_inference_writes_what_eval_only_scores_on_generated_images(
        monkeypatch, ckpt, tmp_path, size):
    root = tmp_path / "demo"
    generate_demo_dataset(root, seed=3, num_train=2, num_val=4)
    assert_same_predictions(monkeypatch, ckpt, "demo", root, tmp_path, size)


def real_subset(root: Path, target: Path, count: int) -> Path:
    """A COCO root of the first ``count`` val images of ``root`` (links, and their annotations)."""
    document = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    document["images"] = sorted(document["images"], key=lambda image: image["id"])[:count]
    kept = {image["id"] for image in document["images"]}
    document["annotations"] = [a for a in document["annotations"] if a["image_id"] in kept]
    (target / "annotations").mkdir(parents=True)
    (target / "annotations" / "instances_val2017.json").write_text(json.dumps(document))
    (target / "val2017").mkdir()
    for image in document["images"]:
        (target / "val2017" / image["file_name"]).symlink_to(
            root / "val2017" / image["file_name"])
    return target


@pytest.mark.coco
def test_inference_writes_what_eval_only_scores_on_real_images(monkeypatch, ckpt, tmp_path):
    root = os.environ.get("DEEPLAB_COCO_ROOT")
    if not root:
        pytest.skip("DEEPLAB_COCO_ROOT is not set: no real COCO images to compare on")
    subset = real_subset(Path(root), tmp_path / "coco", 5)
    # Full resolution, and a short side of 200 (the resize is part of the shared code).
    for size in (None, 200):
        assert_same_predictions(monkeypatch, ckpt, "coco", subset, tmp_path / str(size), size)


def test_torchrun_splits_the_inputs_and_changes_no_output(ckpt, tmp_path):
    for seed in range(5):
        write_image(tmp_path / "in" / f"sub{seed % 2}" / f"{seed}.jpg", 48, 40, seed=seed)
    common = ["--in-path", str(tmp_path / "in"), "--ckpt", str(ckpt), "--engine", "torch",
              "--workers", "0"]
    assert inference.cli(common + ["--out-path", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "inference.py"), *common, "--out-path", str(tmp_path / "two"), "--no-cuda"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "5 inputs segmented" in completed.stdout
    assert_same_masks(tmp_path / "one", tmp_path / "two", 5)
