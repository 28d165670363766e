"""utils.labels: the one colour table, and every output that draws a label map through it."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import utils.labels
from deploy.outputs import render
from utils.labels import colorize, colour_table, palette_for
from utils.summaries import TensorboardSummary

#: No black and no white entry: a black pixel is an id beyond it, a white one the ignore value.
PALETTE = [[255, 0, 0], [0, 255, 0]]
RED, GREEN, BLACK, WHITE = [255, 0, 0], [0, 255, 0], [0, 0, 0], [255, 255, 255]
LABELS = np.array([[0, 1], [5, 255]], dtype=np.uint8)  # 5: a class the palette lacks
DRAWN = [[RED, GREEN], [BLACK, WHITE]]


def test_the_table_gives_palette_colours_white_to_ignore_and_black_to_the_rest():
    table = colour_table([[10, 20, 30], [40, 50, 60]])
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert table[0].tolist() == [10, 20, 30] and table[1].tolist() == [40, 50, 60]
    assert table[255].tolist() == WHITE
    assert not table[2:255].any()


def test_the_pascal_voc_palette():
    palette = palette_for(21)
    assert len(palette) == 21 and palette[0] == BLACK and palette[15] == [192, 128, 128]
    assert palette[1] == [128, 0, 0] and palette[2] == [0, 128, 0]
    with pytest.raises(ValueError, match="255 classes"):
        palette_for(256)


def test_colorize_any_shape_and_refuses_values_no_label_holds():
    assert colorize(LABELS, PALETTE).tolist() == DRAWN
    batch = colorize(np.stack([LABELS.astype(np.int64)] * 2), PALETTE)
    assert batch.shape == (2, 2, 2, 3) and batch[1].tolist() == DRAWN
    for bad in (-1, 256):
        with pytest.raises(ValueError, match="0-255"):
            colorize(np.array([[0, bad]]), PALETTE)


def test_the_palette_png_holds_class_ids_and_the_table_as_its_palette():
    mask = render("mask", LABELS, PALETTE, None, 0.5)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    with Image.open(io.BytesIO(buffer.getvalue())) as reread:
        assert reread.mode == "P" and np.asarray(reread).tolist() == LABELS.tolist()
        palette = np.asarray(reread.getpalette(), dtype=np.uint8).reshape(-1, 3)
    assert palette.shape == (256, 3)
    assert palette[:2].tolist() == PALETTE and palette[255].tolist() == WHITE
    assert not palette[2:255].any()


@pytest.fixture
def table_calls(monkeypatch) -> list:
    """Every palette :func:`utils.labels.colour_table` is asked for, in order."""
    calls = []
    real = utils.labels.colour_table

    def spy(palette):
        calls.append(palette)
        return real(palette)

    monkeypatch.setattr(utils.labels, "colour_table", spy)
    return calls


def drawn_mask(labels, palette, tmp_path):
    path = tmp_path / "mask.png"
    render("mask", labels, palette, None, 0.5).save(path)
    with Image.open(path) as mask:
        return np.asarray(mask.convert("RGB"))


def drawn_colour(labels, palette, tmp_path):
    return np.asarray(render("color", labels, palette, None, 0.5))


def drawn_overlay(labels, palette, tmp_path):
    photo = np.full(labels.shape + (3,), 77, dtype=np.uint8)
    return np.asarray(render("overlay", labels, palette, photo, 1.0))  # alpha 1: colours only


def drawn_grid(labels, palette, tmp_path):
    """The ground-truth cell of the TensorBoard grid (2 pixels of padding around each cell)."""
    summary = TensorboardSummary(tmp_path)
    grids = []
    summary.writer.add_image = lambda tag, grid, global_step: grids.append(grid)
    target = torch.from_numpy(labels.astype(np.int64))[None]
    summary.visualize(torch.zeros(1, 3, *labels.shape), target, target, palette=palette,
                      mean=(0.5,) * 3, std=(0.25,) * 3, step=0)
    summary.close()
    (grid,) = grids
    height, width = labels.shape
    cell = grid[:, 2:2 + height, 4 + width:4 + 2 * width]
    return (cell.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("draw", [drawn_mask, drawn_colour, drawn_overlay, drawn_grid])
def test_every_output_draws_through_the_one_table(draw, table_calls, tmp_path):
    assert draw(LABELS, PALETTE, tmp_path).tolist() == DRAWN
    assert PALETTE in table_calls


def test_the_figures_draw_through_the_one_table_and_an_id_beyond_the_palette_black(
        table_calls):
    pytest.importorskip("matplotlib")
    from utils.figures import image_rows_figure

    image = np.full((40, 40, 3), 255, dtype=np.uint8)

    def black_pixels(truth_id: int) -> int:
        truth = np.full((40, 40), truth_id, dtype=np.uint8)
        figure = image_rows_figure([("a", image, truth, np.zeros_like(truth))], PALETTE)
        return int((figure == 0).all(axis=-1).sum())

    # The ground-truth panel (about 200 x 200 pixels) turns black when its id has no colour.
    assert black_pixels(5) - black_pixels(1) > 10_000
    assert table_calls and all(palette == PALETTE for palette in table_calls)
