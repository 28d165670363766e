"""Issue 23 items 2, 3, 6, 7: conflicting run-folder flags, and faults that end in one line."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

import train
from utils.errors import UserError
from utils.run_folder import CHECKPOINT_NAME, RunFolderOptions, locate_run

TINY = ["--dataset", "demo", "--backbone", "resnet18", "--no-pretrained", "--crop-size", "32",
        "--base-size", "32", "--workers", "0", "--no-cuda", "--batch-size", "2", "--epochs", "1"]


def options(argv: list[str]) -> RunFolderOptions:
    args = train.get_args_parser().parse_args(argv)
    return RunFolderOptions.from_flags(vars(args), backbone="resnet18")


# --------------------------------------------------------------------------- item 2


def test_auto_resume_with_an_explicit_resume_needs_a_run_dir(tmp_path):
    earlier = tmp_path / "run" / "pascal" / "deeplab-resnet18" / "experiment_0"
    earlier.mkdir(parents=True)
    (earlier / CHECKPOINT_NAME).write_bytes(b"x")
    with pytest.raises(UserError, match="--auto-resume with --resume .* needs --run-dir"):
        locate_run(options(["--auto-resume", "--resume", "other.pth.tar", "--ft",
                            "--run-root", str(tmp_path / "run")]))


def test_requeued_fine_tune_starts_from_x_then_continues_the_run_dir(tmp_path, caplog):
    run_dir = tmp_path / "R"
    argv = ["--resume", "X.pth.tar", "--ft", "--auto-resume", "--run-dir", str(run_dir)]
    first = locate_run(options(argv))
    assert (first.resume, first.ft, first.run_dir) == ("X.pth.tar", True, str(run_dir))
    run_dir.mkdir()
    (run_dir / CHECKPOINT_NAME).write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        requeued = locate_run(options(argv))
    assert (requeued.resume, requeued.ft) == (str(run_dir / CHECKPOINT_NAME), False)
    assert "X.pth.tar" in caplog.text


# --------------------------------------------------------------------------- item 3


def test_eval_only_with_ft_is_refused_in_one_line(tmp_path, capsys):
    code = train.cli(TINY + ["--eval-only", "--ft", "--resume", str(tmp_path / "c.pth.tar"),
                             "--run-dir", str(tmp_path / "R")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--eval-only --ft" in err
