"""inference.py --int8 and Predictor.load(int8=...): a checkpoint quantized by NNCF on the run's
photos or a calibration folder, cached by contents, with its agreement with fp32 printed."""
from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import inference
from inference_testing import (make_checkpoint, one_error_line, read_mask, require_deploy,
                               write_image)

pytestmark = pytest.mark.slow
onnx = require_deploy("onnx", "openvino", "onnxruntime", "nncf")

from deploy import int8 as int8_module  # noqa: E402  (imports nncf when it quantizes)
from deploy.engines import OpenVinoEngine  # noqa: E402
from deploy.predictor import Predictor  # noqa: E402
from deploy.quantize import model_input  # noqa: E402
from dataloader.custom_transforms import Normalize  # noqa: E402

WIDTH, HEIGHT = 64, 48
MEASURED = re.compile(r"^int8 model: calibrated on (\d+) images, agrees with fp32 on "
                      r"(\d+\.\d\d) % of pixels of (\d+) held-out images( \(cached\))?$",
                      re.MULTILINE)


def segment(ckpt: Path, in_path: Path, out_path: Path, *extra: str) -> tuple[int, str]:
    """``inference.py --int8`` in this process; its exit status and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = inference.cli(["--in-path", str(in_path), "--out-path", str(out_path),
                                "--ckpt", str(ckpt), "--int8", "--workers", "0", *extra])
    return status, err.getvalue()


def int8_models(cache: Path) -> list[str]:
    return sorted(path.name for path in (cache / "int8").glob("*.onnx"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """A ResNet-18 run with --int8 on 18 of its own photos (16 calibrate, 2 are held out),
    with an empty cache."""
    folder = tmp_path_factory.mktemp("int8_run")
    ckpt = make_checkpoint(folder / "r18.pth.tar")
    for seed in range(18):
        write_image(folder / "in" / f"{seed:02d}.png", WIDTH, HEIGHT, seed=seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEEPLAB_CACHE_DIR", str(folder / "cache"))
        status, err = segment(ckpt, folder / "in", folder / "out")
    assert status == 0, err
    return {"folder": folder, "ckpt": ckpt, "cache": folder / "cache", "err": err}


def test_int8_run_writes_masks_and_prints_its_agreement_on_held_out_photos(built):
    found = MEASURED.search(built["err"])
    assert found, built["err"]
    calibrated, percent, held_out, cached = found.groups()
    assert (calibrated, held_out, cached) == ("16", "2", None)
    for seed in range(18):
        assert read_mask(built["folder"] / "out" / f"{seed:02d}.png").shape == (HEIGHT, WIDTH)
    # The figure is the agreement of the cached int8 model with the cached fp32 graph, both in
    # OpenVINO, on the two photos after the 16 that calibrated it, measured here on its own.
    (model,) = (built["cache"] / "int8").glob("*.onnx")
    (graph,) = (built["cache"] / "onnx").glob("*.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {
        node.op_type for node in onnx.load(str(model)).graph.node}
    settings = torch.load(built["ckpt"], weights_only=True)["settings"]
    normalize = Normalize(settings["mean"], settings["std"])
    same = total = 0
    for seed in (16, 17):
        image = torch.from_numpy(model_input(str(built["folder"] / "in" / f"{seed}.png"),
                                             normalize))
        int8, fp32 = (OpenVinoEngine(str(path), threads=1, amp_dtype=None)(image)["out"].argmax(1)
                      for path in (model, graph))
        # The masks written are the int8 model's.
        assert np.array_equal(read_mask(built["folder"] / "out" / f"{seed}.png"), int8[0].numpy())
        same, total = same + int((int8 == fp32).sum()), total + int8.numel()
    assert percent == f"{100 * same / total:.2f}"
    assert 80 < float(percent) < 100  # random weights: close classes flip, but not most


def test_a_second_run_reuses_the_model_and_prints_the_same_figure(built, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("DEEPLAB_CACHE_DIR", str(built["cache"]))
    monkeypatch.setattr(int8_module, "quantize_int8", _no_quantization)
    before = int8_models(built["cache"])
    # The same photos in another folder: the cache is keyed by their contents, not their paths.
    shutil.copytree(built["folder"] / "in", tmp_path / "in")
    status, err = segment(built["ckpt"], tmp_path / "in", tmp_path / "out")
    assert status == 0, err
    first, again = MEASURED.search(built["err"]), MEASURED.search(err)
    assert again and again.group(4) == " (cached)", err
    assert again.groups()[:3] == first.groups()[:3]
    assert int8_models(built["cache"]) == before and len(before) == 1
    assert len(list((tmp_path / "out").glob("*.png"))) == 18

    # One calibration photo with other bytes (same name, same size): a new model.
    monkeypatch.undo()
    monkeypatch.setenv("DEEPLAB_CACHE_DIR", str(built["cache"]))
    write_image(tmp_path / "in" / "03.png", WIDTH, HEIGHT, seed=99)
    status, err = segment(built["ckpt"], tmp_path / "in", tmp_path / "out", "--overwrite")
    assert status == 0, err
    rebuilt = MEASURED.search(err)
    assert rebuilt and rebuilt.group(4) is None, err
    assert len(int8_models(built["cache"])) == 2 and set(before) < set(int8_models(built["cache"]))


def _no_quantization(*args, **kwargs):
    raise AssertionError("quantized again instead of reading the cached int8 model")


def test_predictor_load_int8_from_a_calibration_folder_without_cache(tmp_path, monkeypatch):
    """16 calibration images, none left over: it runs, and says why agreement is unmeasured;
    with ``cache_dir`` None nothing is written."""
    monkeypatch.setenv("DEEPLAB_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = make_checkpoint(tmp_path / "r18.pth.tar", num_classes=5)
    for seed in range(16):
        write_image(tmp_path / "calibration" / f"{seed:02d}.jpg", WIDTH, HEIGHT, seed=seed)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        predictor, settings = Predictor.load(str(ckpt), device="cpu",
                                             int8=tmp_path / "calibration", cache_dir=None)
    assert predictor.engine_name == "openvino"
    assert settings["class_names"] == [f"class{i}" for i in range(5)]
    record = settings["int8"]
    assert (record["calibration_images"], record["held_out_images"]) == (16, 0)
    assert record["agreement"] is None and not record["cached"]
    summary = int8_module.int8_summary(record)
    assert summary.startswith("int8 model: calibrated on 16 images, agreement with fp32 not "
                              "measured: all 16 images of --calibration")
    image = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    labels = predictor.predict(image)
    assert labels.shape == (HEIGHT, WIDTH) and labels.dtype == torch.uint8
    assert int(labels.max()) < 5
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("photos, calibrated, held_out", [
    (16, 16, 0), (17, 16, 1), (24, 16, 8), (25, 17, 8), (72, 64, 8), (80, 64, 8)])
def test_own_photos_hold_out_up_to_8_and_calibrate_on_at_least_16(tmp_path, photos,
                                                                  calibrated, held_out):
    paths = [write_image(tmp_path / f"{index:02d}.png", 8, 8, seed=index)
             for index in range(photos)]
    (tmp_path / "broken.png").write_bytes(b"not an image")  # the run reports it, not int8
    chosen = int8_module.from_inputs([tmp_path / "broken.png", *paths])
    assert chosen.images == [str(path) for path in paths[:calibrated]]
    assert chosen.held_out == [str(path) for path in paths[calibrated:calibrated + held_out]]
    assert bool(chosen.no_held_out) == (held_out == 0)


def test_calibration_folder_holds_out_images_beyond_64_else_the_run_photos(tmp_path):
    for index in range(70):
        write_image(tmp_path / "many" / f"{index:02d}.png", 8, 8, seed=index)
    chosen = int8_module.from_folder(tmp_path / "many", spare=[tmp_path / "many" / "00.png"])
    assert [Path(path).name for path in chosen.held_out] == [f"{i}.png" for i in range(64, 70)]
    few = sorted((tmp_path / "many").glob("*.png"))[:20]
    (tmp_path / "few.txt").write_text("".join(f"{path}\n" for path in few))
    own = [few[0], write_image(tmp_path / "own.png", 8, 8)]  # one of them calibrates it
    chosen = int8_module.from_folder(tmp_path / "few.txt", spare=own)
    assert len(chosen.images) == 20 and chosen.held_out == [str(own[1])]


def test_the_key_is_the_images_contents_in_any_order(tmp_path):
    ckpt = str(make_checkpoint(tmp_path / "r18.pth.tar"))
    first, second = (str(write_image(tmp_path / f"{i}.png", 8, 8, seed=i)) for i in (1, 2))
    key = int8_module.int8_key(ckpt, [first, second])
    assert int8_module.int8_key(ckpt, [second, first]) == key
    write_image(tmp_path / "2.png", 8, 8, seed=3)
    assert int8_module.int8_key(ckpt, [first, second]) != key


def test_too_few_calibration_images_is_one_line_before_anything_is_built(tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv("DEEPLAB_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = make_checkpoint(tmp_path / "r18.pth.tar")
    write_image(tmp_path / "one" / "a.png", WIDTH, HEIGHT)
    base = ["--in-path", str(tmp_path / "one"), "--out-path", str(tmp_path / "out"),
            "--ckpt", str(ckpt), "--workers", "0"]
    assert inference.cli([*base, "--int8"]) == 2
    err = one_error_line(capsys)
    assert "--calibration" in err and "16" in err and "has 1" in err, err
    assert inference.cli([*base, "--int8", "--calibration", str(tmp_path / "one")]) == 2
    err = one_error_line(capsys)
    assert "--calibration" in err and "16" in err and "1 readable image" in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, words", [
    (["--int8", "--ckpt", "model.onnx"], "export.py --ckpt CKPT --out model-int8.onnx --int8"),
    (["--int8", "--engine", "torch"], "--engine torch"),
    (["--calibration", "photos"], "--calibration is for --int8"),
])
def test_int8_requests_that_cannot_work_are_one_line(tmp_path, capsys, flags, words):
    ckpt = make_checkpoint(tmp_path / "r18.pth.tar")
    write_image(tmp_path / "in" / "a.png", WIDTH, HEIGHT)
    assert inference.cli(["--in-path", str(tmp_path / "in"), "--out-path", str(tmp_path / "out"),
                          "--ckpt", str(ckpt), "--workers", "0", *flags]) == 2
    assert words in one_error_line(capsys)
