"""An fp16 run (autocast + GradScaler, on the CPU) killed with SIGKILL and continued with
--auto-resume ends where the uninterrupted run does, bit for bit, scaler included."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.kill_test import Run, run_to_end
from dataloader.datasets.demo import generate_demo_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: GradScaler's first scale; the first steps of a new model overflow fp16 at it and are skipped.
INITIAL_SCALE = 2.0 ** 16


def fp16_command(data_root: Path, run_dir: Path) -> list[str]:
    # 12 images, batches of 2: one epoch of 6 steps, saved every 2 (fp16 is emulated on most
    # CPUs and slow: ResNet-18 at 32 pixels).
    return [sys.executable, str(REPO / "train.py"), "--dataset", "demo", "--data-root",
            str(data_root), "--backbone", "resnet18", "--no-pretrained", "--no-cuda", "--amp",
            "fp16", "--crop-size", "32", "--base-size", "32", "--eval-size", "32",
            "--batch-size", "2", "--lr", "0.01", "--epochs", "1", "--workers", "1",
            "--save-interval", "2", "--print-freq", "1", "--eval-worst", "0", "--seed", "3",
            "--auto-resume", "--run-dir", str(run_dir)]


def test_fp16_sigkill_then_auto_resume_ends_bit_identical(tmp_path):
    data_root = tmp_path / "demo"
    generate_demo_dataset(data_root, seed=1, num_train=12, num_val=2, image_size=(40, 32))
    run_to_end(fp16_command(data_root, tmp_path / "reference"))
    reference = torch.load(tmp_path / "reference" / "checkpoint.pth.tar", weights_only=True)

    killed_dir = tmp_path / "killed"
    checkpoint_path = killed_dir / "checkpoint.pth.tar"
    run = Run(fp16_command(data_root, killed_dir))
    deadline = time.monotonic() + 300
    while not checkpoint_path.exists() and run.process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.process.pid, signal.SIGSTOP)  # hold it still while the checkpoint is read
    at_kill = torch.load(checkpoint_path, weights_only=True)
    run.kill()
    assert at_kill["iteration"] in (2, 4), run.text()[-2000:]
    run_to_end(fp16_command(data_root, killed_dir))
    resumed = torch.load(checkpoint_path, weights_only=True)

    assert resumed["iteration"] == reference["iteration"] == 6
    # The scaler came down from its first scale (skipped steps happened), so its state matters,
    # and it is the uninterrupted run's: scale and the count of good steps since it changed.
    assert reference["scaler"]["scale"] < INITIAL_SCALE
    assert resumed["scaler"] == reference["scaler"]
    assert resumed["scheduler"]["last_epoch"] == reference["scheduler"]["last_epoch"] == 6
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for (name, state), resumed_state in zip(reference["optimizer"]["state"].items(),
                                            resumed["optimizer"]["state"].values()):
        assert torch.equal(state["momentum_buffer"], resumed_state["momentum_buffer"]), name
