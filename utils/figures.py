"""Figures drawn with matplotlib: what an evaluation got wrong, and the plots of scripts/.

matplotlib is an optional extra (``requirements-plot.txt``): it is imported only when a figure is
drawn, and only through its object-oriented API on an Agg canvas. No pyplot, no backend switch,
nothing global changes in the process that imports this module.

Every evaluation figure is returned as an ``(H, W, 3)`` uint8 RGB array, so that the same pixels
go to TensorBoard (:meth:`utils.summaries.TensorboardSummary.add_figures`) and into a PNG
(:func:`save_png`). Their size is bounded whatever the class count: the confusion matrix shows at
most ``max_classes`` classes, the bar chart at most ``max_bars`` bars, a figure of image rows is
at most :data:`MAX_ROWS_HEIGHT` inches tall.

Names from the data (class names, file names) are drawn as they are written: matplotlib's
mathtext is off for them (``parse_math=False``), so ``price $5 and $10`` keeps its dollars and
``$\\frac{x$`` is no error.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.fileio import atomic_write
from utils.labels import colorize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from utils.metrics import ScoredImage

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -r requirements-plot.txt"
DPI = 100
#: Tallest figure of image rows, in inches (at :data:`DPI`): more rows get shorter ones.
MAX_ROWS_HEIGHT = 64.0
#: The evaluation figures by name; the name is also the PNG's and the TensorBoard tag's.
EVALUATION_FIGURES = ("confusion_matrix", "per_class_iou", "worst_images")


class MatplotlibMissing(UserError):
    """A plot was asked for but matplotlib is not installed."""


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure of ``width`` x ``height`` inches on its own Agg canvas.

    Raises:
        MatplotlibMissing: one line saying how to install matplotlib.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(f"matplotlib is needed to draw plots and is not installed: "
                                f"{INSTALL_HINT}") from None
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def to_rgb(figure: Figure) -> np.ndarray:
    """Render ``figure`` and return its pixels as an ``(H, W, 3)`` uint8 array."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB array as a PNG, atomically (a reader never sees half a file)."""
    image = Image.fromarray(rgb)
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def _row_rates(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total: the share of a true class's pixels given each
    prediction; NaN rows for classes without val pixels."""
    totals = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, matrix / np.maximum(totals, 1), np.nan)


def confused_classes(matrix: np.ndarray, max_classes: int) -> list[int]:
    """Which classes the confusion matrix figure shows, in class id order.

    All of them when there are at most ``max_classes``. Otherwise the classes of the most
    confused pairs: off-diagonal pairs ranked by the share of the true class's pixels predicted
    as the other class (the rate the row-normalised figure shows; mIoU weighs every class
    equally, so a rare class that is always missed ranks above a frequent one that is missed a
    little), then by pixel count. Both classes of a pair are taken while there is room; when
    fewer pairs are confused than there is room for, the most frequent classes fill it.
    """
    count = matrix.shape[0]
    if count <= max_classes:
        return list(range(count))
    rates = np.nan_to_num(_row_rates(matrix))
    np.fill_diagonal(rates, 0)
    off_diagonal = matrix.astype(np.int64).copy()
    np.fill_diagonal(off_diagonal, 0)
    # lexsort: last key first; descending by rate, then by pixels, then ascending pair index.
    order = np.lexsort((-off_diagonal.ravel(), -rates.ravel()))
    chosen: list[int] = []
    for flat in order:
        if len(chosen) >= max_classes or off_diagonal.flat[flat] == 0:
            break
        for cls in divmod(int(flat), count):
            if cls not in chosen and len(chosen) < max_classes:
                chosen.append(cls)
    for cls in np.argsort(-matrix.sum(axis=1), kind="stable"):
        if len(chosen) >= max_classes:
            break
        if int(cls) not in chosen:
            chosen.append(int(cls))
    return sorted(chosen)


def confusion_matrix_figure(matrix: np.ndarray | Sequence[Sequence[int]],
                            class_names: Sequence[str], max_classes: int = 30) -> np.ndarray:
    """The confusion matrix, each row normalised to its true class's pixels, as RGB pixels.

    Args:
        matrix: ``(C, C)`` pixel counts, rows = ground truth, columns = prediction (as
            :class:`utils.metrics.Evaluator` sums them).
        class_names: ``C`` names, written on both axes.
        max_classes: beyond this many classes only those of the most confused pairs are shown
            (:func:`confused_classes`); their rows keep their full totals, so a row's shown
            cells add up to less than 100 % when some of its pixels went to classes not shown.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    shown = confused_classes(matrix, max_classes)
    rates = _row_rates(matrix)[np.ix_(shown, shown)]
    names = [class_names[i] for i in shown]
    n = len(shown)
    cell = 0.36 if n <= 25 else 0.3
    figure = new_figure(2.8 + cell * n, 2.4 + cell * n)
    axes = figure.add_subplot()
    from matplotlib import colormaps  # new_figure has checked that matplotlib is there

    # Grey: a class without val pixels has no row to normalise.
    cmap = colormaps["Blues"].with_extremes(bad="#d9d9d9")
    image = axes.imshow(np.ma.masked_invalid(rates), cmap=cmap, vmin=0.0, vmax=1.0,
                        interpolation="nearest")
    font = 8 if n <= 25 else 7
    axes.set_xticks(range(n), names, rotation=90, fontsize=font, parse_math=False)
    axes.set_yticks(range(n), names, fontsize=font, parse_math=False)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if n <= 25:  # room for the percentages themselves
        for (row, column), rate in np.ndenumerate(rates):
            if np.isfinite(rate) and rate >= 0.005:
                axes.text(column, row, f"{100 * rate:.0f}", ha="center", va="center",
                          fontsize=6, color="white" if rate > 0.5 else "black")
    title = "confusion matrix, % of each true class's val pixels"
    if n < matrix.shape[0]:
        title += (f"\n{n} of {matrix.shape[0]} classes: those of the most confused pairs "
                  "(rows keep their full totals)")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    figure.tight_layout()
    return to_rgb(figure)


def per_class_iou_figure(matrix: np.ndarray | Sequence[Sequence[int]],
                         class_names: Sequence[str], max_bars: int = 200) -> np.ndarray:
    """Per-class IoU as a bar chart sorted from best to worst, beside each class's share of the
    val pixels, as RGB pixels.

    Classes with an undefined IoU (neither in the val labels nor predicted) are left out and
    counted in the title. With more than ``max_bars`` classes, the ``max_bars`` weakest are
    drawn.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    intersection = np.diag(matrix)
    truth = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / (truth + matrix.sum(axis=0) - intersection)
        share = truth / truth.sum() if truth.sum() > 0 else np.zeros_like(truth)
    defined = [i for i in range(len(iou)) if np.isfinite(iou[i])]
    order = sorted(defined, key=lambda i: (-iou[i], i))  # best at the top
    dropped = max(0, len(order) - max_bars)
    order = order[dropped:]
    n = max(len(order), 1)
    bar = 0.24 if n <= 40 else 0.15
    font = 8 if n <= 40 else 6
    figure = new_figure(9.0, 1.6 + bar * n)
    iou_axes, share_axes = figure.subplots(1, 2, sharey=True,
                                           gridspec_kw={"width_ratios": [3, 1.4]})
    rows = np.arange(len(order))
    iou_percent = [100 * iou[i] for i in order]
    share_percent = [100 * share[i] for i in order]
    iou_axes.barh(rows, iou_percent, color="#3b75af")
    share_axes.barh(rows, share_percent, color="#9b9b9b")
    for row, value in zip(rows, iou_percent):
        iou_axes.text(value + 1, row, f"{value:.1f}", va="center", fontsize=font - 1)
    for row, value in zip(rows, share_percent):
        share_axes.text(value, row, f" {value:.2g}", va="center", fontsize=font - 1)
    iou_axes.set_yticks(rows, [class_names[i] for i in order], fontsize=font, parse_math=False)
    iou_axes.set_ylim(len(order) - 0.5, -0.5)
    iou_axes.set_xlim(0, 110)
    iou_axes.set_xlabel("IoU (%)")
    share_axes.set_xlim(0, max(share_percent, default=1) * 1.35 or 1)
    share_axes.set_xlabel("share of val pixels (%)")
    for axes in (iou_axes, share_axes):
        axes.grid(axis="x", alpha=0.3)
        axes.tick_params(axis="x", labelsize=8)
    title = "per-class IoU on val, best to worst"
    absent = len(iou) - len(defined)
    if absent:
        title += f"; {absent} classes neither present nor predicted"
    if dropped:
        title += f"; the {len(order)} weakest of {len(defined)} shown"
    iou_axes.set_title(title, fontsize=9, loc="left")
    figure.tight_layout()
    return to_rgb(figure)


def image_rows_figure(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                      palette: Sequence[Sequence[int]], caption: str = "",
                      row_height: float = 2.2) -> np.ndarray:
    """image | ground truth | prediction, one titled row per image, as RGB pixels.

    Args:
        rows: ``(title, (h, w, 3) uint8 image, (h, w) ground-truth ids, (h, w) predicted ids)``;
            coloured by :func:`utils.labels.colour_table` (255, ignore, white; an id beyond
            ``palette`` black).
        palette: RGB triple (0-255) per class id.
        caption: written under the figure.
        row_height: inches per row (the widest image sets the column width), less when the
            rows would pass :data:`MAX_ROWS_HEIGHT` together.
    """
    row_height = min(row_height, MAX_ROWS_HEIGHT / max(len(rows), 1))
    aspect = max((image.shape[1] / image.shape[0] for _, image, _, _ in rows), default=1.0)
    column_width = row_height * min(aspect, 2.0)
    header, footer = 0.35, 0.3 * bool(caption)  # inches
    height = row_height * max(len(rows), 1) + header + footer
    figure = new_figure(3 * column_width + 0.3, height)
    grid = figure.subplots(max(len(rows), 1), 3, squeeze=False)
    for axes_row, (title, image, truth, prediction) in zip(grid, rows):
        for axes, picture in zip(axes_row, (image, colorize(truth, palette),
                                            colorize(prediction, palette))):
            axes.imshow(picture, interpolation="nearest")
        axes_row[0].set_title(title, loc="left", fontsize=8, parse_math=False)
    for axes in grid.ravel():
        axes.set_axis_off()
    figure.tight_layout(rect=(0, footer / height, 1, 1 - header / height))
    for axes, heading in zip(grid[0], ("image", "ground truth", "prediction")):
        box = axes.get_position()
        figure.text((box.x0 + box.x1) / 2, 1 - 0.5 * header / height, heading, fontsize=10,
                    fontweight="bold", ha="center", va="center")
    if caption:
        figure.text(0.01, 0.5 * footer / height, caption, fontsize=8, va="center",
                    parse_math=False)
    return to_rgb(figure)


def worst_images_figure(worst: Sequence[ScoredImage],
                        palette: Sequence[Sequence[int]]) -> np.ndarray:
    """The worst val images (:class:`utils.metrics.WorstImages`), worst first, each row named
    by its file and its own mIoU, as RGB pixels."""
    rows = [(f"{entry.name}: mIoU {100 * entry.score:.1f} %", entry.image, entry.target,
             entry.prediction) for entry in worst]
    return image_rows_figure(rows, palette,
                             caption="per-image mIoU: over the classes in its label or "
                                     "prediction")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def evaluation_figures(*, confusion_matrix: Sequence[Sequence[int]], class_names: Sequence[str],
                       palette: Sequence[Sequence[int]],
                       worst: Sequence[ScoredImage] = ()) -> dict[str, np.ndarray]:
    """The figures of one evaluation, by name (:data:`EVALUATION_FIGURES`); no worst images
    figure when ``worst`` is empty.

    Without matplotlib this logs one warning (once per process) saying how to install it and
    returns ``{}``: a training run of days must not stop for a missing plotting package.
    """
    try:
        figures = {"confusion_matrix": confusion_matrix_figure(confusion_matrix, class_names),
                   "per_class_iou": per_class_iou_figure(confusion_matrix, class_names)}
        if worst:
            figures["worst_images"] = worst_images_figure(worst, palette)
    except MatplotlibMissing as error:
        _warn_once(f"{error}; evaluation figures skipped")
        return {}
    return figures


def save_figures(figures: dict[str, Any], out_dir: str | os.PathLike,
                 prefix: str = "") -> list[str]:
    """Write each figure as ``<out_dir>/<prefix><name>.png`` (atomically); returns the paths."""
    paths = []
    for name, rgb in figures.items():
        path = os.path.join(out_dir, f"{prefix}{name}.png")
        save_png(path, rgb)
        paths.append(path)
    return paths
