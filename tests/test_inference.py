"""End-to-end runs of inference.py on generated images: every kind of input, bad files,
collisions, resuming, batching, windows and the outputs people look at (CPU, ResNet-18)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

import deploy.predictor
import inference
from inference_testing import one_error_line, read_mask, run, write_image

# --engine torch: the ONNX runtimes have their own tests (test_inference_engines.py).




def test_folder_is_walked_and_mirrored(ckpt, tmp_path):
    inputs = {"a.jpg": (40, 30), "sub/b.png": (33, 47), "sub/deeper/c.jpeg": (64, 48)}
    for seed, (name, (width, height)) in enumerate(inputs.items()):
        write_image(tmp_path / "in" / name, width, height, seed=seed)
    write_image(tmp_path / "in" / ".hidden" / "d.jpg", 20, 20)
    assert run(ckpt, tmp_path / "in", tmp_path / "out") == 0
    written = sorted(str(p.relative_to(tmp_path / "out"))
                     for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == ["a.png", "sub/b.png", "sub/deeper/c.png"]
    for name, (width, height) in inputs.items():
        mask = read_mask((tmp_path / "out" / name).with_suffix(".png"))
        assert mask.shape == (height, width) and mask.max() < 5


def test_single_file_and_list_file(ckpt, tmp_path):
    first = write_image(tmp_path / "photos" / "x" / "a.jpg", 40, 30, seed=1)
    second = write_image(tmp_path / "photos" / "y" / "a.jpg", 40, 30, seed=2)
    assert run(ckpt, first, tmp_path / "single") == 0
    assert read_mask(tmp_path / "single" / "a.png").shape == (30, 40)
    listing = tmp_path / "job.txt"
    listing.write_text("photos/x/a.jpg\n# a comment\n\nphotos/y/a.jpg\n")
    assert run(ckpt, listing, tmp_path / "listed") == 0
    # Same name in two folders: the outputs mirror the folders below the common one.
    assert np.array_equal(read_mask(tmp_path / "listed" / "x" / "a.png"),
                          read_mask(tmp_path / "single" / "a.png"))
    assert (tmp_path / "listed" / "y" / "a.png").is_file()
    assert second.is_file()


def test_exif_orientation_is_applied_unless_turned_off(ckpt, tmp_path):
    stored = write_image(tmp_path / "stored.png", 48, 32, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    with Image.open(stored) as image:
        image.save(tmp_path / "in" / "photo.jpg" if (tmp_path / "in").mkdir() is None else None,
                   exif=exif, quality=100)
        decoded = Image.open(tmp_path / "in" / "photo.jpg")
        # The same pixels, already turned, without EXIF: the mask as displayed must match it.
        decoded.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "turned" / "photo.png"
                                                           if (tmp_path / "turned").mkdir()
                                                           is None else None)
    assert run(ckpt, tmp_path / "in", tmp_path / "out") == 0
    assert run(ckpt, tmp_path / "turned", tmp_path / "expected") == 0
    mask = read_mask(tmp_path / "out" / "photo.png")
    assert mask.shape == (48, 32)  # (height, width) as displayed
    assert np.array_equal(mask, read_mask(tmp_path / "expected" / "photo.png"))
    assert run(ckpt, tmp_path / "in", tmp_path / "raw", "--no-exif-transpose") == 0
    assert read_mask(tmp_path / "raw" / "photo.png").shape == (32, 48)


def test_inputs_that_would_share_an_output_are_refused_before_any_work(ckpt, tmp_path, capsys):
    write_image(tmp_path / "in" / "a.jpg", 20, 20)
    write_image(tmp_path / "in" / "a.png", 20, 20)
    write_image(tmp_path / "in" / "b.png", 20, 20)
    assert run(ckpt, tmp_path / "in", tmp_path / "out") == 2
    err = one_error_line(capsys)
    assert "a.jpg" in err and "a.png" in err
    assert not (tmp_path / "out").exists()


def test_nothing_under_the_input_folder_is_overwritten(ckpt, tmp_path, capsys):
    image = write_image(tmp_path / "in" / "a.png", 20, 20)
    before = image.read_bytes()
    assert run(ckpt, tmp_path / "in", tmp_path / "in") == 2
    assert "--out-path" in one_error_line(capsys)
    assert run(ckpt, image, tmp_path / "in") == 2  # the single file's mask is the file itself
    assert "overwrite" in one_error_line(capsys)
    assert image.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.png"]


def test_skip_existing_resumes_without_rewriting(ckpt, tmp_path, capsys):
    for seed, name in enumerate(("a.png", "b.png", "c.png")):
        write_image(tmp_path / "in" / name, 24, 16, seed=seed)
    assert run(ckpt, tmp_path / "in", tmp_path / "out") == 0
    kept = tmp_path / "out" / "a.png"
    os.utime(kept, ns=(0, 0))  # a rewrite would give it the time of now
    (tmp_path / "out" / "b.png").unlink()
    capsys.readouterr()
    assert run(ckpt, tmp_path / "in", tmp_path / "out", "--skip-existing") == 0
    assert kept.stat().st_mtime_ns == 0
    assert read_mask(tmp_path / "out" / "b.png").shape == (16, 24)
    assert "1 inputs segmented" in capsys.readouterr().out


def test_bad_files_are_named_once_and_the_good_ones_written(ckpt, tmp_path, capsys):
    folder = tmp_path / "in"
    good = [write_image(folder / "good1.jpg", 30, 20, seed=1),
            write_image(folder / "sub" / "good2.png", 20, 30, seed=2)]
    valid = write_image(tmp_path / "valid.jpg", 64, 64, seed=3).read_bytes()
    bad = {"empty.jpg": b"", "truncated.jpg": valid[: len(valid) // 2],
           "text.png": b"this is not an image", "sub/noise.webp": bytes(range(256)) * 4}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    assert run(ckpt, folder, tmp_path / "out", "--workers", "2") == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == len(bad), err
    for name in bad:
        assert sum(str(folder / name) in line for line in lines) == 1, (name, err)
    for path in good:
        assert read_mask(tmp_path / "out" / path.relative_to(folder).with_suffix(".png")).size
    outputs = sorted(p.name for p in (tmp_path / "out").rglob("*.png"))
    assert outputs == ["good1.png", "good2.png"]


def test_a_batched_mask_equals_the_one_image_mask(ckpt, tmp_path):
    sizes = [(40, 30), (30, 40), (40, 30), (40, 30), (30, 40), (52, 36)]
    for seed, (width, height) in enumerate(sizes):
        write_image(tmp_path / "in" / f"{seed}.png", width, height, seed=seed)
    assert run(ckpt, tmp_path / "in", tmp_path / "one", "--batch-size", "1") == 0
    assert run(ckpt, tmp_path / "in", tmp_path / "three", "--batch-size", "3") == 0
    masks = []
    for seed in range(len(sizes)):
        single = read_mask(tmp_path / "one" / f"{seed}.png")
        assert np.array_equal(single, read_mask(tmp_path / "three" / f"{seed}.png")), seed
        masks.append(single)
    assert len(np.unique(np.concatenate([m.ravel() for m in masks]))) > 1  # not one class


def test_batches_never_mix_output_sizes(ckpt, tmp_path):
    # With --size 24 both become 32x24 model inputs, but their masks have their own sizes.
    write_image(tmp_path / "in" / "a.png", 64, 48, seed=1)
    write_image(tmp_path / "in" / "b.png", 65, 48, seed=2)
    assert run(ckpt, tmp_path / "in", tmp_path / "two", "--size", "24", "--batch-size", "2") == 0
    assert run(ckpt, tmp_path / "in", tmp_path / "one", "--size", "24") == 0
    for name, shape in (("a.png", (48, 64)), ("b.png", (48, 65))):
        mask = read_mask(tmp_path / "two" / name)
        assert mask.shape == shape
        assert np.array_equal(mask, read_mask(tmp_path / "one" / name))


def test_color_and_overlay_outputs(ckpt, tmp_path):
    photo = write_image(tmp_path / "in" / "a.png", 40, 30, seed=4)
    assert run(ckpt, tmp_path / "in", tmp_path / "out", "--save", "mask,color,overlay",
               "--alpha", "0.25") == 0
    mask = read_mask(tmp_path / "out" / "a.png")
    palette = np.asarray(Image.open(tmp_path / "out" / "a.png").getpalette()[: 5 * 3],
                         dtype=np.int64).reshape(5, 3)
    color = np.asarray(Image.open(tmp_path / "out" / "a_color.png").convert("RGB"))
    assert np.array_equal(color, palette[mask])
    pixels = np.asarray(Image.open(photo).convert("RGB"), dtype=np.float64)
    expected = np.clip(np.rint(0.75 * pixels + 0.25 * palette[mask]), 0, 255)
    overlay = np.asarray(Image.open(tmp_path / "out" / "a_overlay.png"))
    assert np.abs(overlay.astype(np.int64) - expected).max() <= 1
    assert run(ckpt, tmp_path / "in", tmp_path / "jpg", "--save", "overlay", "--format",
               "jpg") == 0
    with Image.open(tmp_path / "jpg" / "a_overlay.jpg") as written:
        assert written.format == "JPEG" and written.size == (40, 30)
    assert not (tmp_path / "jpg" / "a.png").exists()


def test_large_inputs_go_window_by_window(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(deploy.predictor, "MIN_TILE", 32)  # small windows, a fast test
    write_image(tmp_path / "in" / "big.png", 150, 120, seed=5)
    assert run(ckpt, tmp_path / "in", tmp_path / "explicit", "--tile", "64",
               "--tile-overlap", "16") == 0
    monkeypatch.setattr(deploy.predictor, "TILE_PIXEL_BUDGET", 100 * 100)
    monkeypatch.setattr(deploy.predictor, "DEFAULT_TILE", 64)
    assert run(ckpt, tmp_path / "in", tmp_path / "auto", "--tile-overlap", "16") == 0
    mask = read_mask(tmp_path / "auto" / "big.png")
    assert mask.shape == (120, 150)
    assert np.array_equal(mask, read_mask(tmp_path / "explicit" / "big.png"))


def test_user_errors_are_one_line(ckpt, tmp_path, capsys, monkeypatch):
    image = write_image(tmp_path / "a.png", 20, 20)
    out = tmp_path / "out"
    assert run(ckpt, image, out, "--save", "mask,heatmap") == 2
    assert "--save" in one_error_line(capsys)
    assert run(ckpt, tmp_path / "nowhere", out) == 2
    assert "nowhere" in one_error_line(capsys)
    assert run(tmp_path / "model.onnx", image, out) == 2  # --engine torch on an ONNX file
    assert "onnxruntime" in one_error_line(capsys)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    assert inference.cli(["--in-path", str(image), "--out-path", str(out), "--ckpt", str(ckpt),
                          "--engine", "openvino"]) == 2
    err = one_error_line(capsys)
    assert "openvino" in err and "pip install" in err
    assert not out.exists()


def test_a_cpu_with_amx_hears_of_bf16_once_and_others_not(ckpt, tmp_path, capsys, cpu_bf16):
    image = write_image(tmp_path / "a.png", 20, 20)
    assert run(ckpt, image, tmp_path / "auto") == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "--amp bf16" in line]
    assert len(notes) == (1 if cpu_bf16 else 0)  # the fixture's bf16 CPU has AMX
    if cpu_bf16:
        assert "python -m bench.inference" in notes[0]
    assert run(ckpt, image, tmp_path / "bf16", "--amp", "bf16") == 0  # chosen: nothing to add
    assert "--amp bf16" not in capsys.readouterr().err


def test_an_image_of_other_bands_than_the_model_is_named_and_a_grey_one_predicted(
        ckpt, tmp_path, capsys):
    import tifffile

    folder = tmp_path / "in"
    good = write_image(folder / "photo.jpg", 30, 20, seed=1)
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(folder / "grey.png")  # 1 band
    tifffile.imwrite(folder / "bands.tif", np.zeros((20, 30, 5), np.uint16),
                     photometric="minisblack", planarconfig="contig")
    assert run(ckpt, folder, tmp_path / "out") == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(folder / "bands.tif") in lines[0], err
    assert "5 channel(s)" in lines[0] and "3-channel" in lines[0]
    assert read_mask(tmp_path / "out" / "photo.png").shape == Image.open(good).size[::-1]
    assert read_mask(tmp_path / "out" / "grey.png").shape == (20, 30)
