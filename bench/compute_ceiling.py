#!/usr/bin/env python
"""How fast fp32 inference can be on this machine: the model's floating-point work per image
against the CPU's measured matrix-multiply rate.

Counts the FLOPs of one forward pass (``torch.utils.flop_counter``: convolutions and matrix
products, 2 per multiply-add), measures the rate of a large fp32 matrix product with all of
PyTorch's threads (the best case for any convolution, which runs as such products), and times
the model in PyTorch and, when installed, OpenVINO. ``FLOPs / rate`` is the time no fp32
runtime can beat by much; the achieved share of the rate says how close each one is.

    python -m bench.compute_ceiling --backbone resnet101 --out-stride 16 --size 480 640
    python -m bench.compute_ceiling ... --vf-dir /tmp/vf   # VainF's model counted beside ours
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from deploy.onnx_model import INPUT_NAME, export_onnx
from modeling.deeplab import DeepLab


def flops(model: torch.nn.Module, image: torch.Tensor) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops()


def matmul_rate(side: int = 4096, repeats: int = 10) -> float:
    """FLOP/s of an fp32 ``side x side`` matrix product (best of three batches)."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b
    best = float("inf")
    for _ in range(3):
        tic = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - tic) / repeats)
    return 2 * side ** 3 / best


def best_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    return min(times)


def vf_model(vf_dir: str, num_classes: int, output_stride: int,
             name: str = "deeplabv3plus_resnet101") -> torch.nn.Module:
    sys.path.insert(0, vf_dir)
    import network  # VainF/DeepLabV3Plus-Pytorch, read from its checkout, never vendored

    return getattr(network.modeling, name)(
        num_classes=num_classes, output_stride=output_stride, pretrained_backbone=False).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compute_ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--out-stride", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vf-dir", help="a VainF/DeepLabV3Plus-Pytorch checkout")
    parser.add_argument("--vf-model", default="deeplabv3plus_resnet101",
                        help="its model counted beside ours (deeplabv3plus_mobilenet: MobileNetV2)")
    args = parser.parse_args(argv)

    image = torch.randn(1, 3, *args.size)
    model = DeepLab(backbone=args.backbone, output_stride=args.out_stride,
                    num_classes=args.num_classes).eval()
    rate = matmul_rate()
    work = flops(model, image)
    print(f"{torch.get_num_threads()} threads; fp32 {4096}x{4096} matrix product: "
          f"{rate / 1e9:.1f} GFLOP/s")
    print(f"DeepLabV3+ {args.backbone} os{args.out_stride}, {args.size[0]}x{args.size[1]}: "
          f"{work / 1e9:.1f} GFLOP per image; at that rate {work / rate:.3f} s per image")
    if args.vf_dir:
        other = flops(vf_model(args.vf_dir, args.num_classes, args.out_stride, args.vf_model),
                      image)
        print(f"VainF {args.vf_model}: {other / 1e9:.1f} GFLOP per image "
              f"({work / other:.2f}x less work for it)")
    with torch.inference_mode():
        seconds = best_seconds(lambda: model(image), args.repeats)
    print(f"PyTorch fp32: {seconds:.3f} s per image, {work / seconds / 1e9:.1f} GFLOP/s = "
          f"{work / seconds / rate:.0%} of the matrix-product rate")
    if importlib.util.find_spec("openvino") is not None:
        import openvino

        compiled = openvino.Core().compile_model(
            openvino.Core().read_model(export_onnx(model)), "CPU",
            {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        request, array = compiled.create_infer_request(), image.numpy()
        seconds = best_seconds(lambda: request.infer({INPUT_NAME: array}), args.repeats)
        print(f"OpenVINO fp32: {seconds:.3f} s per image, {work / seconds / 1e9:.1f} GFLOP/s = "
              f"{work / seconds / rate:.0%} of the matrix-product rate")


if __name__ == "__main__":
    main()
