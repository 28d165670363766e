"""export.py --int8: NNCF post-training quantization, calibrated on the user's images."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import export
import inference
from dataloader.custom_transforms import Normalize, pil_to_uint8_tensor
from dataloader.utils import load_image
from inference_testing import make_checkpoint, read_mask, require_deploy, write_image
from modeling.deeplab import DeepLab
from deploy.engines import OpenVinoEngine

pytestmark = pytest.mark.slow
onnx = require_deploy("onnx", "openvino", "onnxruntime", "nncf")

from deploy import quantize  # noqa: E402  (needs nothing optional itself, tested with nncf)


@pytest.fixture(scope="module")
def int8(tmp_path_factory) -> dict:
    """A ResNet-18 checkpoint exported in fp32 and in int8 (calibrated on 16 smooth images and
    one truncated JPEG, which must be named and passed over)."""
    folder = tmp_path_factory.mktemp("int8")
    ckpt = make_checkpoint(folder / "r18.pth.tar")
    for seed in range(16):
        write_image(folder / "calibration" / f"{seed:02d}.png", 96, 72, seed=seed)
    good = write_image(folder / "good.jpg", 96, 72, seed=9)
    # Sorts first: read, named and passed over before the 16 good ones.
    (folder / "calibration" / "0-broken.jpg").write_bytes(good.read_bytes()[:300])
    assert export.cli(["--ckpt", str(ckpt), "--out", str(folder / "fp32.onnx"),
                       "--no-check"]) == 0
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = export.cli(["--ckpt", str(ckpt), "--out", str(folder / "int8.onnx"), "--int8",
                             "--calibration", str(folder / "calibration")])
    assert status == 0, err.getvalue()
    return {"ckpt": ckpt, "folder": folder, "fp32": folder / "fp32.onnx",
            "int8": folder / "int8.onnx", "err": err.getvalue()}


def test_int8_export_skips_bad_calibration_files_and_describes_itself(int8):
    assert int8["err"].count("broken.jpg") == 1, int8["err"]
    proto = onnx.load(str(int8["int8"]))
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    assert metadata["precision"].startswith("int8, calibrated on 16 images")
    fp32 = {p.key: p.value for p in onnx.load(str(int8["fp32"])).metadata_props}
    assert fp32["precision"] == "fp32"
    assert json.loads(metadata["deeplab_settings"]) == json.loads(fp32["deeplab_settings"])
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # Weights stored in 8 bits instead of 32: the file is about a quarter of the fp32 one.
    assert int8["int8"].stat().st_size < 0.35 * int8["fp32"].stat().st_size


def test_int8_logits_follow_fp32_on_unseen_images(int8):
    """Quantization error stays small against the logits' spread on images it was not
    calibrated on. A calibration fed other numbers than inference (unnormalised pixels, say)
    sets activation ranges hundreds of times too wide and fails this by far."""
    checkpoint = torch.load(int8["ckpt"], weights_only=True)
    model = DeepLab.from_state_dict(checkpoint["settings"], checkpoint["model"]).eval()
    runner = OpenVinoEngine(str(int8["int8"]), threads=2, amp_dtype=None)
    normalize = Normalize(checkpoint["settings"]["mean"], checkpoint["settings"]["std"])
    for seed in (10, 11):
        path = write_image(int8["folder"] / "unseen" / f"{seed}.png", 96, 72, seed=seed)
        image = normalize(pil_to_uint8_tensor(load_image(path)))[None]
        with torch.inference_mode():
            expected = model(image)["out"]
        got = runner(image)["out"]
        relative = ((got - expected).abs().mean() / expected.std()).item()
        assert relative < 0.25, (seed, relative)


def test_mobilenetv3_quantizes_and_follows_fp32(tmp_path):
    """NNCF quantizes MobileNetV3's hard-swish and squeeze-excitation blocks too, within the
    ResNet-18 bound above on images it was not calibrated on."""
    ckpt = make_checkpoint(tmp_path / "mnv3.pth.tar", backbone="mobilenetv3", num_classes=5)
    for seed in range(16):  # export.py's least calibration set
        write_image(tmp_path / "calibration" / f"{seed}.png", 64, 48, seed=seed)
    with contextlib.redirect_stderr(io.StringIO()):
        assert export.cli(["--ckpt", str(ckpt), "--out", str(tmp_path / "int8.onnx"), "--int8",
                           "--calibration", str(tmp_path / "calibration")]) == 0
    proto = onnx.load(str(tmp_path / "int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in proto.graph.node}
    checkpoint = torch.load(ckpt, weights_only=True)
    model = DeepLab.from_state_dict(checkpoint["settings"], checkpoint["model"]).eval()
    runner = OpenVinoEngine(str(tmp_path / "int8.onnx"), threads=2, amp_dtype=None)
    normalize = Normalize(checkpoint["settings"]["mean"], checkpoint["settings"]["std"])
    path = write_image(tmp_path / "unseen.png", 64, 64, seed=10)
    image = normalize(pil_to_uint8_tensor(load_image(path)))[None]
    with torch.inference_mode():
        expected = model(image)["out"]
    relative = ((runner(image)["out"] - expected).abs().mean() / expected.std()).item()
    assert relative < 0.25, relative


def test_inference_runs_the_int8_file_on_every_image(int8, tmp_path):
    sizes = [(64, 48), (48, 64), (80, 60)]
    for seed, (width, height) in enumerate(sizes):
        write_image(tmp_path / "in" / f"{seed}.png", width, height, seed=20 + seed)
    for engine in ("auto", "openvino"):
        assert inference.cli(["--in-path", str(tmp_path / "in"), "--out-path",
                              str(tmp_path / engine), "--ckpt", str(int8["int8"]),
                              "--engine", engine, "--workers", "0"]) == 0
        for seed, (width, height) in enumerate(sizes):
            assert read_mask(tmp_path / engine / f"{seed}.png").shape == (height, width)


def test_calibration_reads_images_as_inference_does(tmp_path, monkeypatch):
    """EXIF orientation applied (a phone photo calibrates as displayed), and an image that
    inference would predict in windows gives one central window."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=100)
    normalize = Normalize([0.5] * 3, [0.5] * 3)  # 0 -> -1, 255 -> +1
    array = quantize.model_input(str(path), normalize)
    assert array.shape == (1, 3, 40, 20)
    assert array.dtype == np.float32
    # Turned clockwise, the stored left half is the displayed top half.
    assert array[0, :, :16].mean() > 0.95 and array[0, :, 24:].mean() < -0.95

    monkeypatch.setattr(quantize, "TILE_PIXEL_BUDGET", 30 * 30)
    monkeypatch.setattr(quantize, "DEFAULT_TILE", 16)
    big = write_image(tmp_path / "big.png", 64, 48)
    assert quantize.model_input(str(big), normalize).shape == (1, 3, 16, 16)


def test_int8_refuses_missing_or_unreadable_calibration(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "r18.pth.tar")
    out = tmp_path / "int8.onnx"
    assert export.cli(["--ckpt", str(ckpt), "--out", str(out), "--int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--calibration" in err
    assert export.cli(["--ckpt", str(ckpt), "--out", str(out), "--calibration", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--int8" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.jpg").write_bytes(b"")
    assert export.cli(["--ckpt", str(ckpt), "--out", str(out), "--int8", "--calibration",
                       str(tmp_path / "bad")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "empty.jpg" in lines[0] and "no readable image" in lines[-1] and len(lines) == 2
    assert export.cli(["--ckpt", str(ckpt), "--out", str(out), "--int8", "--calibration",
                       str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--calibration" in err and "missing" in err
    assert not out.exists()


def test_int8_refuses_fewer_than_16_calibration_images(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "r18.pth.tar")
    out = tmp_path / "int8.onnx"
    write_image(tmp_path / "one" / "tiny.png", 1, 1)
    for seed in range(16):
        write_image(tmp_path / "many" / f"{seed:02d}.png", 32, 32, seed=seed)
    for extra, words in [(["--calibration", str(tmp_path / "one")], "has 1 readable image"),
                         (["--calibration", str(tmp_path / "many"), "--calibration-count", "15"],
                          "--calibration-count must be at least 16, got 15")]:
        assert export.cli(["--ckpt", str(ckpt), "--out", str(out), "--int8", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_int8_without_nncf_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "r18.pth.tar")
    write_image(tmp_path / "calibration" / "a.png", 32, 32)
    real_find_spec = quantize.find_spec
    monkeypatch.setattr(quantize, "find_spec",
                        lambda name: None if name == "nncf" else real_find_spec(name))
    assert export.cli(["--ckpt", str(ckpt), "--out", str(tmp_path / "int8.onnx"), "--int8",
                       "--calibration", str(tmp_path / "calibration")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "nncf" in err and "requirements-deploy.txt" in err
    assert not (tmp_path / "int8.onnx").exists()
