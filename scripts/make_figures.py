"""Regenerate doc/colour_scheme.png and doc/results.png from a checkpoint (Pillow only).

- ``colour_scheme.png``: every class name beside its colour, from the checkpoint's settings.
- ``results.png``: real COCO val images | ground truth | prediction, one row per image. The
  prediction is made by :class:`deploy.predictor.Predictor`, as inference.py makes it (same engine choice, preprocessing and
  prediction); the checkpoint's file name is written under the figure, so a figure always says
  which model drew it.

Usage:
    python -m scripts.make_figures --ckpt CKPT [--data-root $DEEPLAB_COCO_ROOT] [--count 4]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import mypath
from dataloader.custom_transforms import pil_to_uint8_tensor
from dataloader.datasets.coco import COCOSegmentation
from deploy.outputs import color_image
from deploy.predictor import Predictor

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT, BACKGROUND = (20, 20, 20), (255, 255, 255)
ROW_HEIGHT = 180
GAP = 6


def colour_scheme(class_names: Sequence[str], palette: Sequence[Sequence[int]],
                  columns: int = 3) -> Image.Image:
    """A legend: one swatch and name per class, in ``columns`` columns, class id order."""
    font = ImageFont.load_default(size=16)
    swatch, cell_width, row = 22, 210, 30
    rows = -(-len(class_names) // columns)
    image = Image.new("RGB", (columns * cell_width + 10, rows * row + 10), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for index, (name, colour) in enumerate(zip(class_names, palette)):
        x, y = 10 + (index // rows) * cell_width, 8 + (index % rows) * row
        draw.rectangle((x, y, x + swatch, y + swatch), fill=tuple(colour), outline=TEXT)
        draw.text((x + swatch + 8, y + swatch / 2), f"{index} {name}", fill=TEXT, font=font,
                  anchor="lm")
    return image


def _fit(picture: Image.Image, resample: Image.Resampling) -> Image.Image:
    width = round(picture.width * ROW_HEIGHT / picture.height)
    return picture.resize((width, ROW_HEIGHT), resample)


def results_grid(rows: list[tuple[Image.Image, np.ndarray, np.ndarray]],
                 palette: Sequence[Sequence[int]], caption: str) -> Image.Image:
    """image | ground truth | prediction for each row, titled, with ``caption`` underneath."""
    font = ImageFont.load_default(size=16)
    cells = [[_fit(image, Image.Resampling.BILINEAR),
              _fit(Image.fromarray(color_image(truth, palette)), Image.Resampling.NEAREST),
              _fit(Image.fromarray(color_image(prediction, palette)), Image.Resampling.NEAREST)]
             for image, truth, prediction in rows]
    column_widths = [max(row[i].width for row in cells) for i in range(3)]
    width = sum(column_widths) + 4 * GAP
    height = 30 + len(cells) * (ROW_HEIGHT + GAP) + 30
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    x = GAP
    for title, column_width in zip(("image", "ground truth", "prediction"), column_widths):
        draw.text((x + column_width / 2, 15), title, fill=TEXT, font=font, anchor="mm")
        x += column_width + GAP
    for row_index, row in enumerate(cells):
        x, y = GAP, 30 + row_index * (ROW_HEIGHT + GAP)
        for cell, column_width in zip(row, column_widths):
            grid.paste(cell, (x, y))
            x += column_width + GAP
    draw.text((GAP, height - 15), caption, fill=TEXT, font=font, anchor="lm")
    return grid


def predictions(ckpt: str, images: list[Image.Image]) -> tuple[list[np.ndarray], dict]:
    """Class ids of each image, predicted as inference.py does with its default flags."""
    predictor, settings = Predictor.load(ckpt)
    labels = [predictor.predict(pil_to_uint8_tensor(image)).numpy() for image in images]
    return labels, settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.make_figures", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint or .onnx file")
    parser.add_argument("--data-root", help="COCO 2017 root (default: $DEEPLAB_COCO_ROOT)")
    parser.add_argument("--count", type=int, default=4, help="val images in results.png")
    parser.add_argument("--first", type=int, default=0, help="index of the first val image")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "doc"))
    parser.add_argument("--caption", default="", help="added to the figure's caption")
    args = parser.parse_args(argv)
    val = COCOSegmentation(mypath.db_root_dir("coco", root=args.data_root), split="val")
    indices = range(args.first, min(args.first + args.count, len(val)))
    samples = [val.load_sample(i) for i in indices]
    images = [image for image, _ in samples]
    labels, settings = predictions(args.ckpt, images)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colour_scheme(settings["class_names"], settings["palette"]).save(
        out_dir / "colour_scheme.png")
    caption = f"prediction: {Path(args.ckpt).name} ({settings['backbone']}) {args.caption}"
    rows = [(image, np.asarray(truth), prediction)
            for (image, truth), prediction in zip(samples, labels)]
    results_grid(rows, settings["palette"], caption.strip()).save(out_dir / "results.png")
    print(f"wrote {out_dir / 'colour_scheme.png'} and {out_dir / 'results.png'}")


if __name__ == "__main__":
    main()
