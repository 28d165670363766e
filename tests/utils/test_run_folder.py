"""Atomic checkpoints, safe loading, RNG capture and the run folder layout."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import utils.checkpoint as checkpoint_module
import utils.run_folder as run_folder_module
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.errors import UserError
from utils.random_state import get_rng_state, set_rng_state
from utils.run_folder import RunFolder


def make_state(value: float) -> dict:
    return {
        "epoch": 3,
        "model": {"conv.weight": torch.full((2, 3), value), "bn.num_batches": torch.tensor(7)},
        "settings": {"backbone": "resnet50", "class_names": ["a", "b"], "mean": (0.5, 0.5, 0.5)},
        "best_miou": None,
    }


def assert_state_equal(loaded: dict, expected: dict) -> None:
    assert loaded["epoch"] == expected["epoch"]
    assert loaded["settings"] == expected["settings"]
    assert loaded["best_miou"] is None
    for key, tensor in expected["model"].items():
        assert torch.equal(loaded["model"][key], tensor)


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pth.tar"  # folder created on demand
    save_checkpoint(make_state(1.0), path)
    assert_state_equal(load_checkpoint(path), make_state(1.0))
    assert sorted(os.listdir(path.parent)) == ["checkpoint.pth.tar"]


def test_failed_replace_keeps_old_checkpoint_and_removes_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    save_checkpoint(make_state(1.0), path)

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(make_state(2.0), path)
    monkeypatch.undo()
    assert_state_equal(load_checkpoint(path), make_state(1.0))
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]


def test_crash_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    save_checkpoint(make_state(1.0), path)
    real_save = torch.save

    def save_half_then_crash(state, handle):
        real_save(state, handle)
        handle.seek(handle.tell() // 2)
        handle.truncate()
        raise KeyboardInterrupt  # even a Ctrl-C mid-write must not leave a temp file behind

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(make_state(2.0), path)
    monkeypatch.undo()
    assert_state_equal(load_checkpoint(path), make_state(1.0))
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.mkdir(marker): proof of whether unsafe loading happened."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth.tar"
    marker = tmp_path / "code_was_executed"
    torch.save({"model": {}, "extra": _RunsCodeWhenUnpickled(str(marker))}, path)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert str(path) in message and "unsafe" in message and "refused" in message
    assert "\n" not in message
    assert not marker.exists()


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nope.pth.tar"
    with pytest.raises(CheckpointError, match="not found") as raised:
        load_checkpoint(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_checkpoint_names_the_path(tmp_path, damage):
    path = tmp_path / "checkpoint.pth.tar"
    save_checkpoint(make_state(1.0), path)
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint", "empty": b""}
    path.write_bytes(damaged[damage])
    with pytest.raises(CheckpointError, match="corrupt") as raised:
        load_checkpoint(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_non_dict_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


def draw_numbers() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        torch.rand(3).tolist(),
    )


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Odd numbers of normal draws leave a cached Gaussian in both Python's and NumPy's states.
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    path = tmp_path / "rng.pth.tar"
    save_checkpoint({"rng": get_rng_state()}, path)
    first = draw_numbers()
    set_rng_state(load_checkpoint(path)["rng"])
    second = draw_numbers()
    assert first == second
    # And the draws after a restore are not simply a replay of a fixed seed.
    assert draw_numbers() != first


def test_experiment_folders_are_numbered(tmp_path):
    first = RunFolder(dataset="coco", checkname="deeplab-resnet", run_root=tmp_path)
    second = RunFolder(dataset="coco", checkname="deeplab-resnet", run_root=tmp_path)
    parent = tmp_path / "coco" / "deeplab-resnet"
    assert first.experiment_dir == parent / "experiment_0"
    assert second.experiment_dir == parent / "experiment_1"
    (parent / "experiment_7").mkdir()
    (parent / "notes").mkdir()
    (parent / "experiment_x").mkdir()
    third = RunFolder(dataset="coco", checkname="deeplab-resnet", run_root=tmp_path)
    assert third.experiment_dir == parent / "experiment_8"


def test_experiment_created_concurrently_is_skipped(tmp_path, monkeypatch):
    parent = tmp_path / "voc" / "net"
    (parent / "experiment_0").mkdir(parents=True)
    # Another run creates experiment_0 between our listing and our mkdir: the listing is stale.
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(()))
    run_folder = RunFolder(dataset="voc", checkname="net", run_root=tmp_path)
    assert run_folder.experiment_dir == parent / "experiment_1"


def test_resume_reuses_the_given_folder(tmp_path):
    folder = tmp_path / "somewhere" / "experiment_3"
    run_folder = RunFolder(dataset="coco", checkname="net", run_root=tmp_path,
                           experiment_dir=folder)
    assert run_folder.experiment_dir == folder and folder.is_dir()
    run_folder.write_checkpoint(make_state(1.0), is_best=False)
    assert run_folder.checkpoint_path == folder / "checkpoint.pth.tar"
    # A second RunFolder on the same folder (resuming twice) is fine too, once the first is done.
    run_folder.close()
    again = RunFolder(dataset="coco", checkname="net", run_root=tmp_path, experiment_dir=folder)
    assert_state_equal(load_checkpoint(again.checkpoint_path), make_state(1.0))


def test_save_writes_best_only_when_best(tmp_path):
    run_folder = RunFolder(dataset="coco", checkname="net", run_root=tmp_path)
    run_folder.write_checkpoint(make_state(1.0), is_best=True)
    run_folder.write_checkpoint(make_state(2.0), is_best=False)
    assert run_folder.best_path == run_folder.experiment_dir / "model_best.pth.tar"
    assert_state_equal(load_checkpoint(run_folder.checkpoint_path), make_state(2.0))
    assert_state_equal(load_checkpoint(run_folder.best_path), make_state(1.0))
    run_folder.write_checkpoint(make_state(3.0), is_best=True)
    assert_state_equal(load_checkpoint(run_folder.best_path), make_state(3.0))
    assert sorted(os.listdir(run_folder.experiment_dir)) == [".lock", "checkpoint.pth.tar",
                                                         "model_best.pth.tar"]


def test_model_best_is_written_before_the_checkpoint_that_carries_its_score(tmp_path,
                                                                            monkeypatch):
    # The disk fills up (or a kill lands) between the two writes of a new best: the resumed run
    # must find the older checkpoint (it evaluates again and rewrites the best), never a
    # checkpoint with the new score beside a model_best that still holds the old one.
    run_folder = RunFolder(dataset="coco", checkname="net", run_root=tmp_path)
    run_folder.write_checkpoint(make_state(1.0), is_best=True)
    real_atomic_write = run_folder_module.atomic_write

    def full_disk_for_the_checkpoint(path, write):
        if Path(path).name == "checkpoint.pth.tar":
            raise OSError(28, "No space left on device")
        real_atomic_write(path, write)

    for module in (run_folder_module, checkpoint_module):  # the copy's write and torch.save's
        monkeypatch.setattr(module, "atomic_write", full_disk_for_the_checkpoint)
    with pytest.raises(UserError, match="no space left on device writing .*checkpoint.pth.tar"):
        run_folder.write_checkpoint(make_state(2.0), is_best=True)
    assert_state_equal(load_checkpoint(run_folder.best_path), make_state(2.0))
    assert_state_equal(load_checkpoint(run_folder.checkpoint_path), make_state(1.0))


def test_one_live_run_per_folder_and_a_killed_one_leaves_it_free(tmp_path):
    folder = tmp_path / "experiment_0"
    stale = folder / ".checkpoint.pth.tar.0123456789ab.tmp"  # the live run is writing it
    first = RunFolder(dataset="coco", checkname="net", experiment_dir=folder)
    stale.write_bytes(b"x")
    with pytest.raises(UserError, match=f"{folder} is in use by another process \\(pid "
                                        f"{os.getpid()} on "):
        RunFolder(dataset="coco", checkname="net", experiment_dir=folder)
    assert stale.exists()  # the refused run deleted nothing of the live one's
    first.close()
    RunFolder(dataset="coco", checkname="net", experiment_dir=folder).close()

    # A holder killed with SIGKILL (no clean-up runs) leaves the lock file but not the lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from utils.fileio import FolderLock; "
         f"FolderLock({str(folder)!r}); print('locked', flush=True); sys.stdin.read()"],
        cwd=Path(__file__).resolve().parents[2], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"pid {holder.pid} "):
        RunFolder(dataset="coco", checkname="net", experiment_dir=folder)
    holder.kill()
    holder.wait()
    RunFolder(dataset="coco", checkname="net", experiment_dir=folder).close()


def test_settings_json_sorted_and_atomic(tmp_path):
    run_folder = RunFolder(dataset="coco", checkname="net", run_root=tmp_path)
    settings = {"lr": 0.01, "backbone": "resnet101", "data_root": tmp_path / "coco", "epochs": 30}
    run_folder.write_settings(settings)
    text = run_folder.settings_path.read_text()
    assert run_folder.settings_path == run_folder.experiment_dir / "settings.json"
    assert json.loads(text) == {**settings, "data_root": str(tmp_path / "coco")}
    keys = [line.split('"')[1] for line in text.splitlines() if line.startswith('  "')]
    assert keys == sorted(settings)
    with pytest.raises(TypeError, match="object"):
        run_folder.write_settings({"bad": object()})
    assert json.loads(run_folder.settings_path.read_text()) == json.loads(text)  # old file intact
    assert sorted(os.listdir(run_folder.experiment_dir)) == [".lock", "settings.json"]

