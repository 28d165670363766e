#!/usr/bin/env python
"""The video acceptance check at full size: generated 640x480 25 fps clips (plain, with a phone's
rotation tag, and at a variable frame rate) through ``inference.py``, against the photo path.

For each clip it runs ``inference.py --save mask,overlay`` on the video and ``--save mask`` on
the same decoded frames written as lossless PNGs (turned as players show them), both as
subprocesses with the same ``--flags``, and checks: the overlay video has every frame, at the
input's timestamps (so the same duration, to the frame), shown the right way up (its size is
the displayed one); and the video's per-frame masks equal the photos' masks on at least
99.9 % of pixels. Prints a Markdown table; exits 1 if a check fails.

    python -m bench.video_check --ckpt mnv3.pth.tar --seconds 10
    python -m bench.video_check --ckpt r18.pth.tar --seconds 10 --flags --size 240
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
from PIL import Image

from bench.video import generate_video

REPO = Path(__file__).resolve().parents[1]
MIN_AGREEMENT = 0.999


def displayed_frames(video: Path, folder: Path) -> tuple[list[float], tuple[int, int]]:
    """The frames of ``video`` as players show them, saved as ``folder/000000.png``...; returns
    their times in seconds and the displayed ``(height, width)``."""
    folder.mkdir(parents=True, exist_ok=True)
    times, shape = [], (0, 0)
    with av.open(str(video)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            pixels = np.rot90(frame.to_ndarray(format="rgb24"), k=round((frame.rotation or 0) / 90))
            Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{index:06d}.png")
            times.append(float(frame.time))
            shape = pixels.shape[:2]
    return times, shape


def output_frames(video: Path) -> tuple[list[float], tuple[int, int]]:
    with av.open(str(video)) as container:
        frames = [(float(frame.time), (frame.height, frame.width))
                  for frame in container.decode(video=0)]
    return [time for time, _ in frames], frames[0][1] if frames else (0, 0)


def check(name: str, clip: Path, scratch: Path, args: argparse.Namespace, fps: int) -> list[str]:
    """One table row: the clip's frames, the output's, the largest timestamp gap, the
    displayed size and the masks' agreement; ``ok`` or what failed."""
    times, shape = displayed_frames(clip, scratch / f"{name}-frames")
    base = [sys.executable, "inference.py", "--ckpt", args.ckpt, "--overwrite", *args.flags]
    for command in (base + ["--in-path", str(clip), "--save", "mask,overlay",
                            "--out-path", str(scratch / f"{name}-video")],
                    base + ["--in-path", str(scratch / f"{name}-frames"), "--save", "mask",
                            "--out-path", str(scratch / f"{name}-photos")]):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
            raise SystemExit(f"inference.py failed on {name}: {lines[-1]}")
    out_times, out_shape = output_frames(scratch / f"{name}-video" / f"{clip.stem}_overlay.mp4")
    gap = max((abs(a - b) for a, b in zip(times, out_times)), default=float("inf"))
    video_masks = sorted((scratch / f"{name}-video" / clip.stem).iterdir())
    equal = total = 0
    for index, path in enumerate(video_masks):
        with Image.open(path) as got, Image.open(scratch / f"{name}-photos"
                                                 / f"{index:06d}.png") as expected:
            got, expected = np.asarray(got), np.asarray(expected)
        equal += int((got == expected).sum()) if got.shape == expected.shape else 0
        total += expected.size
    agreement = equal / total if total else 0.0
    problems = [what for what, bad in (
        ("frame count", not len(times) == len(out_times) == len(video_masks)),
        ("timestamps", gap >= 1 / fps), ("orientation", out_shape != shape),
        ("agreement", agreement < MIN_AGREEMENT)) if bad]
    return [name, f"{len(times)} / {len(out_times)}", f"{1000 * gap:.1f} ms",
            f"{shape[1]}x{shape[0]} / {out_shape[1]}x{out_shape[0]}", f"{100 * agreement:.3f} %",
            "ok" if not problems else "FAIL: " + ", ".join(problems)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.video_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint (or ONNX file)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="further inference.py flags for every run (last on the line)")
    args = parser.parse_args(argv)
    fps = 25
    frames = int(round(args.seconds * fps))
    # Variable frame rate: each frame shown for 1 to 3 ticks of 1/25 s (seeded).
    steps = np.random.default_rng(0).integers(1, 4, size=frames)
    clips = {"plain": {}, "rotated 90": {"rotation": 90},
             "variable rate": {"pts": [0, *np.cumsum(steps)[:-1].tolist()]}}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        for name, options in clips.items():
            clip = scratch / f"{name.replace(' ', '_')}.mp4"
            generate_video(clip, seconds=args.seconds, fps=fps, **options)
            rows.append(check(name.replace(" ", "_"), clip, scratch, args, fps))
    print(f"| clip ({args.seconds:g} s, 640x480, {fps} fps) | frames in / out | largest "
          f"timestamp gap | displayed size in / out | masks = photo path's | check |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if all(row[-1] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
