"""DeepLab model tests: shapes, strides, gradients, parameter counts, registry and weight loading.

Random weights and tiny inputs only; every download is made to fail (see ``_no_network``).
"""
from __future__ import annotations

import math
import os
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from modeling.aspp import ASPP
from modeling.backbone import (
    BACKBONE_ALIASES,
    BACKBONES,
    PretrainedWeightsUnavailable,
    atrous_settings,
    build_backbone,
    canonical_backbone_name,
)
from modeling.deeplab import DeepLab
from model_testing import randomised

SMALL_BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenetv3")
OUTPUT_STRIDES = (8, 16)


pytestmark = pytest.mark.usefixtures("no_network")


def _count(parameters) -> int:
    return sum(parameter.numel() for parameter in parameters)


@pytest.fixture(scope="module")
def resnet101_model() -> DeepLab:
    # Built through the alias, once: it is the slowest thing in this file.
    return DeepLab(backbone="resnet", output_stride=16, num_classes=21)


# --- shapes and strides --------------------------------------------------------------------------

@pytest.mark.parametrize("output_stride", OUTPUT_STRIDES)
@pytest.mark.parametrize("backbone", SMALL_BACKBONES)
def test_output_shapes_and_feature_strides(backbone, output_stride):
    torch.manual_seed(0)
    num_classes = 3 + SMALL_BACKBONES.index(backbone)  # 3, 4, 5, 6
    model = DeepLab(backbone=backbone, output_stride=output_stride, num_classes=num_classes,
                    aux_loss=True).eval()
    # MobileNetV3-Large (paper, table 1): 24 channels at stride 4, 112 at the end of the
    # stride-16 stage, 960 out of the last 1x1 convolution.
    expected_channels = {"resnet18": (64, 256, 512), "resnet34": (64, 256, 512),
                         "resnet50": (256, 1024, 2048), "mobilenetv3": (24, 112, 960)}[backbone]
    assert (model.backbone.low_level_channels, model.backbone.aux_channels,
            model.backbone.out_channels) == expected_channels
    # Every stride-2 layer maps n to ceil(n / 2), so stride s gives ceil(n / s).
    aux_stride = 8 if output_stride == 8 else 16
    for height, width in ((64, 64), (65, 47)):
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            features = model.backbone(x)
            out = model(x)
        assert features["low_level"].shape == (2, expected_channels[0], math.ceil(height / 4),
                                               math.ceil(width / 4))
        assert features["aux"].shape == (2, expected_channels[1], math.ceil(height / aux_stride),
                                         math.ceil(width / aux_stride))
        assert features["out"].shape == (2, expected_channels[2],
                                         math.ceil(height / output_stride),
                                         math.ceil(width / output_stride))
        assert set(out) == {"out", "aux"}
        for logits in out.values():
            assert logits.shape == (2, num_classes, height, width)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("output_stride", OUTPUT_STRIDES)
@pytest.mark.parametrize("backbone", SMALL_BACKBONES)
def test_gradient_reaches_every_parameter(backbone, output_stride):
    torch.manual_seed(0)
    model = DeepLab(backbone=backbone, output_stride=output_stride, num_classes=4,
                    aux_loss=True).train()
    images = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 4, (2, 64, 64))
    out = model(images)
    loss = F.cross_entropy(out["out"], target) + 0.5 * F.cross_entropy(out["aux"], target)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_atrous_settings_and_multi_grid():
    # DeepLabV3: rates (6, 12, 18) at stride 16, doubled at stride 8; multi-grid (1, 2, 4).
    assert atrous_settings(16).aspp_rates == (6, 12, 18)
    assert atrous_settings(8).aspp_rates == (12, 24, 36)
    for output_stride, layer3, layer4 in ((16, [1] * 6, [2, 4, 8]), (8, [2] * 6, [4, 8, 16])):
        backbone = build_backbone("resnet50", output_stride)
        assert [block.conv2.dilation[0] for block in backbone.layer3] == layer3
        assert [block.conv2.dilation[0] for block in backbone.layer4] == layer4
        assert [block.conv2.padding[0] for block in backbone.layer4] == layer4
        assert backbone.layer4[0].downsample[0].stride == (1, 1)
        assert backbone.layer2[0].conv2.stride == (2, 2)  # never dilated
    # BasicBlock: both 3x3 convs dilated; ResNet-18's layer4 has two blocks -> grids 1 and 2.
    backbone = build_backbone("resnet18", 16)
    assert [(block.conv1.dilation[0], block.conv2.dilation[0]) for block in backbone.layer4] == [
        (2, 2), (4, 4)]
    assert backbone.layer4[0].conv1.stride == (1, 1)


@pytest.mark.parametrize("output_stride, aspp_rates, layer3, layer4", [
    (16, (6, 12, 18), [1] * 6, [2, 4, 8]),
    (8, (12, 24, 36), [2] * 6, [4, 8, 16]),  # twice the resolution, twice the rates
])
def test_deeplab_builds_the_rates_of_its_output_stride(output_stride, aspp_rates, layer3, layer4):
    # DeepLabV3 (arXiv:1706.05587): ASPP rates (6, 12, 18) at stride 16, doubled at stride 8;
    # layer4 unit rates (1, 2, 4) times its dilation, layer3 dilated 2 only at stride 8.
    model = DeepLab(backbone="resnet50", output_stride=output_stride, num_classes=3)
    convs = [branch[0] for branch in model.aspp.convs[1:4]]
    assert [conv.dilation for conv in convs] == [(rate, rate) for rate in aspp_rates]
    assert [conv.padding for conv in convs] == [(rate, rate) for rate in aspp_rates]
    assert [block.conv2.dilation[0] for block in model.backbone.layer3] == layer3
    assert [block.conv2.dilation[0] for block in model.backbone.layer4] == layer4
    assert model.backbone.layer3[0].conv2.stride == ((1, 1) if output_stride == 8 else (2, 2))
    assert model.backbone.layer4[0].conv2.stride == (1, 1)


def test_dilation_keeps_parameter_count():
    # Published torchvision totals minus the ImageNet classifier (512 or 2048 inputs x 1000 + 1000).
    resnet18_without_fc = 11_689_512 - (512 * 1000 + 1000)
    resnet50_without_fc = 25_557_032 - (2048 * 1000 + 1000)
    for output_stride in OUTPUT_STRIDES:
        assert _count(build_backbone("resnet18", output_stride).parameters()) == resnet18_without_fc
        assert _count(build_backbone("resnet50", output_stride).parameters()) == resnet50_without_fc


def _randomised_mobilenet_v3_large(seed: int, **kwargs) -> nn.Module:
    """torchvision's MobileNetV3-Large with every tensor drawn from ``seed`` (BatchNorm statistics
    included), so that equal tensors cannot come from two default initialisations."""
    return randomised(torchvision.models.mobilenet_v3_large(weights=None, **kwargs), seed)


def test_mobilenetv3_at_output_stride_16_computes_torchvisions_dilated_backbone():
    # torchvision's deeplabv3_mobilenet_v3_large runs mobilenet_v3_large(dilated=True).features:
    # the same tensors in our backbone give the same features, bit for bit.
    reference = _randomised_mobilenet_v3_large(4, dilated=True)
    backbone = build_backbone("mobilenetv3", 16).eval()
    backbone.load_state_dict({key: value for key, value in reference.state_dict().items()
                              if not key.startswith("classifier.")})
    x = torch.randn(2, 3, 61, 38)
    with torch.no_grad():
        features = backbone(x)
        assert torch.equal(features["low_level"], reference.features[:4](x))
        assert torch.equal(features["aux"], reference.features[:13](x))
        assert torch.equal(features["out"], reference.features(x))


@pytest.mark.parametrize("output_stride, stage16, stage32", [(16, 1, 2), (8, 2, 4)])
def test_mobilenetv3_dilates_the_stages_past_its_output_stride(output_stride, stage16, stage32):
    """MobileNetV3-Large's features: stem (stride 2), blocks 1-3 (stride 4: 2 is strided), 4-6
    (stride 8), 7-12 (stride 16), 13-15 (stride 32), then a 1x1 conv. Depthwise kernels are
    3x3 or 5x5 (paper, table 1); a dilated one has stride 1 and padding (kernel // 2) * dilation.
    """
    backbone = build_backbone("mobilenetv3", output_stride)
    kernels = [3, 3, 3, 5, 5, 5, 3, 3, 3, 3, 3, 3, 5, 5, 5]
    strides = {2: 2, 4: 2, 7: 2 if stage16 == 1 else 1, 13: 1}
    for index, kernel in zip(range(1, 16), kernels):
        dilation = stage16 if 7 <= index <= 12 else stage32 if index >= 13 else 1
        (depthwise,) = [module for module in backbone.features[index].modules()
                        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)]
        assert depthwise.kernel_size == (kernel, kernel), index
        assert depthwise.stride == (strides.get(index, 1),) * 2, index
        assert depthwise.dilation == (dilation, dilation), index
        assert depthwise.padding == (kernel // 2 * dilation,) * 2, index
    # A block that was strided keeps having no residual connection, as in torchvision.
    assert not backbone.features[13].use_res_connect and not backbone.features[7].use_res_connect
    assert backbone.features[14].use_res_connect


def test_mobilenetv3_batch_norm_settings():
    # eps as torchvision trained the ImageNet weights with (1e-3, TensorFlow's), or they compute
    # something else; momentum PyTorch's 0.1, as the ResNets, instead of torchvision's 0.01.
    norms = [module for module in build_backbone("mobilenetv3", 16).modules()
             if isinstance(module, nn.BatchNorm2d)]
    assert len(norms) == 1 + 15 * 3 - 1 + 1  # stem, 3 per block (block 1 has no expansion), last
    assert {(norm.eps, norm.momentum) for norm in norms} == {(1e-3, 0.1)}


def test_mobilenetv3_parameter_count():
    # torchvision's published MobileNetV3-Large total minus its ImageNet classifier
    # (960 x 1280 + 1280 and 1280 x 1000 + 1000); dilation adds none.
    without_classifier = 5_483_032 - (960 * 1280 + 1280) - (1280 * 1000 + 1000)
    assert without_classifier == 2_971_952
    for output_stride in OUTPUT_STRIDES:
        backbone = build_backbone("mobilenetv3", output_stride)
        assert _count(backbone.parameters()) == without_classifier


def test_resnet101_parameter_count(resnet101_model):
    """59,344,309 = ResNet-101 backbone + ASPP + decoder, by hand (BN = 2 x channels, no conv bias).

    Backbone: torchvision ResNet-101 has 44,549,160; minus fc (2048 x 1000 + 1000 = 2,049,000)
        = 42,500,160.
    ASPP (2048 -> 256):
        1x1 branch      2048*256      + 512 =    524,800
        3 x 3x3 branch  3 * (2048*256*9 + 512) = 14,157,312
        image pooling   2048*256      + 512 =    524,800
        projection      5*256*256     + 512 =    328,192
        total                                 15,535,104
    Decoder (low level 256, 21 classes):
        1x1 reduce      256*48        + 96  =     12,384
        3x3             (256+48)*256*9 + 512 =    700,928
        3x3             256*256*9     + 512 =    590,336
        classifier      256*21 + 21         =      5,397
        total                                  1,309,045
    """
    aspp = (2048 * 256 + 512) + 3 * (2048 * 256 * 9 + 512) + (2048 * 256 + 512) \
        + (5 * 256 * 256 + 512)
    decoder = (256 * 48 + 96) + ((256 + 48) * 256 * 9 + 512) + (256 * 256 * 9 + 512) \
        + (256 * 21 + 21)
    backbone = 44_549_160 - (2048 * 1000 + 1000)
    assert (backbone, aspp, decoder) == (42_500_160, 15_535_104, 1_309_045)
    model = resnet101_model
    assert _count(model.backbone.parameters()) == backbone
    assert _count(model.aspp.parameters()) == aspp
    assert _count(model.decoder.parameters()) == decoder
    assert _count(model.parameters()) == 59_344_309


def test_aspp_branches():
    aspp = ASPP(32, (1, 2, 3), out_channels=8).eval()
    assert [branch[0].dilation for branch in aspp.convs[1:4]] == [(1, 1), (2, 2), (3, 3)]
    with torch.no_grad():
        assert aspp(torch.randn(2, 32, 5, 7)).shape == (2, 8, 5, 7)


# --- configuration and registry ------------------------------------------------------------------

def test_aux_head_absent_by_default():
    model = DeepLab(backbone="resnet18", num_classes=3).eval()
    assert model.aux_classifier is None and model.aux_loss is False
    with torch.no_grad():
        assert set(model(torch.randn(2, 3, 64, 64))) == {"out"}
    with_aux = DeepLab(backbone="resnet18", num_classes=3, aux_loss=True)
    # torchvision FCNHead on 256 layer3 channels: 256 -> 64 (3x3, BN) -> 3 (1x1 with bias).
    aux_parameters = 256 * 64 * 9 + 2 * 64 + 64 * 3 + 3
    assert _count(with_aux.parameters()) - _count(model.parameters()) == aux_parameters


@pytest.mark.parametrize("output_stride", [32, 4])
def test_unsupported_output_stride(output_stride):
    with pytest.raises(ValueError, match=str(output_stride)):
        DeepLab(backbone="resnet18", output_stride=output_stride)
    with pytest.raises(ValueError, match=str(output_stride)):
        atrous_settings(output_stride)


def test_alias_resolves_to_resnet101(resnet101_model):
    assert BACKBONE_ALIASES == {"resnet": "resnet101"}
    assert canonical_backbone_name("resnet") == "resnet101"
    assert resnet101_model.backbone_name == "resnet101"
    assert (resnet101_model.output_stride, resnet101_model.num_classes) == (16, 21)
    assert len(resnet101_model.backbone.layer3) == 23  # ResNet-101: 3, 4, 23, 3 blocks


def test_registry_names():
    assert sorted(BACKBONES) == ["mobilenetv3", "resnet101", "resnet152", "resnet18", "resnet34",
                                 "resnet50"]


def test_unknown_backbone():
    with pytest.raises(ValueError, match="xception") as error:
        DeepLab(backbone="xception")
    assert "resnet50" in str(error.value)  # the choices are listed


def test_backbone_and_head_parameters_partition():
    model = DeepLab(backbone="resnet18", num_classes=3, aux_loss=True)
    backbone_ids = [id(p) for p in model.backbone_parameters()]
    head_ids = [id(p) for p in model.head_parameters()]
    expected_head = [id(p) for module in (model.aspp, model.decoder, model.aux_classifier)
                     for p in module.parameters()]
    assert sorted(backbone_ids) == sorted(id(p) for p in model.backbone.parameters())
    assert sorted(head_ids) == sorted(expected_head)
    assert sorted(backbone_ids + head_ids) == sorted(id(p) for p in model.parameters())
    assert len(set(backbone_ids + head_ids)) == len(backbone_ids) + len(head_ids)


def test_head_initialisation():
    torch.manual_seed(0)
    model = DeepLab(backbone="resnet18", num_classes=3)
    for module in list(model.aspp.modules()) + list(model.decoder.modules()):
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    # The classifier keeps PyTorch's default init, as torchvision's heads do: uniform within
    # +-1/sqrt(fan_in) = +-1/16 for a 1x1 conv from 256 channels (std 1/16/sqrt(3)).
    classifier = model.decoder.classifier
    assert classifier.weight.abs().max().item() <= 1 / 16
    assert classifier.weight.std().item() == pytest.approx(1 / 16 / math.sqrt(3), rel=0.1)
    assert 0 < classifier.bias.abs().max().item() <= 1 / 16
    # Kaiming normal, fan_out: std = sqrt(2 / (256 * 3 * 3)) for a 3x3 conv to 256 channels.
    weight = model.aspp.convs[1][0].weight
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)


def test_eval_with_batch_of_one_and_train_needs_two():
    model = DeepLab(backbone="resnet18", num_classes=3)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64))["out"].shape == (1, 3, 64, 64)
    # The image-pooling BatchNorm sees one value per channel: documented, refused by train.py.
    with pytest.raises(ValueError):
        model.train()(torch.randn(1, 3, 64, 64))


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = DeepLab(backbone="resnet18", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)["out"]
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.to(memory_format=torch.channels_last))["out"]
    # Random-init logits reach about 70: float32 summation-order noise is about 1e-5 of that
    # (oneDNN sums channels_last convolutions in another order with 2+ threads), while a layout
    # mistake (e.g. transposed images) changes them by about 20.
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(),
                               rtol=1e-4)


# --- weights -------------------------------------------------------------------------------------

def test_pretrained_offline_raises_dedicated_error(tmp_path):
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached_file = os.path.join(tmp_path, "torch_home", "hub", "checkpoints", os.path.basename(url))
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        DeepLab(backbone="resnet18", pretrained_backbone=True)
    message = str(error.value)
    assert "\n" not in message
    assert url in message and cached_file in message
    assert isinstance(error.value.__cause__, urllib.error.URLError)


def test_pretrained_uses_torch_hub_cache(tmp_path):
    # A file already in the cache under IMAGENET1K_V1's name is used without any download.
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / os.path.basename(url))
    backbone = build_backbone("resnet18", 16, pretrained=True)
    torch.testing.assert_close(backbone.conv1.weight, reference.conv1.weight, rtol=0, atol=0)


class _Payload:
    """Any object: reading it back would need unsafe unpickling."""


def test_cached_imagenet_weights_are_read_safely(tmp_path):
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(1), "meta": _Payload()},
               checkpoints / os.path.basename(url))
    with pytest.raises(PretrainedWeightsUnavailable, match="weights_only=True.*delete it"):
        build_backbone("resnet18", 16, pretrained=True)


def test_local_weights_round_trip(tmp_path):
    torch.manual_seed(2)
    reference = torchvision.models.resnet18()  # fc.* included, as a user would save it
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = DeepLab(backbone="resnet18", output_stride=8, num_classes=3, backbone_weights=path)
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight,
                               reference.layer4[1].conv2.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.bn1.running_var, reference.bn1.running_var,
                               rtol=0, atol=0)


def test_local_mobilenetv3_weights_land_exactly(tmp_path):
    # What --backbone-weights passes on: torchvision's mobilenet_v3_large state dict as a user
    # saves it, classifier.* included.
    reference = _randomised_mobilenet_v3_large(5)
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(reference.state_dict(), path)
    model = DeepLab(backbone="mobilenetv3", output_stride=8, num_classes=3, backbone_weights=path)
    expected = {key: value for key, value in reference.state_dict().items()
                if not key.startswith("classifier.")}
    loaded = model.backbone.state_dict()
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_mobilenetv3_imagenet_weights_from_the_torch_hub_cache(tmp_path):
    weights = torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        build_backbone("mobilenetv3", 16, pretrained=True)
    assert "\n" not in str(error.value) and weights.url in str(error.value)
    reference = _randomised_mobilenet_v3_large(6)
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)  # the failed download made it
    torch.save(reference.state_dict(), checkpoints / os.path.basename(weights.url))
    backbone = build_backbone("mobilenetv3", 16, pretrained=True)
    torch.testing.assert_close(backbone.features[15].block[1][0].weight,
                               reference.features[15].block[1][0].weight, rtol=0, atol=0)


def test_local_weights_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone("resnet18", 16, weights_path=missing)
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet34.pth"):
        build_backbone("resnet18", 16, weights_path=wrong)
    with pytest.raises(ValueError, match="resnet34.pth"):
        build_backbone("mobilenetv3", 16, weights_path=wrong)
    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match="tensor.pth"):
        build_backbone("resnet18", 16, weights_path=not_a_dict)


# --- align_corners -------------------------------------------------------------------------------

@pytest.mark.parametrize("align_corners", [False, True])
def test_align_corners_in_the_final_upsampling(align_corners):
    # 64x64 input, output stride 16: logits at 16x16 (stride 4) are upsampled 4x. Output row 21
    # and column 42 sample the 16-pixel logits at:
    #   align_corners=True:  21 * 15/63 = 5 and 42 * 15/63 = 10 (exactly a logit pixel);
    #   align_corners=False: (21 + 0.5)/4 - 0.5 = 4.875 and (42 + 0.5)/4 - 0.5 = 10.125.
    torch.manual_seed(0)
    model = DeepLab(backbone="resnet18", num_classes=3, align_corners=align_corners).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.backbone(x)
        low = model.decoder(model.aspp(features["out"]), features["low_level"])[0]
        out = model(x)["out"][0]
    assert low.shape[-2:] == (16, 16)
    if align_corners:
        expected = low[:, 5, 10]
    else:
        rows = 0.125 * low[:, 4] + 0.875 * low[:, 5]
        expected = 0.875 * rows[:, 10] + 0.125 * rows[:, 11]
    torch.testing.assert_close(out[:, 21, 42], expected, rtol=1e-5, atol=1e-5)


def test_align_corners_in_the_decoder():
    # ASPP output 4x4 -> low level 16x16: with align_corners=True row/column 5 samples ASPP
    # pixel 5 * 3/15 = 1 exactly, so the upsampled map there is the ASPP value itself.
    from modeling.decoder import Decoder

    torch.manual_seed(0)
    seen = {}
    decoder = Decoder(8, 3, aspp_channels=4, align_corners=True).eval()
    decoder.refine.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    aspp = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        decoder(aspp, torch.randn(1, 8, 16, 16))
    upsampled = seen["x"][0, :4]  # the ASPP channels come first in the concatenation
    torch.testing.assert_close(upsampled[:, 5, 10], aspp[0, :, 1, 2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(upsampled[:, 15, 15], aspp[0, :, 3, 3], rtol=1e-6, atol=1e-6)


def test_align_corners_is_a_setting_and_old_settings_default_to_false():
    model = DeepLab(backbone="resnet18", num_classes=3, align_corners=True)
    settings = model.settings()
    assert settings["align_corners"] is True
    rebuilt = DeepLab.from_settings(settings)
    assert rebuilt.align_corners is True
    assert rebuilt.decoder.align_corners and rebuilt.aspp.convs[-1].align_corners
    # A checkpoint written before the setting existed.
    old = {key: value for key, value in settings.items() if key != "align_corners"}
    assert DeepLab.from_settings(old).align_corners is False
    assert DeepLab(backbone="resnet18", num_classes=3).settings()["align_corners"] is False
