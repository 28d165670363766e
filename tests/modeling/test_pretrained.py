"""Starting a DeepLabV3+ from torchvision's COCO DeepLabV3 (modeling.pretrained), offline.

The source is torchvision's own ``deeplabv3_resnet*`` built with ``weights=None`` and
``aux_loss=True`` (the COCO weights have an aux head), every tensor randomised so that equality
cannot come from two default initialisations. Downloads are made to fail.
"""
from __future__ import annotations

import os

import pytest
import torch
from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101

from modeling.backbone import PretrainedWeightsUnavailable
from modeling.deeplab import DeepLab
from model_testing import Payload, randomised
from modeling.pretrained import (
    COCO_DEEPLABV3_WEIGHTS,
    coco_deeplabv3_state_dict,
    coco_deeplabv3_weights,
    init_from_torchvision_deeplabv3,
)

#: State-dict entries counted by hand: a conv is 1 (its weight), a BatchNorm 5 (weight, bias,
#: running mean and variance, batch counter).
#: ResNet-50 backbone: stem conv + BN, 16 Bottlenecks of 3 convs + 3 BNs, 4 downsample conv + BN.
RESNET50_ENTRIES = (1 + 16 * 3 + 4) * (1 + 5)  # 318
#: ResNet-101: 33 Bottlenecks.
RESNET101_ENTRIES = (1 + 33 * 3 + 4) * (1 + 5)  # 624
#: ASPP: 1x1, three 3x3 and the pooling branch, and the projection, each conv + BN.
ASPP_ENTRIES = 6 * (1 + 5)  # 36
#: FCN aux head: 3x3 conv + BN, then the classifier conv's weight and bias.
AUX_ENTRIES = 1 + 5 + 2  # 8
#: torchvision's head after the ASPP: 3x3 conv + BN, classifier conv weight and bias.
TORCHVISION_HEAD_ENTRIES = 1 + 5 + 2  # 8


pytestmark = pytest.mark.usefixtures("no_network")




@pytest.fixture(scope="module")
def torchvision_resnet50() -> torch.nn.Module:
    return randomised(deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True), 1)


@pytest.fixture(scope="module")
def torchvision_resnet101() -> torch.nn.Module:
    return randomised(deeplabv3_resnet101(weights=None, weights_backbone=None, aux_loss=True), 2)


def torchvision_key(key: str) -> str:
    return "classifier.0." + key[len("aspp."):] if key.startswith("aspp.") else key


@pytest.mark.parametrize("backbone, output_stride, backbone_entries", [
    ("resnet50", 8, RESNET50_ENTRIES),
    ("resnet101", 16, RESNET101_ENTRIES),
])
def test_every_backbone_and_aspp_tensor_comes_from_torchvision(
        backbone, output_stride, backbone_entries, request):
    source_model = request.getfixturevalue(f"torchvision_{backbone}")
    source = source_model.state_dict()
    torch.manual_seed(0)
    model = DeepLab(backbone=backbone, output_stride=output_stride, num_classes=21, aux_loss=True)
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    report = init_from_torchvision_deeplabv3(model, source)

    own = model.state_dict()
    backbone_and_aspp = [k for k in own if k.startswith(("backbone.", "aspp."))]
    assert len(backbone_and_aspp) == backbone_entries + ASPP_ENTRIES
    for key in backbone_and_aspp:
        assert torch.equal(own[key], source[torchvision_key(key)]), key
    # 21 classes on both sides: the aux head comes along, classifier included.
    aux = [k for k in own if k.startswith("aux_classifier.")]
    assert len(aux) == AUX_ENTRIES
    for key in aux:
        assert torch.equal(own[key], source[key]), key
    assert sorted(report.loaded) == sorted(backbone_and_aspp + aux)
    assert len(report.loaded) == backbone_entries + ASPP_ENTRIES + AUX_ENTRIES
    # The decoder starts as it was; torchvision's DeepLabV3 head has no place here.
    assert report.fresh == [k for k in own if k.startswith("decoder.")]
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(value, decoder_before[key]), key
    assert len(report.unused) == TORCHVISION_HEAD_ENTRIES
    assert all(k.startswith("classifier.") and not k.startswith("classifier.0.")
               for k in report.unused)


def test_our_aspp_and_low_level_features_compute_what_torchvision_computes(torchvision_resnet50):
    # Output stride 8 has torchvision's ASPP rates (12, 24, 36).
    model = DeepLab(backbone="resnet50", output_stride=8, num_classes=21).eval()
    init_from_torchvision_deeplabv3(model, torchvision_resnet50.state_dict())
    features = torch.randn(2, 2048, 9, 11)
    images = torch.randn(2, 3, 64, 64)
    theirs = torchvision_resnet50.backbone
    with torch.no_grad():
        torch.testing.assert_close(model.aspp(features),
                                   torchvision_resnet50.classifier[0](features),
                                   rtol=1e-5, atol=1e-5)
        low_level = theirs.layer1(theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(images)))))
        torch.testing.assert_close(model.backbone(images)["low_level"], low_level,
                                   rtol=1e-5, atol=1e-5)


def test_other_class_count_and_no_aux_head(torchvision_resnet50):
    source = torchvision_resnet50.state_dict()
    three = DeepLab(backbone="resnet50", num_classes=3, aux_loss=True)
    report = init_from_torchvision_deeplabv3(three, source)
    assert len(report.loaded) == RESNET50_ENTRIES + ASPP_ENTRIES + AUX_ENTRIES - 2
    assert {"aux_classifier.4.weight", "aux_classifier.4.bias"} <= set(report.fresh)
    assert {"aux_classifier.4.weight", "aux_classifier.4.bias"} <= set(report.unused)
    plain = DeepLab(backbone="resnet50", num_classes=21)
    report = init_from_torchvision_deeplabv3(plain, source)
    assert len(report.loaded) == RESNET50_ENTRIES + ASPP_ENTRIES
    assert len(report.unused) == TORCHVISION_HEAD_ENTRIES + AUX_ENTRIES


def test_another_resnet_is_refused_in_one_line(torchvision_resnet50, torchvision_resnet101):
    with pytest.raises(ValueError, match="deeplabv3_resnet101.*missing or do not fit") as error:
        init_from_torchvision_deeplabv3(DeepLab(backbone="resnet101"),
                                        torchvision_resnet50.state_dict())
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="deeplabv3_resnet50.*no place.*layer3.6") as error:
        init_from_torchvision_deeplabv3(DeepLab(backbone="resnet50"),
                                        torchvision_resnet101.state_dict())
    with pytest.raises(ValueError, match="of another shape"):
        init_from_torchvision_deeplabv3(DeepLab(backbone="resnet18"),
                                        torchvision_resnet50.state_dict())


def test_local_file_hub_cache_and_offline(torchvision_resnet50, tmp_path):
    path = tmp_path / "deeplabv3_resnet50_coco.pth"
    torch.save(torchvision_resnet50.state_dict(), path)
    loaded = coco_deeplabv3_state_dict("resnet50", path)
    assert all(torch.equal(loaded[k], v) for k, v in torchvision_resnet50.state_dict().items())

    url = COCO_DEEPLABV3_WEIGHTS["resnet50"].url
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / os.path.basename(url)
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        coco_deeplabv3_state_dict("resnet50")  # offline, nothing cached
    message = str(error.value)
    assert "\n" not in message
    assert f"curl -LO {url}" in message and str(cached) in message

    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(path.read_bytes())
    with pytest.raises(PretrainedWeightsUnavailable, match="deeplabv3_resnet101_coco"):
        coco_deeplabv3_state_dict("resnet")  # resnet101 has a file of its own
    loaded = coco_deeplabv3_state_dict("resnet50")  # found in the cache, no download
    assert torch.equal(loaded["backbone.conv1.weight"],
                       torchvision_resnet50.state_dict()["backbone.conv1.weight"])



def test_unsafe_or_wrong_files_are_refused(tmp_path):
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"backbone.conv1.weight": torch.zeros(1), "meta": Payload()}, unsafe)
    with pytest.raises(ValueError, match="unsafe.pth.*weights_only=True"):
        coco_deeplabv3_state_dict("resnet50", unsafe)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match="tensor.pth holds a Tensor"):
        coco_deeplabv3_state_dict("resnet50", tensor)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        coco_deeplabv3_state_dict("resnet50", tmp_path / "nowhere.pth")
    # A cached download holding Python objects is refused too (weights_only=True).
    url = COCO_DEEPLABV3_WEIGHTS["resnet50"].url
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(unsafe.read_bytes())
    with pytest.raises(PretrainedWeightsUnavailable, match="weights_only=True.*delete it"):
        coco_deeplabv3_state_dict("resnet50")


def test_only_resnet50_and_resnet101_have_coco_weights():
    assert coco_deeplabv3_weights("resnet") is COCO_DEEPLABV3_WEIGHTS["resnet101"]
    with pytest.raises(ValueError, match="resnet50 and resnet101 only, not resnet18"):
        coco_deeplabv3_weights("resnet18")
    # The published COCO-val mIoU of these weights (torchvision's metadata).
    assert [w.meta["_metrics"]["COCO-val2017-VOC-labels"]["miou"]
            for w in COCO_DEEPLABV3_WEIGHTS.values()] == [66.4, 67.4]
    assert all(len(w.meta["categories"]) == 21 for w in COCO_DEEPLABV3_WEIGHTS.values())


# ---------------------------------------------------------------- train.py --init


TINY = ["--no-pretrained", "--no-cuda", "--amp", "off", "--workers", "0", "--crop-size", "64",
        "--base-size", "64", "--eval-size", "64"]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from dataloader.datasets.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("small_demo") / "demo"
    generate_demo_dataset(root, seed=0, num_train=4, num_val=2, image_size=(64, 48))
    return root


@pytest.mark.slow
def test_train_starts_from_a_local_torchvision_file(torchvision_resnet50, small_demo, tmp_path,
                                                    capsys):
    import train

    path = tmp_path / "deeplabv3_resnet50_coco.pth"
    torch.save(torchvision_resnet50.state_dict(), path)
    run_dir = tmp_path / "run"
    # --lr 0: the weights that come out are those that went in. ImageNet weights are not
    # fetched (downloads fail here): --init replaces them.
    with_pretrained = [arg for arg in TINY if arg != "--no-pretrained"]
    result = train.main(train.get_args_parser().parse_args(
        with_pretrained + ["--backbone", "resnet50", "--init", str(path), "--aux-loss",
                           "--dataset", "demo", "--data-root", str(small_demo), "--epochs", "1",
                           "--batch-size", "2", "--lr", "0", "--run-dir", str(run_dir)]))
    assert result["iteration"] == 2
    out = capsys.readouterr().out
    assert f"--init: {RESNET50_ENTRIES + ASPP_ENTRIES + AUX_ENTRIES} tensors" in out
    saved = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)["model"]
    source = torchvision_resnet50.state_dict()
    model = DeepLab(backbone="resnet50", num_classes=21, aux_loss=True)
    parameters = [name for name, _ in model.named_parameters()
                  if name.startswith(("backbone.", "aspp.", "aux_classifier."))]
    assert len(parameters) == (1 + 16 * 3 + 4) * 3 + 6 * 3 + 5  # conv 1, BatchNorm 2 each
    for name in parameters:
        assert torch.equal(saved[name], source[torchvision_key(name)]), name


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("extra, words", [
    (["--backbone", "resnet18", "--init", "torchvision-coco"],
     ["--init", "resnet50 and resnet101 only, not resnet18", "--backbone resnet50"]),
    (["--backbone", "resnet50", "--init", "torchvision-coco", "--resume", "x.pth.tar"],
     ["--init", "--resume", "drop one"]),
    (["--backbone", "resnet50", "--init", "torchvision-coco"],
     ["--init torchvision-coco", "curl -LO https://download.pytorch.org/models/"
      "deeplabv3_resnet50_coco-cd0a2569.pth", "--init PATH"]),
    (["--backbone", "resnet101", "--init", "nowhere.pth"], ["--init nowhere.pth", "not found"]),
])
def test_init_user_errors_are_one_line(extra, words, small_demo, tmp_path, capsys):
    import train

    status = train.cli(TINY + ["--dataset", "demo", "--data-root", str(small_demo),
                               "--run-root", str(tmp_path)] + extra)
    assert status == 2
    err = _one_line_error(capsys)
    for word in words:
        assert word in err
