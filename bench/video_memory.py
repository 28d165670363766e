#!/usr/bin/env python
"""Peak memory of inference.py on a short and a long video: does it grow with the length?

Generates a 640x480 25 fps video of each length (10 s and 600 s by default, with
:func:`bench.video.generate_video`), runs ``inference.py --in-path clip.mp4 --save overlay`` on
it as a subprocess (the whole process: imports, model loading, decoding, prediction, overlay
drawing and H.264 encoding) and prints a Markdown table of the peak memory of each length and
their difference. Two measures: the peak of the summed RSS of the process and every process
below it (a loader worker or an export child counts), polled from ``/proc`` every
``--interval`` seconds; and ``ru_maxrss`` from ``wait4`` (the largest single process, exact, but
blind to processes running side by side). A warm-up run on a 1-second clip fills one shared
cache (``$DEEPLAB_CACHE_DIR``) first, so that neither measured run includes an ONNX export.

    python -m bench.video_memory --ckpt mnv3.pth.tar
    python -m bench.video_memory --ckpt mnv3.pth.tar --seconds 10 600 --flags --size 120

``--flags`` takes the rest of the line as further inference.py flags for every run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av

from bench.video import generate_video

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def descendants(pid: int) -> list[int]:
    """``pid`` and every living process below it (read from ``/proc/PID/task/*/children``)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:  # it ended meanwhile
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as children:
                    pending.extend(int(child) for child in children.read().split())
            except OSError:
                continue
    return found


def tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and the processes below it, now."""
    total = 0
    for process in descendants(pid):
        try:
            with open(f"/proc/{process}/statm") as statm:
                total += int(statm.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


@dataclass(frozen=True)
class Peak:
    """One run's peaks in bytes: the polled sum over the process tree, and ``ru_maxrss``."""

    tree: int
    largest_process: int


def measure(command: list[str], env: dict[str, str], interval: float, log: Path) -> Peak:
    """Run ``command`` from the repository root, its stderr (progress bars) into ``log``; its
    failure ends the benchmark."""
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        peak = 0
        while True:
            # wait4 of this one child: its own rusage (with that of the processes it reaped),
            # whatever other children this process had before.
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(process.pid))
            time.sleep(interval)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    return Peak(tree=peak, largest_process=usage.ru_maxrss * 1024)


def frame_count(path: Path) -> int:
    """Frames of an MP4 as its container records them."""
    with av.open(str(path)) as container:
        return container.streams.video[0].frames


def run_lengths(ckpt: str, seconds: list[float], flags: list[str], scratch: Path,
                interval: float) -> list[tuple[float, Peak]]:
    """(seconds, peak) of each length, shortest first; each printed as a table row when
    measured (a 10-minute run takes long on a small machine)."""
    env = dict(os.environ, DEEPLAB_CACHE_DIR=str(scratch / "cache"))
    rows = []
    for index, length in enumerate([1.0, *sorted(seconds)]):
        clip = scratch / f"in{index}" / "clip.mp4"
        clip.parent.mkdir()
        frames = generate_video(clip, seconds=length)
        out = scratch / f"out{index}"
        command = [sys.executable, "inference.py", "--ckpt", ckpt, "--in-path", str(clip),
                   "--out-path", str(out), "--save", "overlay", *flags]
        peak = measure(command, env, interval, scratch / f"log{index}.txt")
        clip.unlink()  # the long clip need not wait on disk for the next run
        if index:  # the first run only warms the cache
            written = frame_count(out / "clip_overlay.mp4")
            print(f"| {length:g} s | {frames} / {written} | {peak.tree / 2**20:.0f} MiB "
                  f"| {peak.largest_process / 2**20:.0f} MiB |", flush=True)
            rows.append((length, peak))
        (out / "clip_overlay.mp4").unlink()
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.video_memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint (or ONNX file) to run")
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 600.0],
                        help="lengths of the generated 640x480 25 fps videos")
    parser.add_argument("--interval", type=float, default=0.5,
                        help="seconds between two readings of the processes' RSS")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="further inference.py flags for every run (last on the line)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    flags = " ".join(args.flags) or "(none)"
    print(f"| video, flags {flags} | frames in / out | peak RSS, process tree (polled) "
          f"| ru_maxrss (largest process) |")
    print("|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        rows = run_lengths(args.ckpt, args.seconds, args.flags, Path(folder), args.interval)
    (short, first), (long, last) = rows[0], rows[-1]
    print(f"| difference {long:g} s - {short:g} s | | "
          f"{(last.tree - first.tree) / 2**20:+.0f} MiB "
          f"| {(last.largest_process - first.largest_process) / 2**20:+.0f} MiB |")


if __name__ == "__main__":
    main()
