"""Your own data that is not 8-bit RGB, end to end (issue 26): a 5-band uint16 TIFF dataset with
0/255 binary masks is checked, trained, evaluated, segmented, exported to ONNX and run by
onnxruntime; a 1-band 16-bit PNG dataset trains and evaluates with its class count; a 3-band
dataset starts from exactly the ImageNet first convolution."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

tifffile = pytest.importorskip("tifffile")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

import export  # noqa: E402
import inference  # noqa: E402
import train  # noqa: E402
from dataloader.datasets.folder import FolderSegmentation  # noqa: E402
from tests.e2e.test_train import TINY, scalars  # noqa: E402
from utils.distributed import DistributedContext  # noqa: E402

SIZE = 48


def _scene(rng: np.random.Generator, bands: int, peak: int) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W, bands)`` pixels whose bands are brighter inside a random square, and its mask."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    x, y, side = *rng.integers(4, SIZE // 2, 2), int(rng.integers(12, SIZE // 2))
    mask[y:y + side, x:x + side] = True
    levels = np.linspace(0.2, 0.6, bands)
    pixels = rng.normal(0.25, 0.05, (SIZE, SIZE, bands)) + mask[..., None] * levels
    return np.clip(pixels * peak, 0, peak), mask


def write_multiband(root: Path, bands: int = 5, counts=(("train", 8), ("val", 2))) -> dict:
    """A folder dataset of ``bands``-band uint16 TIFFs and 0/255 masks; returns every train
    image (for statistics computed here, independently of the code)."""
    rng, train_images = np.random.default_rng(0), []
    for split, count in counts:
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            pixels, mask = _scene(rng, bands, 65535)
            pixels = pixels.astype(np.uint16)
            tifffile.imwrite(root / "images" / split / f"{i}.tif", pixels,
                             photometric="minisblack", planarconfig="contig")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / split / f"{i}.png")
            if split == "train":
                train_images.append(pixels)
    return {"train": train_images}


def folder_args(root: Path, *extra: str) -> list[str]:
    return TINY + ["--dataset", "folder", "--data-root", str(root), *extra]


@pytest.fixture(scope="module")
def multiband(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multiband") / "data"
    written = write_multiband(root)
    run_dir = root.parent / "run"
    result = train.main(train.get_args_parser().parse_args(folder_args(
        root, "--mask-format", "binary", "--epochs", "8", "--batch-size", "4", "--lr", "0.02",
        "--eval-interval", "8", "--run-dir", str(run_dir))))
    return dict(written, root=root, run_dir=run_dir, result=result)


def expected_statistics(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and population std over every pixel, in float64, on the unit scale."""
    values = np.concatenate([image.reshape(-1, image.shape[-1]) for image in images]) / 65535.0
    return values.mean(axis=0), values.std(axis=0)


def test_check_data_names_the_binary_flag_and_prints_the_statistics(multiband, capsys):
    root = multiband["root"]
    assert train.cli(folder_args(root, "--check-data")) == 2
    assert "--mask-format binary" in capsys.readouterr().err
    assert train.cli(folder_args(root, "--check-data", "--mask-format", "binary")) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if "--mean" in line][0]
    words = line.split()
    mean = [float(word) for word in words[words.index("--mean") + 1:words.index("--std")]]
    std = [float(word) for word in words[words.index("--std") + 1:]]
    expected_mean, expected_std = expected_statistics(multiband["train"])
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5)
    np.testing.assert_allclose(std, expected_std, rtol=1e-5)


def test_five_bands_train_with_their_statistics_recorded(multiband):
    losses = [value for _, value in scalars(multiband["run_dir"], "train/loss")]
    assert len(losses) == 16
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    settings = torch.load(multiband["run_dir"] / "model_best.pth.tar",
                          weights_only=True)["settings"]
    assert settings["in_channels"] == 5
    assert settings["class_names"] == ["background", "foreground"]
    expected_mean, expected_std = expected_statistics(multiband["train"])
    np.testing.assert_allclose(settings["mean"], expected_mean, rtol=1e-9)
    np.testing.assert_allclose(settings["std"], expected_std, rtol=1e-9)


def test_five_bands_evaluate_segment_and_export(multiband, tmp_path):
    root, ckpt = multiband["root"], multiband["run_dir"] / "model_best.pth.tar"
    train.main(train.get_args_parser().parse_args(folder_args(
        root, "--mask-format", "binary", "--eval-only", "--resume", str(ckpt),
        "--eval-json", str(tmp_path / "eval.json"))))
    # The checkpoint's own statistics normalise its evaluation: the score of its training run.
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert scored["mean_iou"] == pytest.approx(multiband["result"]["best_pred"], abs=1e-6)
    out = tmp_path / "out"
    assert inference.cli(["--in-path", str(root / "images" / "val"), "--out-path", str(out),
                          "--ckpt", str(ckpt), "--no-cuda", "--save", "mask,overlay",
                          "--rgb-bands", "3,2,1"]) == 0
    for image in sorted((root / "images" / "val").glob("*.tif")):
        mask = np.asarray(Image.open(out / f"{image.stem}.png"))
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 1}
        assert Image.open(out / f"{image.stem}_overlay.png").size == (SIZE, SIZE)
    onnx_path = tmp_path / "model.onnx"
    assert export.cli(["--ckpt", str(ckpt), "--out", str(onnx_path)]) == 0
    metadata = {prop.key: prop.value for prop in onnx.load(str(onnx_path)).metadata_props}
    assert metadata["in_channels"] == "5"
    assert_onnxruntime_agrees(ckpt, onnx_path, sorted((root / "images" / "val").glob("*.tif")))
    # inference.py runs the exported file itself, reading its channels from the metadata.
    assert inference.cli(["--in-path", str(root / "images" / "val"), "--out-path",
                          str(tmp_path / "onnx_out"), "--ckpt", str(onnx_path), "--no-cuda",
                          "--engine", "onnxruntime"]) == 0
    for image in sorted((root / "images" / "val").glob("*.tif")):
        torch_mask = np.asarray(Image.open(out / f"{image.stem}.png"))
        onnx_mask = np.asarray(Image.open(tmp_path / "onnx_out" / f"{image.stem}.png"))
        assert (torch_mask == onnx_mask).mean() >= 0.999


def assert_onnxruntime_agrees(ckpt: Path, onnx_path: Path, images: list[Path]) -> None:
    """onnxruntime's argmax equals PyTorch's on at least 99.9 % of the val pixels, both fed the
    images normalised with the checkpoint's statistics (computed here by hand)."""
    from modeling.checkpoint import load_model

    model, settings = load_model(ckpt)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    mean = np.array(settings["mean"], dtype=np.float32)
    std = np.array(settings["std"], dtype=np.float32)
    agree = total = 0
    for path in images:
        pixels = tifffile.imread(path).astype(np.float32) / 65535.0
        batch = ((pixels - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
        got = session.run(None, {session.get_inputs()[0].name: batch})[0].argmax(1)
        with torch.inference_mode():
            expected = model(torch.from_numpy(batch))["out"].argmax(1).numpy()
        agree, total = agree + int((got == expected).sum()), total + expected.size
    assert agree / total >= 0.999


def test_one_band_sixteen_bit_png_trains_and_evaluates(tmp_path):
    root, rng = tmp_path / "grey", np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("sea\nland\ncloud\n")
    for split, count in (("train", 4), ("val", 2)):
        (root / "images" / split).mkdir()
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            pixels, mask = _scene(rng, 1, 65535)
            labels = mask.astype(np.uint8) + (np.arange(SIZE)[None, :] > SIZE - 8) * 2
            Image.fromarray(pixels[..., 0].astype(np.uint16)).save(
                root / "images" / split / f"{i}.png")
            Image.fromarray(labels.astype(np.uint8)).save(root / "masks" / split / f"{i}.png")
    assert Image.open(root / "images" / "train" / "0.png").mode == "I;16"
    run_dir = tmp_path / "run"
    result = train.main(train.get_args_parser().parse_args(folder_args(
        root, "--epochs", "1", "--batch-size", "2", "--run-dir", str(run_dir))))
    assert list(result["metrics"]["per_class_iou"]) == ["sea", "land", "cloud"]
    settings = torch.load(run_dir / "model_best.pth.tar", weights_only=True)["settings"]
    assert settings["num_classes"] == 3 and settings["in_channels"] == 1
    assert len(settings["mean"]) == len(settings["std"]) == 1


def test_three_bands_start_from_exactly_the_imagenet_first_convolution(tmp_path):
    import torchvision

    root = tmp_path / "three"
    write_multiband(root, bands=3, counts=(("train", 2), ("val", 1)))
    torch.manual_seed(3)
    weights = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(weights, tmp_path / "imagenet.pth")
    args = train.get_args_parser().parse_args(folder_args(
        root, "--mask-format", "binary", "--pretrained", "--backbone-weights",
        str(tmp_path / "imagenet.pth")))
    val_set = FolderSegmentation(root, split="val", mask_format="binary")
    assert (val_set.in_channels, val_set.rgb8) == (3, False)  # uint16: not read as a photo
    model = train.build_model(args, None, val_set.num_classes, DistributedContext(),
                              val_set.in_channels)
    assert torch.equal(model.backbone.conv1.weight, weights["conv1.weight"])
