"""Files the project writes get the permissions the user's umask asks for, like any other file."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from utils.checkpoint import save_checkpoint
from utils.fileio import atomic_write, atomic_write_text, remove_stale_temporaries
from utils.run_folder import RunFolder


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the previous one back afterwards."""
    previous = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_written_files_follow_the_umask(umask, tmp_path, mask, expected):
    umask(mask)
    atomic_write(tmp_path / "mask.png", lambda handle: handle.write(b"\x89PNG"))
    atomic_write_text(tmp_path / "metrics.json", "{}")
    save_checkpoint({"model": {"w": torch.zeros(2)}}, tmp_path / "checkpoint.pth.tar")
    run_folder = RunFolder(dataset="demo", checkname="x", experiment_dir=tmp_path / "run")
    run_folder.write_settings({"lr": 0.01})
    # model_best is written, checkpoint.pth.tar is a copy of it
    run_folder.write_checkpoint({"model": {"w": torch.ones(2)}}, is_best=True)
    written = ["mask.png", "metrics.json", "checkpoint.pth.tar", "run/settings.json",
               "run/checkpoint.pth.tar", "run/model_best.pth.tar"]
    assert {name: oct(mode(tmp_path / name)) for name in written} == {
        name: oct(expected) for name in written}


def test_replacing_a_file_takes_the_umask_not_the_old_mode(umask, tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    path.write_bytes(b"old")
    path.chmod(0o600)
    umask(0o022)
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert mode(path) == 0o644
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]  # no temporary file left behind


def test_a_resumed_run_folder_loses_the_temporaries_of_killed_writes(tmp_path):
    # What a SIGKILL during atomic_write leaves: a hidden, randomly named temporary file.
    run = tmp_path / "experiment_0"
    run.mkdir()
    stale = [run / ".checkpoint.pth.tar.0123456789ab.tmp",
             run / ".model_best.pth.tar.a1b2c3d4e5f6.tmp", run / ".metrics.json.00112233aabb.tmp",
             run / ".settings.json.ffeeddccbbaa.tmp",
             run / ".confusion_matrix.png.0123456789ab.tmp",
             run / ".per_class_iou.png.a1b2c3d4e5f6.tmp",
             run / ".worst_images.png.00112233aabb.tmp"]
    kept = [run / "checkpoint.pth.tar", run / ".notes.0123456789ab.tmp", run / "events.out"]
    for path in stale + kept:
        path.write_bytes(b"x" * 10)
    RunFolder(dataset="demo", checkname="c", experiment_dir=run).close()
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert remove_stale_temporaries(run / "checkpoint.pth.tar") == []
