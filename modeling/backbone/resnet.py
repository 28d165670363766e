"""torchvision ResNets as DeepLab backbones: dilated last stages, multi-grid, no classifier.

torchvision's ``replace_stride_with_dilation`` handles neither ``BasicBlock`` (ResNet-18/34) nor
multi-grid, so each model is built with its normal strides and the stages to dilate are converted
in place. Only strides, dilations and paddings change: the parameters (and therefore any
ImageNet state dict) stay exactly those of the torchvision model.

Which stages are dilated, and by how much, is decided by
:func:`modeling.backbone.atrous_settings` from the output stride; this module only applies it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torchvision import models
from torchvision.models import WeightsEnum


def _stage_channels(stage: nn.Sequential) -> int:
    """Channels a ResNet stage outputs: those of its last BatchNorm (last block's bn2 or bn3)."""
    norms = [module for module in stage.modules() if isinstance(module, nn.BatchNorm2d)]
    return norms[-1].num_features


def _dilate_stage(stage: nn.Sequential, dilations: Sequence[int]) -> None:
    """Replace the stage's stride 2 by dilation, in place.

    The first block's strided 3x3 conv and its 1x1 downsample conv get stride 1; every 3x3 conv of
    block ``i`` (both of a ``BasicBlock``, the middle one of a ``Bottleneck``) gets dilation and
    padding ``dilations[i]``, so spatial sizes are kept and the receptive field still grows.
    """
    if len(dilations) < len(stage):
        raise ValueError(f"{len(stage)} blocks need {len(stage)} dilations, got {tuple(dilations)}")
    for block, dilation in zip(stage, dilations):
        for module in block.modules():
            if not isinstance(module, nn.Conv2d):
                continue
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


class ResNetBackbone(nn.Module):
    """The stem and four stages of a torchvision ResNet (no avgpool, no fc).

    Submodule names match torchvision's, so a torchvision ResNet state dict without its ``fc.*``
    entries loads as is.

    Attributes:
        low_level_channels: channels of ``"low_level"`` (layer1 output, stride 4).
        aux_channels: channels of ``"aux"`` (layer3 output, stride 16, or 8 when layer3 is dilated).
        out_channels: channels of ``"out"`` (layer4 output, the output stride).
        imagenet_weights: the torchvision weights this architecture is pretrained with.
    """

    def __init__(
        self,
        resnet: models.ResNet,
        imagenet_weights: WeightsEnum,
        *,
        layer3_dilation: int = 1,
        layer4_dilation: int = 1,
        multi_grid: Sequence[int] = (1, 1, 1),
    ) -> None:
        """
        Args:
            resnet: a torchvision ResNet with its normal strides; its modules are taken over.
            imagenet_weights: recorded for :func:`modeling.backbone.build_backbone`.
            layer3_dilation: 1 keeps layer3's stride 2; more makes it stride 1 with this dilation.
            layer4_dilation: base dilation of layer4 (1 keeps its stride 2).
            multi_grid: layer4 block ``i`` gets ``layer4_dilation * multi_grid[i]`` (DeepLabV3
                multi-grid); ignored when ``layer4_dilation`` is 1.
        """
        super().__init__()
        self.conv1 = resnet.conv1
        self.input_conv = "conv1"
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        if layer3_dilation > 1:
            _dilate_stage(self.layer3, [layer3_dilation] * len(self.layer3))
        if layer4_dilation > 1:
            _dilate_stage(self.layer4, [layer4_dilation * grid for grid in multi_grid])
        self.low_level_channels = _stage_channels(self.layer1)
        self.aux_channels = _stage_channels(self.layer3)
        self.out_channels = _stage_channels(self.layer4)
        self.imagenet_weights = imagenet_weights

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map ``(N, C, H, W)`` images to ``{"low_level", "aux", "out"}`` feature maps."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low_level = self.layer1(x)
        aux = self.layer3(self.layer2(low_level))
        out = self.layer4(aux)
        return {"low_level": low_level, "aux": aux, "out": out}


def _resnet_builder(
    torchvision_builder: Callable[..., models.ResNet], imagenet_weights: WeightsEnum
) -> Callable[..., ResNetBackbone]:
    def build(
        *, layer3_dilation: int = 1, layer4_dilation: int = 1, multi_grid: Sequence[int] = (1, 1, 1)
    ) -> ResNetBackbone:
        return ResNetBackbone(
            torchvision_builder(weights=None),
            imagenet_weights,
            layer3_dilation=layer3_dilation,
            layer4_dilation=layer4_dilation,
            multi_grid=multi_grid,
        )

    build.__name__ = build.__qualname__ = torchvision_builder.__name__
    build.__doc__ = (
        f"A randomly initialised {torchvision_builder.__name__} backbone "
        f"(ImageNet weights: {imagenet_weights}); see :class:`ResNetBackbone` for the arguments."
    )
    return build


# IMAGENET1K_V1 for every depth, like torchvision's references/segmentation.
resnet18 = _resnet_builder(models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1)
resnet34 = _resnet_builder(models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1)
resnet50 = _resnet_builder(models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1)
resnet101 = _resnet_builder(models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1)
resnet152 = _resnet_builder(models.resnet152, models.ResNet152_Weights.IMAGENET1K_V1)
