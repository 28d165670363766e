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
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from tqdm import tqdm

from dataloader.custom_transforms import Normalize
from dataloader.images import ImageFiles, list_inputs, loader_for
from dataloader.utils import DatasetError
from deploy.engines import ENGINE_CHOICES
from deploy.outputs import (IMAGE_FORMATS, OUTPUT_KINDS, Writer, already_written, parse_kinds,
                            plan_outputs)
from deploy.predictor import Predictor, display_pixels, load_engine, predict_all
from modeling.predict import DEFAULT_TILE, TILE_PIXEL_BUDGET
from utils.distributed import DistributedContext, cleanup, init_distributed
from utils.errors import UserError
from utils.hardware import (Hardware, add_hardware_args, cpu_bf16_note, cudnn_benchmark,
                            resolve_hardware)

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
                    help="skip inputs whose outputs all exist (resume an interrupted job)")
    io.add_argument("--workers", type=int, default=1,
                    help="processes decoding images while the model runs (0: in this process)")
    model = parser.add_argument_group("model and speed")
    model.add_argument("--ckpt", default=DEFAULT_CKPT,
                       help="checkpoint written by train.py, or an .onnx file from export.py")
    model.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                       help="runtime; auto: torch on GPUs, else openvino, onnxruntime or torch, "
                            "the first installed; for an .onnx file onnxruntime on GPUs (its "
                            "CUDA build), else openvino or onnxruntime")
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
    if any(scale <= 0 for scale in args.scales):
        raise UserError(f"--scales must be positive, got {args.scales}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.tile and args.tile_overlap >= args.tile:
        raise UserError(f"--tile-overlap {args.tile_overlap} must be smaller than --tile "
                        f"{args.tile}")
    return kinds


def this_process_share(items: list, context: DistributedContext) -> list:
    """Rank ``r`` of ``w`` takes items ``r, r + w, ...``: the shares are disjoint and together
    are every item, however the ranks are spread over machines."""
    return items[context.rank::context.world_size] if context.enabled else items


def main(args: argparse.Namespace) -> int:
    """Segment every input; returns the number of inputs that failed (in all processes)."""
    kinds = check_flags(args)
    context = init_distributed(use_cuda=torch.cuda.is_available() and not args.no_cuda)
    try:
        hardware = resolve_hardware(no_cuda=args.no_cuda, gpu_ids=None, amp=args.amp,
                                    channels_last=args.channels_last, context=context)
        inputs = list_inputs(args.in_path)
        plans = plan_outputs(inputs, Path(args.in_path), Path(args.out_path), kinds, args.format)
        jobs = [i for i, plan in enumerate(plans)
                if not (args.skip_existing and already_written(plan))]
        skipped = len(plans) - len(jobs)
        jobs = this_process_share(jobs, context)
        dataset = ImageFiles([inputs[i].path for i in jobs], exif_transpose=args.exif_transpose,
                             short_side=args.size, keep_original="overlay" in kinds)
        # Workers start decoding now, while the model is loaded.
        samples = iter(loader_for(dataset, args.workers)) if jobs else iter(())
        failures = run(args, samples, hardware, inputs=[inputs[i] for i in jobs],
                       plans=[plans[i] for i in jobs], needs_image="overlay" in kinds,
                       show_progress=context.is_main) if jobs else 0
        written = len(jobs) - failures
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
        show_progress: bool) -> int:
    """Load the model, predict every sample and write its outputs; returns the failures."""
    engine, settings, engine_name = load_engine(
        args.ckpt, hardware, engine=args.engine, amp_explicit=args.amp not in ("auto", "off"),
        compile_model=args.compile)
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
    finally:
        writer.close()
    return bad + writer.failures


def report_error(message: str) -> None:
    """One input failed (unreadable, unwritable): say so above the progress bar; others go on."""
    tqdm.write(f"error: {message}", file=sys.stderr)


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        failures = main(args)
    except (UserError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli())
