"""Issue 23.6: an explicit --resume with changed flags warns about each and keeps the earlier
settings.json."""
from __future__ import annotations

import json
import logging

import train
from utils.run_folder import RunFolder, RunFolderOptions, warn_changed_settings


def resumed(argv: list[str], checkpoint) -> tuple[RunFolderOptions, dict]:
    flags = vars(train.get_args_parser().parse_args(argv + ["--resume", str(checkpoint)]))
    return RunFolderOptions.from_flags(flags, backbone="resnet18"), dict(flags)


def test_changed_flags_are_each_named_and_the_earlier_settings_kept(tmp_path, caplog):
    folder = RunFolder(dataset="demo", checkname="c", experiment_dir=tmp_path / "R")
    first, first_record = resumed(["--crop-size", "513"], folder.checkpoint_path)
    folder.write_settings(first_record)
    options, record = resumed(["--crop-size", "321", "--seed", "7", "--lr", "0.5", "--workers",
                               "3"], folder.checkpoint_path)
    with caplog.at_level(logging.WARNING):
        changed = warn_changed_settings(options, record)
    assert changed == ["--crop-size 513 -> 321", "--seed 1 -> 7"]  # --lr warns in optim
    assert "--crop-size 513 -> 321" in caplog.text and "data order" in caplog.text
    folder.write_settings(record)
    folder.write_settings(record)  # unchanged: no third segment
    assert json.loads((tmp_path / "R" / "settings.json.1").read_text())["crop_size"] == 513
    assert json.loads((tmp_path / "R" / "settings.json").read_text())["crop_size"] == 321
    assert not (tmp_path / "R" / "settings.json.2").exists()
    folder.close()


def test_unchanged_flags_say_nothing(tmp_path, caplog):
    folder = RunFolder(dataset="demo", checkname="c", experiment_dir=tmp_path / "R")
    options, record = resumed(["--crop-size", "513"], folder.checkpoint_path)
    folder.write_settings(record)
    with caplog.at_level(logging.WARNING):
        assert warn_changed_settings(options, record) == []
    assert "changed settings" not in caplog.text
    folder.close()
