"""One short epoch on real COCO images, then inference on its val images.

Needs DEEPLAB_COCO_ROOT (CI points it at ../shared/data/coco_tiny: 80 train + 80 val images);
skipped with that reason otherwise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import inference
import train

pytestmark = [pytest.mark.coco, pytest.mark.slow]

COCO_ROOT = os.environ.get("DEEPLAB_COCO_ROOT")


@pytest.mark.skipif(not COCO_ROOT, reason="set DEEPLAB_COCO_ROOT to a COCO 2017 folder "
                                          "(e.g. ../shared/data/coco_tiny) to run on real COCO")
def test_train_one_epoch_on_coco_and_predict_its_val_images(tmp_path):
    run_dir = tmp_path / "run"
    result = train.main(train.get_args_parser().parse_args([
        "--dataset", "coco", "--data-root", COCO_ROOT, "--backbone", "resnet18",
        "--no-pretrained", "--amp", "off", "--workers", "2", "--epochs", "1", "--no-cuda",
        "--batch-size", "8", "--crop-size", "96", "--base-size", "96", "--eval-size", "96",
        "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(run_dir)]))
    train_images = len(json.loads(
        (Path(COCO_ROOT) / "annotations" / "instances_train2017.json").read_text())["images"])
    settings = json.loads((run_dir / "settings.json").read_text())
    # The area > 1000 filter keeps some but not all of the train images; batches of 8 drop the rest.
    assert 0 < settings["iters_per_epoch"] <= train_images // 8
    assert result["iteration"] == settings["iters_per_epoch"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["pixel_accuracy"] <= 1.0
    assert (run_dir / "model_best.pth.tar").is_file()

    val_dir = Path(COCO_ROOT) / "val2017"
    out_dir = tmp_path / "masks"
    assert inference.cli(["--in-path", str(val_dir), "--out-path", str(out_dir), "--size", "96",
                          "--ckpt", str(run_dir / "checkpoint.pth.tar"), "--no-cuda"]) == 0
    inputs = sorted(val_dir.glob("*.jpg"))
    masks = sorted(out_dir.glob("*.png"))
    assert [p.stem for p in masks] == [p.stem for p in inputs]
    for image_path, mask_path in zip(inputs[:10], masks[:10]):
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            assert mask.size == image.size and mask.mode == "P"
            assert np.asarray(mask).max() < 21
