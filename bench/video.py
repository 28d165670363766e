#!/usr/bin/env python
"""Frames per second of a video through inference.py, beside the same frames as JPEGs.

For each checkpoint: the whole process (``inference.py`` as a subprocess: imports, model
loading, decoding, prediction and writing included) on a generated 640x480 video at 25 fps
(or ``--video``), writing an overlay video; and on the same decoded frames saved as JPEGs
(quality 95) through the photo path, writing JPEG overlays. Runs alternate, round after round,
so that a busy machine slows both alike. ``--vainf`` also times VainF/DeepLabV3Plus-Pytorch's
``predict.py`` on the JPEGs (its MobileNetV2 model, random weights: :class:`bench.vainf.VainF`),
the reference the issue compares with.

    python -m bench.video --ckpts r101.pth.tar r18.pth.tar mnv3.pth.tar
    python -m bench.video --ckpts r18.pth.tar --seconds 10 --rounds 3 \
        --vainf ~/DeepLabV3Plus-Pytorch

Prints a Markdown table (frames per second, the best of the rounds) for doc/results.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from bench.vainf import VainF, timed

REPO = Path(__file__).resolve().parents[1]


def generate_video(path: Path, *, seconds: float, width: int = 640, height: int = 480,
                   fps: int = 25, rotation: int = 0, pts: list[int] | None = None) -> int:
    """An H.264 MP4 of smooth colour blobs drifting across the picture; returns its frames.

    ``rotation``: a display matrix turning it that many degrees counter-clockwise (a phone's
    tag); ``pts``: each frame's timestamp in ticks of ``1 / fps`` (a variable frame rate),
    one per tick by default."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(height // 16, 2 * width // 16, 3), dtype=np.uint8)
    canvas = np.asarray(Image.fromarray(small).resize((2 * width, height),
                                                      Image.Resampling.BILINEAR))
    frames = int(round(seconds * fps))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, fps)
        if rotation:
            stream.set_display_rotation(rotation)
        for index in range(frames):
            left = (4 * index) % width
            frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(canvas[:, left:left + width]), format="rgb24")
            frame.pts = index if pts is None else pts[index]
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return frames


def frames_as_jpegs(video: Path, folder: Path) -> int:
    """The decoded frames of ``video`` as ``folder/000000.jpg``...; returns their count."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    with av.open(str(video)) as container:
        for count, frame in enumerate(container.decode(video=0), start=1):
            frame.to_image().save(folder / f"{count - 1:06d}.jpg", quality=95)
    return count


def commands(args: argparse.Namespace, video: Path, jpegs: Path,
             scratch: Path) -> dict[str, tuple[list[str], dict[str, str], Path]]:
    """Every timed run by name (command, environment, folder): ``<ckpt> video``,
    ``<ckpt> jpeg`` (and VainF's)."""
    runs = {}
    env = dict(os.environ)
    for ckpt in args.ckpts:
        name = Path(ckpt).name
        common = [sys.executable, "inference.py", "--ckpt", ckpt, "--save", "overlay",
                  "--overwrite", *args.flags]
        runs[f"{name} video"] = (common + ["--in-path", str(video), "--out-path",
                                           str(scratch / f"{name}-video")], env, REPO)
        runs[f"{name} jpeg"] = (common + ["--in-path", str(jpegs), "--format", "jpg",
                                          "--out-path", str(scratch / f"{name}-jpeg")], env, REPO)
    if args.vainf:
        runs["VainF predict.py (MobileNetV2) jpeg"] = VainF(
            Path(args.vainf), scratch, model="deeplabv3plus_mobilenet").command(
                jpegs, scratch / "vainf")
    return runs


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.video",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--ckpts", nargs="+", default=[],
                        help="checkpoints (or ONNX files) to time, one table row each")
    parser.add_argument("--video", help="a video to time instead of the generated one")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of the generated 640x480 25 fps video")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each; the best counts")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="further inference.py flags for every run (last on the line)")
    parser.add_argument("--vainf", help="a checkout of VainF/DeepLabV3Plus-Pytorch: its "
                        "predict.py with its MobileNetV2 model (random weights) on the JPEGs")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if not args.ckpts and not args.vainf:
        sys.exit("error: name --ckpts (and/or --vainf): there is nothing to time")
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        video = Path(args.video) if args.video else scratch / "clip.mp4"
        if not args.video:
            generate_video(video, seconds=args.seconds)
        frames = frames_as_jpegs(video, scratch / "jpegs")
        runs = commands(args, video, scratch / "jpegs", scratch)
        best = {name: float("inf") for name in runs}
        for _ in range(args.rounds):
            for name, command in runs.items():
                best[name] = min(best[name], timed(*command))
    print(f"| run ({frames} frames) | frames/s (whole process) | seconds |")
    print("|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {frames / seconds:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
