"""The first convolution for images of any channel count (issue 26): ImageNet's RGB weights
adapted as timm's adapt_input_conv does, ``in_channels`` a setting of the model."""
from __future__ import annotations

import pytest
import torch

from modeling.backbone import adapt_input_conv, build_backbone
from modeling.deeplab import DeepLab


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """A local torchvision resnet18 state dict with random (seeded) weights: tests never download."""
    torch.manual_seed(7)
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state["conv1.weight"]


def test_three_channels_start_from_exactly_the_imagenet_convolution(fake_imagenet):
    path, rgb = fake_imagenet
    model = DeepLab(backbone="resnet18", num_classes=2, backbone_weights=path, in_channels=3)
    assert torch.equal(model.backbone.conv1.weight, rgb)


def test_one_channel_is_the_sum_over_rgb_by_hand():
    weight = torch.zeros(2, 3, 1, 1)
    weight[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    weight[1, :, 0, 0] = torch.tensor([-1.0, 0.5, 4.0])
    adapted = adapt_input_conv(1, weight)
    assert adapted.shape == (2, 1, 1, 1)
    assert adapted.flatten().tolist() == [6.0, 3.5]


def test_five_channels_repeat_rgb_cut_and_scale_by_hand():
    weight = torch.tensor([3.0, 6.0, 9.0]).view(1, 3, 1, 1)
    adapted = adapt_input_conv(5, weight)
    # R G B R G, each times 3/5.
    assert adapted.flatten().tolist() == pytest.approx([1.8, 3.6, 5.4, 1.8, 3.6])


def test_a_grey_image_gives_the_response_of_its_rgb_copy():
    weight = torch.randn(4, 3, 3, 3)
    grey = torch.rand(1, 1, 8, 8)
    rgb_response = torch.nn.functional.conv2d(grey.expand(1, 3, 8, 8), weight)
    grey_response = torch.nn.functional.conv2d(grey, adapt_input_conv(1, weight))
    torch.testing.assert_close(grey_response, rgb_response)


@pytest.mark.parametrize("in_channels", [1, 4, 5])
def test_pretrained_weights_load_adapted_for_n_channels(fake_imagenet, in_channels):
    path, rgb = fake_imagenet
    backbone = build_backbone("resnet18", 16, weights_path=path, in_channels=in_channels)
    assert backbone.conv1.weight.shape == (64, in_channels, 7, 7)
    torch.testing.assert_close(backbone.conv1.weight, adapt_input_conv(in_channels, rgb))


def test_in_channels_is_a_setting_and_old_settings_default_to_three():
    model = DeepLab(backbone="resnet18", num_classes=3, in_channels=5)
    settings = model.settings()
    assert settings["in_channels"] == 5
    rebuilt = DeepLab.from_state_dict(settings, model.state_dict())
    assert rebuilt.backbone.conv1.in_channels == 5
    output = rebuilt.eval()(torch.rand(1, 5, 64, 64))["out"]
    assert output.shape == (1, 3, 64, 64)
    del settings["in_channels"]
    assert DeepLab.from_settings(settings).backbone.conv1.in_channels == 3


@pytest.mark.parametrize("in_channels", [1, 3, 5])
def test_mobilenetv3_adapts_its_stem_convolution_too(tmp_path, in_channels):
    import torchvision

    torch.manual_seed(8)
    state = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    torch.save(state, tmp_path / "mobilenet.pth")
    backbone = build_backbone("mobilenetv3", 16, weights_path=tmp_path / "mobilenet.pth",
                              in_channels=in_channels)
    stem = backbone.features[0][0]
    assert stem.weight.shape == (16, in_channels, 3, 3) and stem.stride == (2, 2)
    torch.testing.assert_close(stem.weight, adapt_input_conv(in_channels,
                                                             state["features.0.0.weight"]))
    assert backbone(torch.rand(1, in_channels, 64, 64))["out"].shape[-2:] == (4, 4)
