"""Converting jfzhang95/pytorch-deeplab-xception checkpoints (modeling.convert and
scripts/convert_checkpoint.py), without that repository.

``fixtures/jfzhang95_resnet101_keys.json`` lists the original model's 680 state-dict names and
shapes in its order, written from its own code by ``python -m scripts.verify_conversion
--write-keys``. Numerical equality with the original code is checked by
``scripts/verify_conversion.py`` itself, which needs that repository; here, a fake original is
made from our own model under the original's names (read off the fixture), so the converted model
must compute exactly what ours computes, and verify_conversion's own check runs against such a
stand-in.
"""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import inference
import train
from dataloader.custom_transforms import Normalize, pil_to_uint8_tensor
from dataloader.datasets.coco import COCOSegmentation
from dataloader.utils import VOC_CLASS_NAMES
from modeling.convert import (
    NotConvertible,
    convert_jfzhang95_resnet,
    load_jfzhang95_resnet,
    strip_data_parallel_prefix,
)
from modeling.deeplab import DeepLab
from scripts import convert_checkpoint, verify_conversion
from utils.metrics import Evaluator
from model_testing import Payload, randomised

FIXTURE = Path(__file__).parents[1] / "fixtures" / "jfzhang95_resnet101_keys.json"
TINY = ["--backbone", "resnet18", "--no-pretrained", "--no-cuda", "--amp", "off", "--workers",
        "0", "--crop-size", "64", "--base-size", "64", "--eval-size", "64"]



def original_entries() -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(shape)) for key, shape in json.loads(FIXTURE.read_text())]


def random_state_dict(entries, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: (torch.randint(0, 1000, shape, generator=generator) if key.endswith(
            "num_batches_tracked") else torch.randn(shape, generator=generator))
        for key, shape in entries
    }


@pytest.fixture(scope="module")
def resnet101_keys() -> list[str]:
    return list(DeepLab(backbone="resnet101", output_stride=16, num_classes=21).state_dict())


@pytest.fixture(scope="module")
def their_names(resnet101_keys) -> dict[str, str]:
    """Our head names -> the original's, pairing the two ResNet-101 models entry by entry."""
    theirs = [key for key, _ in original_entries()]
    assert len(theirs) == len(resnet101_keys) == 680
    return {ours: their for ours, their in zip(resnet101_keys, theirs)
            if not ours.startswith("backbone.")}


def fake_original(model: DeepLab, their_names: dict[str, str], prefix: str = "") -> dict:
    """``model`` as the original's train.py would have saved it (its names, its entries)."""
    state_dict = {prefix + their_names.get(key, key): value.clone()
                  for key, value in model.state_dict().items()}
    return {"epoch": 7, "state_dict": state_dict,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.007, "params": [0, 1]}]},
            "best_pred": np.float64(0.6125)}




# ---------------------------------------------------------------- the key mapping (ResNet-101)


def test_all_680_original_entries_map_onto_our_resnet101(resnet101_keys):
    entries = original_entries()
    source = random_state_dict(entries)
    converted = convert_jfzhang95_resnet(source)
    assert (converted.backbone, converted.num_classes) == ("resnet101", 21)
    assert len(converted.state_dict) == 680 and converted.added == 0
    # Same entries in the same order: ours is the original model under other head names.
    assert list(converted.state_dict) == resnet101_keys
    for (their_key, _), (our_key, tensor) in zip(entries, converted.state_dict.items()):
        assert tensor is source[their_key], (their_key, our_key)
    backbone_entries = sum(key.startswith("backbone.") for key, _ in entries)
    assert converted.renamed == 680 - backbone_entries
    model = DeepLab(backbone="resnet101", output_stride=16, num_classes=21, align_corners=True)
    assert model.load_state_dict(converted.state_dict, strict=True)  # no missing / unexpected
    assert sum(p.numel() for p in model.parameters()) == 59_344_309


def test_head_names_read_off_the_original_source(their_names):
    # Module names of the original's aspp.py and decoder.py, mapped by hand.
    expected = {
        "aspp.convs.0.0.weight": "aspp.aspp1.atrous_conv.weight",
        "aspp.convs.3.1.running_var": "aspp.aspp4.bn.running_var",
        "aspp.convs.4.1.weight": "aspp.global_avg_pool.1.weight",
        "aspp.convs.4.2.num_batches_tracked": "aspp.global_avg_pool.2.num_batches_tracked",
        "aspp.project.0.weight": "aspp.conv1.weight",
        "aspp.project.1.bias": "aspp.bn1.bias",
        "decoder.reduce_low_level.1.running_mean": "decoder.bn1.running_mean",
        "decoder.refine.4.weight": "decoder.last_conv.4.weight",
        "decoder.classifier.bias": "decoder.last_conv.8.bias",
    }
    source = random_state_dict(original_entries())
    converted = convert_jfzhang95_resnet(source).state_dict
    for ours, theirs in expected.items():
        assert their_names[ours] == theirs
        assert converted[ours] is source[theirs]


def test_data_parallel_prefix_and_missing_batch_counters():
    entries = original_entries()
    source = random_state_dict(entries, seed=1)
    plain = convert_jfzhang95_resnet(source).state_dict
    prefixed = convert_jfzhang95_resnet({"module." + k: v for k, v in source.items()}).state_dict
    assert list(prefixed) == list(plain)
    assert all(prefixed[key] is plain[key] for key in plain)
    # PyTorch before 0.4.1 stored no num_batches_tracked: one per BatchNorm is added, as 0.
    old = {key: value for key, value in source.items() if not key.endswith("num_batches_tracked")}
    batch_norms = len(source) - len(old)
    converted = convert_jfzhang95_resnet(old)
    # ResNet-101: stem 1 + 33 blocks x 3 + 4 downsample; ASPP 5 branches + projection 6;
    # decoder 3.
    assert converted.added == batch_norms == 1 + 33 * 3 + 4 + 6 + 3
    assert list(converted.state_dict) == list(plain)
    assert converted.state_dict["backbone.bn1.num_batches_tracked"].item() == 0
    assert strip_data_parallel_prefix({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}


@pytest.mark.parametrize("key, backbone", [
    ("backbone.block1.rep.0.weight", "xception"),
    ("backbone.features.0.0.weight", "mobilenet"),
    ("backbone.layer0.0.weight", "drn"),
])
def test_other_original_backbones_are_named(key, backbone):
    with pytest.raises(NotConvertible, match=f"'{backbone}' backbone"):
        convert_jfzhang95_resnet({key: torch.zeros(1), "decoder.last_conv.8.bias": torch.zeros(2)})


def test_unknown_and_misshapen_entries_are_refused():
    source = random_state_dict(original_entries())
    with pytest.raises(NotConvertible, match="1 unknown entries.*classifier.weight"):
        convert_jfzhang95_resnet(dict(source, **{"classifier.weight": torch.zeros(1)}))
    source["aspp.conv1.weight"] = torch.zeros(256, 1024, 1, 1)  # not 5 x 256 inputs
    with pytest.raises(NotConvertible, match=r"aspp.project.0.weight \(256, 1024, 1, 1\)"):
        load_jfzhang95_resnet(source)


# ---------------------------------------------------------------- the script (ResNet-18, fast)


@pytest.fixture(scope="module")
def original_resnet18(their_names) -> DeepLab:
    """Our ResNet-18 DeepLab, align_corners on: what the converted model must compute."""
    torch.manual_seed(0)
    return randomised(DeepLab(backbone="resnet18", num_classes=21, align_corners=True), seed=3)


@pytest.fixture(scope="module")
def original_file(original_resnet18, their_names, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("original") / "checkpoint.pth.tar"
    torch.save(fake_original(original_resnet18, their_names), path)
    return path


@pytest.fixture(scope="module")
def converted_file(original_file, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("converted") / "deeplab-resnet18-voc.pth.tar"
    assert convert_checkpoint.cli([str(original_file), str(path)]) == 0
    return path


def test_converted_checkpoint_is_self_describing_and_computes_the_same(
        converted_file, original_resnet18, tiny_coco_root):
    checkpoint = torch.load(converted_file, weights_only=True)  # plain types only
    settings = checkpoint["settings"]
    model = DeepLab.from_settings(settings)
    # What train.py writes for a 21-class (VOC names) dataset such as COCO.
    coco = COCOSegmentation(str(tiny_coco_root), split="val")
    assert settings == dict(model.settings(), **coco.metadata())
    assert settings["align_corners"] is True and settings["class_names"][15] == "person"
    assert (settings["backbone"], settings["output_stride"]) == ("resnet18", 16)
    assert checkpoint["converted_from"]["epoch"] == 7
    assert checkpoint["converted_from"]["best_pred"] == pytest.approx(0.6125)
    model.load_state_dict(checkpoint["model"])
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)["out"], original_resnet18(x)["out"],
                                   rtol=0, atol=0)


def test_prefixed_legacy_format_and_class_file(original_resnet18, their_names, tmp_path, capsys):
    # DataParallel's module. prefix, PyTorch's pre-1.6 file format, and 21 names of one's own.
    source = tmp_path / "old.pth"
    torch.save(fake_original(original_resnet18, their_names, prefix="module."), source,
               _use_new_zipfile_serialization=False)
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"c{i}\n" for i in range(21)))
    target = tmp_path / "converted.pth"
    assert convert_checkpoint.cli([str(source), str(target), "--classes", str(classes)]) == 0
    assert "21 classes" in capsys.readouterr().out
    checkpoint = torch.load(target, weights_only=True)
    assert checkpoint["settings"]["class_names"][20] == "c20"
    for key, value in original_resnet18.state_dict().items():
        assert torch.equal(checkpoint["model"][key], value), key



def _bad_files(tmp_path: Path, original_file: Path) -> dict[str, Path]:
    truncated = tmp_path / "truncated.pth.tar"
    data = original_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    xception = tmp_path / "xception.pth.tar"
    torch.save({"epoch": 1, "state_dict": {"backbone.conv1.weight": torch.zeros(32, 3, 3, 3),
                                           "backbone.block1.rep.1.weight": torch.zeros(1),
                                           "decoder.last_conv.8.bias": torch.zeros(21)},
                "best_pred": 0.5}, xception)
    unsafe = tmp_path / "unsafe.pth.tar"
    torch.save({"state_dict": {}, "args": Payload()}, unsafe)
    not_a_checkpoint = tmp_path / "list.pth.tar"
    torch.save({"weights": [1, 2, 3]}, not_a_checkpoint)
    return {"truncated": truncated, "xception": xception, "unsafe": unsafe,
            "not_a_checkpoint": not_a_checkpoint, "missing": tmp_path / "nowhere.pth.tar"}


@pytest.mark.parametrize("kind, words", [
    ("truncated", "corrupt, truncated"),
    ("xception", "'xception' backbone"),
    ("unsafe", "unsafe"),
    ("not_a_checkpoint", "no 'state_dict' entry"),
    ("missing", "not found"),
])
def test_bad_files_give_one_line_and_status_2(kind, words, original_file, tmp_path, capsys):
    path = _bad_files(tmp_path, original_file)[kind]
    target = tmp_path / "out.pth.tar"
    assert convert_checkpoint.cli([str(path), str(target)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and path.name in err and words in err
    assert "Traceback" not in captured.err + captured.out
    assert not target.exists()


def test_class_count_mismatch_names_the_option(original_file, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("background\nperson\ncar\n")
    assert convert_checkpoint.cli([str(original_file), str(tmp_path / "out.pth"),
                                   "--classes", str(classes)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--classes" in err and "21" in err


# ---------------------------------------------------------------- used like a native checkpoint


@pytest.mark.slow
def test_inference_and_eval_only_from_a_converted_checkpoint(converted_file, demo_coco_root,
                                                             tmp_path):
    in_dir = tmp_path / "images"
    in_dir.mkdir()
    images = sorted((demo_coco_root / "val2017").glob("*.jpg"))[:2]
    for image in images:
        (in_dir / image.name).write_bytes(image.read_bytes())
    out_dir = tmp_path / "masks"
    assert inference.cli(["--in-path", str(in_dir), "--out-path", str(out_dir),
                          "--ckpt", str(converted_file), "--no-cuda"]) == 0
    for image in images:
        mask = Image.open(out_dir / f"{image.stem}.png")
        assert mask.size == Image.open(image).size and np.asarray(mask).max() < 21
    metrics_path = tmp_path / "eval.json"
    result = train.main(train.get_args_parser().parse_args(
        TINY + ["--dataset", "demo", "--data-root", str(demo_coco_root), "--eval-only",
                "--resume", str(converted_file), "--eval-json", str(metrics_path)]))
    assert json.loads(metrics_path.read_text())["pixel_accuracy"] == \
        result["metrics"]["pixel_accuracy"]
    assert 0 <= result["metrics"]["pixel_accuracy"] <= 1


def three_class_folder(demo_root: Path, root: Path, per_split: dict[str, int]) -> Path:
    """The demo images as a ``folder`` dataset of 3 classes: background, person, car; the
    demo's other objects (bird, cat, dog) are ignored (255)."""
    to_three = np.full(256, 255, dtype=np.uint8)
    to_three[[0, VOC_CLASS_NAMES.index("person"), VOC_CLASS_NAMES.index("car")]] = [0, 1, 2]
    for split, count in per_split.items():
        dataset = COCOSegmentation(str(demo_root), split=split)
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for index in range(count):
            sample = dataset[index]
            sample["image"].save(root / "images" / split / f"{index:03d}.png")
            label = to_three[np.asarray(sample["label"])]
            Image.fromarray(label).save(root / "masks" / split / f"{index:03d}.png")
    (root / "classes.txt").write_text("background\nperson\ncar\n")
    return root


@pytest.mark.slow
def test_finetune_from_a_converted_checkpoint_to_three_classes(
        converted_file, original_resnet18, demo_coco_root, tmp_path, capsys):
    root = three_class_folder(demo_coco_root, tmp_path / "three", {"train": 16, "val": 4})
    run_dir = tmp_path / "run"
    result = train.main(train.get_args_parser().parse_args(
        TINY + ["--dataset", "folder", "--data-root", str(root), "--resume", str(converted_file),
                "--ft", "--epochs", "1", "--batch-size", "4", "--lr", "0", "--run-dir",
                str(run_dir)]))
    out = capsys.readouterr().out
    assert "re-initialised decoder.classifier.weight, decoder.classifier.bias" in out
    assert "21 -> 3" in out
    assert result["iteration"] == 16 // 4
    assert result["metrics"]["mean_iou"] is not None
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["settings"]["class_names"] == ["background", "person", "car"]
    # The fine-tuned model upsamples as the converted one does.
    assert checkpoint["settings"]["align_corners"] is True
    assert checkpoint["model"]["decoder.classifier.weight"].shape == (3, 256, 1, 1)
    # With a zero learning rate the converted weights come through fine-tuning untouched
    # (BatchNorm statistics do move: training mode updates them).
    for key in ("backbone.conv1.weight", "aspp.project.0.weight", "decoder.refine.4.weight"):
        assert torch.equal(checkpoint["model"][key], original_resnet18.state_dict()[key]), key


def test_plain_resume_of_a_converted_checkpoint_says_to_fine_tune(converted_file, demo_coco_root,
                                                                 tmp_path, capsys):
    status = train.cli(TINY + ["--dataset", "demo", "--data-root", str(demo_coco_root),
                               "--resume", str(converted_file), "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "--ft" in err and "--eval-only" in err


# ---------------------------------------------------------------- scripts/verify_conversion.py


class OriginalNames(nn.Module):
    """A stand-in for the original's ``DeepLab``: the modules of one of ours, registered under
    the original's module names, so its ``state_dict()`` is what the original's would be and it
    returns the logits tensor as the original does."""

    def __init__(self, model: DeepLab, their_modules: dict[str, str]) -> None:
        super().__init__()
        self.backbone = model.backbone  # the original's ResNet uses torchvision's names
        for ours, theirs in their_modules.items():
            parent = self
            *path, name = theirs.split(".")
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(name, model.get_submodule(ours))
        self._model = (model,)  # in a tuple: not registered, its names are ours

    def train(self, mode: bool = True) -> "OriginalNames":
        super().train(mode)
        self._model[0].train(mode)  # dropout layers hold no weights, so only ours reaches them
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model[0](x)["out"]

    def get_1x_lr_params(self):
        return self._model[0].backbone_parameters()

    def get_10x_lr_params(self):
        return self._model[0].head_parameters()


class OriginalSaver:
    """The original's ``Saver`` as its train.py uses it: ``run/<dataset>/<checkname>/
    experiment_<k>/`` under the working directory, ``torch.save`` of the state as given."""

    def __init__(self, args: SimpleNamespace) -> None:
        directory = os.path.join("run", args.dataset, args.checkname)
        run_id = len(os.listdir(directory)) if os.path.isdir(directory) else 0
        self.experiment_dir = os.path.join(directory, f"experiment_{run_id}")
        os.makedirs(self.experiment_dir)

    def save_checkpoint(self, state: dict, is_best: bool, filename="checkpoint.pth.tar") -> None:
        torch.save(state, os.path.join(self.experiment_dir, filename))


class OriginalEvaluator(Evaluator):
    """The original's ``Evaluator`` interface on ours: NumPy class ids in, its mIoU a NumPy
    float64 (what their checkpoints store as ``best_pred``)."""

    def add_batch(self, gt_image: np.ndarray, pre_image: np.ndarray) -> None:
        super().add_batch(torch.from_numpy(gt_image), torch.from_numpy(pre_image))

    def Mean_Intersection_over_Union(self) -> np.float64:  # noqa: N802 - the original's name
        return np.float64(self.mean_iou())


class OriginalTransforms:
    """The original's evaluation ``Normalize`` and ``ToTensor`` on ``{"image", "label"}``
    samples, made of this project's normalisation."""

    class Normalize:
        def __init__(self, mean, std) -> None:
            self.normalize = Normalize(mean, std)

        def __call__(self, sample: dict) -> dict:
            return {"image": self.normalize(pil_to_uint8_tensor(sample["image"])),
                    "label": sample["label"]}

    class ToTensor:
        def __call__(self, sample: dict) -> dict:
            return sample


def their_module_names(their_names: dict[str, str]) -> dict[str, str]:
    """Our head module names -> the original's (from the state-dict names off the fixture)."""
    modules: dict[str, str] = {}
    for ours, theirs in their_names.items():
        modules.setdefault(ours.rsplit(".", 1)[0], theirs.rsplit(".", 1)[0])
    return modules


def stand_in_original(their_modules: dict[str, str]) -> SimpleNamespace:
    """What :func:`verify_conversion.load_original` returns, made of this project's modules: its
    ``DeepLab`` builds our ResNet-18 (``align_corners`` on, as the original upsamples) under the
    original's names."""

    def build(*, backbone: str, output_stride: int, num_classes: int, sync_bn: bool,
              freeze_bn: bool) -> OriginalNames:
        assert backbone == "resnet" and not freeze_bn
        model = DeepLab(backbone="resnet18", output_stride=output_stride,
                        num_classes=num_classes, align_corners=True)
        return OriginalNames(model, their_modules)

    return SimpleNamespace(DeepLab=build, Saver=OriginalSaver, Evaluator=OriginalEvaluator,
                           transforms=OriginalTransforms)


#: (width, height) of the images compared on, then of the 2 BatchNorm is measured on.
VERIFY_SIZES = [(64, 48), (45, 71), (33, 33), (80, 60), (60, 80)]


@pytest.fixture(scope="module")
def verify_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("verify_images")
    rng = np.random.default_rng(0)
    for index, (width, height) in enumerate(VERIFY_SIZES):
        blobs = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
        Image.fromarray(blobs).resize((width, height), Image.Resampling.BICUBIC).save(
            folder / f"{index}.png")
    return folder


@pytest.mark.slow
def test_verify_conversion_passes_against_a_faithful_stand_in(
        their_names, verify_images, tmp_path, monkeypatch, capsys):
    # The whole command as the real run goes, but for reading the original from its checkout.
    original = stand_in_original(their_module_names(their_names))
    monkeypatch.setattr(verify_conversion, "load_original", lambda repo: original)
    report_file = tmp_path / "report.json"
    status = verify_conversion.main(verify_conversion.get_args_parser().parse_args(
        ["--original-repo", "unused", "--images", str(verify_images), "--num-images", "3",
         "--work-dir", str(tmp_path / "work"), "--json", str(report_file)]))
    out = capsys.readouterr().out
    assert status == 0 and "PASSED" in out, out
    report = json.loads(report_file.read_text())
    assert report["passed"] and report["sync_bn_layout_identical"]
    assert report["original_entries"] == len(DeepLab(backbone="resnet18").state_dict())
    pixels = sum(width * height for width, height in VERIFY_SIZES[:3])
    assert set(report["runs"]) == {"as saved by train.py", "module. prefix"}
    for label, run in report["runs"].items():
        # Our modules under their names, converted back: the same computation, bit for bit.
        assert [row["image"] for row in run["images"]] == ["0.png", "1.png", "2.png"]
        assert [row["size"] for row in run["images"]] == [list(s) for s in VERIFY_SIZES[:3]]
        assert run["pixels"] == pixels
        assert run["max_relative_difference"] == 0 and run["argmax_differing_pixels"] == 0
        assert run["inference_max_relative_difference"] == 0
        assert all(row["input_max_abs_difference"] == 0 for row in run["images"])
        source = torch.load(run["source"], weights_only=False)  # written by the stand-in
        prefixed = label == "module. prefix"
        assert all(key.startswith("module.") == prefixed for key in source["state_dict"])
        assert isinstance(source["best_pred"], np.float64) and source["epoch"] == 50
        converted = torch.load(run["converted"], weights_only=True)
        assert converted["settings"]["backbone"] == "resnet18"
        assert converted["settings"]["align_corners"] is True


def test_verify_conversion_fails_when_the_conversion_swaps_two_branches(
        their_names, verify_images, tmp_path):
    # The original's rate-12 and rate-18 ASPP branches under each other's names: the same shapes,
    # so the conversion goes through, but the converted model computes something else. The
    # steps of verify() one by one, converting in this process (the subprocess is the other
    # test's).
    modules = their_module_names(their_names)
    swap = {"aspp.aspp2.atrous_conv": "aspp.aspp3.atrous_conv", "aspp.aspp2.bn": "aspp.aspp3.bn"}
    swap.update({theirs: ours for ours, theirs in swap.items()})
    original = stand_in_original({ours: swap.get(theirs, theirs)
                                  for ours, theirs in modules.items()})
    images, _ = verify_conversion.image_paths(str(verify_images), 3)
    theirs = verify_conversion.build_original(original, 16, sync_bn=False)
    randomised(theirs._model[0], seed=5)
    optimizer = verify_conversion.original_optimizer(theirs)
    src = verify_conversion.save_like_original(original, theirs, optimizer, tmp_path,
                                               data_parallel_prefix=False)
    convert_checkpoint.convert(src, tmp_path / "converted.pth.tar")
    rows = verify_conversion.compare(original, theirs, tmp_path / "converted.pth.tar", images)
    summary = verify_conversion.summarise(rows, tolerance=1e-4)
    assert not summary["passed"]
    assert summary["max_relative_difference"] > 1e-4
    assert summary["pixels"] == sum(width * height for width, height in VERIFY_SIZES[:3])


def test_verify_conversion_reads_the_original_from_its_checkout_and_puts_ours_back(tmp_path):
    # A checkout's shape (its modeling/ shares our package's name), with placeholder classes.
    repo = tmp_path / "pytorch-deeplab-xception"
    files = {
        "modeling/__init__.py": "",
        "modeling/deeplab.py": "from modeling.backbone import resnet\nclass DeepLab:\n"
                               "    backbone_module = resnet\n",
        "modeling/backbone/__init__.py": "",
        "modeling/backbone/resnet.py": "class ResNet:\n    def _load_pretrained_model(self):\n"
                                       "        raise RuntimeError('downloads')\n",
        "utils/saver.py": "class Saver:\n    pass\n",
        "utils/metrics.py": "class Evaluator:\n    pass\n",
        "dataloaders/custom_transforms.py": "class Normalize:\n    pass\n",
    }
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    ours = sys.modules["modeling.deeplab"]
    original = verify_conversion.load_original(repo)
    assert original.DeepLab is not DeepLab and original.DeepLab.__module__ == "modeling.deeplab"
    assert original.Saver.__name__ == "Saver" and original.Evaluator.__name__ == "Evaluator"
    assert original.transforms.Normalize.__name__ == "Normalize"
    # The ImageNet download is switched off; our own modeling package is back in place.
    assert original.DeepLab.backbone_module.ResNet()._load_pretrained_model() is None
    assert sys.modules["modeling.deeplab"] is ours and str(repo) not in sys.path
    from modeling.deeplab import DeepLab as again
    assert again is DeepLab


def test_verify_conversion_refuses_a_folder_that_is_not_the_original(tmp_path):
    with pytest.raises(SystemExit, match="has no modeling/deeplab.py"):
        verify_conversion.load_original(tmp_path)
