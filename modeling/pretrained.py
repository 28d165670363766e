"""Start a DeepLabV3+ from torchvision's COCO-trained DeepLabV3 (``COCO_WITH_VOC_LABELS_V1``).

torchvision's ``deeplabv3_resnet50`` / ``deeplabv3_resnet101`` were trained on COCO train2017
with the 21 Pascal VOC classes (the labels of ``--dataset coco`` here). Their backbone is a
torchvision ResNet and their ``classifier.0`` is the same ASPP as ours (same module names), so
both load tensor for tensor; so does their FCN auxiliary head into ours. Their head after the
ASPP (a 3x3 conv and the classifier) has no counterpart in the DeepLabV3+ decoder, which starts
from its own initialisation.

They were trained at output stride 8 (ASPP rates 12/24/36) with layer4 dilated 2, 4, 4; our
output stride 8 uses the same rates and multi-grid dilations 4, 8, 16 in layer4, output stride
16 half the rates at half the resolution (the same field of view). Either way the weights are a
starting point for fine-tuning, not a finished DeepLabV3+.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping

import torch
from torchvision.models import WeightsEnum
from torchvision.models.segmentation import (
    DeepLabV3_ResNet50_Weights,
    DeepLabV3_ResNet101_Weights,
)

from modeling.backbone import canonical_backbone_name, download_state_dict, read_state_dict
from modeling.deeplab import DeepLab

logger = logging.getLogger(__name__)

#: train.py's ``--init`` value that downloads torchvision's COCO DeepLabV3 (any other value is a
#: local file).
INIT_TORCHVISION_COCO = "torchvision-coco"

#: Backbone -> torchvision's DeepLabV3 weights trained on COCO with the 21 VOC classes.
COCO_DEEPLABV3_WEIGHTS: dict[str, WeightsEnum] = {
    "resnet50": DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    "resnet101": DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
}

#: torchvision DeepLabV3 prefix -> ours. ``classifier.1.`` to ``classifier.4.`` have none.
_PREFIXES = (("backbone.", "backbone."), ("classifier.0.", "aspp."),
             ("aux_classifier.", "aux_classifier."))


@dataclass(frozen=True)
class InitReport:
    """What :func:`init_from_torchvision_deeplabv3` loaded.

    Attributes:
        loaded: our state-dict keys now holding the source's tensors.
        fresh: our keys left as initialised (the decoder; the aux head's classifier when the
            class counts differ; the whole aux head when the source has none).
        unused: source keys with no place here (torchvision's head after the ASPP; its aux head
            when our model has none).
    """

    loaded: list[str]
    fresh: list[str]
    unused: list[str]


def coco_deeplabv3_weights(backbone: str) -> WeightsEnum:
    """torchvision's COCO DeepLabV3 weights for ``backbone`` (``resnet50`` or ``resnet101``).

    Raises:
        ValueError: torchvision publishes none for this backbone.
    """
    name = canonical_backbone_name(backbone)
    if name not in COCO_DEEPLABV3_WEIGHTS:
        raise ValueError(
            f"torchvision publishes COCO DeepLabV3 weights for "
            f"{' and '.join(COCO_DEEPLABV3_WEIGHTS)} only, not {name}"
        )
    return COCO_DEEPLABV3_WEIGHTS[name]


def coco_deeplabv3_state_dict(
    backbone: str, path: str | os.PathLike | None = None
) -> Mapping[str, torch.Tensor]:
    """torchvision's COCO DeepLabV3 state dict: from ``path``, the torch hub cache or downloaded.

    Both the file and the cached download are read with ``torch.load(..., weights_only=True)``.

    Args:
        backbone: ``resnet50`` or ``resnet101`` (aliases allowed).
        path: a local copy (the downloaded ``.pth`` file, or ``model.state_dict()`` of
            ``torchvision.models.segmentation.deeplabv3_resnet*`` saved with ``torch.save``).

    Raises:
        ValueError: no COCO weights for ``backbone``, or ``path`` is not a readable state dict.
        FileNotFoundError: ``path`` does not exist.
        PretrainedWeightsUnavailable: no ``path``, no network and no cached copy (the message
            says where to download the file), or a cached copy that needs unsafe loading.
    """
    weights = coco_deeplabv3_weights(backbone)
    if path is not None:
        return _read_state_dict(path)
    return download_state_dict(
        weights, f"torchvision's COCO DeepLabV3 {canonical_backbone_name(backbone)} weights",
        "download {url} on a machine with internet (e.g. curl -LO {url}) and use that file, "
        "or put it at {cached_file}")


def init_from_torchvision_deeplabv3(
    model: DeepLab, state_dict: Mapping[str, torch.Tensor]
) -> InitReport:
    """Copy a torchvision DeepLabV3's backbone, ASPP and (where it fits) aux head into ``model``.

    Args:
        model: a DeepLabV3+ with the same ResNet as the source (any output stride, any class
            count; its decoder is left as it is).
        state_dict: ``model.state_dict()`` of ``torchvision.models.segmentation.deeplabv3_*``.

    Returns:
        Which tensors were loaded, left fresh and unused.

    Raises:
        ValueError: the source does not hold every backbone and ASPP tensor of ``model`` with the
            same shape (another ResNet depth, another model); the message is one line.
    """
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in state_dict.items():
        target = next((ours + key[len(theirs):] for theirs, ours in _PREFIXES
                       if key.startswith(theirs)), None)
        if target is None or target not in own or own[target].shape != value.shape:
            unused.append(key)
        else:
            mapped[target] = value
    required = [key for key in own if key.startswith(("backbone.", "aspp."))]
    absent = [key for key in required if key not in mapped]
    if absent:
        wrong_shape = [key for key in absent
                       if _source_key(key) in state_dict
                       and state_dict[_source_key(key)].shape != own[key].shape]
        detail = (f"{len(wrong_shape)} of another shape, e.g. {wrong_shape[0]} "
                  f"{tuple(state_dict[_source_key(wrong_shape[0])].shape)} vs "
                  f"{tuple(own[wrong_shape[0]].shape)}" if wrong_shape
                  else f"e.g. {_source_key(absent[0])}")
        raise ValueError(
            f"not a torchvision deeplabv3_{model.backbone_name} state dict: {len(absent)} of the "
            f"{len(required)} backbone and ASPP tensors are missing or do not fit ({detail})"
        )
    surplus = [key for key in unused if key.startswith(("backbone.", "classifier.0."))]
    if surplus:
        raise ValueError(
            f"not a torchvision deeplabv3_{model.backbone_name} state dict: {len(surplus)} of its "
            f"backbone and ASPP tensors have no place in this model, e.g. {surplus[0]} (another "
            "ResNet depth?)"
        )
    model.load_state_dict(mapped, strict=False)
    report = InitReport(loaded=list(mapped), fresh=[key for key in own if key not in mapped],
                        unused=unused)
    logger.info("loaded %d tensors from torchvision's DeepLabV3 (backbone, ASPP%s); %d left as "
                "initialised (decoder%s)", len(report.loaded),
                ", aux head" if any(k.startswith("aux_classifier.") for k in mapped) else "",
                len(report.fresh),
                ", aux classifier" if any(k.startswith("aux_classifier.") for k in report.fresh)
                else "")
    return report


def _source_key(key: str) -> str:
    for theirs, ours in _PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def _read_state_dict(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    return read_state_dict(path, "torchvision DeepLabV3 weights",
                           "save model.state_dict() of torchvision's deeplabv3_resnet*")
