#!/usr/bin/env python
"""Segment images with a trained DeepLabV3+ checkpoint and write colour-coded masks.

    python inference.py --in-path imgs --ckpt run/coco/deeplab-resnet101/experiment_0/model_best.pth.tar

Each input ``name.ext`` gives ``<out-path>/name.png``: a palette PNG of the input's width and
height whose pixel values are class ids and whose palette shows the class colours. The model's
settings (backbone, output stride, classes, normalisation) come from the checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from dataloader.utils import DatasetError, colorize, load_image
from modeling.deeplab import DeepLab
from modeling.predict import predict_probabilities
from utils.fileio import atomic_write
from utils.saver import CheckpointError, load_checkpoint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_CKPT = "modeling/deeplab-resnet.pth.tar"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Predict colour-coded segmentation masks with a DeepLabV3+ checkpoint",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--in-path", required=True, help="an image file or a folder of images")
    parser.add_argument("--out-path", default="inference_results", help="folder for the masks")
    parser.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint written by train.py")
    parser.add_argument("--size", type=int,
                        help="resize the short side of each input before predicting "
                             "(the mask keeps the input's size)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="multi-scale prediction: input scales whose softmax is averaged")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                        help="also average the horizontally flipped input")
    parser.add_argument("--no-cuda", action="store_true", help="run on the CPU even with a GPU")
    return parser


def list_images(in_path: Path) -> list[Path]:
    """The images to segment: ``in_path`` itself, or the image files directly inside it."""
    if in_path.is_file():
        return [in_path]
    if in_path.is_dir():
        return sorted(p for p in in_path.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    raise FileNotFoundError(f"--in-path {in_path} does not exist")


def load_model(ckpt: str, device: torch.device) -> tuple[DeepLab, dict]:
    """Rebuild the model described by a checkpoint's settings and load its weights."""
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(
            f"checkpoint {ckpt} not found: train one with `python train.py` (or `make demo`) and "
            f"pass --ckpt run/<dataset>/<checkname>/experiment_<k>/model_best.pth.tar")
    checkpoint = load_checkpoint(ckpt, map_location="cpu", required_keys=("model", "settings"))
    settings = checkpoint["settings"]
    model = DeepLab.from_settings(settings)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), settings


@torch.no_grad()
def segment(model: DeepLab, image, settings: dict, device: torch.device, size: int | None,
            scales: list[float], flip: bool) -> np.ndarray:
    """Class ids ``(H, W)`` uint8 for one PIL RGB image, at the image's own size."""
    width, height = image.size
    tensor = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)
    if size is not None:
        tensor = TF.resize(tensor, [size], antialias=True)
    tensor = TF.normalize(tensor, settings["mean"], settings["std"]).unsqueeze(0).to(device)
    probabilities = predict_probabilities(model, tensor, (height, width), scales, flip)
    return probabilities.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()


def main(args: argparse.Namespace) -> int:
    """Segment every input; returns the number of inputs that failed."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.no_cuda else "cpu")
    images = list_images(Path(args.in_path))
    if not images:
        raise FileNotFoundError(f"--in-path {args.in_path} holds no image files "
                                f"({', '.join(IMAGE_SUFFIXES)})")
    model, settings = load_model(args.ckpt, device)
    out_dir = Path(args.out_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in tqdm(images, desc="inference", dynamic_ncols=True):
        try:
            image = load_image(path)
        except DatasetError as error:
            # One bad file must not cost the others their masks.
            tqdm.write(f"error: {error}; skipped", file=sys.stderr)
            failures += 1
            continue
        label = segment(model, image, settings, device, args.size, args.scales, args.flip)
        # Atomic: an interrupted run never leaves a half-written mask behind.
        mask = colorize(label, settings["palette"])
        atomic_write(out_dir / f"{path.stem}.png", lambda file: mask.save(file, format="PNG"))
    print(f"{len(images) - failures} masks written to {out_dir}"
          + (f"; {failures} inputs failed" if failures else ""))
    return failures


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        failures = main(args)
    except (FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli())
