#!/usr/bin/env python
"""Export a checkpoint to a self-describing ONNX file for onnxruntime, OpenVINO and others.

    python export.py --ckpt run/coco/deeplab-resnet101/experiment_0/model_best.pth.tar --out model.onnx
    python inference.py --ckpt model.onnx --engine openvino --in-path photos
    python export.py --ckpt ... --out model-int8.onnx --int8 --calibration photos  # CPUs

Input ``image``: float32 ``(N, C, H, W)`` (C: metadata ``in_channels``, 3 for RGB), ``(x - mean) /
std`` per channel with x = uint8 / 255, uint16 / 65535 or float as is; output ``logits``:
float32 ``(N, num_classes, H, W)``; batch, height and width are dynamic. The class names,
palette, normalisation and architecture are in the file's metadata_props. ``--int8`` stores
int8 weights and activations (QuantizeLinear / DequantizeLinear pairs, calibrated by NNCF on
your images); OpenVINO ran it faster than fp32 on the CPUs in doc/results.md, and
its masks differ from fp32 on some pixels: measure how many with `python -m bench.inference`
before you rely on it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

from dataloader.custom_transforms import Normalize
from deploy.onnx_model import INPUT_NAME, OUTPUT_NAME, export_onnx, with_metadata
from deploy.predictor import REQUIRED_SETTINGS
from modeling.checkpoint import load_model
from modeling.deeplab import DeepLab
from utils.checkpoint import CheckpointError
from utils.errors import UserError
from utils.fileio import atomic_write, remove_stale_temporaries
from utils.signals import Interrupted, raise_on_stop_signals


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a DeepLabV3+ checkpoint to ONNX",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--int8", action="store_true",
                        help="quantize to int8, calibrated on --calibration (faster on CPUs, "
                             "slightly different masks)")
    parser.add_argument("--calibration",
                        help="--int8: images like the ones you will segment (a file, a folder "
                             "walked recursively, or a .txt list)")
    parser.add_argument("--calibration-count", type=int, default=16,
                        help="--int8: how many of those images (the first, sorted; at least "
                             "16)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare onnxruntime's logits with PyTorch's on a random input "
                             "(fp32 exports only)")
    return parser


def check_export(model: DeepLab, data: bytes) -> str:
    """Run a random ``(2, C, 96, 128)`` input through PyTorch and onnxruntime; a summary line."""
    import onnxruntime

    channels = model.in_channels
    image = torch.randn(2, channels, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(image)["out"]
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: image.numpy()})[0])
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    difference = ((got - expected).abs().max() / expected.abs().max()).item()
    return (f"onnxruntime vs PyTorch on a random 2x{channels}x96x128 input: largest logit difference "
            f"{difference:.1e} of the largest logit, argmax agreement {100 * agreement:.3f}%")


def main(args: argparse.Namespace) -> str:
    """Write ``args.out``; returns what was done, in one line."""
    if importlib.util.find_spec("onnx") is None:
        raise UserError("export.py needs the onnx package: pip install -r requirements-deploy.txt"
                        " -c constraints.txt")
    if not args.out.lower().endswith(".onnx"):
        raise UserError(f"--out {args.out} must end in .onnx")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder: name the .onnx file to write")
    if args.int8 and not args.calibration:
        raise UserError("--int8 needs --calibration: a folder of images like the ones you will "
                        "segment (a few dozen are enough)")
    if args.calibration and not args.int8:
        raise UserError("--calibration is for --int8 exports: add --int8, or drop --calibration")
    calibration = []
    if args.int8:  # refuse a missing package or a bad folder before the slow part
        from deploy.quantize import calibration_images, require_packages
        require_packages()
        calibration = calibration_images(args.calibration, args.calibration_count)
    try:
        model, settings = load_model(args.ckpt, required_settings=REQUIRED_SETTINGS)
    except CheckpointError as error:
        raise UserError(f"--ckpt: {error}") from None
    remove_stale_temporaries(args.out)  # of an export killed while it wrote
    data = export_onnx(model, settings)
    if args.int8:
        from deploy.quantize import quantize_int8
        data = quantize_int8(data, calibration, Normalize(settings["mean"], settings["std"]))
        data = with_metadata(data, settings, precision=f"int8, calibrated on {len(calibration)} "
                                                       f"images of {args.calibration}")
    summary = (f"{args.out}: {len(data) / 2**20:.1f} MiB, DeepLabV3+ {settings['backbone']}, "
               f"output stride {settings['output_stride']}, {settings['num_classes']} classes")
    if args.int8:
        summary += f", int8 (calibrated on {len(calibration)} images)"
    elif args.check and importlib.util.find_spec("onnxruntime") is not None:
        summary += "\n" + check_export(model, data)
    # Last, so that an interrupt before it leaves --out as it was (and one during it, too).
    atomic_write(args.out, lambda handle: handle.write(data))
    return summary


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        with raise_on_stop_signals():
            print(main(args))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"interrupted by {stop}: {args.out} was not written", file=sys.stderr)
        return stop.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(cli())
