#!/usr/bin/env python
"""Peak memory and time of inference.py on one very large photo (6000x4000 by default).

Writes a synthetic photo of that size (smooth colour blobs, as a JPEG) to a temporary folder,
runs inference.py on it as a subprocess with the given flags and prints its wall time and peak
resident memory (ru_maxrss of the process and its decoding worker, the larger of the two;
``--workers 0`` keeps everything in one process).

    python -m bench.large_image_memory --ckpt model_best.pth.tar
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


def write_photo(path: Path, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    blobs = rng.integers(0, 256, size=(height // 200, width // 200, 3), dtype=np.uint8)
    Image.fromarray(blobs).resize((width, height), Image.Resampling.BICUBIC).save(
        path, quality=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.large_image_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--width", type=int, default=6000)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("flags", nargs="*", help="inference.py flags, after --")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        photo = Path(scratch) / "in" / "large.jpg"
        photo.parent.mkdir()
        write_photo(photo, args.width, args.height)
        command = [sys.executable, str(REPO / "inference.py"), "--in-path", str(photo.parent),
                   "--out-path", str(Path(scratch) / "out"), "--ckpt", args.ckpt, *args.flags]
        tic = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - tic
        with Image.open(Path(scratch) / "out" / "large.png") as mask:
            size = mask.size
    print(f"{args.width}x{args.height} photo, flags {' '.join(args.flags) or '(defaults)'}: "
          f"exit {status >> 8}, mask {size[0]}x{size[1]}, {seconds:.1f} s, peak RSS "
          f"{usage.ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
