#!/usr/bin/env python
"""Check scripts/convert_checkpoint.py against the original code it converts from.

    git clone https://github.com/jfzhang95/pytorch-deeplab-xception /tmp/jf
    python -m scripts.verify_conversion --original-repo /tmp/jf --images $DEEPLAB_COCO_ROOT/val2017

1. Builds that repository's ``DeepLab(backbone='resnet', output_stride=16, num_classes=21)``
   with its own code (ImageNet download turned off), gives it random weights and BatchNorm
   running statistics measured on real images (then randomly scaled), takes one SGD step with
   its own optimiser set-up so the optimiser state is real, and saves it with its own ``Saver``
   exactly as its ``train.py`` does (``state_dict``, ``optimizer``, ``epoch``, ``best_pred`` from
   its own ``Evaluator``), once as saved there and once with the ``module.`` prefix of
   ``nn.DataParallel``.
2. Converts each file with ``python -m scripts.convert_checkpoint`` (a separate process, as a
   user runs it) and rebuilds the result as a :class:`modeling.deeplab.DeepLab` from its settings.
3. Runs both models on real images: the same tensor (from the original's own ``Normalize`` and
   ``ToTensor``) into both, and this project's whole inference path (:class:`Predictor
   <deploy.predictor.Predictor>` as ``inference.py --engine torch --amp off`` runs it, with its
   own preprocessing) against the original's argmax. Reports the largest logit difference
   relative to the largest logit magnitude and the pixels whose argmax differs. Exits 1 if, for
   the same input, the relative difference is above ``--tolerance`` or any pixel's argmax
   differs, or if the inference path's relative difference is above ``--tolerance``. (Its input
   differs from the original's by float rounding, so its argmax may flip where the two best
   classes are nearly tied; those pixels and their gaps are reported.)

``--write-keys FILE`` instead writes the original model's state-dict names and shapes as JSON
(the test fixture ``tests/fixtures/jfzhang95_resnet101_keys.json``).

The original repository is read from ``--original-repo`` at run time, never copied here. Its
packages ``modeling``/``utils`` share names with ours, so its ``modeling`` is imported under a
swapped ``sys.modules`` and its ``Saver``, ``Evaluator`` and transforms are loaded from their
files (its ``dataloaders`` package imports SciPy, which is not needed for the transforms).
Everything after that reading is :func:`verify`, which takes the original's code as an argument:
``tests/modeling/test_convert.py`` runs it against a stand-in made of this project's modules.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dataloader.custom_transforms import Normalize, pil_to_uint8_tensor
from deploy.predictor import Predictor
from modeling.checkpoint import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]

NUM_CLASSES = 21
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.verify_conversion",
        description="Compare a converted checkpoint with jfzhang95/pytorch-deeplab-xception",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--original-repo", required=True, metavar="PATH",
                        help="a checkout of jfzhang95/pytorch-deeplab-xception")
    parser.add_argument("--images", metavar="DIR", help="folder of real images (e.g. COCO val2017)")
    parser.add_argument("--num-images", type=int, default=10, help="how many images to compare")
    parser.add_argument("--out-stride", type=int, default=16, choices=(8, 16))
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed max|ours - theirs| / max|theirs| per image")
    parser.add_argument("--work-dir", help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--json", metavar="FILE", help="also write the measurements here")
    parser.add_argument("--write-keys", metavar="FILE",
                        help="only write the original's state-dict names and shapes to FILE")
    parser.add_argument("--seed", type=int, default=0)
    return parser


# ------------------------------------------------------------------------ the original's code


@contextmanager
def _original_modeling(repo: Path) -> Iterator[None]:
    """Import the original's top-level ``modeling`` package in place of ours, then put ours back.

    Modules already imported keep working after the swap: they hold references, not names.
    """
    ours = {name: module for name, module in sys.modules.items()
            if name == "modeling" or name.startswith("modeling.")}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, str(repo))
    try:
        yield
    finally:
        sys.path.remove(str(repo))
        for name in [n for n in sys.modules if n == "modeling" or n.startswith("modeling.")]:
            del sys.modules[name]
        sys.modules.update(ours)


def _load_file(path: Path, name: str) -> ModuleType:
    """Import one file of the original under a private name (it imports only std libs)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_original(repo: Path) -> SimpleNamespace:
    """The original's ``DeepLab`` class, ``Saver``, ``Evaluator`` and eval transforms."""
    if not (repo / "modeling" / "deeplab.py").is_file():
        raise SystemExit(f"error: --original-repo {repo} has no modeling/deeplab.py: pass a "
                         "checkout of jfzhang95/pytorch-deeplab-xception")
    with _original_modeling(repo):
        deeplab = __import__("modeling.deeplab", fromlist=["DeepLab"])
        resnet = __import__("modeling.backbone.resnet", fromlist=["ResNet"])
    # Its ResNet-101 downloads ImageNet weights when built; random weights are the point here.
    resnet.ResNet._load_pretrained_model = lambda self: None
    return SimpleNamespace(
        DeepLab=deeplab.DeepLab,
        Saver=_load_file(repo / "utils" / "saver.py", "jfzhang95_saver").Saver,
        Evaluator=_load_file(repo / "utils" / "metrics.py", "jfzhang95_metrics").Evaluator,
        transforms=_load_file(repo / "dataloaders" / "custom_transforms.py",
                              "jfzhang95_transforms"),
    )


def build_original(original: SimpleNamespace, output_stride: int, sync_bn: bool) -> nn.Module:
    """The original's ``DeepLab(backbone='resnet')`` with 21 classes, random weights."""
    return original.DeepLab(backbone="resnet", output_stride=output_stride,
                            num_classes=NUM_CLASSES, sync_bn=sync_bn, freeze_bn=False)


def write_keys(original: SimpleNamespace, path: Path) -> None:
    """Write ``[[name, shape], ...]`` of the original's ResNet-101 state dict as JSON."""
    model = build_original(original, 16, sync_bn=False)
    entries = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    # One entry per line: a readable diff if that repository's model ever changes.
    path.write_text("[\n" + ",\n".join(json.dumps(entry) for entry in entries) + "\n]\n")
    print(f"{path}: {len(entries)} entries, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")


# ------------------------------------------------------------------------ a trained-looking model


def randomise(model: nn.Module, calibration: torch.Tensor, generator: torch.Generator) -> None:
    """Random weights; BatchNorm statistics measured on real images, then randomly scaled.

    Measuring first keeps activations in a sane range through 100 layers; the random affine
    parameters and the scaling make every statistic non-trivial (no 0 mean, no unit variance).
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration batches
        model.train()
        for batch in calibration.split(2):
            model(batch)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.1
                shape = module.weight.shape
                module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_mean.mul_(0.8 + 0.4 * torch.rand(shape, generator=generator))
                module.running_var.mul_(0.8 + 0.4 * torch.rand(shape, generator=generator))
    model.eval()


def original_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser of the original's train.py (default flags), after one step."""
    parameters = [{"params": model.get_1x_lr_params(), "lr": 0.007},
                  {"params": model.get_10x_lr_params(), "lr": 0.07}]
    optimizer = torch.optim.SGD(parameters, momentum=0.9, weight_decay=5e-4, nesterov=False)
    model.train()
    images = torch.randn(2, 3, 65, 65)
    labels = torch.randint(0, NUM_CLASSES, (2, 65, 65))
    F.cross_entropy(model(images), labels, ignore_index=255).backward()
    # Take the step with zero learning rates: the optimiser state is real, the weights unchanged.
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    return optimizer


def save_like_original(original: SimpleNamespace, model: nn.Module,
                       optimizer: torch.optim.Optimizer, work_dir: Path,
                       data_parallel_prefix: bool) -> Path:
    """Save as the original's train.py does, with its own Saver, in ``work_dir/run/...``.

    Returns:
        The checkpoint file written.
    """
    evaluator = original.Evaluator(NUM_CLASSES)
    rng = np.random.default_rng(0)
    target = rng.integers(0, NUM_CLASSES, (4, 32, 32))
    evaluator.add_batch(target, np.where(rng.random(target.shape) < 0.6, target, 0))
    best_pred = evaluator.Mean_Intersection_over_Union()  # a NumPy float64, as in their runs
    state_dict = model.state_dict()
    if data_parallel_prefix:
        # What nn.DataParallel(model).state_dict() holds; built by hand because DataParallel
        # moves the model to a GPU where there is one.
        state_dict = {"module." + key: value for key, value in state_dict.items()}
    args = SimpleNamespace(dataset="pascal", checkname="deeplab-resnet")
    previous = os.getcwd()
    os.chdir(work_dir)  # their Saver writes under ./run
    try:
        saver = original.Saver(args)
        saver.save_checkpoint({"epoch": 50, "state_dict": state_dict,
                               "optimizer": optimizer.state_dict(), "best_pred": best_pred},
                              is_best=True)
        return work_dir / saver.experiment_dir / "checkpoint.pth.tar"
    finally:
        os.chdir(previous)


# ------------------------------------------------------------------------ comparison


def convert_with_our_script(src: Path, dst: Path, output_stride: int) -> str:
    """Run scripts/convert_checkpoint.py as a user would; returns its one-line summary."""
    command = [sys.executable, "-m", "scripts.convert_checkpoint", str(src), str(dst),
               "--out-stride", str(output_stride)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"conversion failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


def original_input(original: SimpleNamespace, image: Image.Image) -> torch.Tensor:
    """``(1, 3, H, W)``: the original's evaluation normalisation (its own Normalize and ToTensor,
    NumPy code), without its crop."""
    transforms = original.transforms
    sample = {"image": image, "label": Image.new("L", image.size)}
    sample = transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))(sample)
    return transforms.ToTensor()(sample)["image"].unsqueeze(0)


@torch.no_grad()
def compare(original: SimpleNamespace, theirs: nn.Module, ckpt: Path,
            images: list[Path]) -> list[dict[str, Any]]:
    """Per image: the same input tensor into both models, and this project's inference path
    (its own preprocessing) against the original's argmax."""
    ours, settings = load_model(ckpt, required_settings=("mean", "std"))
    predictor, _ = Predictor.load(str(ckpt), engine="torch", device="cpu", amp="off")
    normalize = Normalize(settings["mean"], settings["std"])
    rows = []
    for path in images:
        image = Image.open(path).convert("RGB")
        pixels = pil_to_uint8_tensor(image)
        x = original_input(original, image)
        their_logits = theirs(x)
        our_logits = ours(x)["out"]
        scale = their_logits.abs().max().item()
        difference = (our_logits - their_logits).abs().max().item()
        their_argmax = their_logits.argmax(dim=1)[0]

        # This project's own path: inference.py's preprocessing and prediction. Its input
        # differs from the original's by float rounding (NumPy normalises in float64, Normalize
        # in float32), so near-ties between the two best classes may flip; their gap is reported.
        our_input = normalize(pixels).unsqueeze(0)
        own_input_logits = ours(our_input)["out"]
        segmented = predictor.predict(pixels).long()
        flipped = segmented != their_argmax
        top2 = their_logits[0].topk(2, dim=0).values
        gaps = (top2[0] - top2[1])[flipped]
        rows.append({
            "image": path.name,
            "size": list(image.size),
            "classes_predicted": int(their_argmax.unique().numel()),
            "pixels": their_argmax.numel(),
            "max_abs_logit": scale,
            "max_abs_difference": difference,
            "max_relative_difference": difference / scale,
            "argmax_differing_pixels": int((our_logits.argmax(dim=1)[0] != their_argmax).sum()),
            "input_max_abs_difference": (our_input - x).abs().max().item(),
            "inference_max_relative_difference":
                (own_input_logits - their_logits).abs().max().item() / scale,
            "inference_differing_pixels": int(flipped.sum()),
            "inference_differing_max_top2_gap": gaps.max().item() if len(gaps) else None,
        })
    return rows


def image_paths(folder: str, count: int) -> tuple[list[Path], list[Path]]:
    """``count`` images of ``folder`` to compare on, and its last 2 to measure BatchNorm
    statistics on (name order)."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < count + 2:
        raise SystemExit(f"error: --images {folder} has {len(paths)} images; need "
                         f"{count + 2} (2 calibrate BatchNorm)")
    return paths[:count], paths[-2:]


def summarise(rows: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """One conversion's totals over its images, and whether it passes.

    The gate is the conversion: the same input must give the same logits and argmax. The
    inference.py path must stay within the tolerance; its argmax flips at near-ties are reported,
    not failed (they come from input rounding, not from the weights).
    """
    summary = {
        "max_relative_difference": max(row["max_relative_difference"] for row in rows),
        "argmax_differing_pixels": sum(row["argmax_differing_pixels"] for row in rows),
        "inference_differing_pixels": sum(row["inference_differing_pixels"] for row in rows),
        "pixels": sum(row["pixels"] for row in rows),
        "inference_max_relative_difference":
            max(row["inference_max_relative_difference"] for row in rows),
    }
    summary["passed"] = (summary["max_relative_difference"] <= tolerance
                         and summary["argmax_differing_pixels"] == 0
                         and summary["inference_max_relative_difference"] <= tolerance)
    return summary


def print_run(label: str, message: str, rows: list[dict[str, Any]], summary: dict[str, Any],
              seconds: float) -> None:
    print(f"\n[{label}] {message}")
    for row in rows:
        gap = row["inference_differing_max_top2_gap"]
        print(f"  {row['image']} {row['size'][0]}x{row['size'][1]}, "
              f"{row['classes_predicted']} classes predicted: same input: max|logit| "
              f"{row['max_abs_logit']:.4g}, max|diff| {row['max_abs_difference']:.3g} "
              f"(relative {row['max_relative_difference']:.3g}), argmax differs on "
              f"{row['argmax_differing_pixels']} px | inference.py path: input max|diff| "
              f"{row['input_max_abs_difference']:.2g}, relative logit diff "
              f"{row['inference_max_relative_difference']:.2g}, argmax differs on "
              f"{row['inference_differing_pixels']} px"
              + (f" (top-2 logit gaps there <= {gap:.3g})" if gap is not None else ""))
    pixels = summary["pixels"]
    print(f"  {len(rows)} images, {pixels:,} pixels, same input: max relative logit "
          f"difference {summary['max_relative_difference']:.3g}; argmax identical on "
          f"{pixels - summary['argmax_differing_pixels']:,}/{pixels:,} pixels | inference.py "
          f"path: max relative logit difference "
          f"{summary['inference_max_relative_difference']:.2g}, argmax identical on "
          f"{pixels - summary['inference_differing_pixels']:,}/{pixels:,}; {seconds:.0f} s")


def verify(original: SimpleNamespace, *, images: list[Path], calibration_images: list[Path],
           output_stride: int = 16, tolerance: float = 1e-4, work_dir: Path,
           seed: int = 0) -> dict[str, Any]:
    """Steps 1-3 of the module docstring with the original's code ``original`` (from
    :func:`load_original`, or a stand-in with its interface).

    Args:
        images: compared on, whole.
        calibration_images: BatchNorm statistics are measured on these (resized to 321 x 321).
        work_dir: the checkpoints are written under it.

    Returns:
        The measurements; ``"passed"`` says whether every conversion passed the gate.
    """
    torch.manual_seed(seed)
    calibration = torch.cat([
        original_input(original, Image.open(p).convert("RGB").resize((321, 321)))
        for p in calibration_images])
    theirs = build_original(original, output_stride, sync_bn=False)
    synced = build_original(original, output_stride, sync_bn=True)
    same_layout = [(k, v.shape) for k, v in theirs.state_dict().items()] == [
        (k, v.shape) for k, v in synced.state_dict().items()]
    del synced
    randomise(theirs, calibration, torch.Generator().manual_seed(seed))
    optimizer = original_optimizer(theirs)

    report: dict[str, Any] = {
        "original_entries": len(theirs.state_dict()),
        "original_parameters": sum(p.numel() for p in theirs.parameters()),
        "sync_bn_layout_identical": same_layout,
        "tolerance": tolerance,
        "runs": {},
    }
    print(f"original: {report['original_entries']} entries, "
          f"{report['original_parameters']:,} parameters; SynchronizedBatchNorm2d layout "
          f"identical: {same_layout}")
    passed = same_layout
    for prefix in (False, True):
        label = "module. prefix" if prefix else "as saved by train.py"
        folder = work_dir / ("prefixed" if prefix else "plain")
        folder.mkdir(parents=True, exist_ok=True)
        src = save_like_original(original, theirs, optimizer, folder, data_parallel_prefix=prefix)
        dst = src.with_name("converted.pth.tar")
        tic = time.perf_counter()
        message = convert_with_our_script(src, dst, output_stride)
        rows = compare(original, theirs, dst, images)
        summary = summarise(rows, tolerance)
        print_run(label, message, rows, summary, time.perf_counter() - tic)
        report["runs"][label] = {"source": str(src), "converted": str(dst), "images": rows,
                                 **summary}
        passed = passed and summary["passed"]
    report["passed"] = passed
    return report


def main(args: argparse.Namespace) -> int:
    original = load_original(Path(args.original_repo))
    if args.write_keys:
        write_keys(original, Path(args.write_keys))
        return 0
    if not args.images:
        raise SystemExit("error: --images DIR is needed (or --write-keys FILE)")
    images, calibration_images = image_paths(args.images, args.num_images)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="verify_conversion_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    report = verify(original, images=images, calibration_images=calibration_images,
                    output_stride=args.out_stride, tolerance=args.tolerance, work_dir=work_dir,
                    seed=args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'PASSED' if report['passed'] else 'FAILED'}: tolerance {args.tolerance:g} "
          f"relative; argmax identical on every pixel for the same input")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
