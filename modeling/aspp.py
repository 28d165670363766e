"""Atrous Spatial Pyramid Pooling (DeepLabV3, https://arxiv.org/abs/1706.05587, sec. 3.3)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1
) -> nn.Sequential:
    # No conv bias: the BatchNorm that follows has its own.
    padding = dilation if kernel_size == 3 else 0
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Sequential):
    """Image-level features: global average, 1x1 conv, BN, ReLU, broadcast back to the map size.

    Its BatchNorm sees one value per channel and sample, so training needs a batch of at least 2.
    """

    def __init__(self, in_channels: int, out_channels: int, align_corners: bool = False) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, out_channels, 1))
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)


class ASPP(nn.Module):
    """Five parallel branches over the high-level features, concatenated and projected.

    Branches: a 1x1 conv, three 3x3 convs with dilation ``atrous_rates``, and image pooling; each
    gives ``out_channels``. The ``5 * out_channels`` concatenation is projected to ``out_channels``
    by a 1x1 conv, BN, ReLU and ``Dropout(0.5)``.
    """

    def __init__(
        self,
        in_channels: int,
        atrous_rates: Sequence[int],
        out_channels: int = 256,
        align_corners: bool = False,
    ) -> None:
        """
        Args:
            in_channels: channels of the backbone's ``"out"`` features.
            atrous_rates: three dilations, from :func:`modeling.backbone.atrous_settings`.
            out_channels: channels of every branch and of the output.
            align_corners: how the image-pooling branch is upsampled (see
                :class:`modeling.deeplab.DeepLab`).
        """
        super().__init__()
        if len(atrous_rates) != 3:
            raise ValueError(f"ASPP takes three atrous rates, got {tuple(atrous_rates)}")
        self.convs = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_conv_bn_relu(in_channels, out_channels, 3, dilation=rate) for rate in atrous_rates]
            + [ASPPPooling(in_channels, out_channels, align_corners)]
        )
        self.project = nn.Sequential(
            *_conv_bn_relu(len(self.convs) * out_channels, out_channels, 1),
            nn.Dropout(0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, h, w)`` -> ``(N, out_channels, h, w)``."""
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))
