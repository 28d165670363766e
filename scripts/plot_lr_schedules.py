"""Regenerate doc/poly.png, doc/stepdecay.png and doc/cosine.png from the real schedulers.

Each figure plots the learning rate used at every iteration of a 30 epoch x 100 iteration run with
base rate 0.01, without warmup and with 500 warmup iterations, as produced by
:func:`utils.lr_scheduler.build_lr_scheduler`, so the pictures cannot drift from the code. Drawn
with PIL only (matplotlib is not a dependency).

Usage:
    python -m scripts.plot_lr_schedules [--out-dir doc]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from utils.lr_scheduler import build_lr_scheduler

REPO_ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 30
ITERS_PER_EPOCH = 100
BASE_LR = 0.01
WARMUP_ITERS = 500

#: (file name, scheduler name, title, extra scheduler arguments)
FIGURES = (
    ("poly.png", "poly", "poly: b * (1 - s/S)^0.9", {"power": 0.9}),
    (
        "stepdecay.png",
        "step",
        "step: b * 0.1^(t // 1000)  (decay every 10 epochs)",
        {"step_size": 10 * ITERS_PER_EPOCH, "gamma": 0.1},
    ),
    ("cosine.png", "cos", "cosine: b * (1 + cos(pi * s/S)) / 2", {}),
)

WIDTH, HEIGHT = 900, 520
LEFT, RIGHT, TOP, BOTTOM = 100, 30, 60, 80
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)
GRID, AXIS, TEXT = (225, 225, 225), (40, 40, 40), (20, 20, 20)


def learning_rates(name: str, warmup_iters: int, **kwargs: float) -> list[float]:
    """The rate used at each iteration of the example run, read from the optimizer."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=BASE_LR)
    total_iters = EPOCHS * ITERS_PER_EPOCH
    scheduler = build_lr_scheduler(
        optimizer, name, total_iters=total_iters, warmup_iters=warmup_iters, **kwargs
    )
    rates = []
    for _ in range(total_iters):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def draw_figure(
    title: str, curves: Sequence[tuple[str, tuple[int, int, int], list[float]]]
) -> Image.Image:
    """A line plot with axes, grid, ticks, axis labels, a title and a legend."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=15)
    title_font = ImageFont.load_default(size=19)
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    total_iters = len(curves[0][2])
    y_max = BASE_LR * 1.05

    def to_pixel(iteration: float, rate: float) -> tuple[float, float]:
        return (
            LEFT + plot_width * iteration / total_iters,
            TOP + plot_height * (1.0 - rate / y_max),
        )

    for tick in range(0, total_iters + 1, 5 * ITERS_PER_EPOCH):
        x, _ = to_pixel(tick, 0.0)
        draw.line([(x, TOP), (x, TOP + plot_height)], fill=GRID)
        draw.line([(x, TOP + plot_height), (x, TOP + plot_height + 6)], fill=AXIS, width=2)
        draw.text((x, TOP + plot_height + 10), str(tick), fill=TEXT, font=font, anchor="mt")
    for step in range(6):
        rate = BASE_LR * step / 5
        _, y = to_pixel(0, rate)
        draw.line([(LEFT, y), (LEFT + plot_width, y)], fill=GRID)
        draw.line([(LEFT - 6, y), (LEFT, y)], fill=AXIS, width=2)
        draw.text((LEFT - 10, y), f"{rate:.3f}", fill=TEXT, font=font, anchor="rm")
    draw.rectangle([LEFT, TOP, LEFT + plot_width, TOP + plot_height], outline=AXIS, width=2)

    # Later curves are drawn first and wider, so where two coincide both stay visible.
    for index in reversed(range(len(curves))):
        _, color, rates = curves[index]
        points = [to_pixel(iteration, rate) for iteration, rate in enumerate(rates)]
        draw.line(points, fill=color, width=2 + 2 * index, joint="curve")

    draw.text((WIDTH / 2, TOP / 2), title, fill=TEXT, font=title_font, anchor="mm")
    draw.text(
        (LEFT + plot_width / 2, HEIGHT - 22),
        f"iteration ({EPOCHS} epochs x {ITERS_PER_EPOCH} iterations, base lr b = {BASE_LR})",
        fill=TEXT, font=font, anchor="mm",
    )
    # Vertical axis label: draw horizontally on a small canvas, then rotate it.
    label = "learning rate"
    left, top, right, bottom = font.getbbox(label)
    label_image = Image.new("RGB", (right - left + 4, bottom - top + 6), "white")
    ImageDraw.Draw(label_image).text((2 - left, 3 - top), label, fill=TEXT, font=font)
    label_image = label_image.rotate(90, expand=True)
    image.paste(label_image, (14, TOP + (plot_height - label_image.height) // 2))

    legend_x, legend_y = LEFT + plot_width - 250, TOP + 14
    draw.rectangle(
        [legend_x, legend_y, legend_x + 236, legend_y + 14 + 24 * len(curves)],
        fill="white", outline=(180, 180, 180),
    )
    for index, (name, color, _) in enumerate(curves):
        y = legend_y + 19 + 24 * index
        draw.line([(legend_x + 10, y), (legend_x + 40, y)], fill=color, width=3)
        draw.text((legend_x + 50, y), name, fill=TEXT, font=font, anchor="lm")
    return image


def plot_all(out_dir: Path) -> list[Path]:
    """Write the three figures into ``out_dir`` (created if needed); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, name, title, kwargs in FIGURES:
        curves = [
            ("no warmup", BLUE, learning_rates(name, 0, **kwargs)),
            (
                f"{WARMUP_ITERS} warmup iterations",
                ORANGE,
                learning_rates(name, WARMUP_ITERS, **kwargs),
            ),
        ]
        path = out_dir / file_name
        draw_figure(title, curves).save(path, optimize=True)
        written.append(path)
    return written


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.plot_lr_schedules", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir", type=Path, default=REPO_ROOT / "doc",
        help="folder for the PNG files (default: the repository's doc/)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    for path in plot_all(args.out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
