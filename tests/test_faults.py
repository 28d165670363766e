"""Runs that are killed, interrupted or distributed behave as a careful user expects (CPU)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from bench.kill_test import Run, kill_test
from dataloader.datasets.coco import COCOSegmentation
from dataloader.datasets.demo import generate_demo_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--no-pretrained", "--no-cuda", "--amp", "off", "--crop-size",
        "64", "--base-size", "64", "--eval-size", "48", "--dataset", "demo",
        "--batch-size", "4", "--lr", "0.01"]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    # 16 train images -> 4 iterations per epoch of 4 images.
    root = tmp_path_factory.mktemp("small") / "demo"
    generate_demo_dataset(root, seed=1, num_train=16, num_val=4)
    return root


@pytest.fixture(scope="module")
def long_demo(tmp_path_factory) -> Path:
    # 64 train images: 32 iterations per epoch of 2; 24 val images.
    root = tmp_path_factory.mktemp("long") / "demo"
    generate_demo_dataset(root, seed=2, num_train=64, num_val=24)
    return root


def start(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def torchrun(args: list[str]) -> list[str]:
    """Two CPU processes of train.py under torchrun, on the small demo set."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "train.py"), *TINY, "--workers", "0", "--batch-size", "2", *args]


def wait_for_output(run: Run, pattern: str, timeout: float = 180) -> float:
    """Wait until the run's output matches ``pattern``; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, run.text()):
        if run.process.poll() is not None:
            run.wait()
            pytest.fail(f"run ended before {pattern!r}:\n{run.text()[-3000:]}")
        if time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"no {pattern!r} within the timeout:\n{run.text()[-3000:]}")
        time.sleep(0.01)
    return time.monotonic()


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


def test_sigterm_mid_epoch_saves_that_iteration_and_exits(long_demo, tmp_path):
    # No interval saves and a 32-iteration epoch: only saving on the signal can leave a
    # checkpoint, and it holds the iteration the signal arrived at.
    run_dir = tmp_path / "term"
    run = Run([sys.executable, str(REPO / "train.py"), *TINY, "--data-root", str(long_demo),
               "--batch-size", "2", "--epochs", "1", "--workers", "1", "--run-dir",
               str(run_dir)])
    wait_for_output(run, r"epoch 0:\s+\d+%\|[^|]*\|\s*[3-9]/32")
    # The whole process group, data workers included, as a cluster scheduler or Ctrl-C does.
    os.killpg(run.process.pid, signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM, run.text()[-2000:]
    assert "SIGTERM" in run.text() and "--resume" in run.text()
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert 3 <= checkpoint["iteration"] < 32
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "rng", "settings", "iteration"}
    assert not (run_dir / "model_best.pth.tar").exists()


def test_sigterm_during_validation_saves_within_seconds_and_resume_evaluates(long_demo,
                                                                            tmp_path):
    # One 32-iteration epoch, then a slow evaluation (24 images, 4 scales, flipped): a signal
    # during it must not wait for its end (a pre-emption grace period would run out).
    run_dir = tmp_path / "val-term"
    common = [*TINY, "--data-root", str(long_demo), "--batch-size", "8", "--epochs", "1",
              "--workers", "1", "--run-dir", str(run_dir)]
    run = Run([sys.executable, str(REPO / "train.py"), *common, "--eval-size", "128",
               "--eval-scales", "0.75", "1", "1.25", "1.5", "--eval-flip"])
    wait_for_output(run, r"val:\s+\d+%\|[^|]*\|\s*[1-9]")
    signalled = time.monotonic()
    os.killpg(run.process.pid, signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM, run.text()[-2000:]
    assert time.monotonic() - signalled < 10
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["iteration"] == 8 and checkpoint["epoch"] == 0
    assert checkpoint["eval_pending"] is True
    assert not (run_dir / "metrics.json").exists()  # the evaluation did not finish

    # The resumed run owes that evaluation and gives it before anything else.
    result = train.main(train.get_args_parser().parse_args(common + ["--auto-resume"]))
    assert result["iteration"] == 8
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["epoch"], metrics["iteration"]) == (0, 8)
    assert torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)["eval_pending"] is False


def test_auto_resume_continues_the_run_folder_it_finds(small_demo, tmp_path):
    common = TINY + ["--data-root", str(small_demo), "--workers", "0", "--auto-resume",
                     "--run-root", str(tmp_path / "runs")]
    parse = train.get_args_parser().parse_args
    first = train.main(parse(common + ["--epochs", "1"]))
    folder = tmp_path / "runs" / "demo" / "deeplab-resnet18" / "experiment_0"
    assert Path(first["experiment_dir"]) == folder and first["iteration"] == 4
    # Requeued with the same command (here asking for one more epoch): same folder, resumed.
    second = train.main(parse(common + ["--epochs", "2"]))
    assert Path(second["experiment_dir"]) == folder and second["iteration"] == 8
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["resume"] == str(folder / "checkpoint.pth.tar")
    assert sorted(p.name for p in folder.parent.iterdir()) == ["experiment_0"]
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == list(range(1, 9))

    # A job killed before its first checkpoint left an empty folder: it starts there again.
    (folder.parent / "experiment_1").mkdir()
    third = train.main(parse(common + ["--epochs", "1"]))
    assert Path(third["experiment_dir"]) == folder.parent / "experiment_1"
    assert third["iteration"] == 4
    assert sorted(p.name for p in folder.parent.iterdir()) == ["experiment_0", "experiment_1"]


def test_random_sigkills_then_auto_resume_end_bit_identical(tmp_path):
    # `python -m bench.kill_test` itself, shortened (20 kills by default there).
    report = kill_test(kills=2, seed=0, epochs=2, save_interval=2, workdir=tmp_path,
                       log=lambda line: None)
    assert len(report["kills"]) == 2
    assert report["unreadable"] == 0
    assert report["leftover_temporaries"] == 0
    assert report["max_lost"] <= 2
    assert report["iteration"] == (16, 16)
    assert report["identical"]
    assert report["best_pred"][0] == report["best_pred"][1]


@pytest.fixture(scope="module")
def odd_val_demo(tmp_path_factory) -> Path:
    # 5 val images over 2 ranks: 3 and 2. An even split would hide a sampler ignoring the rank.
    root = tmp_path_factory.mktemp("odd") / "demo"
    generate_demo_dataset(root, seed=1, num_train=16, num_val=5)
    return root


def test_torchrun_two_processes_on_cpu(odd_val_demo, tmp_path):
    small_demo = odd_val_demo
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
    # Every val pixel scored exactly once over the ranks: the label files' non-ignored pixels.
    val_set = COCOSegmentation(str(small_demo), split="val")
    valid = sum(int((np.asarray(val_set.label_at(i)) != 255).sum()) for i in range(len(val_set)))
    assert ddp_metrics["pixels"] == single["pixels"] == valid
    assert single["mean_iou"] == ddp_metrics["mean_iou"]
    assert single["pixel_accuracy"] == ddp_metrics["pixel_accuracy"]


def test_sigterm_under_torchrun_saves_once_all_ranks_agree(long_demo, tmp_path):
    # No interval saves: the checkpoint exists only if the ranks agreed to stop and rank 0 saved.
    run_dir = tmp_path / "ddp-term"
    run = Run(torchrun(["--data-root", str(long_demo), "--epochs", "1", "--print-freq", "1",
                        "--run-dir", str(run_dir)]))
    wait_for_output(run, r"epoch 0:\s+\d+%\|[^|]*\|\s*[2-9]/16")
    os.killpg(run.process.pid, signal.SIGTERM)
    run.wait(timeout=120)
    assert "interrupted by SIGTERM: checkpoint saved" in run.text(), run.text()[-2000:]
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert 2 <= checkpoint["iteration"] < 16


def test_check_data_under_torchrun_reports_once_and_fails_the_job(tmp_path):
    root = tmp_path / "demo"
    generate_demo_dataset(root, seed=2, num_train=4, num_val=2)
    victim = sorted((root / "train2017").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    completed = subprocess.run(torchrun(["--data-root", str(root), "--check-data"]), cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0  # rank 0 found a bad file: the job fails
    out = completed.stdout
    assert out.count("checked 4 train + 2 val samples") == 1, out
    assert out.count(victim.name) == 1, out
    assert out.count("data check FAILED: 1 bad sample(s)") == 1, out
