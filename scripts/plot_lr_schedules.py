"""Regenerate doc/poly.png, doc/stepdecay.png and doc/cosine.png from the real schedulers.

Each figure plots the learning rate used at every iteration of a 30 epoch x 100 iteration run with
base rate 0.01, without warmup and with 500 warmup iterations, as produced by
:func:`utils.lr_scheduler.build_lr_scheduler`, so the pictures cannot drift from the code. Drawn
with matplotlib (``pip install -r requirements-plot.txt``).

Usage:
    python -m scripts.plot_lr_schedules [--out-dir doc]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from utils.errors import UserError
from utils.figures import new_figure, save_png, to_rgb
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

#: Figure size in inches (900 x 520 pixels at utils.figures.DPI = 100).
WIDTH, HEIGHT = 9.0, 5.2
BLUE, ORANGE = "#1f77b4", "#ff7f0e"


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


def draw_figure(title: str, curves: Sequence[tuple[str, str, list[float]]]):
    """A line plot of each ``(legend, colour, rates)`` curve: axes, grid, labels, title, legend.

    Later curves are drawn first and wider, so where two coincide both stay visible.
    """
    figure = new_figure(WIDTH, HEIGHT)
    axes = figure.add_subplot()
    for index in reversed(range(len(curves))):
        name, color, rates = curves[index]
        axes.plot(range(len(rates)), rates, color=color, linewidth=1.5 + 2 * index, label=name,
                  zorder=len(curves) - index)
    total_iters = len(curves[0][2])
    axes.set_xlim(0, total_iters)
    axes.set_ylim(0, BASE_LR * 1.05)
    axes.set_xticks(range(0, total_iters + 1, 5 * ITERS_PER_EPOCH))
    axes.grid(color="#e1e1e1")
    axes.set_title(title)
    axes.set_xlabel(f"iteration ({EPOCHS} epochs x {ITERS_PER_EPOCH} iterations, "
                    f"base lr b = {BASE_LR})")
    axes.set_ylabel("learning rate")
    handles, labels = axes.get_legend_handles_labels()
    axes.legend(handles[::-1], labels[::-1], loc="upper right")  # in the order given
    figure.tight_layout()
    return figure


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
        save_png(path, to_rgb(draw_figure(title, curves)))
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


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        paths = plot_all(args.out_dir)
    except UserError as error:  # matplotlib missing
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
