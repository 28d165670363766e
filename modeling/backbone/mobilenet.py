"""torchvision's MobileNetV3-Large as a DeepLab backbone: dilated last stages, no classifier.

MobileNetV3 (Howard et al., "Searching for MobileNetV3", https://arxiv.org/abs/1905.02244) is
built with its normal strides and the stages past the output stride are converted in place, as
torchvision's ``mobilenet_v3_large(dilated=True)`` under ``deeplabv3_mobilenet_v3_large`` does:
each depthwise convolution of a dilated stage gets stride 1 and a dilation, and the first block
of the stage keeps having no residual connection. Only strides, dilations and paddings change,
so the parameters (and any ImageNet state dict) are exactly those of torchvision's model.

Which stages are dilated, and by how much, is decided by
:func:`modeling.backbone.atrous_settings` from the output stride; this module only applies it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision import models
from torchvision.models import WeightsEnum

#: Running-statistics momentum of every BatchNorm of the backbone (see MobileNetV3Backbone).
BATCH_NORM_MOMENTUM = 0.1


def _dilate_stage(blocks: Sequence[nn.Module], dilation: int) -> None:
    """Replace the stage's stride 2 by ``dilation``, in place.

    Every convolution larger than 1x1 (the depthwise one of each inverted-residual block) gets
    stride 1, the dilation and the padding that keeps the spatial size; 1x1 convolutions are
    never strided in MobileNetV3, so the stride-2 block's output keeps its input's size.
    """
    for block in blocks:
        for module in block.modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
                module.stride = (1, 1)
                module.dilation = (dilation, dilation)
                module.padding = tuple((size - 1) // 2 * dilation for size in module.kernel_size)


class MobileNetV3Backbone(nn.Module):
    """The ``features`` of a torchvision MobileNetV3 (no pooling, no classifier).

    ``features`` keeps torchvision's name and indices, so a torchvision MobileNetV3 state dict
    without its ``classifier.*`` entries loads as is. Its stages end where the next strided
    block begins (torchvision's ``_is_cn`` marks those blocks); for MobileNetV3-Large the
    features are 16 blocks and a 1x1 convolution: stride 4 after block 3, 16 after block 12.

    Attributes:
        low_level_channels: channels of ``"low_level"`` (the last stride-4 block, 24).
        aux_channels: channels of ``"aux"`` (the last stride-16 block, 112; stride 8 when that
            stage is dilated).
        out_channels: channels of ``"out"`` (the final 1x1 convolution, 960; the output stride).
        imagenet_weights: the torchvision weights this architecture is pretrained with.
    """

    def __init__(
        self,
        mobilenet: models.MobileNetV3,
        imagenet_weights: WeightsEnum,
        *,
        layer3_dilation: int = 1,
        layer4_dilation: int = 1,
    ) -> None:
        """
        Args:
            mobilenet: a torchvision MobileNetV3 with its normal strides; its features are
                taken over.
            imagenet_weights: recorded for :func:`modeling.backbone.build_backbone`.
            layer3_dilation: 1 keeps the stride-16 stage's stride 2; more makes it stride 1
                with this dilation.
            layer4_dilation: dilation of every block of the last (stride-32) stage; 1 keeps
                its stride 2.
        """
        super().__init__()
        self.features = mobilenet.features
        self.input_conv = "features.0.0"  # the stem's Conv2dNormActivation: conv, BN, Hardswish
        for module in self.features.modules():
            if isinstance(module, nn.BatchNorm2d):
                # torchvision's 0.01 (from the TensorFlow ImageNet recipe) leaves the running
                # statistics of a short run (~100 iterations) behind the weights, so evaluation
                # sees stale statistics; 0.1 is PyTorch's default, which the ResNets and heads
                # use. Not a weight: ImageNet tensors load the same, and eps stays torchvision's
                # 0.001 so that they compute what they did.
                module.momentum = BATCH_NORM_MOMENTUM
        strided = [index for index, block in enumerate(self.features)
                   if getattr(block, "_is_cn", False)]
        if len(strided) != 4:
            raise ValueError(f"expected 4 strided blocks after the stem, found {len(strided)}")
        # Blocks strided[k] .. strided[k + 1] - 1 run at stride 2 ** (k + 2).
        self._low_level_index = strided[1] - 1
        self._aux_index = strided[3] - 1
        if layer3_dilation > 1:
            _dilate_stage(self.features[strided[2]:strided[3]], layer3_dilation)
        if layer4_dilation > 1:
            _dilate_stage(self.features[strided[3]:], layer4_dilation)
        self.low_level_channels = self.features[self._low_level_index].out_channels
        self.aux_channels = self.features[self._aux_index].out_channels
        self.out_channels = self.features[-1].out_channels
        self.imagenet_weights = imagenet_weights

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map ``(N, 3, H, W)`` images to ``{"low_level", "aux", "out"}`` feature maps."""
        features = {}
        for index, block in enumerate(self.features):
            x = block(x)
            if index == self._low_level_index:
                features["low_level"] = x
            elif index == self._aux_index:
                features["aux"] = x
        features["out"] = x
        return features


def mobilenetv3(
    *, layer3_dilation: int = 1, layer4_dilation: int = 1, multi_grid: Sequence[int] = (1, 1, 1)
) -> MobileNetV3Backbone:
    """A randomly initialised MobileNetV3-Large backbone (ImageNet weights: IMAGENET1K_V1, the
    ones torchvision's ``deeplabv3_mobilenet_v3_large`` starts from).

    ``multi_grid`` is taken for the registry's one signature and not applied: torchvision
    dilates the last stage's three blocks alike, and TensorFlow's DeepLab applies multi-grid
    to ResNets only. See :class:`MobileNetV3Backbone` for the other arguments.
    """
    del multi_grid
    return MobileNetV3Backbone(
        models.mobilenet_v3_large(weights=None),
        models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        layer3_dilation=layer3_dilation,
        layer4_dilation=layer4_dilation,
    )
