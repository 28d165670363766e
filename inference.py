#!/usr/bin/env python
"""Segment images with a trained DeepLabV3+ checkpoint (or its exported ONNX file).

    python inference.py --in-path photos --ckpt run/coco/deeplab-resnet101/experiment_0/model_best.pth.tar
    python inference.py --in-path list.txt --ckpt model.onnx --save mask,overlay --format jpg
    torchrun --nproc_per_node 4 inference.py --in-path photos --ckpt ...     # split over processes

Each input ``sub/name.ext`` (a file, a folder walked recursively, or a .txt list of paths) gives
``<out-path>/sub/name.png``: a palette PNG of the image's displayed size whose pixel values are
class ids and whose palette shows the class colours; ``--save`` adds colour images, overlays and
confidence maps. A video ``sub/clip.mp4`` gives ``sub/clip/000000.png``... and
``sub/clip_overlay.mp4``, ``sub/clip_color.mp4`` (:mod:`deploy.video_writer`).
Images are decoded by loader workers and outputs encoded by writer threads while the model runs;
images above a pixel budget are predicted window by window in bounded memory. The model's
settings (architecture, classes, normalisation) come from the checkpoint or the ONNX metadata.

Only this tool's own earlier outputs are ever replaced (``--skip-existing``, ``--overwrite``);
SIGINT / SIGTERM finish the writes in flight, say how to resume and exit with 130 / 143.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from dataloader.images import ImageFiles, InputImage, decoded_samples, list_inputs
from dataloader.utils import DatasetError, default_cache_dir
from dataloader.video import is_video
from deploy.engines import ENGINE_CHOICES
from deploy.int8 import (CalibrationSet, check_int8_request, from_folder, from_inputs,
                         int8_summary)
from deploy.outputs import (IMAGE_FORMATS, OUTPUT_KINDS, Writer, assign_outputs, check_existing,
                            parse_bands, parse_kinds)
from deploy.predictor import Predictor, window_problem
from deploy.video_writer import VideoSegmenter
from deploy.warmup import EXPORT_FIRST_FROM, Startup, startup_engine
from modeling.inference_ops import DEFAULT_TILE, TILE_PIXEL_BUDGET
from utils.distributed import DistributedContext, cleanup, decided_by_main, init_distributed
from utils.errors import UserError
from utils.fileio import remove_stale_temporaries_of
from utils.hardware import add_hardware_args, cpu_bf16_note
from utils.signals import Interrupted, raise_on_stop_signals

DEFAULT_CKPT = "modeling/deeplab-resnet.pth.tar"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Predict segmentation masks with a DeepLabV3+ checkpoint or ONNX file",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _io_args(parser.add_argument_group("inputs and outputs"))
    model = parser.add_argument_group("model and speed")
    model.add_argument("--ckpt", default=DEFAULT_CKPT,
                       help="checkpoint written by train.py, or an .onnx file from export.py")
    model.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                       help="runtime; auto: torch on GPUs, else openvino, onnxruntime or torch, "
                            "the first installed; for an .onnx file onnxruntime on GPUs (its "
                            "CUDA build), else openvino or onnxruntime")
    model.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                       help="keep the ONNX graph exported from a checkpoint and OpenVINO's "
                            "compiled model in $DEEPLAB_CACHE_DIR (default ~/.cache/deeplab), "
                            "so the next run starts sooner")
    model.add_argument("--int8", action=argparse.BooleanOptionalAction, default=False,
                       help="quantize the checkpoint to int8 with NNCF and run it in OpenVINO "
                            "(onnxruntime with --engine onnxruntime): faster on CPUs, masks "
                            "differ from fp32 on some pixels (the agreement is measured and "
                            "printed); the int8 model is cached like the graph")
    model.add_argument("--calibration", metavar="DIR",
                       help="--int8: calibrate on up to 64 images of DIR (a folder, an image or a "
                            ".txt list; at least 16) instead of the run's own photos; images "
                            "beyond 64 measure the agreement with fp32")
    add_hardware_args(model, channels_last=True)  # --channels-last, --compile: --engine torch
    model.add_argument("--batch-size", type=int, default=1,
                       help="images per model call; only images of one size are batched")
    feed = parser.add_argument_group("how inputs are fed")
    feed.add_argument("--size", type=int,
                      help="resize the short side before predicting (outputs keep the input size)")
    feed.add_argument("--scales", type=float, nargs="+", default=[1.0],
                      help="multi-scale prediction: input scales whose softmax is averaged")
    feed.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                      help="also average the horizontally flipped input")
    feed.add_argument("--tile", type=int, default=None,
                      help=f"predict in windows of this many pixels (0: never); default: "
                           f"{DEFAULT_TILE} for inputs over {TILE_PIXEL_BUDGET // 2**20} "
                           f"megapixels, else whole")
    feed.add_argument("--tile-overlap", type=int, default=256,
                      help="minimum overlap of neighbouring windows, in pixels")
    return parser


def _io_args(io: argparse._ArgumentGroup) -> None:
    """Which inputs are read and which outputs written, and how."""
    io.add_argument("--in-path", required=True,
                    help="an image, a video, a folder (walked recursively) or a .txt file of "
                         "their paths")
    io.add_argument("--out-path", default="inference_results",
                    help="output folder (mirrors the input sub-folders); never inside --in-path")
    io.add_argument("--save", default="mask",
                    help=f"comma-separated outputs: {', '.join(OUTPUT_KINDS)} (class-id palette "
                         f"PNG, RGB colours, colours blended over the photo, the chosen class's "
                         f"probability as grey, 255 = certain); for a video the masks and "
                         f"confidence are folders of per-frame PNGs, colours and overlays MP4s")
    io.add_argument("--format", default="png", choices=IMAGE_FORMATS,
                    help="file format of color and overlay outputs (masks are always PNG)")
    io.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colours")
    io.add_argument("--rgb-bands", type=parse_bands, metavar="R,G,B", help="overlays of images "
                    "that are not 8-bit RGB: the 1-based bands shown as red, green, blue (or one "
                    "band as grey), each stretched from its 2nd-98th percentile to 8 bits; "
                    "default: the first three bands (one band: grey)")
    io.add_argument("--exif-transpose", action=argparse.BooleanOptionalAction, default=True,
                    help="turn images as their EXIF orientation says (as viewers show them); "
                         "--no-exif-transpose keeps the stored pixels, as training does")
    io.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=False,
                    help="skip inputs whose outputs all exist and decode (resume an interrupted "
                         "job); earlier outputs that do not decode are written again")
    io.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                    help="replace earlier outputs of this tool (files it did not write are "
                         "never replaced; without either flag existing outputs stop the run)")
    io.add_argument("--workers", type=int, default=1,
                    help="processes decoding images while the model runs (0: in this process)")


#: The largest --size: a short side of 8192 pixels is a 50-megapixel 4:3 photo already (and
#: larger ones are predicted at their own size, window by window); a typo like 51200 would ask
#: for tens of GB.
MAX_SIZE = 8192


def check_flags(args: argparse.Namespace) -> list[str]:
    """Refuse flag values that cannot work, before anything is read; returns the output kinds."""
    kinds = parse_kinds(args.save)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--size", args.size, 1), ("--tile", args.tile, 0),
                             ("--tile-overlap", args.tile_overlap, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.size is not None and args.size > MAX_SIZE:
        raise UserError(f"--size must be at most {MAX_SIZE} (pixels of the short side), got "
                        f"{args.size}; larger photos need no --size: they are predicted window "
                        f"by window")
    if not all(math.isfinite(scale) and scale > 0 for scale in args.scales):
        raise UserError(f"--scales must be positive numbers, got "
                        f"{' '.join(map(str, args.scales))}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}")
    problem = window_problem(args.tile, args.tile_overlap, names=("--tile", "--tile-overlap"))
    if problem:
        raise UserError(problem)
    if args.skip_existing and args.overwrite:
        raise UserError("--skip-existing keeps complete outputs and --overwrite replaces them: "
                        "choose one")
    check_out_path(args.out_path)
    check_int8_flags(args)
    return kinds


def check_int8_flags(args: argparse.Namespace) -> None:
    """Refuse ``--int8`` / ``--calibration`` requests that cannot work, in one line."""
    if args.calibration is not None and not args.int8:
        raise UserError("--calibration is for --int8: add --int8, or drop --calibration")
    if args.int8:
        check_int8_request(args.ckpt, args.engine)


def int8_calibration(args: argparse.Namespace) -> CalibrationSet | None:
    """The images ``--int8`` calibrates on (None without it): ``--calibration``'s, else the
    run's own photos, all of them whatever this process's share or ``--skip-existing``
    leaves, so every process and a resumed run find the same cached model."""
    if not args.int8:
        return None
    photos = [item.path for item in list_inputs(args.in_path) if not is_video(item.path)]
    if args.calibration is not None:
        return from_folder(args.calibration, spare=photos)
    return from_inputs(photos)


def report_int8(settings: dict, *, show: bool) -> None:
    """The int8 model's calibration and agreement with fp32, in one line on stderr."""
    if "int8" in settings and show:
        tqdm.write(int8_summary(settings["int8"]), file=sys.stderr)


def check_out_path(out_path: str) -> None:
    """Raises UserError for an ``--out-path`` that is a file or a link to nothing."""
    if os.path.islink(out_path) and not os.path.exists(out_path):
        raise UserError(f"--out-path {out_path} is a link to {os.readlink(out_path)}, which does "
                        f"not exist: create that folder, or name another --out-path")
    if os.path.lexists(out_path) and not os.path.isdir(out_path):
        raise UserError(f"--out-path {out_path} is a file: name a folder for the outputs")


def this_process_share(items: list, context: DistributedContext) -> list:
    """Rank ``r`` of ``w`` takes items ``r, r + w, ...``: the shares are disjoint and together
    are every item, however the ranks are spread over machines."""
    return items[context.rank::context.world_size] if context.enabled else items


@dataclass
class Jobs:
    """The inputs to segment and their outputs, decided once before anything is written."""

    inputs: list[InputImage] = field(default_factory=list)
    plans: list[dict[str, Path]] = field(default_factory=list)
    skipped: int = 0


def collect_jobs(*, in_path: str, out_path: str, kinds: list[str], image_format: str,
              skip_existing: bool, overwrite: bool) -> Jobs:
    """List the inputs, check their outputs as a whole and against what exists, and remove
    the temporaries killed runs left beside them; the inputs whose outputs are done (with
    ``skip_existing``) are left out."""
    inputs = list_inputs(in_path)
    plans = assign_outputs(inputs, Path(in_path), Path(out_path), kinds, image_format)
    done = check_existing(plans, Path(out_path), skip_existing=skip_existing,
                          overwrite=overwrite)
    remove_stale_temporaries_of(path for plan in plans for path in plan.values())
    todo = [i for i, finished in enumerate(done) if not finished]
    return Jobs(inputs=[inputs[i] for i in todo], plans=[plans[i] for i in todo],
                skipped=len(done) - len(todo))


def share_of_jobs(args: argparse.Namespace, kinds: list[str],
                  context: DistributedContext) -> Jobs:
    """This process's share of the jobs (``skipped`` counts the whole run's)."""
    # Rank 0 decides for all: a rank listing the done outputs after another one's first
    # write would get a different share (inputs done twice or never).
    planned = decided_by_main(functools.partial(
        collect_jobs, in_path=args.in_path, out_path=args.out_path, kinds=kinds,
        image_format=args.format, skip_existing=args.skip_existing, overwrite=args.overwrite),
        context)
    share = this_process_share(list(range(len(planned.inputs))), context)
    return Jobs(inputs=[planned.inputs[i] for i in share],
                plans=[planned.plans[i] for i in share], skipped=planned.skipped)


@dataclass
class Tally:
    """How far a run got, for the line an interrupted run prints."""

    jobs: int = 0
    written: int = 0
    partial: list[Path] = field(default_factory=list)  # outputs of a video cut short


def main(args: argparse.Namespace, tally: Tally | None = None) -> int:
    """Segment every input; returns the number of inputs that failed (in all processes)."""
    kinds = check_flags(args)
    tally = tally if tally is not None else Tally()
    use_cuda = torch.cuda.is_available() and not args.no_cuda
    context = init_distributed(use_cuda=use_cuda)
    try:
        jobs = share_of_jobs(args, kinds, context)
        tally.jobs, failures = len(jobs.inputs), 0
        photos, videos = split_videos(jobs)
        dataset = ImageFiles([item.path for item in photos.inputs],
                             exif_transpose=args.exif_transpose, short_side=args.size,
                             keep_original="overlay" in kinds)
        # Workers start decoding now, while the model is loaded; stopped however this ends.
        with decoded_samples(dataset, args.workers if photos.inputs else 0) as samples:
            if jobs.inputs:
                predictor, settings, startup = load_predictor(
                    args, device=f"cuda:{context.local_rank}" if use_cuda else "cpu",
                    job_size=len(photos.inputs) + EXPORT_FIRST_FROM * len(videos.inputs),
                    show_notes=context.is_main)
                predictor.confidence = "confidence" in kinds
                failures = segment_videos(args, predictor, settings["palette"], videos, tally,
                                          show_progress=context.is_main)
                if photos.inputs:
                    failures += segment_photos(args, predictor, settings["palette"], photos,
                                               samples, tally, show_progress=context.is_main)
                if startup.export is not None:  # the work is done: it takes nothing from it
                    startup.export()
        return report_counts(len(jobs.inputs) - failures, failures, jobs.skipped,
                             args.out_path, context)
    finally:
        cleanup(context)


def split_videos(jobs: Jobs) -> tuple[Jobs, Jobs]:
    """The photos' jobs and the videos' jobs."""
    parts = (Jobs(), Jobs())
    for item, plan in zip(jobs.inputs, jobs.plans):
        part = parts[is_video(item.path)]
        part.inputs.append(item)
        part.plans.append(plan)
    return parts


def segment_photos(args: argparse.Namespace, predictor: Predictor, palette: list, jobs: Jobs,
                   samples: Iterator[dict], tally: Tally, *, show_progress: bool) -> int:
    """Predict and write the decoded ``samples`` of the photos of ``jobs``; returns how many
    failed. Outputs are written by threads while the model runs."""
    writer = Writer(plans=jobs.plans, names=[item.path for item in jobs.inputs],
                    palette=palette, alpha=args.alpha, rgb_bands=args.rgb_bands,
                    threads=max(1, min(2, os.cpu_count() or 1)), on_error=report_error)
    progress = tqdm(samples, total=len(jobs.plans), dynamic_ncols=True,
                    desc=f"inference ({predictor.engine_name})", disable=not show_progress)
    try:
        failures = predictor.predict_all(progress, writer.add, on_error=report_skipped)
    finally:
        progress.close()
        written = tally.written
        try:
            writer.close()  # also when interrupted: the writes in flight finish
        finally:
            tally.written = written + writer.written
    return failures + writer.failures


def segment_videos(args: argparse.Namespace, predictor: Predictor, palette: list, jobs: Jobs,
                   tally: Tally, *, show_progress: bool) -> int:
    """Segment the videos of ``jobs`` one after the other, their frames streamed through the
    model; returns how many could not be read whole."""
    segmenter = VideoSegmenter(
        predictor=predictor, palette=palette, alpha=args.alpha, short_side=args.size,
        report=functools.partial(tqdm.write, file=sys.stderr),
        progress=functools.partial(frame_progress, disable=not show_progress))
    failures = 0
    try:
        for item, plan in zip(jobs.inputs, jobs.plans):
            if segmenter.run(item.path, plan):
                tally.written += 1
            else:
                failures += 1
    finally:
        tally.partial = segmenter.partial
    return failures


def frame_progress(frames: Iterable, total: int | None, name: str, *, disable: bool) -> tqdm:
    """A progress bar over one video's frames, in frames per second."""
    return tqdm(frames, total=total, desc=name, unit="frame", dynamic_ncols=True, leave=False,
                disable=disable)


def load_predictor(args: argparse.Namespace, *, device: str, job_size: int,
                   show_notes: bool) -> tuple[Predictor, dict, Startup]:
    """The predictor the flags describe (:meth:`Predictor.load`) for ``job_size`` inputs, the
    model's settings, and how it started (a background export to start at the end: its
    ``export``); notes on faster choices go to stderr."""
    cache_dir = default_cache_dir() if args.cache else None
    startup = Startup(args.engine) if args.int8 else startup_engine(
        args.ckpt, engine=args.engine, device=torch.device(device), cache_dir=cache_dir,
        job_size=job_size, precision=args.amp if args.amp in ("bf16", "fp16") else "off")
    predictor, settings = Predictor.load(
        args.ckpt, engine=startup.engine, device=device, amp=args.amp,
        channels_last=args.channels_last, cache_dir=cache_dir,
        scales=args.scales, flip=args.flip, tile=args.tile, tile_overlap=args.tile_overlap,
        batch_size=args.batch_size, int8=int8_calibration(args))
    report_int8(settings, show=show_notes)
    if args.compile:
        predictor.compile()
    if startup.note and show_notes:
        tqdm.write(startup.note, file=sys.stderr)
    elif (args.engine == "auto" and predictor.engine_name == "torch"
            and predictor.hardware.device.type == "cpu"):
        tqdm.write("note: running PyTorch; on CPUs OpenVINO or onnxruntime are faster "
                   "(python -m bench.inference), and OpenVINO runs export.py --int8 files: "
                   "pip install -r requirements-deploy.txt", file=sys.stderr)
    note = cpu_bf16_note(args.amp, predictor.hardware.device, measure_with=(
        "python -m bench.inference --ckpt CKPT --images SOME --configs auto torch:bf16 "
        "openvino:bf16 --no-whole"))
    if note and show_notes and not args.int8:
        tqdm.write(note, file=sys.stderr)
    return predictor, settings, startup


def report_counts(written: int, failures: int, skipped: int, out_path: str,
                  context: DistributedContext) -> int:
    """Print the run's totals (all processes'); returns the failures of all processes."""
    if context.enabled:
        counts = torch.tensor([written, failures])
        dist.all_reduce(counts)
        written, failures = (int(value) for value in counts)
    if context.is_main:
        print(f"{written} inputs segmented into {out_path}"
              + (f"; {skipped} skipped, their outputs exist" if skipped else "")
              + (f"; {failures} failed" if failures else ""))
    return failures


def report_skipped(message: str) -> None:
    """One input could not be read: say so above the progress bar; the others go on."""
    report_error(f"{message}; skipped")


def report_error(message: str) -> None:
    """One input failed (unreadable, unwritable): say so above the progress bar; others go on."""
    tqdm.write(f"error: {message}", file=sys.stderr)


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    tally = Tally()
    try:
        with raise_on_stop_signals():
            failures = main(args, tally)
    except (UserError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"\ninterrupted by {stop}: {tally.written} of {tally.jobs} inputs written to "
              f"{args.out_path}; run the same command with --skip-existing to do the rest",
              file=sys.stderr)
        if tally.partial:
            print(f"the frames of the video being segmented are kept, playable, in "
                  f"{', '.join(map(str, tally.partial))}", file=sys.stderr)
        return stop.exit_status
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli())
