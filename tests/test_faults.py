"""Runs that are killed, interrupted or distributed behave as a careful user expects (CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from dataloader.datasets.demo import generate_demo_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--no-pretrained", "--amp", "off", "--crop-size", "64",
        "--base-size", "64", "--eval-size", "48", "--dataset", "demo",
        "--batch-size", "4", "--lr", "0.01"]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    # 16 train images -> 4 iterations per epoch of 4 images.
    root = tmp_path_factory.mktemp("small") / "demo"
    generate_demo_dataset(root, seed=1, num_train=16, num_val=4)
    return root


def start(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def torchrun(args: list[str]) -> list[str]:
    """Two CPU processes of train.py under torchrun, on the small demo set."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "train.py"), *TINY, "--workers", "0", "--batch-size", "2", "--no-cuda",
            *args]


def wait_for_checkpoint(process: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"run ended before its first checkpoint:\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no checkpoint within the timeout")
        time.sleep(0.02)


def test_killed_run_resumes_exactly(small_demo, tmp_path):
    common = TINY + ["--data-root", str(small_demo), "--epochs", "3", "--workers", "1",
                     "--save-interval", "2", "--eval-interval", "2"]
    # The reference: an uninterrupted run.
    reference = train.main(train.get_args_parser().parse_args(
        common + ["--run-dir", str(tmp_path / "reference")]))
    reference_ckpt = torch.load(tmp_path / "reference" / "checkpoint.pth.tar",
                                weights_only=True)

    # The same run, killed with SIGKILL right after its first checkpoint...
    run_dir = tmp_path / "killed"
    process = start(common + ["--run-dir", str(run_dir)])
    wait_for_checkpoint(process, run_dir / "checkpoint.pth.tar")
    process.send_signal(signal.SIGSTOP)
    killed_at = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)["iteration"]
    process.kill()
    process.communicate()
    assert 0 < killed_at < reference["iteration"]

    # ...then resumed from that checkpoint.
    resumed = train.main(train.get_args_parser().parse_args(
        common + ["--resume", str(run_dir / "checkpoint.pth.tar")]))
    resumed_ckpt = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)

    assert resumed["iteration"] == reference["iteration"] == 12
    assert resumed["lr"] == reference["lr"]
    assert resumed_ckpt["scheduler"]["last_epoch"] == reference_ckpt["scheduler"]["last_epoch"]
    # Same data order, augmentation and dropout: the weights end bit-identical on the CPU.
    for name, tensor in reference_ckpt["model"].items():
        assert torch.equal(tensor, resumed_ckpt["model"][name]), name
    assert resumed["best_pred"] == reference["best_pred"]

    # TensorBoard sees each step once, in order, across the killed and the resumed run.
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("train/loss")]
    assert steps == list(range(1, 13))
    losses = [event.value for event in accumulator.Scalars("train/loss")]
    reference_acc = EventAccumulator(str(tmp_path / "reference"))
    reference_acc.Reload()
    assert losses == [event.value for event in reference_acc.Scalars("train/loss")]


def test_sigterm_saves_a_checkpoint_and_exits(small_demo, tmp_path):
    run_dir = tmp_path / "term"
    process = start(TINY + ["--data-root", str(small_demo), "--epochs", "50", "--workers", "1",
                            "--save-interval", "1", "--run-dir", str(run_dir)],
                    start_new_session=True)
    wait_for_checkpoint(process, run_dir / "checkpoint.pth.tar")
    # The whole process group, data workers included, as a cluster scheduler or Ctrl-C does.
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert 0 < checkpoint["iteration"] < 50 * 4
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "rng", "settings", "iteration"}


def test_torchrun_two_processes_on_cpu(small_demo, tmp_path):
    run_dir = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    completed = subprocess.run(
        torchrun(["--data-root", str(small_demo), "--epochs", "1", "--run-dir", str(run_dir)]),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "weights identical across 2 ranks: yes" in completed.stdout
    settings = json.loads((run_dir / "settings.json").read_text())
    assert settings["world_size"] == 2
    assert settings["sync_bn"] is False  # SyncBatchNorm is CUDA-only
    assert settings["iters_per_epoch"] == 16 // 2 // 2
    ddp_metrics = json.loads((run_dir / "metrics.json").read_text())

    # A single process scoring the same checkpoint gets the same confusion matrix.
    out = tmp_path / "single.json"
    train.main(train.get_args_parser().parse_args(
        TINY + ["--data-root", str(small_demo), "--workers", "0", "--eval-only",
                "--resume", str(run_dir / "checkpoint.pth.tar"), "--eval-json", str(out)]))
    single = json.loads(out.read_text())
    assert single["mean_iou"] == ddp_metrics["mean_iou"]
    assert single["pixel_accuracy"] == ddp_metrics["pixel_accuracy"]


def test_sigterm_under_torchrun_saves_once_all_ranks_agree(small_demo, tmp_path):
    run_dir = tmp_path / "ddp-term"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        torchrun(["--data-root", str(small_demo), "--epochs", "100", "--save-interval", "1",
                  "--print-freq", "1", "--run-dir", str(run_dir)]),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    wait_for_checkpoint(process, run_dir / "checkpoint.pth.tar")
    first = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)["iteration"]
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert "interrupted by SIGTERM: checkpoint saved" in err, err[-2000:]
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert first <= checkpoint["iteration"] < 100 * 4
