"""inference.py pointed at any folder: it never replaces a file it did not write, reads lists and
folders as the file system does, stays in bounded memory, stops cleanly on SIGINT / SIGTERM and
says every bad input in one line before the model runs (CPU, ResNet-18, random weights)."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import deploy.outputs
import deploy.predictor
import export
import inference
from dataloader.images import list_inputs
from dataloader.utils import DatasetError
from inference_testing import FAST, make_checkpoint, one_error_line, read_mask, run, write_image
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def garbage_ckpt(tmp_path) -> Path:
    """A checkpoint that fails to load: an error about anything else came before the model."""
    path = tmp_path / "garbage.pth.tar"
    path.write_bytes(b"not a checkpoint")
    return path




def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# 1. Only this tool's own outputs are ever replaced.

def test_a_photo_beside_a_single_input_or_a_listed_one_is_never_replaced(
        ckpt, garbage_ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    write_image(photos / "a.jpg", 32, 24, seed=1)
    write_image(photos / "a.png", 32, 24, seed=2)  # another photo, not a mask
    before = snapshot(photos)
    listing = tmp_path / "job.txt"
    listing.write_text("photos/a.jpg\n")
    for in_path in (photos / "a.jpg", listing):
        # Refused before the model loads: the garbage checkpoint is never read.
        assert run(garbage_ckpt, in_path, photos) == 2
        err = one_error_line(capsys)
        assert str(photos / "a.png") in err and "did not write" in err
        assert run(ckpt, in_path, photos, "--overwrite") == 2
        assert "did not write" in one_error_line(capsys)
        assert run(ckpt, in_path, photos, "--skip-existing") == 2
        assert "did not write" in one_error_line(capsys)
    assert snapshot(photos) == before


def test_earlier_outputs_are_kept_unless_asked_and_recognised_in_every_format(
        ckpt, tmp_path, capsys):
    write_image(tmp_path / "in" / "a.png", 32, 24, seed=3)
    out = tmp_path / "out"
    save = ["--save", "mask,color,overlay", "--format", "jpg"]
    assert run(ckpt, tmp_path / "in", out, *save) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a.png", "a_color.jpg", "a_overlay.jpg"]
    from PIL import Image

    with Image.open(out / "a.png") as mask:
        assert mask.info["Software"] == deploy.outputs.MARKER
    with Image.open(out / "a_color.jpg") as colour:
        assert colour.info["comment"] == deploy.outputs.MARKER.encode()
    for path in out.iterdir():
        os.utime(path, ns=(0, 0))
    capsys.readouterr()
    assert run(ckpt, tmp_path / "in", out, *save) == 2  # neither flag: nothing is replaced
    err = one_error_line(capsys)
    assert "--skip-existing" in err and "--overwrite" in err
    assert all(path.stat().st_mtime_ns == 0 for path in out.iterdir())
    assert run(ckpt, tmp_path / "in", out, *save, "--overwrite") == 0
    assert all(path.stat().st_mtime_ns > 0 for path in out.iterdir())
    capsys.readouterr()
    assert run(ckpt, tmp_path / "in", out, *save, "--overwrite", "--skip-existing") == 2
    assert "choose one" in one_error_line(capsys)


def test_a_file_at_an_output_path_is_refused_whatever_its_kind(ckpt, tmp_path, capsys):
    write_image(tmp_path / "in" / "sub" / "a.png", 20, 20)
    for name, make in (("sub/a.png", lambda p: p.write_bytes(b"notes")),
                       ("sub/a.png", lambda p: p.mkdir()),
                       ("sub", lambda p: p.write_bytes(b"a file where a folder must go"))):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        make(target)
        before = snapshot(out)
        assert run(ckpt, tmp_path / "in", out, "--overwrite") == 2
        assert str(target) in one_error_line(capsys)
        assert snapshot(out) == before


# 2. A list is read through the file system.

def test_a_listed_path_is_the_file_the_system_opens(tmp_path):
    write_image(tmp_path / "real" / "z.jpg", 16, 16, seed=1)
    (tmp_path / "real" / "sub").mkdir()
    lists = tmp_path / "lists"
    write_image(lists / "z.jpg", 16, 16, seed=2)  # what a text-only `link/..` would name
    (lists / "link").symlink_to(tmp_path / "real" / "sub")
    (lists / "job.txt").write_text("link/../z.jpg\n")
    item, = list_inputs(lists / "job.txt")
    assert os.path.samefile(item.path, lists / "link" / ".." / "z.jpg")
    assert item.path.read_bytes() == (tmp_path / "real" / "z.jpg").read_bytes()


def test_a_list_with_a_byte_order_mark_or_in_latin_1(ckpt, tmp_path, capsys):
    write_image(tmp_path / "a.jpg", 16, 16)
    bom = tmp_path / "bom.txt"
    bom.write_text("a.jpg\n", encoding="utf-8-sig")
    item, = list_inputs(bom)
    assert item.path == tmp_path / "a.jpg"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a.jpg\ncaf\u00e9.jpg\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="UTF-8"):
        list_inputs(latin)
    assert run(ckpt, latin, tmp_path / "out") == 2
    err = one_error_line(capsys)
    assert "latin.txt" in err and "line 2" in err


# 3. Folders are walked completely.

def test_folders_behind_links_are_walked_once_and_loops_end(tmp_path):
    root = tmp_path / "in"
    write_image(root / "a.png", 8, 8)
    write_image(tmp_path / "elsewhere" / "b.png", 8, 8)
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    (root / "linked-again").symlink_to(tmp_path / "elsewhere")
    (root / "loop").symlink_to(root)
    found = [str(item.relative) for item in list_inputs(root)]
    assert found == ["a.png", "linked/b.png"]


def test_a_folder_inside_the_input_is_named_by_its_own_path_not_a_link(tmp_path):
    root = tmp_path / "in"
    write_image(root / "z-real" / "a.png", 8, 8)
    write_image(root / "m" / "b.png", 8, 8)
    (root / "a-link").symlink_to(root / "z-real")     # sorts before the folder it names
    (root / "m" / "b-link").symlink_to(root / "m")    # inside the folder it names
    (root / "0-up").symlink_to(root)                   # the input folder itself
    found = [str(item.relative) for item in list_inputs(root)]
    assert found == ["m/b.png", "z-real/a.png"]


# 4. A folder without a recognised image is an error; more formats are recognised.

def test_gif_jfif_tiff_bmp_and_webp_are_read(ckpt, tmp_path):
    for index, (name, options) in enumerate([("a.gif", {}), ("b.jfif", {"format": "JPEG"}),
                                             ("c.tiff", {}), ("d.bmp", {}), ("e.webp", {})]):
        write_image(tmp_path / "in" / name, 24, 16, seed=index, **options)
    assert run(ckpt, tmp_path / "in", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.png", "b.png", "c.png", "d.png", "e.png"]
    assert read_mask(tmp_path / "out" / "a.png").shape == (16, 24)


def test_a_folder_without_images_is_an_error_naming_the_suffixes(garbage_ckpt, tmp_path,
                                                                 capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    (tmp_path / "in" / "song.mp3").write_bytes(b"x")
    assert run(garbage_ckpt, tmp_path / "in", tmp_path / "out") == 2
    err = one_error_line(capsys)
    assert "no image" in err and ".jpg" in err and ".gif" in err and ".webp" in err
    assert ".mp4" in err and ".mov" in err  # videos are inputs too
    assert not (tmp_path / "out").exists()


# 5. --skip-existing redoes outputs that do not decode.

def test_skip_existing_redoes_empty_and_cut_off_outputs(ckpt, tmp_path, capsys):
    for seed, name in enumerate(("a.png", "b.png", "c.png")):
        write_image(tmp_path / "in" / name, 40, 30, seed=seed)
    out = tmp_path / "out"
    assert run(ckpt, tmp_path / "in", out) == 0
    expected = {name: read_mask(out / name) for name in ("a.png", "b.png")}
    (out / "a.png").write_bytes(b"")
    data = (out / "b.png").read_bytes()
    (out / "b.png").write_bytes(data[: len(data) - 40])  # cut off: its mark survives
    os.utime(out / "c.png", ns=(0, 0))
    capsys.readouterr()
    assert run(ckpt, tmp_path / "in", out, "--skip-existing") == 0
    assert "2 inputs segmented" in capsys.readouterr().out
    for name, mask in expected.items():
        assert np.array_equal(read_mask(out / name), mask)
    assert (out / "c.png").stat().st_mtime_ns == 0


def test_skip_existing_redoes_an_input_missing_any_of_its_outputs(ckpt, tmp_path, capsys):
    for seed, name in enumerate(("a.png", "b.png")):
        write_image(tmp_path / "in" / name, 40, 30, seed=seed)
    out = tmp_path / "out"
    assert run(ckpt, tmp_path / "in", out, "--save", "mask,overlay") == 0
    overlay = (out / "a_overlay.png").read_bytes()
    (out / "a_overlay.png").unlink()  # its mask is still there
    os.utime(out / "b.png", ns=(0, 0))
    capsys.readouterr()
    assert run(ckpt, tmp_path / "in", out, "--save", "mask,overlay", "--skip-existing") == 0
    assert "1 inputs segmented" in capsys.readouterr().out
    assert (out / "a_overlay.png").read_bytes() == overlay
    assert (out / "b.png").stat().st_mtime_ns == 0


# 6. Names are compared case-folded.

def test_names_differing_only_in_case_are_refused(garbage_ckpt, tmp_path, capsys):
    write_image(tmp_path / "in" / "A.jpg", 8, 8)
    write_image(tmp_path / "in" / "a.jpg", 8, 8, seed=1)
    assert run(garbage_ckpt, tmp_path / "in", tmp_path / "out") == 2
    err = one_error_line(capsys)
    assert "A.jpg" in err and "a.jpg" in err
    assert not (tmp_path / "out").exists()


def test_an_output_that_would_be_another_outputs_folder_is_refused(tmp_path):
    write_image(tmp_path / "in" / "trip.jpg", 8, 8)
    write_image(tmp_path / "in" / "trip.png" / "a.jpg", 8, 8)
    with pytest.raises(UserError, match="folder"):
        deploy.outputs.assign_outputs(list_inputs(tmp_path / "in"), tmp_path / "in",
                                    tmp_path / "out", ["mask"], "png")


# 7. torchrun: the shares are fixed before anything is written.

LATE_LISTING_RANK = """
import os, sys, time
import inference

if os.environ["RANK"] == "1":  # list only once rank 0 has written its first output
    listed = inference.list_inputs

    def late(path):
        deadline = time.monotonic() + 120
        while not os.path.exists(sys.argv[-1]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return listed(path)

    inference.list_inputs = late
sys.exit(inference.cli(sys.argv[1:-1]))
"""


def test_torchrun_shares_do_not_depend_on_when_a_rank_lists(ckpt, tmp_path):
    for index in range(4):
        write_image(tmp_path / "in" / f"{index}.png", 24, 16, seed=index)
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(LATE_LISTING_RANK)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(driver), "--in-path", str(tmp_path / "in"), "--out-path", str(out), "--ckpt",
         str(ckpt), *FAST, "--skip-existing", str(out / "0.png")],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    assert "4 inputs segmented" in result.stdout


# 9. The overlay is blended in pieces.

def test_an_overlay_takes_little_more_than_its_photo_and_blends_exactly():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (3000, 1000, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (3000, 1000), dtype=np.uint8)
    palette = [[0, 0, 0], [192, 128, 128], [10, 250, 30]]
    tracemalloc.start()
    picture = deploy.outputs.render("overlay", labels, palette, photo, 0.3)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    overlay = np.asarray(picture)
    assert peak < 4 * photo.nbytes  # less than one float32 copy of the photo
    expected = np.rint(0.7 * photo + 0.3 * np.asarray(palette)[labels])
    assert np.abs(overlay.astype(np.int64) - expected).max() <= 1


# 10. Windows the model cannot predict well are refused: too small for its widest ASPP branch
# (one call per pixel at --tile 1), or overlapping by more than half, automatic windows too.

@pytest.mark.parametrize("extra, flag", [
    (["--tile", "1"], "--tile"), (["--tile", "16", "--tile-overlap", "8"], "--tile"),
    (["--tile", "591", "--tile-overlap", "0"], "--tile"),
    (["--tile-overlap", "5000"], "--tile-overlap"),
    (["--tile", "600", "--tile-overlap", "301"], "--tile-overlap"),
    (["--tile", "600", "--tile-overlap", "600"], "--tile-overlap"),
])
def test_windows_too_small_or_overlapping_too_much_are_refused(garbage_ckpt, tmp_path, capsys,
                                                              extra, flag):
    image = write_image(tmp_path / "a.png", 8, 8)
    assert run(garbage_ckpt, image, tmp_path / "out", *extra) == 2
    assert one_error_line(capsys).startswith(f"error: {flag} ")


def test_the_smallest_window_spans_the_widest_aspp_branch():
    from modeling.backbone import atrous_settings

    # A 3x3 kernel dilated by the widest rate spans 2 * rate + 1 feature pixels: 73 x 8 = 584
    # at output stride 8, 37 x 16 = 592 at 16; the larger is the smallest window.
    spans = [(2 * max(atrous_settings(stride).aspp_rates) + 1) * stride for stride in (8, 16)]
    assert spans == [584, 592] and deploy.predictor.MIN_TILE == 592
    with pytest.raises(ValueError, match="tile must be at least 592"):
        deploy.predictor.Predictor(engine=None, hardware=None, normalize=None, tile=64)
    assert inference.check_flags(inference.get_args_parser().parse_args(
        ["--in-path", "x", "--tile", "592", "--tile-overlap", "296"])) == ["mask"]


# 11. Interrupts.

def interrupt_after(monkeypatch, calls: int, signum: int) -> None:
    """The process signals itself once ``calls`` images have been predicted."""
    whole = deploy.predictor.Predictor.whole
    count = [0]

    def counting(self, samples):
        labels = whole(self, samples)
        count[0] += 1
        if count[0] == calls:
            os.kill(os.getpid(), signum)
        return labels

    monkeypatch.setattr(deploy.predictor.Predictor, "whole", counting)


def test_ctrl_c_finishes_the_writes_in_flight_and_says_how_to_resume(
        ckpt, tmp_path, capsys, monkeypatch):
    for index in range(6):
        write_image(tmp_path / "in" / f"{index}.png", 24, 16, seed=index)
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 2, signal.SIGINT)
    try:
        status = run(ckpt, tmp_path / "in", out)
    except KeyboardInterrupt:
        status = "KeyboardInterrupt"
    assert status == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "1 of 6 inputs written" in err and "--skip-existing" in err
    assert sorted(p.name for p in out.iterdir()) == ["0.png"]  # no temporaries either
    monkeypatch.undo()
    assert run(ckpt, tmp_path / "in", out, "--skip-existing") == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{index}.png" for index in range(6)]


SIGNAL_ITSELF = """
import os, signal, sys
import deploy.predictor, inference

whole = deploy.predictor.Predictor.whole

def counting(self, samples):
    labels = whole(self, samples)
    os.kill(os.getpid(), signal.SIGTERM)
    return labels

deploy.predictor.Predictor.whole = counting
sys.exit(inference.cli(sys.argv[1:]))
"""


def test_sigterm_exits_143_without_a_traceback_and_a_rerun_clears_stale_temporaries(
        ckpt, tmp_path):
    for index in range(3):
        write_image(tmp_path / "in" / f"{index}.png", 24, 16, seed=index)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".2.png.0123456789ab.tmp"  # a write killed by SIGKILL
    stale.write_bytes(b"half")
    others = out / ".notes.0123456789ab.tmp"
    others.write_bytes(b"not ours")
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_ITSELF)
    result = subprocess.run(
        [sys.executable, str(driver), "--in-path", str(tmp_path / "in"), "--out-path", str(out),
         "--ckpt", str(ckpt), "--engine", "torch", "--workers", "1"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 143, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "0 of 3 inputs written" in result.stderr and "--skip-existing" in result.stderr
    assert not stale.exists() and others.exists()
    assert sorted(p.name for p in out.iterdir()) == [".notes.0123456789ab.tmp"]


def test_an_error_in_a_loader_worker_ends_the_run_within_seconds(ckpt, tmp_path):
    """The worker's MemoryError (a 2 x 2000 image at --size 8192 asks for about 200 GB, under
    a 10 GB address-space limit) is raised in the main process, which stops the workers and
    exits non-zero. The workers ignore SIGTERM: left to Python's exit, it waited for ever."""
    write_image(tmp_path / "in" / "thin.png", 2000, 2)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (10 * 2**30, 10 * 2**30))

    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "inference.py", "--in-path", str(tmp_path / "in"), "--out-path",
         str(tmp_path / "out"), "--ckpt", str(ckpt), "--engine", "torch", "--workers", "1",
         "--size", "8192"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        preexec_fn=limit_memory, capture_output=True, text=True, timeout=150)
    assert result.returncode != 0 and "MemoryError" in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - start < 120


def test_an_interrupted_export_writes_nothing_and_leaves_no_temporary(
        ckpt, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    stale = tmp_path / ".model.onnx.0123456789ab.tmp"
    stale.write_bytes(b"half")
    real_export = export.export_onnx

    def interrupted_export(*args, **kwargs):
        data = real_export(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return data

    monkeypatch.setattr(export, "export_onnx", interrupted_export)
    try:
        status = export.cli(["--ckpt", str(ckpt), "--out", str(out), "--no-check"])
    except KeyboardInterrupt:
        status = "KeyboardInterrupt"
    assert status == 130
    err = one_error_line(capsys)
    assert "interrupted" in err and "model.onnx" in err
    assert list(tmp_path.iterdir()) == []


# 12. Every bad input: one line, exit 2, before the model runs.

def altered_checkpoint(ckpt: Path, path: Path, change) -> Path:
    checkpoint = torch.load(ckpt, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_settings_without_a_key_are_one_line(ckpt, tmp_path, capsys):
    image = write_image(tmp_path / "a.png", 8, 8)
    no_mean = altered_checkpoint(ckpt, tmp_path / "no-mean.pth.tar",
                                 lambda c: c["settings"].pop("mean"))
    assert run(no_mean, image, tmp_path / "out") == 2
    assert "'mean'" in one_error_line(capsys)
    no_names = altered_checkpoint(ckpt, tmp_path / "no-names.pth.tar",
                                  lambda c: c["settings"].pop("class_names"))
    assert export.cli(["--ckpt", str(no_names), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "'class_names'" in one_error_line(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


def test_a_bad_checkpoint_is_one_line_when_exported_for_the_onnx_runtimes(
        ckpt, garbage_ckpt, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    image = write_image(tmp_path / "a.png", 8, 8)
    no_std = altered_checkpoint(ckpt, tmp_path / "no-std.pth.tar",
                                lambda c: c["settings"].pop("std"))
    for bad, expected in ((no_std, "'std'"), (garbage_ckpt, "garbage.pth.tar")):
        assert inference.cli(["--in-path", str(image), "--out-path", str(tmp_path / "out"),
                              "--ckpt", str(bad), "--engine", "openvino", "--workers", "0"]) == 2
        assert expected in one_error_line(capsys)


def test_weights_that_do_not_fit_the_settings_are_one_line(ckpt, tmp_path, capsys):
    image = write_image(tmp_path / "a.png", 8, 8)
    wrong = altered_checkpoint(ckpt, tmp_path / "wrong.pth.tar",
                               lambda c: c["settings"].update(num_classes=7))
    assert run(wrong, image, tmp_path / "out") == 2
    err = one_error_line(capsys)
    assert "wrong.pth.tar" in err and "do not fit" in err and "7 classes" in err
    assert export.cli(["--ckpt", str(wrong), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "do not fit" in one_error_line(capsys)


def test_paths_of_the_wrong_kind_are_one_line(ckpt, garbage_ckpt, tmp_path, capsys):
    image = write_image(tmp_path / "a.png", 8, 8)
    (tmp_path / "model.onnx").mkdir()
    assert export.cli(["--ckpt", str(ckpt), "--out", str(tmp_path / "model.onnx")]) == 2
    assert "is a folder" in one_error_line(capsys)
    existing = tmp_path / "results"
    existing.write_bytes(b"x")
    assert run(garbage_ckpt, image, existing) == 2
    assert "--out-path" in one_error_line(capsys)
    dangling = tmp_path / "linked-results"
    dangling.symlink_to(tmp_path / "missing" / "folder")
    assert run(garbage_ckpt, image, dangling) == 2
    assert one_error_line(capsys) == (
        f"error: --out-path {dangling} is a link to {tmp_path / 'missing' / 'folder'}, which "
        f"does not exist: create that folder, or name another --out-path")


@pytest.mark.parametrize("scale", ["nan", "inf"])
def test_scales_that_are_not_numbers_are_one_line(garbage_ckpt, tmp_path, capsys, scale):
    image = write_image(tmp_path / "a.png", 8, 8)
    assert run(garbage_ckpt, image, tmp_path / "out", "--scales", "1", scale) == 2
    assert "--scales" in one_error_line(capsys)


def test_a_list_naming_one_file_twice_says_so(garbage_ckpt, tmp_path, capsys):
    write_image(tmp_path / "photos" / "a.jpg", 8, 8)
    listing = tmp_path / "job.txt"
    listing.write_text("photos/a.jpg\nphotos/b.jpg\n./photos/../photos/a.jpg\n")
    assert run(garbage_ckpt, listing, tmp_path / "out") == 2
    err = one_error_line(capsys)
    assert "twice" in err and "lines 1 and 3" in err


# 13. Names near the file system's limit.

def test_a_legal_name_near_the_limit_is_written(ckpt, tmp_path):
    name = "x" * 236  # 240 bytes with .png: legal, but not with 18 more for a temporary
    write_image(tmp_path / "in" / f"{name}.jpg", 16, 16)
    assert run(ckpt, tmp_path / "in", tmp_path / "out") == 0
    assert read_mask(tmp_path / "out" / f"{name}.png").shape == (16, 16)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{name}.png"]


# 14. Start-up: the exported graph and OpenVINO's compiled model are cached.

def test_a_checkpoint_is_exported_once_and_reused_until_it_changes(ckpt, tmp_path,
                                                                   monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEEPLAB_CACHE_DIR", str(cache))
    write_image(tmp_path / "in" / "a.png", 40, 30, seed=5)
    common = ["--in-path", str(tmp_path / "in"), "--engine", "openvino", "--amp", "off",
              "--workers", "0"]
    assert inference.cli(common + ["--out-path", str(tmp_path / "first"), "--ckpt",
                                   str(ckpt)]) == 0
    graphs = list((cache / "onnx").glob("*.onnx"))
    assert len(graphs) == 1
    assert any((cache / "openvino").iterdir())

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(deploy.predictor, "export_in_child", no_export)
    assert inference.cli(common + ["--out-path", str(tmp_path / "second"), "--ckpt",
                                   str(ckpt)]) == 0
    assert np.array_equal(read_mask(tmp_path / "second" / "a.png"),
                          read_mask(tmp_path / "first" / "a.png"))
    other = make_checkpoint(tmp_path / "other.pth.tar", num_classes=5, seed=1)
    with pytest.raises(AssertionError, match="exported again"):
        inference.cli(common + ["--out-path", str(tmp_path / "third"), "--ckpt", str(other)])
