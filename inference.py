#!/usr/bin/env python
"""Segment images with a trained DeepLabV3+ checkpoint (or its exported ONNX file).

    python inference.py --in-path photos --ckpt run/coco/deeplab-resnet101/experiment_0/model_best.pth.tar
    python inference.py --in-path list.txt --ckpt model.onnx --save mask,overlay --format jpg
    torchrun --nproc_per_node 4 inference.py --in-path photos --ckpt ...     # split over processes

Each input ``sub/name.ext`` (a file, a folder walked recursively, or a .txt list of paths) gives
``<out-path>/sub/name.png``: a palette PNG of the image's displayed size whose pixel values are
class ids and whose palette shows the class colours; ``--save`` adds colour images and overlays.
Images are decoded by loader workers and outputs encoded by writer threads while the model runs;
images above a pixel budget are predicted window by window in bounded memory. The model's
settings (architecture, classes, normalisation) come from the checkpoint or the ONNX metadata.

Only this tool's own earlier outputs are ever replaced (``--skip-existing``, ``--overwrite``);
SIGINT / SIGTERM finish the writes in flight, say how to resume and exit with 130 / 143.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from tqdm import tqdm

from dataloader.custom_transforms import Normalize
from dataloader.images import ImageFiles, InputImage, list_inputs, loader_for
from dataloader.utils import DatasetError, default_cache_dir
from deploy.engines import ENGINE_CHOICES
from deploy.outputs import (IMAGE_FORMATS, OUTPUT_KINDS, Writer, check_existing, parse_kinds,
                            plan_outputs)
from deploy.predictor import Predictor, display_pixels, load_engine, predict_all
from modeling.inference_ops import DEFAULT_TILE, TILE_PIXEL_BUDGET
from utils.distributed import DistributedContext, cleanup, decided_by_main, init_distributed
from utils.errors import UserError
from utils.fileio import remove_stale_temporaries_of
from utils.hardware import (Hardware, add_hardware_args, cpu_bf16_note, cudnn_benchmark,
                            resolve_hardware)
from utils.signals import Interrupted, raise_on_stop_signals

DEFAULT_CKPT = "modeling/deeplab-resnet.pth.tar"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Predict segmentation masks with a DeepLabV3+ checkpoint or ONNX file",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--in-path", required=True,
                    help="an image, a folder (walked recursively) or a .txt file of image paths")
    io.add_argument("--out-path", default="inference_results",
                    help="output folder (mirrors the input sub-folders); never inside --in-path")
    io.add_argument("--save", default="mask",
                    help=f"comma-separated outputs: {', '.join(OUTPUT_KINDS)} (class-id palette "
                         f"PNG, RGB colours, colours blended over the photo)")
    io.add_argument("--format", default="png", choices=IMAGE_FORMATS,
                    help="file format of color and overlay outputs (masks are always PNG)")
    io.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colours")
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


def check_flags(args: argparse.Namespace) -> list[str]:
    """Refuse flag values that cannot work, before anything is read; returns the output kinds."""
    kinds = parse_kinds(args.save)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--size", args.size, 1), ("--tile", args.tile, 0),
                             ("--tile-overlap", args.tile_overlap, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if not all(math.isfinite(scale) and scale > 0 for scale in args.scales):
        raise UserError(f"--scales must be positive numbers, got "
                        f"{' '.join(map(str, args.scales))}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}")
    # At most half a window: more would multiply the windows (at tile - 1, one per pixel).
    tile = DEFAULT_TILE if args.tile is None else args.tile
    if tile and 2 * args.tile_overlap > tile:
        raise UserError(f"--tile-overlap {args.tile_overlap} must be at most half the window "
                        f"({tile // 2} for " + (f"--tile {tile}" if args.tile else
                                                f"the automatic {tile}-pixel windows") + ")")
    if args.skip_existing and args.overwrite:
        raise UserError("--skip-existing keeps complete outputs and --overwrite replaces them: "
                        "choose one")
    if os.path.lexists(args.out_path) and not os.path.isdir(args.out_path):
        raise UserError(f"--out-path {args.out_path} is a file: name a folder for the outputs")
    return kinds


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


def plan_jobs(*, in_path: str, out_path: str, kinds: list[str], image_format: str,
              skip_existing: bool, overwrite: bool) -> Jobs:
    """List the inputs, check their outputs as a whole and against what exists, and remove
    the temporaries killed runs left beside them; the inputs whose outputs are done (with
    ``skip_existing``) are left out."""
    inputs = list_inputs(in_path)
    plans = plan_outputs(inputs, Path(in_path), Path(out_path), kinds, image_format)
    done = check_existing(plans, Path(out_path), skip_existing=skip_existing,
                          overwrite=overwrite)
    remove_stale_temporaries_of(path for plan in plans for path in plan.values())
    todo = [i for i, finished in enumerate(done) if not finished]
    return Jobs(inputs=[inputs[i] for i in todo], plans=[plans[i] for i in todo],
                skipped=len(done) - len(todo))


@dataclass
class Tally:
    """How far a run got, for the line an interrupted run prints."""

    jobs: int = 0
    written: int = 0


def main(args: argparse.Namespace, tally: Tally | None = None) -> int:
    """Segment every input; returns the number of inputs that failed (in all processes)."""
    kinds = check_flags(args)
    tally = tally if tally is not None else Tally()
    context = init_distributed(use_cuda=torch.cuda.is_available() and not args.no_cuda)
    try:
        hardware = resolve_hardware(no_cuda=args.no_cuda, gpu_ids=None, amp=args.amp,
                                    channels_last=args.channels_last, context=context)
        # Rank 0 decides for all: a rank listing the done outputs after another one's first
        # write would get a different share (inputs done twice or never).
        planned = decided_by_main(lambda: plan_jobs(
            in_path=args.in_path, out_path=args.out_path, kinds=kinds, image_format=args.format,
            skip_existing=args.skip_existing, overwrite=args.overwrite), context)
        jobs = this_process_share(list(range(len(planned.inputs))), context)
        inputs = [planned.inputs[i] for i in jobs]
        tally.jobs = len(jobs)
        dataset = ImageFiles([item.path for item in inputs], exif_transpose=args.exif_transpose,
                             short_side=args.size, keep_original="overlay" in kinds)
        # Workers start decoding now, while the model is loaded.
        samples = iter(loader_for(dataset, args.workers)) if jobs else iter(())
        failures = run(args, samples, hardware, inputs=inputs,
                       plans=[planned.plans[i] for i in jobs], needs_image="overlay" in kinds,
                       show_progress=context.is_main, tally=tally) if jobs else 0
        written, skipped = len(jobs) - failures, planned.skipped
        if context.enabled:
            counts = torch.tensor([written, failures])
            dist.all_reduce(counts)
            written, failures = (int(value) for value in counts)
        if context.is_main:
            print(f"{written} inputs segmented into {args.out_path}"
                  + (f"; {skipped} skipped, their outputs exist" if skipped else "")
                  + (f"; {failures} failed" if failures else ""))
        return failures
    finally:
        cleanup(context)


def run(args: argparse.Namespace, samples: Iterable[dict[str, Any]], hardware: Hardware, *,
        inputs: list, plans: list[dict[str, Path]], needs_image: bool,
        show_progress: bool, tally: Tally) -> int:
    """Load the model, predict every sample and write its outputs; returns the failures.

    Interrupted (:class:`utils.signals.Interrupted`), it lets the writes in flight finish,
    counts them in ``tally`` and re-raises."""
    engine, settings, engine_name = load_engine(
        args.ckpt, hardware, engine=args.engine, amp_explicit=args.amp not in ("auto", "off"),
        compile_model=args.compile, cache_dir=default_cache_dir() if args.cache else None)
    if args.engine == "auto" and engine_name == "torch" and hardware.device.type == "cpu":
        tqdm.write("note: running PyTorch; on CPUs OpenVINO or onnxruntime are faster "
                   "(python -m bench.inference), and OpenVINO runs export.py --int8 files: "
                   "pip install -r requirements-deploy.txt", file=sys.stderr)
    note = cpu_bf16_note(args.amp, hardware.device, measure_with=(
        "python -m bench.inference --ckpt CKPT --images SOME --configs auto torch:bf16 "
        "openvino:bf16 --no-whole"))
    if note and show_progress:
        tqdm.write(note, file=sys.stderr)
    if engine_name != "torch":
        hardware.channels_last = False  # the ONNX runtimes take plain NCHW arrays
    predictor = Predictor(engine=engine, hardware=hardware,
                          normalize=Normalize(settings["mean"], settings["std"]),
                          scales=args.scales, flip=args.flip, tile=args.tile,
                          tile_overlap=args.tile_overlap, batch_size=args.batch_size)
    writer = Writer(plans=plans, names=[item.path for item in inputs],
                    palette=settings["palette"], alpha=args.alpha,
                    threads=max(1, min(2, os.cpu_count() or 1)), on_error=report_error)

    def emit(sample: dict[str, Any], labels: torch.Tensor) -> None:
        image = display_pixels(sample).permute(1, 2, 0).numpy() if needs_image else None
        writer.submit(sample["index"], labels.numpy(), image)

    progress = tqdm(samples, total=len(plans), desc=f"inference ({engine_name})",
                    disable=not show_progress, dynamic_ncols=True)
    try:
        # No cuDNN autotuning: nearly every photo has its own size, and would be tuned anew.
        with torch.inference_mode(), cudnn_benchmark(False):
            bad = predict_all(progress, predictor, emit,
                              on_error=lambda message: report_error(f"{message}; skipped"))
        del predictor, engine  # the last outputs are written in the model's memory, not beside
    finally:
        progress.close()
        try:
            writer.close()  # also when interrupted: the writes in flight finish
        finally:
            tally.written = writer.written
    return bad + writer.failures


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
        return stop.exit_status
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli())
