"""``python -m bench.gpu_check --device cpu --quick`` runs every row of the GPU check on the CPU,
so the check cannot rot before the next GPU arrives."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import Row, compare_with_fp32, row_names

REPO = Path(__file__).resolve().parents[2]
GPU_MODELS = ("resnet50", "resnet101")
#: Rows that run on a CPU and must pass there; the others say why they are skipped or n/a.
RUN_ON_CPU = {"matmul bf16", "model FLOPs", "train resnet50 fp32", "train resnet50 bf16",
              "train resnet50 fp16", "train resnet50 bf16 channels_last", "SIGTERM + resume",
              "torchrun NCCL SyncBN", "DataParallel replica dtype", "inference eager"}


@pytest.mark.slow
def test_quick_check_on_the_cpu_prints_every_row_and_passes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", DEEPLAB_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu",
                             "--quick", "--workdir", str(tmp_path / "work")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    table = result.stdout[result.stdout.index("bench.gpu_check on CPU"):].splitlines()[1:]
    names = row_names(GPU_MODELS)
    assert len(table) == len(names) == 16
    for line, name in zip(table, names):  # every row of the GPU table, in its order
        assert line.startswith(name + " "), (line, name)
        status = line[len(name):].split()[0]
        if name in RUN_ON_CPU:
            assert status == "ok", line
        else:
            assert status in ("skipped:", "n/a"), line
    assert any("n/a on cpu:" in line for line in table)
    fp16 = next(line for line in table if line.startswith("train resnet50 fp16 "))
    assert "over 2 its" in fp16


@pytest.mark.parametrize("fp16_loss, status", [(1.05, "ok"), (0.95, "ok"), (1.2, "FAIL"),
                                               (0.8, "FAIL")])
def test_a_reduced_precision_loss_is_held_to_fp32s(fp16_loss, status):
    # A 10% tolerance: 5% either side passes, 20% either side fails.
    fp32 = Row("train resnet50 fp32", values={"last_loss": 1.0})
    row = Row("train resnet50 fp16", values={"last_loss": fp16_loss, "judged": True})
    compare_with_fp32(row, fp32, tolerance=0.1)
    assert row.status == status


def test_a_short_run_shows_the_gap_without_judging_it():
    fp32 = Row("train resnet50 fp32", values={"last_loss": 1.0})
    row = Row("train resnet50 fp16", values={"last_loss": 2.0, "judged": False})
    compare_with_fp32(row, fp32, tolerance=0.1)
    assert row.status == "ok" and "100.0% from fp32's (not judged" in row.detail
