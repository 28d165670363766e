#!/usr/bin/env python
"""Check a GPU machine end to end in one command: train.py itself in every precision, torchrun
with NCCL and SyncBatchNorm, DataParallel's replica dtype, inference engines, SIGTERM + resume.

    python -m bench.gpu_check                        # one GPU, at most about 8 minutes
    python -m bench.gpu_check --device cpu --quick   # the same code paths on a CPU, in a minute

Training runs ``train.py`` as a subprocess on a generated demo set (ResNet-50 and ResNet-101 at
crop 513; ``--quick``: ResNet-18 at crop 32, which stands in for ResNet-50, and few iterations),
and reads its images per second and losses from the TensorBoard events it writes. Each row
prints ``ok``, ``FAIL``, ``skipped: <reason>`` or ``n/a on cpu: <reason>``; the exit status is
1 when any row failed. Rows (the same on every device):

- ``matmul bf16``: the dense matrix-product rate measured here (the ceiling below);
- ``model FLOPs``: training FLOPs per image (forward + backward, ``FlopCounterMode``);
- ``train <model> <precision>``: images/s, peak memory (GPU memory; peak RSS on a CPU), the
  first and last losses (finite, and decreasing when there are enough iterations to judge), the
  share of the matmul rate the run reaches, and for bf16/fp16 the final loss against fp32's;
  ``... channels_last`` and ``... compile`` add those flags to bf16;
- ``SIGTERM + resume``: the fp32 run, stopped by SIGTERM mid-epoch (exit 143, a checkpoint of
  that iteration) and continued with ``--auto-resume`` to its end;
- ``torchrun NCCL SyncBN``: one process under torchrun (gloo, no SyncBN, on a CPU);
- ``DataParallel replica dtype``: the dtype an ``AutocastReplica`` computes in, in
  DataParallel's worker threads (``parallel_apply``; a thread on a CPU);
- ``inference eager|compiled|onnxruntime CUDA``: images/s of the trained fp32 checkpoint on
  real photos (``$DEEPLAB_COCO_ROOT/val2017``, else the demo set's) in the precision
  ``--amp auto`` picks, and the share of pixels agreeing with fp32 PyTorch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.kill_test import Run
from dataloader.datasets.demo import generate_demo_dataset

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16", "fp16")
AMP_FLAG = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}
#: Fewer logged losses than this and "decreasing" is not judged.
MIN_LOSSES_TO_JUDGE = 10
#: Fewer iterations than this and a bf16/fp16 final loss is not held to fp32's: short runs at
#: these learning rates part ways by chance (``--quick``'s 12 steps did by 40%).
MIN_ITERS_TO_COMPARE = 100
#: Fewest pixels (share) of an engine's masks that must agree with fp32 PyTorch's.
MIN_AGREEMENT = 0.98
#: Runs train.py itself (its ``__main__``), then prints the process's peak memory.
TRAIN_RUNNER = """
import resource, runpy, sys, torch
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(f"gpu_check peak_memory_bytes {peak}", flush=True)
"""


@dataclass(frozen=True)
class Setup:
    """What one mode of the check runs."""

    device: str
    models: tuple[str, str]  # the row names' models
    stand_in: str | None  # --quick: trains this one for models[0], skips models[1]
    crop: int
    batch: int
    iters: int  # fp32/bf16 runs
    fp16_iters: int
    iters_per_epoch: int
    photos: int
    matmul_side: int
    print_freq: int
    loss_tolerance: float  # largest relative gap of a bf16/fp16 final loss from fp32's

    def trained(self, model: str) -> str:
        return self.stand_in or model


def setup_for(device: str, quick: bool) -> Setup:
    if quick:
        return Setup(device=device, models=("resnet50", "resnet101"), stand_in="resnet18",
                     crop=32, batch=2, iters=12, fp16_iters=2, iters_per_epoch=6, photos=2,
                     matmul_side=512, print_freq=1, loss_tolerance=0.3)  # 12 steps: noisy
    return Setup(device=device, models=("resnet50", "resnet101"), stand_in=None, crop=513,
                 batch=8, iters=200, fp16_iters=200, iters_per_epoch=50, photos=80,
                 matmul_side=8192, print_freq=10, loss_tolerance=0.1)


@dataclass
class Row:
    name: str
    status: str = "ok"  # ok, FAIL, skipped: ..., n/a on cpu: ...
    detail: str = ""
    values: dict = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.status = "FAIL"
        self.detail = f"{self.detail}; {why}" if self.detail else why


def row_names(models: tuple[str, str]) -> list[str]:
    """Every row of the table, in order (the same on a GPU and with ``--device cpu --quick``)."""
    first = models[0]
    return (["matmul bf16", "model FLOPs"]
            + [f"train {model} {p}" for model in models for p in PRECISIONS]
            + [f"train {first} bf16 channels_last", f"train {first} bf16 compile",
               "SIGTERM + resume", "torchrun NCCL SyncBN", "DataParallel replica dtype",
               "inference eager", "inference compiled", "inference onnxruntime CUDA"])


# --------------------------------------------------------------------------- measurements


def matmul_rate(device: str, side: int) -> float:
    """FLOP/s of a dense bf16 ``side x side`` matrix product on ``device`` (best of 3)."""
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    best = math.inf
    for _ in range(4):  # the first is a warm-up
        synchronize(device)
        tic = time.perf_counter()
        for _ in range(5):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - tic) / 5)
    return 2 * side ** 3 / best


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def training_flops(backbone: str, crop: int, device: str) -> float:
    """FLOPs of one image's forward and backward pass at ``crop`` x ``crop``."""
    from modeling.deeplab import DeepLab  # the model only: training itself runs in train.py

    model = DeepLab(backbone=backbone, num_classes=21, pretrained_backbone=False).to(device)
    images = torch.randn(2, 3, crop, crop, device=device)  # 2: BatchNorm in training mode
    with FlopCounterMode(display=False) as counter:
        model(images)["out"].float().mean().backward()
    return counter.get_total_flops() / 2


def tensorboard_series(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)]
            for tag in ("train/loss", "train/images_per_second") if tag in events.Tags()["scalars"]}


# --------------------------------------------------------------------------- training rows


def train_flags(setup: Setup, backbone: str, data_root: Path, run_dir: Path, *,
                iters: int) -> list[str]:
    """train.py's flags for about ``iters`` iterations (whole epochs of the demo set)."""
    return ["--dataset", "demo", "--data-root", str(data_root), "--backbone", backbone,
            "--no-pretrained", "--crop-size", str(setup.crop), "--base-size", str(setup.crop),
            "--eval-size", str(setup.crop), "--batch-size", str(setup.batch),
            "--epochs", str(epochs(setup, iters)), "--eval-interval", "1000", "--eval-worst", "0",
            "--workers", "1" if setup.device == "cpu" else "8", "--print-freq",
            str(setup.print_freq), "--run-dir", str(run_dir), "--lr", "0.02",
            *(["--no-cuda"] if setup.device == "cpu" else [])]


def epochs(setup: Setup, iters: int) -> int:
    return max(iters // setup.iters_per_epoch, 1)


def data_for(data_root: Path, iters: int, setup: Setup) -> Path:
    """The demo set a run of ``iters`` iterations trains on: the main one, or for runs shorter
    than its epoch (``--quick``'s fp16), one of ``iters`` steps (no epoch is cut short)."""
    return data_root if iters >= setup.iters_per_epoch else data_root.with_name(
        f"demo_{iters}")


def run_train(flags: list[str], env: dict | None = None) -> tuple[int, str]:
    """train.py run to its end by :data:`TRAIN_RUNNER`: exit status and output."""
    result = subprocess.run([sys.executable, "-c", TRAIN_RUNNER, str(REPO / "train.py"), *flags],
                            cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, **(env or {})))
    return result.returncode, result.stdout + result.stderr


def judge_training(row: Row, run_dir: Path, output: str, *, ceiling: float | None) -> None:
    """Fill ``row`` from a finished run's TensorBoard events and output; ``ceiling`` is the
    seconds per image at the matmul rate (FLOPs / rate), None when not counted."""
    series = tensorboard_series(run_dir)
    losses, speeds = series.get("train/loss", []), series.get("train/images_per_second", [])
    if not losses:
        return row.fail("no train/loss events")
    peak = next((int(line.split()[-1]) for line in output.splitlines()
                 if line.startswith("gpu_check peak_memory_bytes")), 0)
    speed = statistics.median(speeds[len(speeds) // 2:]) if speeds else 0.0  # past warm-up
    quarter = max(len(losses) // 4, 1)
    first, last = statistics.mean(losses[:quarter]), statistics.mean(losses[-quarter:])
    row.values.update(images_per_second=speed, last_loss=last)
    share = f", {100 * speed * ceiling:.1f}% of matmul rate" if ceiling else ""
    memory = "GPU memory" if torch.cuda.is_available() else "RSS"
    row.detail = (f"{speed:.1f} img/s, peak {memory} {peak / 2**30:.2f} GiB, loss {first:.3f} -> "
                  f"{last:.3f} over {len(losses)} its{share}")
    if not all(math.isfinite(v) for v in losses):
        row.fail("a loss is not finite")
    elif len(losses) >= MIN_LOSSES_TO_JUDGE and not last < first:
        row.fail("loss did not decrease")


def compare_with_fp32(row: Row, fp32: Row | None, tolerance: float) -> None:
    if fp32 is None or "last_loss" not in fp32.values or "last_loss" not in row.values:
        return
    gap = abs(row.values["last_loss"] - fp32.values["last_loss"]) / fp32.values["last_loss"]
    row.detail += f", final loss {100 * gap:.1f}% from fp32's"
    if not row.values.get("judged"):
        row.detail += f" (not judged under {MIN_ITERS_TO_COMPARE} its)"
    elif gap > tolerance:
        row.fail(f"final loss more than {100 * tolerance:.0f}% from fp32's")


def training_row(setup: Setup, name: str, backbone: str, extra: list[str], *, iters: int,
                 workdir: Path, data_root: Path, ceiling: float | None) -> Row:
    row = Row(name)
    run_dir = workdir / name.replace(" ", "_")
    data = data_for(data_root, iters, setup)
    status, output = run_train(train_flags(setup, backbone, data, run_dir, iters=iters) + extra)
    if status != 0:
        row.fail(f"train.py exited {status}: {output.strip().splitlines()[-1:]}")
        return row
    judge_training(row, run_dir, output, ceiling=ceiling)
    row.values["judged"] = iters >= MIN_ITERS_TO_COMPARE
    return row


def sigterm_row(setup: Setup, backbone: str, *, workdir: Path, data_root: Path
                ) -> tuple[Row, Path, str]:
    """The fp32 run of ``backbone``, stopped by SIGTERM after a few steps and resumed; returns
    the row, the run folder and the resumed run's output."""
    row, run_dir = Row("SIGTERM + resume"), workdir / "sigterm"
    flags = train_flags(setup, backbone, data_root, run_dir, iters=setup.iters) + [
        "--amp", "off", "--no-channels-last", "--auto-resume"]
    run = Run([sys.executable, "-c", TRAIN_RUNNER, str(REPO / "train.py"), *flags])
    deadline = time.monotonic() + 600
    while (run.reached(setup.iters_per_epoch) < 2 and run.process.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.02)
    os.killpg(run.process.pid, signal.SIGTERM)
    status = run.wait(timeout=120)
    checkpoint = run_dir / "checkpoint.pth.tar"
    saved = torch.load(checkpoint, weights_only=True)["iteration"] if checkpoint.exists() else 0
    total = epochs(setup, setup.iters) * setup.iters_per_epoch
    if status != 128 + signal.SIGTERM or not 0 < saved < total:
        row.fail(f"SIGTERM: exit {status}, checkpoint at iteration {saved} of {total}")
        return row, run_dir, ""
    status, output = run_train(flags)
    final = torch.load(checkpoint, weights_only=True)["iteration"] if checkpoint.exists() else 0
    row.detail = f"stopped at iteration {saved} (exit 143), resumed to {final} of {total}"
    if status != 0 or final != total:
        row.fail(f"resume exited {status}: {output.strip().splitlines()[-1:]}")
    return row, run_dir, output


def torchrun_row(setup: Setup, backbone: str, *, workdir: Path, data_root: Path) -> Row:
    """One train.py process under torchrun: NCCL and SyncBatchNorm on a GPU, gloo on a CPU."""
    row, run_dir = Row("torchrun NCCL SyncBN"), workdir / "torchrun"
    on_gpu = setup.device == "cuda"
    flags = train_flags(setup, backbone, data_root, run_dir, iters=setup.iters_per_epoch) + [
        "--amp", "bf16" if on_gpu else "off", *(["--sync-bn"] if on_gpu else [])]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "1", str(REPO / "train.py"), *flags], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        row.fail(f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
        return row
    settings = json.loads((run_dir / "settings.json").read_text())
    row.detail = (f"world size {settings['world_size']}, backend "
                  f"{'nccl' if on_gpu else 'gloo'}, SyncBN {settings['sync_bn']}"
                  + ("" if on_gpu else " (n/a on cpu: PyTorch's SyncBatchNorm is CUDA-only)"))
    if settings["world_size"] != 1 or settings["sync_bn"] != on_gpu:
        row.fail("settings.json disagrees")
    return row


def dataparallel_row(device: str) -> Row:
    """The dtype an :class:`AutocastReplica` computes in where DataParallel runs replicas: in
    ``parallel_apply``'s threads, which re-enter autocast with ``enabled`` only."""
    from utils.hardware import AutocastReplica

    row = Row("DataParallel replica dtype")
    # A dtype other than the device's autocast default (CUDA: fp16; CPU: bf16), so that a
    # replica falling back to the default shows.
    wanted = torch.bfloat16 if device == "cuda" else torch.float16
    conv = torch.nn.Conv2d(3, 4, 3).to(device)
    replica = AutocastReplica(conv, device_type=device, dtype=wanted)
    image = torch.randn(2, 3, 16, 16, device=device)
    if device == "cuda":
        from torch.nn.parallel import parallel_apply

        with torch.autocast("cuda", dtype=wanted):
            outputs = parallel_apply([replica, replica], [(image,), (image,)], devices=[0, 0])
        how = "parallel_apply, 2 replicas on cuda:0"
    else:
        outputs = []

        def in_thread() -> None:
            with torch.autocast("cpu"):
                outputs.append(replica(image))

        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        how = "a worker thread (parallel_apply n/a on cpu: it needs CUDA devices)"
    dtypes = sorted({str(output.dtype) for output in outputs})
    row.detail = f"{dtypes} wanted {wanted}, via {how}"
    if dtypes != [str(wanted)]:
        row.fail("a replica computed in another dtype")
    return row


# --------------------------------------------------------------------------- inference rows


def photos(data_root: Path, count: int) -> list[torch.Tensor]:
    """``count`` real photos: COCO val2017 under $DEEPLAB_COCO_ROOT, else the demo set's."""
    from dataloader.custom_transforms import pil_to_uint8_tensor
    from dataloader.images import list_inputs
    from dataloader.utils import load_image

    coco = os.environ.get("DEEPLAB_COCO_ROOT")
    folder = Path(coco) / "val2017" if coco and (Path(coco) / "val2017").is_dir() else None
    paths = [item.path for item in list_inputs(folder or data_root / "train2017")][:count]
    return [pil_to_uint8_tensor(load_image(path)) for path in paths]


def timed_predictions(predict, images: list[torch.Tensor], device: str
                      ) -> tuple[float, list[torch.Tensor]]:
    """Images per second (after a warm-up on the first image) and the masks."""
    predict(images[0])
    synchronize(device)
    tic = time.perf_counter()
    labels = [predict(image).cpu() for image in images]
    synchronize(device)
    return len(images) / (time.perf_counter() - tic), labels


def inference_rows(setup: Setup, checkpoint: Path, images: list[torch.Tensor]) -> list[Row]:
    from deploy.engines import onnxruntime_has_cuda
    from deploy.predictor import Predictor

    on_gpu = setup.device == "cuda"
    amp = "auto" if on_gpu else "bf16"  # auto is fp32 on a CPU: bf16 runs autocast there
    baseline, _ = Predictor.load(str(checkpoint), engine="torch", device=setup.device, amp="off")
    _, reference = timed_predictions(baseline.predict, images, setup.device)
    rows = {name: Row(f"inference {name}") for name in ("eager", "compiled", "onnxruntime CUDA")}
    engines = {"eager": ("torch", amp)}
    if on_gpu:
        engines["compiled"] = ("torch", amp)
    else:
        rows["compiled"].status = ("skipped: torch.compile of the model takes minutes on a "
                                   "CPU, past --quick's minute")
    if on_gpu and onnxruntime_has_cuda():
        engines["onnxruntime CUDA"] = ("onnxruntime", "off")
    else:
        rows["onnxruntime CUDA"].status = (
            "skipped: onnxruntime's CUDA build is not installed" if on_gpu
            else "n/a on cpu: the CUDA execution provider needs a GPU")
    for name, (engine, precision) in engines.items():
        predictor, _ = Predictor.load(str(checkpoint), engine=engine, device=setup.device,
                                      amp=precision)
        if name == "compiled":
            predictor.engine.model = torch.compile(predictor.engine.model)
        speed, labels = timed_predictions(predictor.predict, images, setup.device)
        agreement = sum(int((a == b).sum()) for a, b in zip(labels, reference)) / sum(
            label.numel() for label in reference)
        rows[name].detail = (f"{speed:.1f} img/s on {len(images)} photos, amp {precision}, "
                             f"{100 * agreement:.2f}% pixels as fp32")
        if agreement < MIN_AGREEMENT:
            rows[name].fail(f"under {100 * MIN_AGREEMENT:.0f}% agreement")
    return list(rows.values())


# --------------------------------------------------------------------------- the check


def training_rows(setup: Setup, *, workdir: Path, data_root: Path, rate: float,
                  flops: dict[str, float]) -> tuple[list[Row], Path]:
    """Every ``train ...`` row and the SIGTERM one; returns them and the fp32 run's folder."""
    first = setup.models[0]
    sigterm, fp32_dir, fp32_output = sigterm_row(setup, setup.trained(first), workdir=workdir,
                                    data_root=data_root)
    rows = [sigterm]
    for model in setup.models:
        if model != first and setup.stand_in:
            rows += [Row(f"train {model} {p}", status=f"skipped: --quick trains "
                         f"{setup.stand_in} only, for {first}") for p in PRECISIONS]
            continue
        backbone = setup.trained(model)
        ceiling = flops[backbone] / rate if backbone in flops else None
        common = dict(workdir=workdir, data_root=data_root, ceiling=ceiling)
        if model == first:  # its fp32 run is the SIGTERM + resume one
            fp32 = Row(f"train {model} fp32")
            judge_training(fp32, fp32_dir, fp32_output, ceiling=ceiling)
        else:
            fp32 = training_row(setup, f"train {model} fp32", backbone,
                                ["--amp", "off", "--no-channels-last"], iters=setup.iters,
                                **common)
        rows.append(fp32)
        for precision in ("bf16", "fp16"):
            iters = setup.fp16_iters if precision == "fp16" else setup.iters
            row = training_row(setup, f"train {model} {precision}", backbone,
                               ["--amp", AMP_FLAG[precision], "--no-channels-last"], iters=iters,
                               **common)
            compare_with_fp32(row, fp32, setup.loss_tolerance)
            rows.append(row)
    backbone = setup.trained(first)
    common = dict(workdir=workdir, data_root=data_root, iters=setup.iters,
                  ceiling=flops[backbone] / rate if backbone in flops else None)
    rows.append(training_row(setup, f"train {first} bf16 channels_last", backbone,
                             ["--amp", "bf16", "--channels-last"], **common))
    if setup.device == "cuda":
        rows.append(training_row(setup, f"train {first} bf16 compile", backbone,
                                 ["--amp", "bf16", "--channels-last", "--compile"], **common))
    else:
        rows.append(Row(f"train {first} bf16 compile", status="skipped: compiling the training "
                        "step takes minutes on a CPU, past --quick's minute"))
    return rows, fp32_dir


def run_check(setup: Setup, workdir: Path) -> list[Row]:
    data_root = workdir / "demo"
    generate_demo_dataset(data_root, seed=1, num_train=setup.iters_per_epoch * setup.batch,
                          num_val=2)
    if setup.fp16_iters < setup.iters_per_epoch:
        generate_demo_dataset(data_for(data_root, setup.fp16_iters, setup), seed=1,
                              num_train=setup.fp16_iters * setup.batch, num_val=2)
    rate = matmul_rate(setup.device, setup.matmul_side)
    rows = [Row("matmul bf16", detail=f"{rate / 1e12:.3f} TFLOP/s ({setup.matmul_side}^2, "
                f"{setup.device})")]
    backbones = sorted({setup.trained(model) for model in setup.models})
    flops = {b: training_flops(b, setup.crop, setup.device) for b in backbones}
    rows.append(Row("model FLOPs", detail=", ".join(
        f"{b} {flops[b] / 1e9:.2f} GFLOP/image (forward + backward at {setup.crop})"
        for b in backbones)))
    trained, fp32_dir = training_rows(setup, workdir=workdir, data_root=data_root, rate=rate,
                                      flops=flops)
    rows += trained
    rows.append(torchrun_row(setup, setup.trained(setup.models[0]), workdir=workdir,
                             data_root=data_root))
    rows.append(dataparallel_row(setup.device))
    rows += inference_rows(setup, fp32_dir / "checkpoint.pth.tar",
                           photos(data_root, setup.photos))
    order = {name: index for index, name in enumerate(row_names(setup.models))}
    return sorted(rows, key=lambda row: order[row.name])


def print_table(rows: list[Row], device: str) -> None:
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\nbench.gpu_check on {name}, torch {torch.__version__}")
    width = max(len(row.name) for row in rows)
    for row in rows:
        print(f"{row.name:{width}}  {row.status:6}  {row.detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="ResNet-18 at crop 32, few iterations and photos (about a minute "
                             "on a CPU)")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no GPU here: run python -m bench.gpu_check --device cpu --quick",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as temporary:
        rows = run_check(setup_for(args.device, args.quick), Path(args.workdir or temporary))
    print_table(rows, args.device)
    return 1 if any(row.status == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
