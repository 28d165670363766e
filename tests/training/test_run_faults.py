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


# --------------------------------------------------------------------------- item 7


def one_line_error(capsys) -> str:
    """The one error line on stderr, with no traceback (progress bars aside)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("flags, named", [
    (["--nesterov", "--momentum", "0"], "--nesterov"),
    (["--lr", "-1"], "--lr"),
])
def test_sgd_flags_torch_refuses_are_one_line(tmp_path, capsys, flags, named):
    assert train.cli(TINY + flags + ["--run-dir", str(tmp_path / "R")]) == 2
    assert named in one_line_error(capsys)


def test_a_dangling_run_dir_link_is_one_line(tmp_path, capsys):
    (tmp_path / "R").symlink_to(tmp_path / "missing")
    assert train.cli(TINY + ["--run-dir", str(tmp_path / "R")]) == 2
    assert "does not exist" in one_line_error(capsys)


def test_a_read_only_run_folder_is_refused_before_anything_is_built(tmp_path, capsys,
                                                                     monkeypatch):
    import utils.run_folder

    read_only = tmp_path / "R"
    read_only.mkdir()
    real_access = utils.run_folder.os.access
    # As root, a chmod 555 folder is writable: a read-only mount is what os.access reports.
    monkeypatch.setattr(utils.run_folder.os, "access",
                        lambda path, mode: Path(path) != read_only and real_access(path, mode))
    monkeypatch.setattr(train, "build_datasets", lambda *a, **k: pytest.fail("built datasets"))
    assert train.cli(TINY + ["--run-dir", str(read_only)]) == 2
    assert "not writable" in one_line_error(capsys)


@pytest.mark.parametrize("environ, named", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": ""}, "MASTER_PORT"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_PORT": ""},
     "MASTER_PORT"),
])
def test_bad_launcher_variables_are_one_line_naming_them(tmp_path, capsys, monkeypatch,
                                                         environ, named):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert train.cli(TINY + ["--run-dir", str(tmp_path / "R")]) == 2
    assert named in one_line_error(capsys)


def test_a_full_disk_during_a_checkpoint_write_is_one_line(tmp_path, capsys, monkeypatch):
    import utils.checkpoint

    def full(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(utils.checkpoint, "atomic_write", full)
    assert train.cli(TINY + ["--run-dir", str(tmp_path / "R")]) == 2
    err = one_line_error(capsys)
    assert "no space left on device writing" in err and ".pth.tar" in err


def test_a_full_disk_under_tensorboard_is_a_warning_and_the_run_ends(tmp_path, capsys,
                                                                     monkeypatch, warnings_of):
    caplog = warnings_of("utils.summaries")
    from torch.utils.tensorboard import SummaryWriter

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    monkeypatch.setattr(SummaryWriter, "flush", full)
    assert train.cli(TINY + ["--run-dir", str(tmp_path / "R")]) == 0
    assert (tmp_path / "R" / "checkpoint.pth.tar").is_file()
    assert caplog.text.count("TensorBoard stopped writing") == 1
