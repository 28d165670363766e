#!/usr/bin/env python
"""Why NNCF: int8 masks from NNCF and from onnxruntime's own quantizer, against fp32.

Both quantize the same exported model, calibrated on the same images (read by export.py's
code), and both results run in OpenVINO; printed is the share of pixels of ``--images`` whose
class equals the fp32 model's, and the seconds per image.

    python -m bench.quantizers --ckpt model_best.pth.tar \\
        --calibration $DEEPLAB_COCO_ROOT/train2017 --images $DEEPLAB_COCO_ROOT/val2017
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import openvino
from onnxruntime import quantization

from dataloader.custom_transforms import Normalize
from dataloader.images import list_inputs
from deploy.onnx_model import INPUT_NAME, export_onnx
from deploy.quantize import calibration_images, model_input, quantize_int8
from modeling.checkpoint import load_model


def onnxruntime_int8(fp32: bytes, paths: list[str], normalize: Normalize, scratch: Path) -> bytes:
    """onnxruntime's ``quantize_static``: QDQ, per-channel int8 weights, uint8 activations."""

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.inputs = iter(paths)

        def get_next(self):
            path = next(self.inputs, None)
            return None if path is None else {INPUT_NAME: model_input(path, normalize)}

    (scratch / "fp32.onnx").write_bytes(fp32)
    quantization.quantize_static(
        str(scratch / "fp32.onnx"), str(scratch / "ort.onnx"), Reader(),
        quant_format=quantization.QuantFormat.QDQ, per_channel=True,
        activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8)
    return (scratch / "ort.onnx").read_bytes()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quantizers", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--calibration", required=True, help="images to calibrate on")
    parser.add_argument("--count", type=int, default=16, help="calibration images")
    parser.add_argument("--images", required=True, help="images to compare on")
    parser.add_argument("--limit", type=int, default=16)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # onnxruntime's quantizer warns once per bias
    model, settings = load_model(args.ckpt, required_settings=("mean", "std"))
    normalize = Normalize(settings["mean"], settings["std"])
    paths = calibration_images(args.calibration, args.count)
    fp32 = export_onnx(model)
    with tempfile.TemporaryDirectory() as scratch:
        models = {"fp32": fp32, "nncf": quantize_int8(fp32, paths, normalize),
                  "onnxruntime": onnxruntime_int8(fp32, paths, normalize, Path(scratch))}
    core = openvino.Core()
    compiled = {name: core.compile_model(core.read_model(data), "CPU",
                                         {"INFERENCE_PRECISION_HINT": "f32"})
                for name, data in models.items()}
    images = [str(item.path) for item in list_inputs(args.images)][:args.limit]
    same = {name: 0 for name in compiled}
    seconds = {name: 0.0 for name in compiled}
    total = 0
    for path in images:
        array = model_input(path, normalize)
        labels = {}
        for name, runner in compiled.items():
            tic = time.perf_counter()
            labels[name] = runner(array)[0].argmax(1)
            seconds[name] += time.perf_counter() - tic
        total += labels["fp32"].size
        for name in compiled:
            same[name] += int((labels[name] == labels["fp32"]).sum())
    print(f"{len(images)} images, calibrated on {len(paths)}; run in OpenVINO")
    for name in compiled:
        print(f"{name:12} agreement with fp32 {100 * same[name] / total:8.4f}%   "
              f"{seconds[name] / len(images):.3f} s per image")


if __name__ == "__main__":
    main()
