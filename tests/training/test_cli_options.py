"""train.py options end to end on each dataset kind, and the small pieces behind them."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import train
from utils.distributed import DistributedContext
from utils.errors import UserError
from utils.hardware import CPU_FP16_NOTE, Placement, resolve_amp
from utils.metrics import Evaluator
from dataloader.utils import palette_for
from modeling.deeplab import DeepLab
from modeling.inference_ops import predict_probabilities

# --no-cuda: on a GPU host the runs would otherwise take every GPU (DataParallel).
TINY = ["--backbone", "resnet18", "--no-pretrained", "--workers", "0", "--crop-size", "48",
        "--base-size", "48", "--epochs", "1", "--batch-size", "4", "--print-freq", "1",
        "--no-cuda"]


def draw_pair(seed: int, class_ids: list[int], size=(48, 40)) -> tuple[Image.Image, np.ndarray]:
    """An image with one coloured square per class and its class-index mask (0 elsewhere)."""
    rng = np.random.default_rng(seed)
    image = np.full((size[1], size[0], 3), 120, dtype=np.uint8)
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for class_id in class_ids:
        x, y = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
        image[y:y + 12, x:x + 12] = (40 * class_id) % 256
        mask[y:y + 12, x:x + 12] = class_id
    return Image.fromarray(image), mask


def make_folder_dataset(root: Path, bad_train_image: bool = False,
                        class_names: tuple[str, ...] = ("background", "square", "disc")) -> Path:
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in class_names))
    for split, count in (("train", 9), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            image, mask = draw_pair(i, [1, 2])
            image.save(root / "images" / split / f"{i:03d}.jpg")
            Image.fromarray(mask).save(root / "masks" / split / f"{i:03d}.png")
    if bad_train_image:
        (root / "images" / "train" / "008.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def make_voc_dataset(root: Path) -> Path:
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    names = {"train": [f"2007_{i:06d}" for i in range(8)], "val": ["2008_000001"]}
    flat = sum(palette_for(21), [])
    for split, stems in names.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for i, stem in enumerate(stems):
            image, mask = draw_pair(i, [8, 15])
            mask[0, :] = 255  # VOC's border value
            image.save(root / "JPEGImages" / f"{stem}.jpg")
            png = Image.fromarray(mask, mode="P")
            png.putpalette(flat + [0] * (768 - len(flat)))
            png.save(root / "SegmentationClass" / f"{stem}.png")
    return root


def make_cocostuff_dataset(root: Path) -> Path:
    for split, count in (("train2017", 8), ("val2017", 1)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            image, mask = draw_pair(i, [1, 3])
            # raw value = COCO id - 1: classes 1 and 3 become COCO-Stuff ids 124 (grass), 126 (ground-other)
            raw = np.where(mask == 0, 255, mask - 1 + 123).astype(np.uint8)
            image.save(root / "images" / split / f"{i:012d}.jpg")
            Image.fromarray(raw).save(root / "annotations" / split / f"{i:012d}.png")
    return root


def run(args: list[str], tmp_path: Path) -> tuple[dict, dict]:
    run_dir = tmp_path / "run"
    result = train.main(train.get_args_parser().parse_args(
        TINY + args + ["--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "cache")]))
    return result, json.loads((run_dir / "settings.json").read_text())


def test_folder_dataset_with_focal_aux_weights_bf16_and_a_bad_image(tmp_path, capsys):
    root = make_folder_dataset(tmp_path / "mine", bad_train_image=True)
    result, settings = run(["--dataset", "folder", "--data-root", str(root), "--loss-type",
                            "focal", "--aux-loss", "--use-balanced-weights", "--skip-bad-images",
                            "--amp", "bf16", "--channels-last", "--lr-scheduler", "cos",
                            "--warmup-iters", "1", "--eval-worst", "0"], tmp_path)
    assert settings["model"]["class_names"] == ["background", "square", "disc"]
    assert settings["model"]["aux_loss"] is True
    assert settings["amp_dtype"] == "torch.bfloat16"
    assert result["iteration"] == 9 // 4
    assert "skipped 1 bad samples" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["model"]["decoder.classifier.weight"].shape[0] == 3
    assert "aux_classifier.4.weight" in checkpoint["model"]
    # class weights were cached in --cache-dir, nothing was written into the dataset
    assert any((tmp_path / "cache").rglob("*"))
    assert sorted(p.name for p in root.iterdir()) == ["classes.txt", "images", "masks"]
    # --eval-worst 0: the matrix and the bars, no worst images
    assert sorted(p.name for p in (tmp_path / "run").glob("*.png")) == [
        "confusion_matrix.png", "per_class_iou.png"]


def test_finetune_from_a_21_class_checkpoint_to_3_classes(tmp_path, capsys):
    voc = make_voc_dataset(tmp_path / "VOC2012")
    run(["--dataset", "pascal", "--data-root", str(voc), "--amp", "off"], tmp_path / "a")
    source = tmp_path / "a" / "run" / "checkpoint.pth.tar"
    folder = make_folder_dataset(tmp_path / "mine")
    # --lr 0: two SGD steps that move nothing, so every weight shows where it came from.
    result, settings = run(["--dataset", "folder", "--data-root", str(folder), "--amp", "off",
                            "--resume", str(source), "--ft", "--lr", "0"], tmp_path / "b")
    out = capsys.readouterr().out
    assert "re-initialised decoder.classifier.weight, decoder.classifier.bias" in out
    assert "21 -> 3" in out
    assert settings["model"]["num_classes"] == 3
    assert result["iteration"] == 2  # a fine-tune starts at iteration 0, not the source's
    tuned = torch.load(tmp_path / "b" / "run" / "checkpoint.pth.tar", weights_only=True)
    assert tuned["settings"]["num_classes"] == 3
    source_weights = torch.load(source, weights_only=True)["model"]
    model = DeepLab(backbone="resnet18", num_classes=3)
    classifier = set(model.classifier_parameter_names())
    assert classifier == {"decoder.classifier.weight", "decoder.classifier.bias"}
    for name, _ in model.named_parameters():
        if name not in classifier:
            assert torch.equal(tuned["model"][name], source_weights[name]), name
    assert tuned["model"]["decoder.classifier.weight"].shape == (3, 256, 1, 1)
    assert source_weights["decoder.classifier.weight"].shape == (21, 256, 1, 1)
    # A fresh classifier (PyTorch's default init, within +-1/sqrt(256)), untouched at lr 0.
    assert 0 < tuned["model"]["decoder.classifier.bias"].abs().max().item() <= 1 / 16
    # Buffers came from the source too: BatchNorm counted the source's 2 training batches, then
    # the fine-tune's 2 (its running means and variances moved with them, as train mode does).
    for name, count in tuned["model"].items():
        if name.endswith("num_batches_tracked"):
            assert (int(source_weights[name]), int(count)) == (2, 4), name


def test_cocostuff_runs_with_171_classes(tmp_path):
    root = make_cocostuff_dataset(tmp_path / "cocostuff")
    result, settings = run(["--dataset", "cocostuff", "--data-root", str(root), "--amp", "off",
                            "--eval-scales", "0.75", "1.0", "--eval-flip"], tmp_path)
    assert settings["model"]["num_classes"] == 171
    assert len(settings["model"]["palette"]) == 171
    # 11 unused ids lie below 124, so grass and ground-other are contiguous classes 112 and 114
    names = settings["model"]["class_names"]
    assert (names[112], names[114]) == ("grass", "ground-other")
    scored = {name for name, value in result["metrics"]["per_class_iou"].items()
              if value is not None}
    assert {"grass", "ground-other"} <= scored
    for name in ("confusion_matrix", "per_class_iou", "worst_images"):
        assert (tmp_path / "run" / f"{name}.png").is_file()


# ------------------------------------------------------------------------- pieces


def test_resolve_amp(warnings_of):
    caplog = warnings_of("utils.hardware")
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("auto", cpu) is None  # fp32: auto never picks a reduced precision here
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert not caplog.records
    # fp16 runs on the CPU (to test the GradScaler path), with one line saying what it is for.
    assert resolve_amp("fp16", cpu) is torch.float16
    assert [r.getMessage() for r in caplog.records] == [CPU_FP16_NOTE]
    assert "testing the GPU fp16 path" in CPU_FP16_NOTE


def test_out_of_memory_names_the_flags(tmp_path, monkeypatch, capsys):
    root = make_folder_dataset(tmp_path / "mine")

    def out_of_memory(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("modeling.deeplab.DeepLab.forward", out_of_memory)
    status = train.cli(TINY + ["--dataset", "folder", "--data-root", str(root), "--amp", "off",
                               "--run-dir", str(tmp_path / "run")])
    assert status == 4
    # the progress bar may precede it; the error itself is one line and no traceback
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: GPU out of memory")
    assert "--batch-size" in last and "--crop-size" in last


class PositionModel(torch.nn.Module):
    """Logits that depend on position, so flipping changes them: out = x[:, :2] * column ramp."""

    def forward(self, x):
        ramp = torch.linspace(0.0, 1.0, x.shape[-1])
        return {"out": x[:, :2] * ramp}


def test_flip_averages_the_unflipped_prediction():
    x = torch.randn(1, 3, 4, 6)
    model = PositionModel()
    got = predict_probabilities(model, x, (4, 6), flip=True)
    plain = (x[:, :2] * torch.linspace(0, 1, 6)).softmax(1)
    flipped_logits = (torch.flip(x, dims=[3])[:, :2] * torch.linspace(0, 1, 6))
    mirrored = torch.flip(flipped_logits, dims=[3]).softmax(1)
    torch.testing.assert_close(got, (plain + mirrored) / 2)


def test_scales_are_resized_to_the_output_and_averaged():
    x = torch.randn(2, 3, 8, 8)
    got = predict_probabilities(PositionModel(), x, (5, 7), scales=(0.5, 1.0, 2.0))
    assert got.shape == (2, 2, 5, 7)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 5, 7))


class SizeAndCornerModel(torch.nn.Module):
    """Logits constant over a half-size map, so resizing keeps them exactly: class 0 gets the
    input height / 8 (which the scale changes), class 1 the input's top-left value (which the
    flip changes)."""

    def forward(self, x):
        n, _, height, width = x.shape
        logits = torch.empty(n, 2, height // 2, width // 2)
        logits[:, 0] = height / 8
        logits[:, 1] = x[:, 0, :1, :1]
        return {"out": logits}


def test_scales_and_flips_average_the_probabilities_of_every_view():
    x = torch.full((1, 3, 8, 8), 2.0)
    x[..., 4:] = -1.0  # top-left 2 unflipped, -1 flipped, at every scale
    got = predict_probabilities(SizeAndCornerModel(), x, (5, 7), scales=(0.5, 1.0, 2.0),
                                flip=True)
    # Views: heights 4, 8, 16 give class-0 logits 0.5, 1, 2; class 1 is 2 (plain) or -1 (flipped).
    # p(class 0) = 1 / (1 + exp(logit1 - logit0)), averaged over the six views.
    views = [(s, c) for s in (0.5, 1.0, 2.0) for c in (2.0, -1.0)]
    expected = sum(1 / (1 + math.exp(c - s)) for s, c in views) / 6
    assert expected == pytest.approx(0.600385, abs=1e-6)
    torch.testing.assert_close(got[:, 0], torch.full((1, 5, 7), expected))
    torch.testing.assert_close(got[:, 1], torch.full((1, 5, 7), 1 - expected))
    # Without the flips, only the plain views: (0.182426 + 0.268941 + 0.5) / 3.
    plain = predict_probabilities(SizeAndCornerModel(), x, (5, 7), scales=(0.5, 1.0, 2.0))
    expected_plain = sum(1 / (1 + math.exp(2.0 - s)) for s in (0.5, 1.0, 2.0)) / 3
    assert expected_plain == pytest.approx(0.317122, abs=1e-6)
    torch.testing.assert_close(plain[:, 0], torch.full((1, 5, 7), expected_plain))


# ------------------------------------------------------------------------- learning-rate rules


def parse(flags: list[str]):
    return train.get_args_parser().parse_args(["--dataset", "folder", "--backbone", "resnet18",
                                               "--no-pretrained", *flags])


def cpu(devices: int = 1) -> SimpleNamespace:
    """The Hardware fields build_plan and build_optimisation read."""
    return SimpleNamespace(device=torch.device("cpu"), devices_per_process=devices,
                           gpu_ids=list(range(devices)) if devices > 1 else [], amp_dtype=None)


@pytest.mark.parametrize("flags, devices, world_size, total_batch, lr", [
    (["--batch-size", "4"], 1, 1, 4, 0.0025),      # 0.01 x 4 / 16
    (["--batch-size", "4"], 1, 4, 16, 0.01),       # torchrun: 4 processes of 4
    (["--batch-size", "8"], 1, 8, 64, 0.04),
    ([], 2, 1, 8, 0.005),                          # DataParallel on 2 GPUs: 4 per GPU
    ([], 1, 2, 8, 0.005),                          # torchrun, 1 GPU each: 4 per process
    (["--batch-size", "4", "--lr", "0.003"], 1, 4, 16, 0.003),  # --lr wins
])
def test_default_lr_is_0_01_per_16_images_of_total_batch(flags, devices, world_size,
                                                          total_batch, lr):
    schedule = train.build_plan(parse(flags + ["--epochs", "3"]), 200, Placement(
        cpu(devices), DistributedContext(rank=0, world_size=world_size)))
    assert (schedule.total_batch, schedule.lr) == (total_batch, pytest.approx(lr))
    assert schedule.iters_per_epoch == 200 // total_batch
    assert schedule.total_iters == 3 * (200 // total_batch)


def learning_rates(flags: list[str], train_size: int):
    args = parse(flags)
    model = DeepLab(backbone="resnet18", num_classes=3, aux_loss=True)
    placement = Placement(cpu(), DistributedContext())
    schedule = train.build_plan(args, train_size, placement)
    optimisation = train.build_optimisation(args, model, schedule, None, placement)
    return model, schedule, optimisation


def test_the_head_learns_10x_faster_than_the_backbone():
    model, _, optimisation = learning_rates(["--lr", "0.02", "--batch-size", "4"], 40)
    rate = {id(p): group["lr"] for group in optimisation.optimizer.param_groups
            for p in group["params"]}
    assert len(rate) == len(list(model.parameters()))  # every parameter is trained
    assert {rate[id(p)] for p in model.backbone.parameters()} == {0.02}
    head = [p for module in (model.aspp, model.decoder, model.aux_classifier)
            for p in module.parameters()]
    assert head and all(rate[id(p)] == pytest.approx(0.2) for p in head)


def test_lr_step_counts_epochs_of_iterations():
    _, schedule, optimisation = learning_rates(
        ["--lr", "0.1", "--batch-size", "4", "--epochs", "6", "--lr-scheduler", "step",
         "--lr-step", "2", "--lr-gamma", "0.5"], 12)
    assert (schedule.iters_per_epoch, schedule.total_iters) == (3, 18)
    used = []
    for _ in range(18):
        used.append(optimisation.optimizer.param_groups[0]["lr"])
        optimisation.optimizer.step()
        optimisation.scheduler.step()
    # 2 epochs x 3 iterations = 6 iterations per step of the decay
    assert used == pytest.approx([0.1] * 6 + [0.05] * 6 + [0.025] * 6)


def test_model_best_holds_the_weights_of_the_best_evaluation(tmp_path, monkeypatch):
    root = make_folder_dataset(tmp_path / "mine")
    for i in range(4, 9):  # 4 train images: one iteration of 4 per epoch
        (root / "images" / "train" / f"{i:03d}.jpg").unlink()
        (root / "masks" / "train" / f"{i:03d}.png").unlink()
    scripted = [0.30, 0.50, 0.20]  # the mIoU of evaluations 1, 2, 3: the second is the best
    models, evaluations, weights = [], [], []
    real_build_model, real_results = train.build_model, Evaluator.results

    def build_model(*args, **kwargs):
        models.append(real_build_model(*args, **kwargs))
        return models[-1]

    def results(self, class_names):
        # One Evaluator per evaluation (its table calls results() too): count them, and keep
        # the weights it scored.
        if not any(self is seen for seen in evaluations):
            evaluations.append(self)
            weights.append({k: v.clone() for k, v in models[0].state_dict().items()})
        number = next(i for i, seen in enumerate(evaluations) if seen is self)
        return dict(real_results(self, class_names), mean_iou=scripted[number])

    monkeypatch.setattr(train, "build_model", build_model)
    monkeypatch.setattr(Evaluator, "results", results)
    result, settings = run(["--dataset", "folder", "--data-root", str(root), "--amp", "off",
                            "--epochs", "3", "--eval-interval", "1", "--lr", "0.05"], tmp_path)
    assert len(evaluations) == 3 and settings["iters_per_epoch"] == 1
    best = torch.load(tmp_path / "run" / "model_best.pth.tar", weights_only=True)
    latest = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)
    assert best["best_pred"] == latest["best_pred"] == result["best_pred"] == max(scripted)
    assert (best["iteration"], latest["iteration"]) == (2, 3)
    for name, tensor in weights[1].items():
        assert torch.equal(best["model"][name], tensor), name
        assert torch.equal(latest["model"][name], weights[2][name]), name
    assert any(not torch.equal(weights[1][name], weights[2][name]) for name in weights[1])


def test_negative_eval_worst_is_refused():
    args = train.get_args_parser().parse_args(["--eval-worst", "-1"])
    with pytest.raises(UserError, match="--eval-worst"):
        train.check_flags(args)


def test_eval_worst_above_64_is_refused_in_one_line(capsys):
    # 320 worst images drew a 910 x 70,465-pixel PNG at every evaluation.
    train.check_flags(train.get_args_parser().parse_args(["--eval-worst", "64"]))
    assert train.cli(["--eval-worst", "65", "--dataset", "folder", "--data-root",
                      "/nonexistent/data"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --eval-worst must be 0 (off) or a number of images up to 64, got 65"


# ------------------------------------------------------- reports run after the checkpoint


def folder_run(root: Path, run_dir: Path, *extra: str) -> int:
    """The issue's command: ``python train.py --dataset folder ... --epochs 1 --run-dir R``."""
    return train.cli(["--dataset", "folder", "--data-root", str(root), "--backbone", "resnet18",
                      "--no-pretrained", "--crop-size", "64", "--base-size", "64", "--workers",
                      "0", "--no-cuda", "--batch-size", "4", "--epochs", "1", "--amp", "off",
                      "--run-dir", str(run_dir), *extra])


def test_class_names_are_drawn_as_written_not_as_mathtext(tmp_path):
    # matplotlib's mathtext failed on this name: ParseSyntaxException, exit 1, no checkpoint.
    root = make_folder_dataset(tmp_path / "mine",
                               class_names=("background", "$\\frac{x$", "price $5 and $10"))
    assert folder_run(root, tmp_path / "R") == 0
    checkpoint = torch.load(tmp_path / "R" / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["iteration"] == 2  # 9 images, batches of 4: the epoch's 2 steps
    assert checkpoint["settings"]["class_names"][1] == "$\\frac{x$"
    for name in ("confusion_matrix", "per_class_iou", "worst_images"):
        assert (tmp_path / "R" / f"{name}.png").is_file()


def test_a_figure_error_is_one_warning_and_the_epoch_is_saved(tmp_path, monkeypatch, caplog):
    root = make_folder_dataset(tmp_path / "mine")

    def out_of_memory(*args, **kwargs):
        raise MemoryError("cannot allocate 2.9 GB for the figure")

    monkeypatch.setattr("utils.figures.confusion_matrix_figure", out_of_memory)
    with caplog.at_level(logging.WARNING):
        assert folder_run(root, tmp_path / "R") == 0
    checkpoint = torch.load(tmp_path / "R" / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["iteration"] == 2 and checkpoint["eval_pending"] is False
    assert (tmp_path / "R" / "model_best.pth.tar").is_file()
    assert json.loads((tmp_path / "R" / "metrics.json").read_text())["iteration"] == 2
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno >= logging.WARNING]
    assert warnings == ["the evaluation figures skipped: MemoryError: cannot allocate 2.9 GB "
                        "for the figure"]
    assert not list((tmp_path / "R").glob("*.png"))
