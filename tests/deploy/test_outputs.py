"""deploy.outputs: where inference writes (planned from the inputs) and what it draws."""
from __future__ import annotations

import numpy as np
import pytest

from dataloader.images import list_inputs
from deploy.outputs import assign_outputs, parse_kinds, render
from utils.errors import UserError
from inference_testing import touch


def test_outputs_are_named_after_the_input_and_mirror_subfolders(tmp_path):
    items = list_inputs(touch(tmp_path / "in" / "sub" / "a.jpg").parents[1])
    plan, = assign_outputs(items, tmp_path / "in", tmp_path / "out", ["mask", "color", "overlay"],
                         "jpg")
    assert plan == {"mask": tmp_path / "out" / "sub" / "a.png",
                    "color": tmp_path / "out" / "sub" / "a_color.jpg",
                    "overlay": tmp_path / "out" / "sub" / "a_overlay.jpg"}


def test_two_inputs_writing_one_output_are_refused_naming_both(tmp_path):
    touch(tmp_path / "in" / "a.jpg")
    touch(tmp_path / "in" / "a.png")
    with pytest.raises(UserError) as error:
        assign_outputs(list_inputs(tmp_path / "in"), tmp_path / "in", tmp_path / "out", ["mask"],
                     "png")
    assert "a.jpg" in str(error.value) and "a.png" in str(error.value)
    assert "rename" in str(error.value)


def test_outputs_never_land_on_or_inside_the_inputs(tmp_path):
    folder = tmp_path / "in"
    image = touch(folder / "a.png")
    for out in (folder, folder / "masks"):
        with pytest.raises(UserError, match="inside --in-path"):
            assign_outputs(list_inputs(folder), folder, out, ["mask"], "png")
    # A single PNG whose mask would be written over itself.
    with pytest.raises(UserError, match="overwrite the input"):
        assign_outputs(list_inputs(image), image, folder, ["mask"], "png")


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


def test_rgb_bands_are_one_based_and_stretched_2_to_98_percent():
    import argparse

    import torch

    from deploy.outputs import display_rgb, parse_bands

    assert parse_bands("3,2,1") == (3, 2, 1) and parse_bands("4") == (4,)
    for bad in ("0,1,2", "1,2", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bands(bad)
    # Band b holds 0..100 * (b + 1): each percentile stretch maps 2 -> 0 and 98 -> 255.
    ramp = torch.arange(101, dtype=torch.float32)
    pixels = torch.stack([ramp * (band + 1) for band in range(4)])[:, None, :]  # (4, 1, 101)
    shown = display_rgb(pixels, (4, 2, 1))
    assert shown.shape == (1, 101, 3) and shown.dtype == np.uint8
    expected = np.clip(np.rint((np.arange(101) - 2) / 96 * 255), 0, 255)
    for channel in range(3):
        assert shown[0, :, channel].tolist() == expected.tolist()
    grey = display_rgb(pixels[:1])  # one band: grey
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    photo = torch.randint(0, 256, (3, 2, 2), dtype=torch.uint8)
    assert (display_rgb(photo) == photo.permute(1, 2, 0).numpy()).all()  # 8-bit RGB as it is
    with pytest.raises(ValueError, match="has 4 band"):
        display_rgb(pixels, (5, 1, 1))
