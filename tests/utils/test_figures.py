"""The evaluation figures: which classes the confusion matrix shows, bounded sizes at 171
classes, and a missing matplotlib."""
import importlib.util
import logging
import sys

import numpy as np
import pytest
from PIL import Image

from utils import figures
from utils.figures import (DPI, MatplotlibMissing, confused_classes, confusion_matrix_figure,
                           evaluation_figures, new_figure, per_class_iou_figure, save_figures,
                           save_png, worst_images_figure)
from utils.metrics import ScoredImage

#: Drawing tests need matplotlib (make and CI install it); the missing-matplotlib test does not.
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib not installed")


def colours(rgb: np.ndarray) -> int:
    return len(np.unique(rgb.reshape(-1, 3), axis=0))


def test_all_classes_shown_up_to_the_limit():
    assert confused_classes(np.eye(5, dtype=np.int64), max_classes=5) == [0, 1, 2, 3, 4]


def test_confused_classes_by_hand():
    # 6 classes, room for 4. Off-diagonal rates (share of the true class's pixels):
    #   4 -> 5: 50 of 100 = 0.50 (the most confused pair)
    #   0 -> 1: 300 of 1000 = 0.30 (most pixels, lower rate)
    #   2 -> 3: 30 of 100 = 0.30 (same rate as 0 -> 1, fewer pixels: ranks after it)
    matrix = np.diag([700, 100, 70, 100, 50, 100]).astype(np.int64)
    matrix[0, 1], matrix[4, 5], matrix[2, 3] = 300, 50, 30
    assert confused_classes(matrix, max_classes=4) == [0, 1, 4, 5]
    assert confused_classes(matrix, max_classes=3) == [0, 4, 5]  # room for one of 0 -> 1
    # Room beyond the confused classes is filled by the most frequent classes (0 has 1000).
    assert confused_classes(matrix, max_classes=5) == [0, 1, 2, 4, 5]
    assert sorted(confused_classes(matrix, max_classes=6)) == list(range(6))


def test_confused_classes_fill_with_frequent_classes_when_few_are_confused():
    matrix = np.diag([5, 900, 10, 800, 1, 700, 3]).astype(np.int64)
    matrix[0, 2] = 1  # the only confusion
    # 0 and 2 from the pair, then 1 (900 pixels) and 3 (800 pixels).
    assert confused_classes(matrix, max_classes=4) == [0, 1, 2, 3]


@needs_matplotlib
def test_confusion_matrix_rows_are_normalised_to_the_true_class():
    # Two classes: class 0 all right, class 1 predicted as 0 everywhere; rows 0 -> [1, 0],
    # 1 -> [1, 0]: the cells (0, 0) and (1, 0) are the darkest colour, (0, 1) and (1, 1) white.
    rgb = confusion_matrix_figure([[10, 0], [40, 0]], ["a", "b"])
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    darkest = np.array([8, 48, 107])  # matplotlib's "Blues" at 1.0
    assert (np.abs(rgb.astype(int) - darkest).sum(axis=2) < 8).sum() > 100


@needs_matplotlib
@pytest.mark.parametrize("num_classes", [21, 171])
def test_figures_for_many_classes_stay_bounded(num_classes, tmp_path):
    rng = np.random.default_rng(num_classes)
    matrix = rng.integers(0, 30, (num_classes, num_classes))
    matrix += np.diag(rng.integers(100, 10_000, num_classes))
    matrix[5] = 0  # a class without val pixels
    names = [f"class_{i}" for i in range(num_classes)]
    confusion = confusion_matrix_figure(matrix, names)
    bars = per_class_iou_figure(matrix, names)
    # At most 30 classes on each axis of the matrix, at most 200 bars: the pixel size cannot
    # grow with the class count beyond those (a 30 x 30 matrix is under 14 inches square).
    assert len(confused_classes(matrix, 30)) == min(num_classes, 30)
    assert confusion.shape[0] <= 14 * DPI and confusion.shape[1] <= 14 * DPI
    assert bars.shape[1] == 9 * DPI and bars.shape[0] <= (1.6 + 0.15 * 200) * DPI + 1
    assert colours(confusion) > 10 and colours(bars) > 10
    paths = save_figures({"confusion_matrix": confusion, "per_class_iou": bars}, tmp_path, "x_")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["x_confusion_matrix.png",
                                                    "x_per_class_iou.png"]
    with Image.open(paths[0]) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), confusion)


@needs_matplotlib
def test_per_class_bars_at_most_max_bars():
    matrix = np.diag(np.arange(1, 256)).astype(np.int64)
    matrix[:, 0] += 1  # every class loses a pixel to class 0: IoUs differ
    names = [f"c{i}" for i in range(255)]
    few = per_class_iou_figure(matrix, names, max_bars=20)
    assert few.shape[0] <= (1.6 + 0.24 * 20) * DPI + 1


@needs_matplotlib
def test_worst_images_figure_has_a_row_per_image():
    palette = [[0, 0, 0], [255, 0, 0]]
    entry = ScoredImage(0.25, 3, "a.jpg", np.full((20, 40, 3), 128, np.uint8),
                        np.ones((20, 40), np.uint8), np.zeros((20, 40), np.uint8))
    one = worst_images_figure([entry], palette)
    three = worst_images_figure([entry] * 3, palette)
    assert three.shape[0] > 2 * one.shape[0] - 100
    # The ground-truth column shows class 1's red.
    assert ((three == [255, 0, 0]).all(axis=2)).sum() > 100


@needs_matplotlib
def test_worst_images_figure_height_is_bounded():
    # 320 rows of 2.2 inches drew a 70,465-pixel-tall PNG; rows get shorter past 64 inches.
    entry = ScoredImage(0.25, 3, "a.jpg", np.full((8, 8, 3), 128, np.uint8),
                        np.ones((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    rgb = worst_images_figure([entry] * 40, [[0, 0, 0], [255, 0, 0]])
    rows, header_and_caption = 64, 0.35 + 0.3  # inches; 40 rows of 2.2 would be 88
    assert rgb.shape[0] <= round((rows + header_and_caption) * DPI)
    assert figures.MAX_ROWS_HEIGHT == rows


def drawn_texts(monkeypatch, draw) -> list:
    """The text artists of the figures ``draw()`` renders (hidden ones included)."""
    seen = []
    real_to_rgb = figures.to_rgb

    def keep(figure):
        seen.append(figure)
        return real_to_rgb(figure)

    monkeypatch.setattr(figures, "to_rgb", keep)
    draw()
    from matplotlib.text import Text

    return [text for figure in seen for text in figure.findobj(Text)]


@needs_matplotlib
@pytest.mark.parametrize("name", ["price $5 and $10", "$\\frac{x$", "$x$"])
def test_names_from_the_data_are_drawn_as_written(monkeypatch, name):
    # mathtext drew "price $5 and $10" as "price 5and10" and failed on "$\\frac{x$".
    matrix = [[5, 1], [2, 7]]
    entry = ScoredImage(0.25, 3, name, np.full((8, 8, 3), 128, np.uint8),
                        np.ones((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    texts = drawn_texts(monkeypatch, lambda: evaluation_figures(
        confusion_matrix=matrix, class_names=["background", name], palette=[[0, 0, 0]] * 2,
        worst=[entry]))
    named = [text for text in texts if name in text.get_text() and text.get_visible()]
    assert len(named) >= 4  # both axes of the matrix, a bar, the worst image's title
    for text in named:
        # What matplotlib typesets: the string as it is, not as math.
        assert text._preprocess_math(text.get_text()) == (text.get_text(), False)


def test_without_matplotlib_training_figures_warn_once(monkeypatch, caplog):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    figures._warn_once.cache_clear()
    with pytest.raises(MatplotlibMissing, match="pip install -r requirements-plot.txt"):
        new_figure(1, 1)
    with caplog.at_level(logging.WARNING, logger="utils.figures"):
        for _ in range(2):
            assert evaluation_figures(confusion_matrix=[[1]], class_names=["a"],
                                      palette=[[0, 0, 0]]) == {}
    assert caplog.text.count("requirements-plot.txt") == 1
    figures._warn_once.cache_clear()


def test_save_png_replaces_the_file(tmp_path):
    path = tmp_path / "f.png"
    save_png(path, np.zeros((2, 3, 3), np.uint8))
    save_png(path, np.full((4, 5, 3), 200, np.uint8))
    with Image.open(path) as image:
        assert image.size == (5, 4) and image.getpixel((0, 0)) == (200, 200, 200)
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temporary left


@needs_matplotlib
@pytest.mark.slow
def test_make_figures_segments_val_images_of_any_dataset(tmp_path):
    import torch

    from dataloader.datasets.demo import generate_demo_dataset
    from dataloader.utils import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASS_NAMES, palette_for
    from modeling.deeplab import DeepLab
    from scripts import make_figures

    root = generate_demo_dataset(tmp_path / "demo", seed=3, num_train=0, num_val=3,
                                 image_size=(40, 32))
    torch.manual_seed(0)
    model = DeepLab(backbone="resnet18", num_classes=21)
    settings = dict(model.settings(), class_names=list(VOC_CLASS_NAMES),
                    palette=palette_for(21), mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    checkpoint = tmp_path / "random.pth.tar"
    torch.save({"model": model.state_dict(), "settings": settings}, checkpoint)
    out = tmp_path / "out"
    assert make_figures.main(["--ckpt", str(checkpoint), "--dataset", "demo", "--data-root",
                              root, "--count", "2", "--out-dir", str(out)]) == 0
    with Image.open(out / "results.png") as results, Image.open(out / "colour_scheme.png") as key:
        assert results.width > 600 and results.height > 2 * 240  # two rows of 240 pixels
        assert key.height > 100
    assert make_figures.main(["--ckpt", str(tmp_path / "missing.pth.tar"), "--dataset", "demo",
                              "--data-root", root, "--out-dir", str(out)]) == 2
