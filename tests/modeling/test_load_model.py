"""modeling.checkpoint.load_model: the one way from a checkpoint (file or dict) to a model."""
from __future__ import annotations

import argparse

import pytest
import torch

import train
from modeling.checkpoint import ARCHITECTURE_SETTINGS, load_model
from modeling.deeplab import DeepLab
from utils.checkpoint import CheckpointError
from utils.distributed import DistributedContext
from utils.errors import UserError


def small_model(**options) -> DeepLab:
    torch.manual_seed(0)
    return DeepLab(backbone="resnet18", output_stride=16, num_classes=3, **options)


def train_checkpoint(model: DeepLab) -> dict:
    """What train.py saves: weights, settings (architecture plus data), training state."""
    settings = dict(model.settings(), class_names=["a", "b", "c"], palette=[[0, 0, 0]] * 3,
                    mean=[0.5] * 3, std=[0.25] * 3)
    return {"model": model.state_dict(), "settings": settings, "epoch": 2, "iteration": 40}


def test_a_checkpoint_file_becomes_its_model_in_eval_mode(tmp_path):
    model = small_model(aux_loss=True)
    path = tmp_path / "model_best.pth.tar"
    torch.save(train_checkpoint(model), path)
    loaded, settings = load_model(path)
    assert isinstance(loaded, DeepLab) and not loaded.training
    assert settings == train_checkpoint(model)["settings"]
    assert loaded.settings() == model.settings()
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[key], expected[key]) for key in expected)
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(image)["out"], model.eval()(image)["out"])


def test_a_checkpoint_without_the_later_settings_loads_with_their_defaults(tmp_path):
    # Written before aux_loss and align_corners were recorded: only the architecture's core.
    model = small_model()
    path = tmp_path / "old.pth.tar"
    torch.save({"model": model.state_dict(),
                "settings": {key: model.settings()[key] for key in ARCHITECTURE_SETTINGS}}, path)
    loaded, _ = load_model(path)
    assert loaded.aux_loss is False and loaded.align_corners is False


def test_a_checkpoint_already_read_is_taken_as_it_is():
    checkpoint = train_checkpoint(small_model())
    loaded, settings = load_model(checkpoint, source="--resume x.pth")
    assert settings is checkpoint["settings"]
    assert torch.equal(loaded.decoder.classifier.weight,
                       checkpoint["model"]["decoder.classifier.weight"])


def damaged(change) -> dict:
    checkpoint = train_checkpoint(small_model())
    change(checkpoint)
    return checkpoint


@pytest.mark.parametrize("change, required, words", [
    (lambda c: c.pop("settings"), (), ["x.pth", "no 'settings' entry"]),
    (lambda c: c["settings"].pop("output_stride"), (), ["x.pth", "lack 'output_stride'"]),
    (lambda c: c["settings"].pop("palette"), ("palette", "mean"), ["x.pth", "lack 'palette'"]),
    (lambda c: c["settings"].update(num_classes=7), (), ["x.pth", "do not fit", "7 classes"]),
    (lambda c: c["model"].pop("decoder.classifier.bias"), (), ["x.pth", "do not fit"]),
])
def test_what_does_not_describe_a_model_is_one_line(change, required, words):
    with pytest.raises(CheckpointError) as raised:
        load_model(damaged(change), source="x.pth", required_settings=required)
    message = str(raised.value)
    assert all(word in message for word in words) and "\n" not in message
    assert isinstance(raised.value, UserError)  # the scripts print it in one line, exit 2


def test_a_missing_file_names_its_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        load_model(tmp_path / "nope.pth")


def flags(**changes) -> argparse.Namespace:
    values = dict(ft=False, resume="x.pth", dataset="demo", backbone="resnet18", out_stride=16,
                  aux_loss=False, pretrained=False, init=None, backbone_weights=None)
    return argparse.Namespace(**dict(values, **changes))


def test_resume_builds_the_model_through_load_model_in_training_mode():
    model = small_model()
    resumed = train.build_model(flags(), train_checkpoint(model), 3, DistributedContext())
    assert resumed.training
    assert all(torch.equal(resumed.state_dict()[key], value)
               for key, value in model.state_dict().items())


def test_resume_from_weights_that_do_not_fit_their_settings_is_one_line():
    checkpoint = damaged(lambda c: c["settings"].update(backbone="resnet34"))
    with pytest.raises(UserError, match="--resume x.pth: its weights do not fit"):
        train.build_model(flags(), checkpoint, 3, DistributedContext())


def test_finetune_takes_the_weights_that_fit_and_a_new_classifier(capsys):
    source = small_model()
    tuned = train.build_model(flags(ft=True), train_checkpoint(source), 5, DistributedContext())
    assert tuned.num_classes == 5 and tuned.training
    expected = source.state_dict()
    kept = [key for key in expected if not key.startswith("decoder.classifier")]
    assert all(torch.equal(tuned.state_dict()[key], expected[key]) for key in kept)
    assert tuned.decoder.classifier.weight.shape[0] == 5
    assert "re-initialised decoder.classifier.weight, decoder.classifier.bias (class count " \
           "3 -> 5)" in capsys.readouterr().out
