"""Two torchrun processes score an odd number of val images exactly as one process does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from dataloader.datasets.demo import generate_demo_dataset
from dataloader.utils import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASS_NAMES, palette_for
from modeling.deeplab import DeepLab

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def write_checkpoint(path: Path) -> None:
    """A random-weight ResNet-18 DeepLab as train.py saves one: its guesses differ from image to
    image, so an image scored twice or missed changes the confusion matrix."""
    torch.manual_seed(0)
    model = DeepLab(backbone="resnet18", num_classes=21)
    settings = dict(model.settings(), class_names=list(VOC_CLASS_NAMES),
                    palette=palette_for(21), mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    torch.save({"model": model.state_dict(), "settings": settings}, path)


def test_two_ranks_score_5_val_images_like_one_process(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", seed=2, num_train=0, num_val=5,
                                 image_size=(40, 32))
    checkpoint = tmp_path / "random.pth.tar"
    write_checkpoint(checkpoint)
    common = ["--dataset", "demo", "--data-root", root, "--eval-only", "--resume",
              str(checkpoint), "--workers", "0", "--no-cuda", "--amp", "off",
              "--cache-dir", str(tmp_path / "cache")]
    two = tmp_path / "two.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train.py"), *common, "--eval-json", str(two)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Rank 0's progress bar (the only one shown) counts its own slice: images 0, 2 and 4.
    assert "3/3 [" in completed.stderr and "/5 [" not in completed.stderr
    one = tmp_path / "one.json"
    # One thread, as each torchrun process has: other thread counts may sum convolutions in
    # another order, and a last-bit difference can flip the argmax of a near-tie pixel.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(train.get_args_parser().parse_args(common + ["--eval-json", str(one)]))
    finally:
        torch.set_num_threads(threads)
    single, double = json.loads(one.read_text()), json.loads(two.read_text())
    assert double == single  # every metric: the summed confusion matrices are equal
    assert 0 < single["pixel_accuracy"] < 1  # a model whose guesses vary, not a constant
