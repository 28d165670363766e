#!/usr/bin/env python
"""Peak memory and time of inference.py on one very large photo (6000x4000 by default).

Writes a synthetic photo of that size (smooth colour blobs, as a JPEG) to a temporary folder,
runs inference.py on it as a subprocess once per path and prints each run's wall time and peak
resident memory (ru_maxrss of the process and its decoding worker, the larger of the two;
``--workers 0`` keeps everything in one process). The paths, unless flags are given after
``--``: the default (windows), ``--size 256`` (one small model input, full-size masks) and
``--save mask,color,overlay``. Each run starts with an empty cache (``$DEEPLAB_CACHE_DIR``), so
the export of a checkpoint to ONNX counts as it does on a first run; ``--warm`` reuses one.
Without ``--ckpt`` a randomly initialised ResNet-18 checkpoint (21 classes) is measured.

    python -m bench.large_image_memory
    python -m bench.large_image_memory --ckpt model_best.pth.tar --max-gib 1.5
    python -m bench.large_image_memory --ckpt ... -- --workers 0 --engine torch
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
#: The paths measured when no flags are given: windows, one small input, every output kind.
PATHS = ([], ["--size", "256"], ["--save", "mask,color,overlay"])


def write_photo(path: Path, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    blobs = rng.integers(0, 256, size=(height // 200, width // 200, 3), dtype=np.uint8)
    Image.fromarray(blobs).resize((width, height), Image.Resampling.BICUBIC).save(
        path, quality=90)


def random_resnet18(path: Path) -> str:
    """A train.py-style checkpoint of a randomly initialised ResNet-18 (21 classes)."""
    import torch

    from dataloader.utils import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASS_NAMES, palette_for
    from modeling.deeplab import DeepLab

    torch.manual_seed(0)
    model = DeepLab(backbone="resnet18", output_stride=16, num_classes=21).eval()
    settings = dict(model.settings(), class_names=list(VOC_CLASS_NAMES),
                    palette=palette_for(21), mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    torch.save({"model": model.state_dict(), "settings": settings}, path)
    return str(path)


def measure(command: list[str], env: dict[str, str]) -> tuple[int, float, int, str]:
    """Exit status, seconds, peak RSS in bytes and the stderr tail of one run."""
    tic = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - tic
    return status >> 8, seconds, usage.ru_maxrss * 1024, process.stderr.read()[-500:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.large_image_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="checkpoint or ONNX file (default: random ResNet-18)")
    parser.add_argument("--width", type=int, default=6000)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--warm", action=argparse.BooleanOptionalAction, default=False,
                        help="share one cache between the runs (the first fills it)")
    parser.add_argument("--max-gib", type=float,
                        help="exit 1 if a run's peak RSS exceeds this many GiB")
    parser.add_argument("flags", nargs="*", help="inference.py flags, after --")
    args = parser.parse_args(argv)
    over = 0
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        photo = scratch / "in" / "large.jpg"
        photo.parent.mkdir()
        write_photo(photo, args.width, args.height)
        ckpt = args.ckpt or random_resnet18(scratch / "resnet18.pth.tar")
        for index, flags in enumerate([args.flags] if args.flags else PATHS):
            cache = scratch / ("cache" if args.warm else f"cache{index}")
            out = scratch / f"out{index}"
            command = [sys.executable, str(REPO / "inference.py"), "--in-path",
                       str(photo.parent), "--out-path", str(out), "--ckpt", ckpt, *flags]
            status, seconds, peak, err = measure(command,
                                                 dict(os.environ, DEEPLAB_CACHE_DIR=str(cache)))
            if status == 0:
                with Image.open(out / "large.png") as mask:
                    what = f"mask {mask.size[0]}x{mask.size[1]}"
            else:
                what = f"failed: {(err.strip().splitlines() or [''])[-1]}"
            print(f"{args.width}x{args.height} photo, flags {' '.join(flags) or '(defaults)'}: "
                  f"exit {status}, {what}, {seconds:.1f} s, peak RSS {peak / 2**30:.2f} GiB",
                  flush=True)
            over += bool(status) or (args.max_gib is not None and peak > args.max_gib * 2**30)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
