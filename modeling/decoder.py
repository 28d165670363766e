"""The DeepLabV3+ decoder (https://arxiv.org/abs/1802.02611, sec. 3.1): refine ASPP output with
stride-4 low-level features and classify each pixel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Low-level features are reduced to few channels so they do not outweigh the ASPP's 256
#: (paper, sec. 4.1: 48).
LOW_LEVEL_REDUCED_CHANNELS = 48


class Decoder(nn.Module):
    """Low-level 1x1 reduction, concatenation with the upsampled ASPP output, two 3x3 convs and a
    1x1 classifier.

    Dropout 0.5 after the first 3x3 conv and 0.1 after the second follows the widely used PyTorch
    port (jfzhang95/pytorch-deeplab-xception) that this toolkit replaces.
    """

    def __init__(
        self,
        low_level_channels: int,
        num_classes: int,
        aspp_channels: int = 256,
        align_corners: bool = False,
    ) -> None:
        """
        Args:
            low_level_channels: channels of the backbone's ``"low_level"`` features.
            num_classes: output channels (logits).
            aspp_channels: channels of the ASPP output.
            align_corners: how the ASPP output is upsampled to the low-level resolution (see
                :class:`modeling.deeplab.DeepLab`).
        """
        super().__init__()
        self.align_corners = align_corners
        self.reduce_low_level = nn.Sequential(
            nn.Conv2d(low_level_channels, LOW_LEVEL_REDUCED_CHANNELS, 1, bias=False),
            nn.BatchNorm2d(LOW_LEVEL_REDUCED_CHANNELS),
            nn.ReLU(inplace=True),
        )
        self.refine = nn.Sequential(
            nn.Conv2d(aspp_channels + LOW_LEVEL_REDUCED_CHANNELS, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
        )
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(
        self, aspp_features: torch.Tensor, low_level_features: torch.Tensor
    ) -> torch.Tensor:
        """Logits at the low-level resolution.

        Args:
            aspp_features: ``(N, aspp_channels, h, w)``, stride ``output_stride``.
            low_level_features: ``(N, low_level_channels, H/4, W/4)``.

        Returns:
            ``(N, num_classes, H/4, W/4)`` logits.
        """
        low_level_features = self.reduce_low_level(low_level_features)
        aspp_features = F.interpolate(aspp_features, size=low_level_features.shape[-2:],
                                      mode="bilinear", align_corners=self.align_corners)
        return self.classifier(self.refine(torch.cat([aspp_features, low_level_features], dim=1)))
