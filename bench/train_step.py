#!/usr/bin/env python
"""Training-step throughput of DeepLabV3+ under the speed options of train.py.

Each configuration runs the same forward + backward + SGD step on random data in this process;
the first configuration (fp32, contiguous) is the baseline and every other is printed as a ratio
of its images per second. Run it on the machine you train on:

    python -m bench.train_step                           # GPU if present, else CPU
    python -m bench.train_step --backbone resnet101 --crop-size 513 --batch-size 8 --compile
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from modeling.deeplab import DeepLab


def step_time(model, optimizer, images, targets, dtype, steps: int, warmup: int) -> float:
    """Median seconds per training step."""
    device_type = images.device.type
    times = []
    for i in range(warmup + steps):
        if device_type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images)["out"].float(), targets, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--no-cuda", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.no_cuda else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    configs = [("fp32", None, False, False), ("fp32 channels_last", None, True, False),
               ("bf16 autocast", torch.bfloat16, False, False),
               ("bf16 channels_last", torch.bfloat16, True, False)]
    if device.type == "cuda":
        configs.append(("fp16 channels_last", torch.float16, True, False))
    if args.compile:
        configs.append(("bf16 channels_last compile", torch.bfloat16, True, True))

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, generator=generator)
    targets = torch.randint(0, 21, (args.batch_size, args.crop_size, args.crop_size),
                            generator=generator)
    print(f"device {device}, {args.backbone} os{args.output_stride}, batch {args.batch_size} x "
          f"{args.crop_size}^2, median of {args.steps} steps after {args.warmup} warm-up")
    baseline = None
    for name, dtype, channels_last, compiled in configs:
        torch.manual_seed(0)
        model = DeepLab(backbone=args.backbone, output_stride=args.output_stride).to(device)
        x = images.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        runner = torch.compile(model) if compiled else model
        seconds = step_time(runner, optimizer, x, targets.to(device), dtype, args.steps,
                            args.warmup + (3 if compiled else 0))
        rate = args.batch_size / seconds
        baseline = baseline or rate
        print(f"{name:28s} {rate:8.2f} images/s   x{rate / baseline:.2f} of fp32")


if __name__ == "__main__":
    main()
