"""export.py and the ONNX runtimes: a self-describing file that predicts what PyTorch predicts."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import export
import inference
from dataloader.custom_transforms import Normalize, pil_to_uint8_tensor
from dataloader.utils import load_image
from inference_testing import make_checkpoint, read_mask, require_deploy, write_image
from modeling.deeplab import DeepLab
from deploy.engines import OnnxRuntimeEngine, OpenVinoEngine, resolve_engine
from deploy.predictor import load_engine
from utils.errors import UserError
from utils.hardware import Hardware

pytestmark = pytest.mark.slow
onnx = require_deploy("onnx", "onnxruntime", "openvino")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(folder / "r18.pth.tar", num_classes=21)
    assert export.cli(["--ckpt", str(ckpt), "--out", str(folder / "r18.onnx"), "--no-check"]) == 0
    checkpoint = torch.load(ckpt, weights_only=True)
    model = DeepLab.from_state_dict(checkpoint["settings"], checkpoint["model"]).eval()
    return {"ckpt": ckpt, "onnx": folder / "r18.onnx", "model": model,
            "settings": checkpoint["settings"]}


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def test_the_file_describes_itself(exported):
    proto = onnx.load(str(exported["onnx"]))
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    settings = exported["settings"]
    assert json.loads(metadata["class_names"])[15] == "person"
    assert json.loads(metadata["palette"])[15] == [192, 128, 128]
    assert json.loads(metadata["mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(metadata["std"]) == [0.229, 0.224, 0.225]
    assert json.loads(metadata["deeplab_settings"]) == json.loads(json.dumps(settings))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_runtimes_agree_with_pytorch_at_any_batch_and_size(exported, engine):
    runner = (OnnxRuntimeEngine(str(exported["onnx"]), threads=2, use_cuda=False)
              if engine == "onnxruntime" else
              OpenVinoEngine(str(exported["onnx"]), threads=2, amp_dtype=None))
    assert json.loads(runner.metadata()["deeplab_settings"])["num_classes"] == 21
    generator = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 64, 64), (2, 3, 75, 131), (3, 3, 40, 33)]:
        image = torch.randn(*shape, generator=generator)
        with torch.inference_mode():
            expected = exported["model"](image)["out"]
        got = runner(image)["out"]
        assert got.shape == expected.shape
        assert agreement(got.argmax(1), expected.argmax(1)) >= 0.999, shape


@pytest.fixture(scope="module")
def exported_mobilenetv3(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("export_mobilenetv3")
    ckpt = make_checkpoint(folder / "mnv3.pth.tar", backbone="mobilenetv3", num_classes=5)
    assert export.cli(["--ckpt", str(ckpt), "--out", str(folder / "mnv3.onnx"),
                       "--no-check"]) == 0
    checkpoint = torch.load(ckpt, weights_only=True)
    model = DeepLab.from_state_dict(checkpoint["settings"], checkpoint["model"]).eval()
    return {"onnx": folder / "mnv3.onnx", "model": model}


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_mobilenetv3_runs_in_every_runtime_as_in_pytorch(exported_mobilenetv3, engine):
    # Its hard-swish, hard-sigmoid and squeeze-excitation ops exported and run in fp32.
    path = str(exported_mobilenetv3["onnx"])
    runner = (OnnxRuntimeEngine(path, threads=2, use_cuda=False) if engine == "onnxruntime"
              else OpenVinoEngine(path, threads=2, amp_dtype=None))
    assert json.loads(runner.metadata()["deeplab_settings"])["backbone"] == "mobilenetv3"
    generator = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 64, 64), (1, 3, 64, 48)]:
        image = torch.randn(*shape, generator=generator)
        with torch.inference_mode():
            expected = exported_mobilenetv3["model"](image)["out"].argmax(1)
        got = runner(image)["out"].argmax(1)
        assert expected.unique().numel() >= 2  # not one class everywhere, which any engine gets
        assert got.shape == expected.shape
        assert agreement(got, expected) >= 0.999, shape


def real_images(limit: int) -> list[Path]:
    root = os.environ.get("DEEPLAB_COCO_ROOT")
    if not root:
        pytest.skip("DEEPLAB_COCO_ROOT is not set: no real COCO images to compare on")
    return sorted((Path(root) / "val2017").glob("*.jpg"))[:limit]


def test_onnxruntime_agrees_with_pytorch_fp32_on_real_images(exported):
    runner = OnnxRuntimeEngine(str(exported["onnx"]), threads=2, use_cuda=False)
    normalize = Normalize(exported["settings"]["mean"], exported["settings"]["std"])
    same = total = 0
    for path in real_images(4):
        image = normalize(pil_to_uint8_tensor(load_image(path)))[None]
        with torch.inference_mode():
            expected = exported["model"](image)["out"].argmax(1)
        got = runner(image)["out"].argmax(1)
        same += int((got == expected).sum())
        total += expected.numel()
    assert same / total >= 0.999, same / total


def masks_agreement(exported, tmp_path: Path, ckpt_kind: str, flags: list[str]) -> float:
    """The share of pixels whose class ``inference.py --ckpt <ckpt_kind> FLAGS`` gives as
    ``--engine torch --amp off`` does, on three generated images."""
    for seed, (width, height) in enumerate([(64, 48), (48, 64), (80, 60)]):
        write_image(tmp_path / "in" / f"{seed}.png", width, height, seed=seed)
    common = ["--in-path", str(tmp_path / "in"), "--workers", "0"]
    assert inference.cli(common + ["--out-path", str(tmp_path / "torch"), "--ckpt",
                                   str(exported["ckpt"]), "--engine", "torch", "--amp",
                                   "off"]) == 0
    assert inference.cli(common + ["--out-path", str(tmp_path / "other"), "--ckpt",
                                   str(exported[ckpt_kind]), *flags]) == 0
    same = total = 0
    for seed in range(3):
        expected = read_mask(tmp_path / "torch" / f"{seed}.png")
        got = read_mask(tmp_path / "other" / f"{seed}.png")
        same, total = same + int((got == expected).sum()), total + expected.size
    return same / total


@pytest.mark.parametrize("ckpt_kind,engine", [("onnx", "onnxruntime"), ("onnx", "openvino"),
                                              ("ckpt", "openvino")])
def test_inference_runs_the_same_pipeline_on_every_engine(exported, tmp_path, ckpt_kind, engine):
    # fp32 against fp32: random weights leave a few near-ties that rounding may flip.
    flags = ["--engine", engine, "--amp", "off"]
    assert masks_agreement(exported, tmp_path, ckpt_kind, flags) >= 0.999


@pytest.mark.parametrize("ckpt_kind,flags", [("ckpt", []), ("onnx", []),
                                             ("ckpt", ["--engine", "torch"])])
def test_the_default_precision_is_fp32_whatever_the_cpu_reports(exported, tmp_path, ckpt_kind,
                                                                flags, cpu_bf16):
    agreement = masks_agreement(exported, tmp_path, ckpt_kind, flags)
    if flags:  # PyTorch in its default precision is exactly the fp32 run
        assert agreement == 1.0
    else:  # the default engine: fp32 in another runtime
        assert agreement >= 0.999


@pytest.mark.parametrize("cuda_onnxruntime, expected", [(True, "onnxruntime"),
                                                        (False, "openvino")])
def test_an_onnx_file_runs_by_default_on_a_gpu_machine(exported, tmp_path, monkeypatch,
                                                       cuda_onnxruntime, expected):
    """--engine auto on a GPU machine picks PyTorch for checkpoints, which cannot run an ONNX
    file: that goes to onnxruntime's CUDA build where it is installed, else to OpenVINO (CPU),
    in fp32 even where --amp auto chose bf16 for the GPU."""
    import onnxruntime

    providers = ["CUDAExecutionProvider"] * cuda_onnxruntime + ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
    gpu = torch.device("cuda", 0)
    assert resolve_engine("auto", gpu) == "torch"
    assert resolve_engine("auto", gpu, onnx_file=True) == expected
    # The engine really runs: built for a (pretended) Ampere GPU, on this machine's CPU.
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr("deploy.engines.onnxruntime_has_cuda", lambda: cuda_onnxruntime)
    hardware = Hardware(device=gpu, gpu_ids=[0], amp_dtype=torch.bfloat16, channels_last=True)
    engine, settings, name = load_engine(str(exported["onnx"]), hardware)
    assert name == expected and settings["num_classes"] == 21
    if name == "openvino":
        import openvino

        assert engine.compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    image = torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected_labels = exported["model"](image)["out"].argmax(1)
    assert agreement(engine(image)["out"].argmax(1), expected_labels) >= 0.999


def test_an_onnx_file_without_a_runtime_is_one_line(monkeypatch):
    monkeypatch.setattr("deploy.engines.is_installed", lambda name: name == "torch")
    with pytest.raises(UserError, match="requirements-deploy.txt"):
        resolve_engine("auto", torch.device("cpu"), onnx_file=True)
    assert resolve_engine("auto", torch.device("cpu")) == "torch"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter, on purpose
def test_an_onnx_file_without_our_metadata_is_refused(tmp_path, capsys):
    model = torch.nn.Conv2d(3, 2, 1).eval()
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False,
                      input_names=["image"], output_names=["logits"])
    image = write_image(tmp_path / "a.png", 16, 16)
    assert inference.cli(["--in-path", str(image), "--out-path", str(tmp_path / "out"),
                          "--ckpt", str(path), "--engine", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "foreign.onnx" in err and "export.py" in err


def test_a_corrupt_onnx_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf at all")
    image = write_image(tmp_path / "a.png", 16, 16)
    for engine in ("onnxruntime", "openvino"):
        assert inference.cli(["--in-path", str(image), "--out-path", str(tmp_path / "out"),
                              "--ckpt", str(path), "--engine", engine]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "broken.onnx" in err and engine in err


def test_export_checks_itself_and_refuses_bad_arguments(exported, tmp_path, capsys):
    out = tmp_path / "checked.onnx"
    assert export.cli(["--ckpt", str(exported["ckpt"]), "--out", str(out)]) == 0
    # export.py's own check on a random input: random weights give near-ties, so a few pixels
    # may flip between PyTorch and onnxruntime; the bar is 99.9 %.
    agreement = re.search(r"argmax agreement ([0-9.]+)%", capsys.readouterr().out)
    assert agreement is not None and float(agreement.group(1)) >= 99.9
    assert export.cli(["--ckpt", str(exported["ckpt"]), "--out", str(tmp_path / "m.bin")]) == 2
    assert "--out" in capsys.readouterr().err
    assert export.cli(["--ckpt", str(tmp_path / "none.pth.tar"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.pth.tar" in err
