#!/usr/bin/env python
"""Inference speed, memory and agreement of every engine and precision on a folder of images.

For each configuration: images per second of the whole process (``inference.py`` run as a
subprocess: imports, model loading, decoding and writing included) and of the model alone (the
prediction of decoded, normalised images in this process), the peak RSS of that subprocess, and
the share of pixels whose class agrees with the baseline: the same checkpoint in PyTorch fp32,
contiguous, batch 1, one image after the other. Configurations are run in turn, round after
round (all whole-process runs, then all model-only runs), so that a busy machine slows them
all alike; the printed ratios are against the baseline measured in the same run.

    python -m bench.inference --ckpt model_best.pth.tar --images $DEEPLAB_COCO_ROOT/val2017
    python -m bench.inference --ckpt ... --images ... --configs auto torch:off torch:bf16
    python -m bench.inference --ckpt ... --images ... --configs auto openvino:int8 \
        --int8-calibration $DEEPLAB_COCO_ROOT/train2017

``ENGINE:int8`` runs a file written by ``export.py --int8`` (made once, before the timings,
calibrated on ``--int8-calibration``: use other images than ``--images``, or the agreement
flatters int8).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataloader.custom_transforms import pil_to_uint8_tensor
from dataloader.images import list_inputs
from dataloader.utils import load_image
from deploy.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]

BASELINE = "baseline"
INT8 = "int8"
#: Configuration names: ``engine:amp``, or ``auto`` for inference.py's defaults.
DEFAULT_CONFIGS = ("auto", "torch:off", "onnxruntime:off", "openvino:off")


@dataclass(frozen=True)
class Config:
    """What a configuration runs: :meth:`Predictor.load`'s ``engine`` and ``amp``, and the
    memory format; the defaults are inference.py's."""

    engine: str = "auto"
    amp: str = "auto"
    channels_last: bool = True


def config_of(name: str) -> Config:
    if name == BASELINE:
        return Config(engine="torch", amp="off", channels_last=False)
    if name == "auto":
        return Config()
    engine, amp = name.split(":")
    return Config(engine=engine, amp="auto" if amp == INT8 else amp)


def flags_of(name: str) -> list[str]:
    """The inference.py flags that run configuration ``name`` in a whole process."""
    config = config_of(name)
    flags = ["--engine", config.engine, "--amp", config.amp,
             "--channels-last" if config.channels_last else "--no-channels-last"]
    return flags + (["--workers", "0"] if name == BASELINE else [])


def ckpt_of(config: str, args: argparse.Namespace) -> str:
    """The file a configuration runs: the checkpoint, or its int8 export."""
    return str(args.int8_file if config.endswith(":" + INT8) else args.ckpt)


def export_int8(args: argparse.Namespace, scratch: Path) -> None:
    """Write ``args.int8_file`` with export.py (timed apart: it is a one-off step)."""
    if not args.int8_calibration:
        raise SystemExit("an ENGINE:int8 config needs --int8-calibration IMAGES")
    args.int8_file = scratch / "int8.onnx"
    tic = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "export.py"), "--ckpt", str(args.ckpt), "--out",
                    str(args.int8_file), "--int8", "--calibration", str(args.int8_calibration),
                    "--calibration-count", str(args.int8_count)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    print(f"export.py --int8 ({args.int8_count} calibration images): "
          f"{time.perf_counter() - tic:.1f} s", flush=True)


@dataclass
class Result:
    whole_seconds: list[float] = field(default_factory=list)
    model_seconds: list[float] = field(default_factory=list)
    peak_rss: int = 0  # bytes
    same_pixels: int = 0
    pixels: int = 0


def whole_process(config: str, args: argparse.Namespace, out_dir: Path) -> tuple[float, int]:
    """Seconds and peak RSS (bytes, the largest process) of one inference.py run."""
    command = [sys.executable, str(REPO / "inference.py"), "--in-path", str(args.images),
               "--out-path", str(out_dir), "--ckpt", ckpt_of(config, args), *flags_of(config)]
    tic = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - tic
    if status:
        raise SystemExit(f"{config} failed: {process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def load_runner(name: str, ckpt: str):
    """The prediction function of a configuration: the Predictor inference.py builds."""
    config = config_of(name)
    predictor, _ = Predictor.load(ckpt, engine=config.engine, amp=config.amp,
                                  channels_last=config.channels_last)
    return predictor.predict


def model_only(predict, images: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    predict(images[0])  # warm-up: first-call allocations and kernel choices
    tic = time.perf_counter()
    labels = [predict(image) for image in images]
    return time.perf_counter() - tic, labels


def report(results: dict[str, Result], count: int) -> None:
    base = results[BASELINE]
    base_whole = min(base.whole_seconds) if base.whole_seconds else None
    base_model = min(base.model_seconds)
    print(f"\n{count} images; best of {len(base.model_seconds)} round(s); ratios are against "
          f"the baseline (PyTorch fp32, contiguous, batch 1)")
    print(f"{'config':18} {'whole img/s':>11} {'ratio':>6} {'model img/s':>11} {'ratio':>6} "
          f"{'peak RSS':>9} {'agreement':>10}")
    for config, result in results.items():
        model = min(result.model_seconds)
        whole = min(result.whole_seconds) if result.whole_seconds else None
        whole_text = (f"{count / whole:11.3f} {base_whole / whole:5.2f}x" if whole
                      else f"{'-':>11} {'-':>6}")
        agreement = 100 * result.same_pixels / max(result.pixels, 1)
        rss_text = f"{result.peak_rss / 2**30:7.2f}GB" if whole else f"{'-':>9}"
        print(f"{config:18} {whole_text} {count / model:11.3f} {base_model / model:5.2f}x "
              f"{rss_text} {agreement:9.4f}%")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.inference", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint (.pth.tar) to measure")
    parser.add_argument("--images", required=True, type=Path, help="folder of images")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="engine:amp pairs (amp off|bf16|fp16|auto|int8), or auto for the "
                             "defaults")
    parser.add_argument("--int8-calibration", type=Path,
                        help="images export.py --int8 calibrates on (not the --images)")
    parser.add_argument("--int8-count", type=int, default=16, help="how many of them")
    parser.add_argument("--limit", type=int, help="use the first N images only")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-whole", action="store_true", help="model-only timings")
    args = parser.parse_args(argv)
    configs = [BASELINE] + [c for c in args.configs if c != BASELINE]
    paths = [item.path for item in list_inputs(args.images)][: args.limit]
    if args.limit:  # the whole-process runs read the same images
        subset = Path(tempfile.mkdtemp(prefix="bench-images-"))
        for path in paths:
            (subset / path.name).symlink_to(path.resolve())
        args.images = subset
    results = {config: Result() for config in configs}
    with tempfile.TemporaryDirectory() as scratch:
        if any(config.endswith(":" + INT8) for config in configs):
            export_int8(args, Path(scratch))
        # Whole-process runs first, while this process is small: a child's peak RSS counts the
        # memory it inherits before exec, so loaded models here would inflate every figure.
        for round_index in range(0 if args.no_whole else args.rounds):
            for config in configs:
                seconds, rss = whole_process(config, args,
                                             Path(scratch) / f"{config}{round_index}")
                results[config].whole_seconds.append(seconds)
                results[config].peak_rss = max(results[config].peak_rss, rss)
                print(f"round {round_index} {config}: whole process {seconds:.1f} s", flush=True)
        images = [pil_to_uint8_tensor(load_image(path)) for path in paths]
        runners = {config: load_runner(config, ckpt_of(config, args)) for config in configs}
        reference: list[torch.Tensor] = []
        for round_index in range(args.rounds):
            for config in configs:
                seconds, labels = model_only(runners[config], images)
                results[config].model_seconds.append(seconds)
                reference = labels if config == BASELINE and not reference else reference
                if round_index == 0:
                    results[config].same_pixels = sum(int((a == b).sum())
                                                      for a, b in zip(labels, reference))
                    results[config].pixels = sum(label.numel() for label in labels)
                print(f"round {round_index} {config}: model {seconds:.1f} s", flush=True)
    report(results, len(images))


if __name__ == "__main__":
    main()
