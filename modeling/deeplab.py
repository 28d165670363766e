"""DeepLabV3+: a dilated backbone, ASPP and a decoder with low-level features."""
from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from modeling.aspp import ASPP
from modeling.backbone import atrous_settings, build_backbone, canonical_backbone_name
from modeling.decoder import Decoder


class DeepLab(nn.Module):
    """DeepLabV3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic
    Image Segmentation", https://arxiv.org/abs/1802.02611) with a torchvision ResNet or
    MobileNetV3-Large backbone.

    The ASPP, decoder and auxiliary head are sized from the backbone's channel counts. Training
    needs at least 2 images per batch (per device): the ASPP image-pooling BatchNorm sees a single
    value per channel and sample. Evaluation works with any batch size.

    Attributes:
        backbone_name: canonical backbone name (aliases resolved), e.g. ``"resnet101"``.
        output_stride: 16 or 8.
        num_classes: number of output channels.
        aux_loss: whether ``forward`` also returns ``"aux"`` logits.
        align_corners: the ``align_corners`` of every bilinear upsampling inside the model (ASPP
            image pooling, decoder, logits to input size).
    """

    def __init__(
        self,
        *,
        backbone: str = "resnet101",
        output_stride: int = 16,
        num_classes: int = 21,
        pretrained_backbone: bool = False,
        backbone_weights: str | os.PathLike | None = None,
        aux_loss: bool = False,
        align_corners: bool = False,
        in_channels: int = 3,
    ) -> None:
        """
        Args:
            backbone: a name of :data:`modeling.backbone.BACKBONES` or an alias.
            output_stride: input size / ASPP feature size, 16 or 8 (8 is finer and ~4x costlier).
            num_classes: classes predicted per pixel, background included.
            pretrained_backbone: start the backbone from torchvision's ImageNet weights.
            backbone_weights: a local torchvision state dict of the backbone to start from instead.
            aux_loss: add an FCN head on the backbone's ``"aux"`` features (torchvision's recipe).
            align_corners: ``False`` (torchvision's convention) for models trained here; ``True``
                reproduces models trained by jfzhang95/pytorch-deeplab-xception (converted).
            in_channels: image bands; ImageNet weights adapt (``backbone.adapt_input_conv``).

        Raises:
            ValueError: unknown backbone, unsupported output stride, weights file that does not fit.
            FileNotFoundError: ``backbone_weights`` does not exist.
            modeling.backbone.PretrainedWeightsUnavailable: offline and not cached.
        """
        super().__init__()
        self.backbone_name = canonical_backbone_name(backbone)
        self.output_stride = output_stride
        self.num_classes = num_classes
        self.aux_loss = aux_loss
        self.align_corners = align_corners
        self.in_channels = in_channels

        settings = atrous_settings(output_stride)
        self.backbone = build_backbone(
            self.backbone_name, output_stride,
            pretrained=pretrained_backbone, weights_path=backbone_weights,
            in_channels=in_channels,
        )
        self.aspp = ASPP(self.backbone.out_channels, settings.aspp_rates,
                         align_corners=align_corners)
        self.decoder = Decoder(self.backbone.low_level_channels, num_classes,
                               align_corners=align_corners)
        self.aux_classifier = (
            _fcn_head(self.backbone.aux_channels, num_classes) if aux_loss else None
        )

        # The backbone keeps torchvision's init (or its pretrained weights); only the heads are new.
        for head in (self.aspp, self.decoder, self.aux_classifier):
            if head is not None:
                _init_head(head)
        # The classifiers keep PyTorch's default init, as torchvision's segmentation heads do:
        # kaiming fan_out over the class count gave logits of std ~2.8 and a first loss near 6
        # instead of ln(num_classes).
        for layer in self._classifiers().values():
            layer.reset_parameters()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "DeepLab":
        """Rebuild the architecture a checkpoint's ``settings`` describe (weights not loaded).

        Settings added after a checkpoint was written (``aux_loss``, ``align_corners``) take their
        defaults, so older checkpoints still load.
        """
        return cls(
            backbone=settings["backbone"],
            output_stride=settings["output_stride"],
            num_classes=settings["num_classes"],
            aux_loss=settings.get("aux_loss", False),
            align_corners=settings.get("align_corners", False),
            in_channels=settings.get("in_channels", 3),
        )

    @classmethod
    def from_state_dict(
        cls, settings: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
    ) -> "DeepLab":
        """Rebuild the architecture and take ``state_dict``'s tensors as its weights.

        Built on the meta device, so no time is spent initialising weights that are replaced at
        once (noticeable for ResNet-101 on a CPU); the tensors are used as they are (``assign``).

        Raises:
            RuntimeError: ``state_dict`` lacks a tensor of this architecture or has others.
        """
        with torch.device("meta"):
            model = cls.from_settings(settings)
        model.load_state_dict(state_dict, assign=True)
        return model

    def settings(self) -> dict[str, Any]:
        """The constructor settings as plain types, for self-describing checkpoints."""
        return {
            "backbone": self.backbone_name,
            "output_stride": self.output_stride,
            "num_classes": self.num_classes,
            "aux_loss": self.aux_loss,
            "align_corners": self.align_corners,
            "in_channels": self.in_channels,
        }

    def _classifiers(self) -> dict[str, nn.Conv2d]:
        """The layers producing class logits, by state-dict prefix."""
        heads = {"decoder.classifier": self.decoder.classifier}
        if self.aux_classifier is not None:
            heads["aux_classifier." + str(len(self.aux_classifier) - 1)] = self.aux_classifier[-1]
        return heads

    def classifier_parameter_names(self) -> list[str]:
        """State-dict keys whose shape depends on ``num_classes`` (re-initialised by fine-tuning)."""
        return [f"{prefix}.{name}" for prefix, layer in self._classifiers().items()
                for name, _ in layer.named_parameters()]

    def load_finetune_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        """Load another run's weights to fine-tune from; classifier layers whose shape differs
        (another class count) keep their fresh initialisation.

        Returns:
            The names of the tensors left re-initialised.

        Raises:
            ValueError: any other tensor is missing, unexpected or of another shape.
        """
        own = self.state_dict()
        reinit = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
        classifier = set(self.classifier_parameter_names())
        for key in reinit:
            if key not in classifier:
                raise ValueError(f"{key} {tuple(state_dict[key].shape)} vs {tuple(own[key].shape)}")
        filtered = {k: v for k, v in state_dict.items() if k not in reinit}
        missing, unexpected = self.load_state_dict(filtered, strict=False)
        missing = [k for k in missing if k not in reinit]
        if missing or unexpected:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        return reinit

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pixel class logits.

        Args:
            x: ``(N, C, H, W)`` normalised images; any ``H, W`` (not only multiples of 16).

        Returns:
            ``{"out": (N, num_classes, H, W)}`` logits, plus ``"aux"`` of the same shape when
            ``aux_loss``.
        """
        input_size = x.shape[-2:]
        features = self.backbone(x)
        logits = self.decoder(self.aspp(features["out"]), features["low_level"])
        result = {"out": _upsample(logits, input_size, self.align_corners)}
        # A constructor setting, not data: torch.compile sees a fixed graph.
        if self.aux_classifier is not None:
            result["aux"] = _upsample(self.aux_classifier(features["aux"]), input_size,
                                      self.align_corners)
        return result

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the (possibly pretrained) backbone: the base learning rate."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter (ASPP, decoder, aux head): trained from scratch at 10x the rate."""
        backbone_ids = {id(parameter) for parameter in self.backbone.parameters()}
        return (parameter for parameter in self.parameters() if id(parameter) not in backbone_ids)


def _upsample(logits: torch.Tensor, size: torch.Size, align_corners: bool) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


def _fcn_head(in_channels: int, num_classes: int) -> nn.Sequential:
    """torchvision's FCNHead: 3x3 conv to ``in_channels // 4``, BN, ReLU, Dropout(0.1), 1x1 conv."""
    inter_channels = in_channels // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(inter_channels),
        nn.ReLU(inplace=True),
        nn.Dropout(0.1),
        nn.Conv2d(inter_channels, num_classes, 1),
    )


def _init_head(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
