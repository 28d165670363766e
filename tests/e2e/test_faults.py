"""Runs that are killed, interrupted or distributed behave as a careful user expects (CPU)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from bench.kill_test import Run, kill_test
from dataloader.datasets.coco import COCOSegmentation
from dataloader.datasets.demo import generate_demo_dataset
from utils.fileio import FolderLock
from model_testing import record_used_lrs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
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


def poly_lrs(lr: float, total: int, steps: range) -> list[float]:
    """The poly schedule's rate for 1-based steps ``steps`` of a ``total``-step run, by hand."""
    return [lr * (1 - (step - 1) / total) ** 0.9 for step in steps]


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes (event files included)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(small_demo, tmp_path_factory) -> dict:
    """One finished epoch (4 steps) found by --auto-resume under ``runs``; shared read-only."""
    runs = tmp_path_factory.mktemp("finished") / "runs"
    flags = TINY + ["--data-root", str(small_demo), "--epochs", "1", "--workers", "0"]
    with pytest.MonkeyPatch.context() as patch:
        used = record_used_lrs(patch)
        result = train.main(train.get_args_parser().parse_args(
            flags + ["--auto-resume", "--run-root", str(runs)]))
    folder = runs / "demo" / "deeplab-resnet18" / "experiment_0"
    assert Path(result["experiment_dir"]) == folder
    return dict(result, flags=flags, runs=runs, folder=folder, used_lrs=used,
                files=folder_state(folder))


def test_each_step_trains_at_its_own_rate_and_tensorboard_says_so(finished_run):
    # The rate of step k is the schedule's at iteration k - 1: 0.01 for the first step.
    expected = poly_lrs(0.01, 4, range(1, 5))
    assert finished_run["used_lrs"] == pytest.approx(expected, rel=1e-12)
    accumulator = EventAccumulator(str(finished_run["folder"]))
    accumulator.Reload()
    logged = [(event.step, event.value) for event in accumulator.Scalars("train/lr")]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert [value for _, value in logged] == pytest.approx(expected, rel=1e-6)


def test_sigterm_in_an_epochs_last_iteration_keeps_its_evaluation(finished_run, tmp_path,
                                                                 monkeypatch):
    # The signal arrives during the last step of the run's only epoch: the checkpoint owes the
    # evaluation, and the resumed run gives it (the uninterrupted run's score, metrics.json and
    # model_best), instead of finishing with "best mIoU 0.00".
    real_train_step, steps = train.train_step, []

    def signalled_in_step_4(*args, **kwargs):
        steps.append(len(steps) + 1)
        loss = real_train_step(*args, **kwargs)
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(train, "train_step", signalled_in_step_4)
    run_dir = tmp_path / "last-step"
    flags = finished_run["flags"] + ["--run-dir", str(run_dir)]
    assert train.cli(flags) == 128 + signal.SIGTERM
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert (checkpoint["iteration"], checkpoint["epoch"]) == (4, 0)
    assert checkpoint["eval_pending"] is True
    assert not (run_dir / "metrics.json").exists()

    monkeypatch.setattr(train, "train_step", real_train_step)
    resumed = train.main(train.get_args_parser().parse_args(
        flags + ["--resume", str(run_dir / "checkpoint.pth.tar")]))
    assert resumed["iteration"] == 4
    assert resumed["best_pred"] == finished_run["best_pred"] > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["epoch"], metrics["iteration"]) == (0, 4)
    assert metrics["mean_iou"] == finished_run["best_pred"]
    best = torch.load(run_dir / "model_best.pth.tar", weights_only=True)
    assert best["best_pred"] == finished_run["best_pred"]


def test_auto_resume_continues_only_the_run_it_found(finished_run, capsys):
    flags = finished_run["flags"] + ["--auto-resume", "--run-root", str(finished_run["runs"])]
    # Other flags: another experiment, refused in one line that names them.
    assert train.cli(flags + ["--lr", "0.02", "--loss-type", "focal"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--lr 0.01 -> 0.02" in err and '--loss-type "ce" -> "focal"' in err
    assert str(finished_run["folder"]) in err
    # The same flags: the run is finished, it says so and writes nothing.
    assert train.cli(flags) == 0
    out = capsys.readouterr().out
    assert "finished at iteration 4 of 4" in out
    assert f"best mIoU {100 * finished_run['best_pred']:.2f}" in out
    assert folder_state(finished_run["folder"]) == finished_run["files"]
    assert sorted(p.name for p in finished_run["folder"].parent.iterdir()) == ["experiment_0"]


def test_a_run_folder_is_not_reused_or_shared(finished_run, tmp_path, capsys):
    folder = finished_run["folder"]
    checkpoint = folder / "checkpoint.pth.tar"
    # A new run into a folder that holds one: refused, nothing replaced.
    assert train.cli(finished_run["flags"] + ["--run-dir", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--resume {checkpoint}" in err, err
    # Continuing from model_best there would replace the newer checkpoint.pth.tar beside it.
    assert train.cli(finished_run["flags"] + ["--epochs", "2", "--resume",
                                              str(folder / "model_best.pth.tar")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--run-dir NEW_FOLDER" in err, err
    # A live run holds the folder (here: its lock, as a running train.py holds it).
    lock = FolderLock(folder)
    try:
        stale = folder / ".checkpoint.pth.tar.0123456789ab.tmp"  # the live run's write
        stale.write_bytes(b"x")
        assert train.cli(finished_run["flags"] + ["--epochs", "2",
                                                  "--resume", str(checkpoint)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "in use by another process" in err, err
        assert stale.exists()
        stale.unlink()
    finally:
        lock.release()
    assert folder_state(folder) == finished_run["files"]


def test_resume_with_other_lr_momentum_and_weight_decay_runs_them(finished_run, tmp_path,
                                                                 monkeypatch, caplog, capsys):
    # One more epoch from the finished run's model_best, in a folder of its own, with other SGD
    # flags (and --sync-bn, which a single process cannot use): what settings.json, the start-up
    # line and TensorBoard say is what trains.
    run_dir = tmp_path / "branch"
    used = record_used_lrs(monkeypatch)
    with caplog.at_level("WARNING"):
        result = train.main(train.get_args_parser().parse_args(
            finished_run["flags"] + [
                "--epochs", "2", "--lr", "0.005", "--momentum", "0.8", "--weight-decay", "0.001",
                "--nesterov", "--sync-bn", "--run-dir", str(run_dir),
                "--resume", str(finished_run["folder"] / "model_best.pth.tar")]))
    assert result["iteration"] == 8
    expected = poly_lrs(0.005, 8, range(5, 9))
    assert used == pytest.approx(expected, rel=1e-12)
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    logged = [(event.step, event.value) for event in accumulator.Scalars("train/lr")]
    assert [step for step, _ in logged] == [5, 6, 7, 8]
    assert [value for _, value in logged] == pytest.approx(expected, rel=1e-6)
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    for group in checkpoint["optimizer"]["param_groups"]:
        assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.8, 1e-3, True)
    assert checkpoint["scheduler"]["base_lrs"] == pytest.approx([0.005, 0.05])
    settings = json.loads((run_dir / "settings.json").read_text())
    assert (settings["lr"], settings["momentum"], settings["weight_decay"]) == (0.005, 0.8, 1e-3)
    assert settings["nesterov"] is True and settings["sync_bn"] is False
    assert "lr 0.005 (head 0.05)" in capsys.readouterr().out
    assert "base_lrs [0.01, 0.1] -> [0.005, 0.05]" in caplog.text
    assert "momentum 0.9 -> 0.8" in caplog.text and "--sync-bn has no effect" in caplog.text
    assert folder_state(finished_run["folder"]) == finished_run["files"]


#: train.py's command line that stops itself (SIGSTOP) at a chosen moment, so that the test's
#: SIGKILL lands exactly there: "evaluation": at the second image of its first evaluation;
#: "epoch-start": entering its second epoch, right after the checkpoint of the first one's end.
SELF_STOPPING_TRAIN = """
import os, signal, sys
import train
moment, calls = sys.argv[1], []
def stopping_at_call_2(real):
    def wrapper(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(*args, **kwargs)
    return wrapper
if moment == "evaluation":
    train.predict_labels = stopping_at_call_2(train.predict_labels)
else:
    train.train_one_epoch = stopping_at_call_2(train.train_one_epoch)
sys.exit(train.cli(sys.argv[2:]))
"""


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def is_stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] == "T"


def wait_until_stopped(run: Run, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not is_stopped(run.process.pid):
        if run.process.poll() is not None:
            run.wait()
            pytest.fail(f"run ended before stopping itself:\n{run.text()[-3000:]}")
        if time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"the run did not stop itself:\n{run.text()[-3000:]}")
        time.sleep(0.02)


def test_killed_run_resumes_exactly(small_demo, tmp_path):
    # 3 epochs of 4 iterations: interval checkpoints at 2, 6 and 10, epoch-end checkpoints at
    # 4, 8 and 12, evaluations after epoch 1 (iteration 8) and epoch 2 (12, the last).
    common = TINY + ["--data-root", str(small_demo), "--epochs", "3", "--workers", "1",
                     "--save-interval", "2", "--eval-interval", "2"]
    # The reference: an uninterrupted run, on one thread as the killed runs (bench.kill_test.Run:
    # OMP_NUM_THREADS=1); CPU kernels sum in another order on another number of threads.
    with one_thread():
        reference = train.main(train.get_args_parser().parse_args(
            common + ["--run-dir", str(tmp_path / "reference")]))
    reference_ckpt = torch.load(tmp_path / "reference" / "checkpoint.pth.tar",
                                weights_only=True)

    # The same run, killed with SIGKILL right after its first checkpoint...
    run_dir = tmp_path / "killed"
    flags = common + ["--auto-resume", "--run-dir", str(run_dir)]
    checkpoint_path = run_dir / "checkpoint.pth.tar"
    run = Run([sys.executable, str(REPO / "train.py"), *flags])
    deadline = time.monotonic() + 300
    while not checkpoint_path.exists() and run.process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.process.pid, signal.SIGSTOP)
    killed_at = [torch.load(checkpoint_path, weights_only=True)["iteration"]]
    run.kill()
    assert 0 < killed_at[0] < 6
    # ...then, each time continued by the same command, killed in an evaluation (the checkpoint
    # is the interval one before it), right after an epoch's end (its checkpoint, evaluated) and
    # in the final evaluation.
    for moment, saved_at in (("evaluation", 6), ("epoch-start", 8), ("evaluation", 10)):
        run = Run([sys.executable, "-c", SELF_STOPPING_TRAIN, moment, *flags])
        wait_until_stopped(run)
        checkpoint = torch.load(checkpoint_path, weights_only=True)
        killed_at.append(checkpoint["iteration"])
        run.kill()
        assert (moment, checkpoint["iteration"]) == (moment, saved_at), run.text()[-2000:]
        assert checkpoint["eval_pending"] is False
        assert checkpoint["best_pred"] == (0.0 if saved_at < 8 else pytest.approx(
            reference_miou(tmp_path / "reference", iteration=8), rel=1e-6))

    # ...and continued to its end.
    with one_thread():
        resumed = train.main(train.get_args_parser().parse_args(flags))
    resumed_ckpt = torch.load(checkpoint_path, weights_only=True)

    assert resumed["iteration"] == reference["iteration"] == 12
    assert resumed["lr"] == reference["lr"]
    assert resumed_ckpt["scheduler"]["last_epoch"] == reference_ckpt["scheduler"]["last_epoch"]
    # Same data order, augmentation and dropout: the weights end bit-identical on the CPU.
    for name, tensor in reference_ckpt["model"].items():
        assert torch.equal(tensor, resumed_ckpt["model"][name]), name
    assert resumed["best_pred"] == reference["best_pred"]
    best = torch.load(run_dir / "model_best.pth.tar", weights_only=True)
    reference_best = torch.load(tmp_path / "reference" / "model_best.pth.tar", weights_only=True)
    assert best["iteration"] == reference_best["iteration"]
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(
        (tmp_path / "reference" / "metrics.json").read_text())

    # TensorBoard sees each step once, in order, across the killed and the resumed runs.
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    reference_acc = EventAccumulator(str(tmp_path / "reference"))
    reference_acc.Reload()
    steps = [event.step for event in accumulator.Scalars("train/loss")]
    assert steps == list(range(1, 13))
    for tag in ("train/loss", "val/mIoU"):
        assert [(e.step, e.value) for e in accumulator.Scalars(tag)] == [
            (e.step, e.value) for e in reference_acc.Scalars(tag)], tag
    assert [e.step for e in accumulator.Scalars("val/mIoU")] == [8, 12]


def reference_miou(run_dir: Path, iteration: int) -> float:
    """A run's mIoU of the evaluation at ``iteration`` (from TensorBoard: float32)."""
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return next(e.value for e in accumulator.Scalars("val/mIoU") if e.step == iteration)


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

    # The resumed run owes that evaluation and gives it before anything else (here with the
    # default, faster evaluation flags: an explicit --resume applies changed flags).
    result = train.main(train.get_args_parser().parse_args(
        common + ["--resume", str(run_dir / "checkpoint.pth.tar")]))
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
    # The run's best score so far, set out of reach here: a resumed run that does not beat it
    # keeps it (and the model_best it belongs to) whatever it scores.
    checkpoint = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
    torch.save(dict(checkpoint, best_pred=0.99), folder / "checkpoint.pth.tar")
    best_file = (folder / "model_best.pth.tar").read_bytes()
    # Requeued with the same command (here asking for one more epoch): same folder, resumed.
    second = train.main(parse(common + ["--epochs", "2"]))
    assert Path(second["experiment_dir"]) == folder and second["iteration"] == 8
    assert second["best_pred"] == 0.99 and second["metrics"]["mean_iou"] < 0.99
    assert (folder / "model_best.pth.tar").read_bytes() == best_file
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


def worker_pid(launcher: int, rank: int, timeout: float = 120) -> int:
    """The process of ``rank`` among the descendants of ``launcher`` (read from its RANK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = [launcher]
        while queue:
            pid = queue.pop(0)
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                            for child in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            if pid != launcher and f"RANK={rank}".encode() in environ:
                return pid
            queue += children
        time.sleep(0.1)
    pytest.fail(f"no rank {rank} process under {launcher}")


def test_sigterm_to_one_rank_under_torchrun_stops_every_rank(long_demo, tmp_path):
    # Only rank 1 is signalled: the ranks agree to stop (at the next step, --print-freq 1) and
    # rank 0, never signalled, saves. No interval saves: only that can leave a checkpoint.
    run_dir = tmp_path / "ddp-term"
    run = Run(torchrun(["--data-root", str(long_demo), "--epochs", "1", "--print-freq", "1",
                        "--run-dir", str(run_dir)]))
    wait_for_output(run, r"epoch 0:\s+\d+%\|[^|]*\|\s*[2-9]/16")
    os.kill(worker_pid(run.process.pid, rank=1), signal.SIGTERM)
    run.wait(timeout=300)
    text = run.text()
    assert text.count("interrupted by SIGTERM") == 2, text[-3000:]  # each rank's last line
    assert not re.search(r"\[rank\d\]:\s*Traceback", text), text[-3000:]  # torchrun's own: ok
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert 2 <= checkpoint["iteration"] < 16


def test_sigterm_to_rank_0_under_torchrun_saves_at_the_next_step(long_demo, tmp_path):
    # With --print-freq 20 the ranks compare stop flags only at the epoch's end (iteration 16):
    # waiting for that agreement to save could outlast a launcher's grace period. Rank 0, which
    # alone is signalled here, saves at the next step and the ranks stop at the agreement.
    run_dir = tmp_path / "ddp-term-0"
    run = Run(torchrun(["--data-root", str(long_demo), "--epochs", "1", "--print-freq", "20",
                        "--run-dir", str(run_dir)]))
    wait_for_output(run, r"epoch 0:\s+\d+%\|[^|]*\|\s*[2-5]/16")
    reached = int(re.findall(r"epoch 0:\s+\d+%\|[^|]*\|\s*(\d+)/16", run.text())[-1])
    os.kill(worker_pid(run.process.pid, rank=0), signal.SIGTERM)
    run.wait(timeout=300)
    text = run.text()
    assert text.count("interrupted by SIGTERM") == 2, text[-3000:]
    assert not re.search(r"\[rank\d\]:\s*Traceback", text), text[-3000:]  # torchrun's own: ok
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert reached <= checkpoint["iteration"] < 16
    assert checkpoint["eval_pending"] is False


#: train.py under a launcher, with rank 1's loss NaN at its step ``argv[1]``.
NAN_ON_RANK_1 = """
import math, os, sys
import train
poisoned_step, real_build_loss = int(sys.argv[1]), train.build_loss
def build_loss(*args, **kwargs):
    criterion, calls = real_build_loss(*args, **kwargs), []
    def loss(logits, target):
        calls.append(None)
        value = criterion(logits, target)
        poisoned = os.environ["RANK"] == "1" and len(calls) == poisoned_step
        return value * math.nan if poisoned else value
    return loss
train.build_loss = build_loss
sys.exit(train.cli(sys.argv[2:]))
"""


def test_nan_loss_on_one_rank_stops_every_rank(small_demo, tmp_path):
    # Two processes started as a launcher that does not tear the others down starts them (srun,
    # mpirun): a rank leaving alone on its NaN would leave the other in its next collective.
    # 16 images, 2 ranks of 2: 4 steps. The NaN is in rank 1's last loss, where rank 0's own
    # losses are all still finite.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_dir = tmp_path / "nan"
    flags = [*TINY, "--workers", "0", "--batch-size", "2", "--data-root", str(small_demo),
             "--epochs", "1", "--run-dir", str(run_dir), "--dist-timeout", "3"]
    processes = [subprocess.Popen(
        [sys.executable, "-c", NAN_ON_RANK_1, "4", *flags], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
        for rank in (0, 1)]
    errors = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [3, 3], errors
    assert "loss is nan at iteration 4" in errors[1]
    assert "loss is not finite on another rank, by iteration 4" in errors[0]
    assert not any("Traceback" in err for err in errors), errors
    assert not (run_dir / "checkpoint.pth.tar").exists()


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
