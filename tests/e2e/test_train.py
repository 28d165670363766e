"""End-to-end runs of train.py and inference.py on generated demo data (CPU, tiny sizes)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import inference
import train
from dataloader.datasets.coco import COCOSegmentation
from model_testing import Payload

pytestmark = pytest.mark.slow

# resnet18 at output stride 16 on 64-pixel crops: about a second per iteration on 2 cores.
# --no-cuda: on a GPU host the runs would otherwise take every GPU (DataParallel).
TINY = ["--backbone", "resnet18", "--no-pretrained", "--amp", "off", "--workers", "0",
        "--crop-size", "64", "--base-size", "64", "--eval-size", "64", "--no-cuda"]


def scalars(run_dir: str | Path, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


@pytest.fixture(scope="module")
def demo_root(demo_coco_root) -> Path:
    return demo_coco_root


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory) -> dict:
    # 4 epochs of 12 steps: the loss ends near 0.16 of its start and the best mIoU near 0.64,
    # against the 0.6 and twice all-background (0.30) asserted below (measured, OMP_NUM_THREADS=1).
    run_dir = tmp_path_factory.mktemp("run") / "exp"
    args = train.get_args_parser().parse_args(
        TINY + ["--dataset", "demo", "--data-root", str(demo_root), "--epochs", "4",
                "--batch-size", "8", "--lr", "0.02", "--eval-interval", "2",
                "--run-dir", str(run_dir)])
    result = train.main(args)
    return dict(result, run_dir=run_dir)


def val_pixel_counts(root: Path) -> np.ndarray:
    """Pixels of each label value (0-255) in the val labels, counted from the dataset."""
    dataset = COCOSegmentation(str(root), split="val")
    counts = np.zeros(256, dtype=np.int64)
    for i in range(len(dataset)):
        counts += np.bincount(np.asarray(dataset[i]["label"]).ravel(), minlength=256)
    return counts


def all_background_miou(root: Path) -> float:
    """mIoU of predicting background everywhere, computed from the val labels by hand:
    background IoU = background pixels / valid pixels, every other present class scores 0."""
    valid = val_pixel_counts(root)[:21]
    present = int((valid > 0).sum())
    return valid[0] / valid.sum() / present


def test_training_learns_and_writes_its_run(trained, demo_root):
    run_dir = trained["run_dir"]
    losses = [value for _, value in scalars(run_dir, "train/loss")]
    assert len(losses) == trained["iteration"]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    baseline = all_background_miou(demo_root)
    assert trained["best_pred"] > 2 * baseline, (trained["best_pred"], baseline)
    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "settings.json", "metrics.json"):
        assert (run_dir / name).is_file()
    settings = json.loads((run_dir / "settings.json").read_text())
    assert settings["model"]["backbone"] == "resnet18"
    assert settings["model"]["num_classes"] == 21
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["iteration"] == trained["iteration"]
    step, value = scalars(run_dir, "val/mIoU")[-1]
    assert step == trained["iteration"]
    assert value == pytest.approx(metrics["mean_iou"], rel=1e-6)
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["iteration"] == trained["iteration"]
    assert checkpoint["settings"]["class_names"][15] == "person"


FIGURES = ("confusion_matrix", "per_class_iou", "worst_images")


def image_steps(log_dir: str | Path) -> dict[str, list[int]]:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Images(tag)]
            for tag in accumulator.Tags()["images"]}


def test_every_evaluation_draws_its_figures(trained, demo_root):
    run_dir = trained["run_dir"]
    evaluations = [step for step, _ in scalars(run_dir, "val/mIoU")]
    assert len(evaluations) == 2  # epochs 2 and 4
    steps = image_steps(run_dir)
    for name in FIGURES:
        assert steps[f"val/{name}"] == evaluations
        with Image.open(run_dir / f"{name}.png") as image:  # the last evaluation's
            assert image.format == "PNG" and image.width > 300
    metrics = json.loads((run_dir / "metrics.json").read_text())
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (21, 21)
    # Rows count each class's val pixels (ignore excluded), as the labels hold them.
    assert matrix.sum(axis=1).tolist() == val_pixel_counts(demo_root)[:21].tolist()
    assert matrix.trace() / matrix.sum() == pytest.approx(metrics["pixel_accuracy"])


def test_inference_from_the_trained_checkpoint(trained, demo_root, tmp_path):
    images = sorted((demo_root / "val2017").glob("*.jpg"))[:3]
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    for image in images:
        (in_dir / image.name).write_bytes(image.read_bytes())
    (in_dir / "broken.jpg").write_bytes(b"not a jpeg")
    out_dir = tmp_path / "out"
    status = inference.cli(["--in-path", str(in_dir), "--out-path", str(out_dir), "--no-cuda",
                            "--ckpt", str(trained["run_dir"] / "model_best.pth.tar")])
    assert status == 1  # the broken file is reported...
    for image in images:  # ...and every good one still gets its mask
        mask = Image.open(out_dir / f"{image.stem}.png")
        assert mask.mode == "P"
        assert mask.size == Image.open(image).size
        assert np.asarray(mask).max() < 21
        # palette entry 15 (person) is the VOC colour
        assert mask.getpalette()[15 * 3: 15 * 3 + 3] == [192, 128, 128]
    assert not (out_dir / "broken.png").exists()


def test_eval_only_matches_training_metrics(trained, demo_root, tmp_path):
    out = tmp_path / "eval.json"
    result = train.main(train.get_args_parser().parse_args(
        TINY + ["--dataset", "demo", "--data-root", str(demo_root), "--eval-only",
                "--resume", str(trained["run_dir"] / "checkpoint.pth.tar"),
                "--eval-json", str(out)]))
    written = json.loads(out.read_text())
    last = json.loads((trained["run_dir"] / "metrics.json").read_text())
    assert written["mean_iou"] == last["mean_iou"]
    assert written["confusion_matrix"] == last["confusion_matrix"]
    assert result["metrics"]["pixel_accuracy"] == last["pixel_accuracy"]
    # Figures beside the json, and a TensorBoard run of their own at the checkpoint's step.
    for name in FIGURES:
        assert (tmp_path / f"eval_{name}.png").is_file()
    assert image_steps(tmp_path / "eval") == {f"val/{name}": [trained["iteration"]]
                                              for name in FIGURES}


def eval_only(demo_root: Path, checkpoint: Path) -> dict:
    return train.main(train.get_args_parser().parse_args(
        TINY + ["--dataset", "demo", "--data-root", str(demo_root), "--eval-only", "--resume",
                str(checkpoint), "--eval-worst", "2"]))


def test_eval_only_names_its_files_after_the_checkpoint(trained, demo_root, tmp_path):
    # Evaluations of model_best and of checkpoint in one folder overwrote each other's JSON,
    # figures and TensorBoard folder (all named eval_metrics).
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        (tmp_path / name).write_bytes((trained["run_dir"] / name).read_bytes())
    best = eval_only(demo_root, tmp_path / "model_best.pth.tar")
    latest = eval_only(demo_root, tmp_path / "checkpoint.pth.tar")
    for stem, result in (("eval_model_best", best), ("eval_checkpoint", latest)):
        assert json.loads((tmp_path / f"{stem}.json").read_text()) == result["metrics"]
        for figure in FIGURES:
            assert (tmp_path / f"{stem}_{figure}.png").is_file()
        step = torch.load(tmp_path / f"{stem.removeprefix('eval_')}.pth.tar",
                          weights_only=True)["iteration"]
        assert image_steps(tmp_path / stem) == {f"val/{name}": [step] for name in FIGURES}


def test_eval_only_again_replaces_its_files_and_leaves_no_temporaries(trained, demo_root,
                                                                      tmp_path):
    checkpoint = tmp_path / "checkpoint.pth.tar"
    checkpoint.write_bytes((trained["run_dir"] / "checkpoint.pth.tar").read_bytes())
    eval_only(demo_root, checkpoint)
    # What a kill during the JSON's and a figure's atomic writes leaves.
    killed = [tmp_path / ".eval_checkpoint.json.0123456789ab.tmp",
              tmp_path / ".eval_checkpoint_confusion_matrix.png.a1b2c3d4e5f6.tmp"]
    for path in killed:
        path.write_bytes(b"half")
    eval_only(demo_root, checkpoint)
    assert not any(path.exists() for path in killed)
    # One event file: two at the same step would show the figures twice in TensorBoard.
    assert len(list((tmp_path / "eval_checkpoint").glob("events.out.tfevents.*"))) == 1
    assert image_steps(tmp_path / "eval_checkpoint") == {
        f"val/{name}": [trained["iteration"]] for name in FIGURES}


def test_finetune_reinitialises_a_classifier_of_another_size(trained, tmp_path, capsys):
    from modeling.deeplab import DeepLab

    model = DeepLab(backbone="resnet18", num_classes=5)
    reinit = model.load_finetune_state_dict(
        torch.load(trained["run_dir"] / "checkpoint.pth.tar", weights_only=True)["model"])
    assert reinit == ["decoder.classifier.weight", "decoder.classifier.bias"]
    source = torch.load(trained["run_dir"] / "checkpoint.pth.tar", weights_only=True)["model"]
    assert torch.equal(model.state_dict()["backbone.conv1.weight"], source["backbone.conv1.weight"])


# ---------------------------------------------------------------- user errors: one line, exit 2


def test_missing_dataset_root_names_the_variable(monkeypatch, capsys):
    monkeypatch.delenv("DEEPLAB_COCO_ROOT", raising=False)
    monkeypatch.setattr("mypath.DEFAULT_ROOTS", {"coco": "/nope/coco"})
    assert train.cli(TINY + ["--dataset", "coco"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "DEEPLAB_COCO_ROOT" in err and "--data-root" in err


def test_batch_of_one_is_refused(demo_root, tmp_path, capsys):
    assert train.cli(TINY + ["--dataset", "demo", "--data-root", str(demo_root),
                             "--batch-size", "1", "--run-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, named", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    # 1 epoch of the demo's 100 images in batches of 8: 12 iterations.
    (["--epochs", "1", "--batch-size", "8", "--warmup-iters", "12"],
     "--warmup-iters 12 must be at least 0 and below the run's 12 iterations"),
    (["--run-dir", "{file}/run"], "{file} is a file, not a folder"),
    (["--run-root", "{file}/runs"], "{file} is a file, not a folder"),
], ids=["epochs-0", "batch-0", "warmup-beyond-the-run", "run-dir-under-a-file",
        "run-root-under-a-file"])
def test_flag_values_that_cannot_run_are_refused_in_one_line(demo_root, tmp_path, monkeypatch,
                                                             capsys, flags, named):
    def must_not_train(*args, **kwargs):
        raise AssertionError("trained despite the flag")  # --epochs 0 silently became 15

    monkeypatch.setattr(train, "train_one_epoch", must_not_train)
    file = tmp_path / "notes.txt"
    file.write_text("a file")
    assert train.cli(TINY + ["--dataset", "demo", "--data-root", str(demo_root),
                             "--run-root", str(tmp_path / "runs"),
                             *[flag.format(file=file) for flag in flags]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named.format(file=file) in err, err
    assert not (tmp_path / "runs").exists()


def test_offline_pretrained_download_names_the_flags(demo_root, tmp_path, monkeypatch, capsys):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    args = [a for a in TINY if a != "--no-pretrained"]
    assert train.cli(args + ["--dataset", "demo", "--data-root", str(demo_root),
                             "--run-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--no-pretrained" in err and "--backbone-weights" in err


def test_missing_checkpoint_for_inference(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert inference.cli(["--in-path", str(image), "--no-cuda",
                          "--ckpt", str(tmp_path / "none.pth.tar")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.pth.tar" in err and "train.py" in err


def test_bare_state_dict_is_not_taken_for_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert inference.cli(["--in-path", str(image), "--ckpt", str(path), "--no-cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights.pth" in err and "'settings'" in err



def test_unsafe_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "unsafe.pth.tar"
    torch.save({"settings": Payload()}, path)
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert inference.cli(["--in-path", str(image), "--ckpt", str(path), "--no-cuda"]) == 2
    assert "unsafe.pth.tar" in capsys.readouterr().err


def test_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoint(
        demo_root, tmp_path, monkeypatch, capsys):
    real_build_loss = train.build_loss

    def poisoned_build_loss(*args, **kwargs):
        criterion = real_build_loss(*args, **kwargs)
        calls = {"n": 0}

        def loss(logits, target):
            calls["n"] += 1
            value = criterion(logits, target)
            return value * math.nan if calls["n"] == 3 else value

        return loss

    monkeypatch.setattr(train, "build_loss", poisoned_build_loss)
    run_dir = tmp_path / "nan"
    status = train.cli(TINY + ["--dataset", "demo", "--data-root", str(demo_root), "--epochs", "1",
                               "--batch-size", "8", "--save-interval", "2",
                               "--run-dir", str(run_dir)])
    assert status == 3
    err = capsys.readouterr().err
    assert "iteration 3" in err
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["iteration"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values()
               if t.is_floating_point())
