"""Regenerate doc/colour_scheme.png and doc/results.png from a checkpoint (drawn by matplotlib).

- ``colour_scheme.png``: every class name beside its colour, from the checkpoint's settings.
- ``results.png``: val images | ground truth | prediction, one row per image. The prediction is
  made by :class:`deploy.predictor.Predictor` as inference.py makes it (same engine choice,
  preprocessing and prediction); the checkpoint's file name is written under the figure, so a
  figure always says which model drew it.

Usage:
    python -m scripts.make_figures --ckpt CKPT [--dataset coco] [--data-root ROOT] [--count 4]
    python -m scripts.make_figures --ckpt run/demo/make-demo/model_best.pth.tar --dataset demo
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

import mypath
from dataloader.custom_transforms import pil_to_uint8_tensor
from dataloader.datasets import DATASETS, build_dataset
from dataloader.utils import DatasetError
from deploy.predictor import Predictor
from utils.errors import UserError
from utils.figures import image_rows_figure, new_figure, save_png, to_rgb

REPO_ROOT = Path(__file__).resolve().parents[1]


def colour_scheme(class_names: Sequence[str], palette: Sequence[Sequence[int]],
                  columns: int = 3) -> np.ndarray:
    """A legend as RGB pixels: one swatch and ``id name`` per class, in ``columns`` columns,
    class id order (down each column)."""
    rows = -(-len(class_names) // columns)
    figure = new_figure(2.1 * columns, 0.3 * rows + 0.1)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, columns)
    axes.set_ylim(rows, 0)
    axes.set_axis_off()
    for index, (name, colour) in enumerate(zip(class_names, palette)):
        column, row = divmod(index, rows)
        axes.add_patch(_swatch(column + 0.05, row + 0.15, [c / 255 for c in colour]))
        axes.text(column + 0.2, row + 0.5, f"{index} {name}", va="center", fontsize=10,
                  parse_math=False)
    return to_rgb(figure)


def _swatch(x: float, y: float, colour: Sequence[float]):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 0.1, 0.7, facecolor=colour, edgecolor="#141414", linewidth=0.8)


def _fit(picture: Image.Image, height: int, resample: Image.Resampling) -> Image.Image:
    return picture.resize((round(picture.width * height / picture.height), height), resample)


def results_grid(rows: list[tuple[str, Image.Image, np.ndarray, np.ndarray]],
                 palette: Sequence[Sequence[int]], caption: str,
                 height: int = 240) -> np.ndarray:
    """image | ground truth | prediction for each ``(title, image, truth, prediction)`` row,
    scaled to ``height`` pixels, with ``caption`` underneath, as RGB pixels."""
    scaled = [(title, np.asarray(_fit(image, height, Image.Resampling.BILINEAR)),
               np.asarray(_fit(Image.fromarray(truth), height, Image.Resampling.NEAREST)),
               np.asarray(_fit(Image.fromarray(prediction), height, Image.Resampling.NEAREST)))
              for title, image, truth, prediction in rows]
    return image_rows_figure(scaled, palette, caption=caption, row_height=2.4)


def predictions(ckpt: str, images: list[Image.Image]) -> tuple[list[np.ndarray], dict]:
    """Class ids of each image, predicted as inference.py does with its default flags."""
    predictor, settings = Predictor.load(ckpt)
    labels = [predictor.predict(pil_to_uint8_tensor(image)).numpy() for image in images]
    return labels, settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.make_figures", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint or .onnx file")
    parser.add_argument("--dataset", default="coco", choices=sorted(DATASETS),
                        help="whose val images to segment")
    parser.add_argument("--data-root", help="dataset folder (default: as train.py finds it, "
                        "e.g. $DEEPLAB_COCO_ROOT)")
    parser.add_argument("--count", type=int, default=4, help="val images in results.png")
    parser.add_argument("--first", type=int, default=0, help="index of the first val image")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "doc"))
    parser.add_argument("--caption", default="", help="added to the figure's caption")
    args = parser.parse_args(argv)
    try:
        write_figures(ckpt=args.ckpt, dataset=args.dataset, data_root=args.data_root,
                      first=args.first, count=args.count, out_dir=Path(args.out_dir),
                      caption=args.caption)
    except (UserError, DatasetError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def write_figures(*, ckpt: str, dataset: str, data_root: str | None, first: int, count: int,
                  out_dir: Path, caption: str) -> None:
    """Segment val images ``first`` .. ``first + count - 1`` of ``dataset`` with ``ckpt`` and
    write ``colour_scheme.png`` and ``results.png`` into ``out_dir``."""
    val = build_dataset(dataset, mypath.db_root_dir(dataset, root=data_root), "val")
    indices = range(first, min(first + count, len(val)))
    samples = [val.load_sample(i) for i in indices]
    images = [image for image, _ in samples]
    labels, settings = predictions(ckpt, images)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_png(out_dir / "colour_scheme.png",
             colour_scheme(settings["class_names"], settings["palette"]))
    caption = f"prediction: {Path(ckpt).name} ({settings['backbone']}) {caption}"
    rows = [(val.sample_name(i), image, np.asarray(truth), prediction)
            for i, (image, truth), prediction in zip(indices, samples, labels)]
    save_png(out_dir / "results.png", results_grid(rows, settings["palette"], caption.strip()))
    print(f"wrote {out_dir / 'colour_scheme.png'} and {out_dir / 'results.png'}")


if __name__ == "__main__":
    sys.exit(main())
