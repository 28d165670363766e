"""deploy.outputs: where inference writes (planned from the inputs) and what it draws."""
from __future__ import annotations

import numpy as np
import pytest

from dataloader.images import list_inputs
from deploy.outputs import parse_kinds, plan_outputs, render
from utils.errors import UserError
from inference_testing import touch


def test_outputs_are_named_after_the_input_and_mirror_subfolders(tmp_path):
    items = list_inputs(touch(tmp_path / "in" / "sub" / "a.jpg").parents[1])
    plan, = plan_outputs(items, tmp_path / "in", tmp_path / "out", ["mask", "color", "overlay"],
                         "jpg")
    assert plan == {"mask": tmp_path / "out" / "sub" / "a.png",
                    "color": tmp_path / "out" / "sub" / "a_color.jpg",
                    "overlay": tmp_path / "out" / "sub" / "a_overlay.jpg"}


def test_two_inputs_writing_one_output_are_refused_naming_both(tmp_path):
    touch(tmp_path / "in" / "a.jpg")
    touch(tmp_path / "in" / "a.png")
    with pytest.raises(UserError) as error:
        plan_outputs(list_inputs(tmp_path / "in"), tmp_path / "in", tmp_path / "out", ["mask"],
                     "png")
    assert "a.jpg" in str(error.value) and "a.png" in str(error.value)
    assert "rename" in str(error.value)


def test_outputs_never_land_on_or_inside_the_inputs(tmp_path):
    folder = tmp_path / "in"
    image = touch(folder / "a.png")
    for out in (folder, folder / "masks"):
        with pytest.raises(UserError, match="inside --in-path"):
            plan_outputs(list_inputs(folder), folder, out, ["mask"], "png")
    # A single PNG whose mask would be written over itself.
    with pytest.raises(UserError, match="overwrite the input"):
        plan_outputs(list_inputs(image), image, folder, ["mask"], "png")


def test_parse_kinds():
    assert parse_kinds("mask, overlay") == ["mask", "overlay"]
    for bad in ("", "mask,mask", "heatmap"):
        with pytest.raises(UserError, match="--save"):
            parse_kinds(bad)


def test_colour_and_overlay_pixels_by_hand():
    palette = [[0, 0, 0], [192, 128, 128]]
    labels = np.array([[0, 1], [1, 255]], dtype=np.uint8)
    photo = np.full((2, 2, 3), 100, dtype=np.uint8)
    color = np.asarray(render("color", labels, palette, None, 0.5))
    assert color[0, 1].tolist() == [192, 128, 128] and color[1, 1].tolist() == [255, 255, 255]
    # 0.5 * 100 + 0.5 * 192 = 146, 0.5 * 100 + 0.5 * 128 = 114; background blends with black.
    overlay = np.asarray(render("overlay", labels, palette, photo, 0.5))
    assert overlay[0, 1].tolist() == [146, 114, 114] and overlay[0, 0].tolist() == [50, 50, 50]
    assert np.asarray(render("overlay", labels, palette, photo, 0.0)).tolist() == photo.tolist()
    mask = render("mask", labels, palette, None, 0.5)
    assert mask.mode == "P" and np.asarray(mask).tolist() == labels.tolist()
