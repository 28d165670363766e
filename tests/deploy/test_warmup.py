"""deploy.warmup: ``--engine auto``'s first run on a checkpoint runs PyTorch at once while a
background process exports the graph, and the next run uses OpenVINO without exporting; large
jobs, named engines and cached graphs are left as they were."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import deploy.predictor
import deploy.warmup
import inference
from deploy.warmup import EXPORT_FIRST_FROM, Startup, startup_engine, warm
from inference_testing import make_checkpoint, read_mask, require_deploy, write_image
from utils.fileio import FolderLock

require_deploy("onnx", "openvino")

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


def test_only_a_small_first_auto_job_on_a_cpu_runs_pytorch(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPLAB_BACKGROUND_EXPORT", "1")
    started = []
    monkeypatch.setattr(deploy.warmup, "export_in_background",
                        lambda *args, **kwargs: started.append(args) or True)
    cache = tmp_path / "cache"
    startup = startup_engine(str(ckpt), engine="auto", device=CPU, cache_dir=cache,
                             job_size=EXPORT_FIRST_FROM - 1)
    assert startup.engine == "torch" and "background" in startup.note
    assert not started  # not before the run's own work is done
    assert startup.export() and started == [(str(ckpt), cache)]
    for changed in (dict(job_size=EXPORT_FIRST_FROM), dict(engine="openvino"),
                    dict(cache_dir=None), dict(device=torch.device("cuda"))):
        options = dict(engine="auto", device=CPU, cache_dir=cache, job_size=1) | changed
        assert startup_engine(str(ckpt), **options) == Startup(options["engine"]), changed


def test_with_the_background_export_off_the_note_says_how_to_cache(ckpt, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("DEEPLAB_BACKGROUND_EXPORT", "0")
    startup = startup_engine(str(ckpt), engine="auto", device=CPU,
                             cache_dir=tmp_path / "cache", job_size=1)
    assert startup.engine == "torch" and startup.export is None
    assert f"{EXPORT_FIRST_FROM} inputs" in startup.note and "--engine openvino" in startup.note


def test_a_running_export_keeps_a_second_one_out_and_a_foreground_one_waits(ckpt, tmp_path):
    cache = tmp_path / "cache"
    folder = cache / "onnx"
    folder.mkdir(parents=True)
    entered = threading.Event()

    def foreground() -> None:
        with deploy.predictor.export_lock(folder):
            entered.set()

    with FolderLock(folder):  # a background export at work
        assert warm(str(ckpt), cache, runtime="openvino", precision="off", threads=1) == 1
        waiting = threading.Thread(target=foreground)
        waiting.start()
        assert not entered.wait(0.5)
    assert entered.wait(10)
    waiting.join()
    assert not list(folder.glob("*.onnx"))  # the refused export wrote nothing


def wait_for_compiled_model(cache: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not list((cache / "openvino").glob("*.uses")):
        assert time.monotonic() < deadline, sorted(cache.rglob("*"))
        time.sleep(0.5)
    with FolderLock(cache / "onnx", wait=True):  # the export's process is done
        pass


@pytest.mark.slow
def test_the_first_run_exports_in_the_background_and_the_second_uses_it(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("DEEPLAB_BACKGROUND_EXPORT", "1")
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEEPLAB_CACHE_DIR", str(cache))
    ckpt = make_checkpoint(tmp_path / "r18.pth.tar", num_classes=5)
    write_image(tmp_path / "in" / "a.png", 64, 48, seed=3)
    common = ["--in-path", str(tmp_path / "in"), "--ckpt", str(ckpt), "--workers", "0"]
    assert inference.cli(common + ["--out-path", str(tmp_path / "first")]) == 0
    first = capsys.readouterr().err
    assert "inference (torch)" in first and "exported in the background" in first, first
    # Started as the run ended (deploy.warmup.Startup.export): it took no CPU from the run.
    wait_for_compiled_model(cache)
    assert len(list((cache / "onnx").glob("*.onnx"))) == 1

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(deploy.predictor, "export_in_child", no_export)
    assert inference.cli(common + ["--out-path", str(tmp_path / "second")]) == 0
    second = capsys.readouterr().err
    assert "inference (openvino)" in second and "background" not in second, second
    agree = np.mean(read_mask(tmp_path / "first" / "a.png")
                    == read_mask(tmp_path / "second" / "a.png"))
    assert agree >= 0.999


def test_the_background_export_yields_to_every_other_process():
    # In a session of its own (start_new_session), a nice value alone ranks it only within that
    # session where the kernel groups by session (autogroup): it got 40 % of 2 cores beside a run.
    code = ("import os; from deploy.warmup import lowest_priority; lowest_priority(); "
            "print(os.nice(0)); group = '/proc/self/autogroup'; "
            "print(open(group).read().split()[-1] if os.path.exists(group) else 19)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, start_new_session=True, env=dict(os.environ,
                                                                         PYTHONPATH=str(REPO)))
    assert result.stdout.split() == ["19", "19"], result.stderr
