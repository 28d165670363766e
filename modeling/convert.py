"""Weights published by jfzhang95/pytorch-deeplab-xception, renamed for :class:`DeepLab`.

That repository's ``--backbone resnet`` DeepLabV3+ is the architecture built here, tensor for
tensor and in the same order (680 state-dict entries for ResNet-101 with 21 classes); only the
head's module names differ. Its ResNet uses torchvision's names, so the backbone entries keep
theirs. The models upsample with ``align_corners=True``; build the target with
``DeepLab(..., align_corners=True)`` to compute what they computed.

Knows state dicts only: reading and writing files is ``scripts/convert_checkpoint.py``'s job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from modeling.deeplab import DeepLab

#: Their head module prefix -> ours. Every entry below each prefix keeps its last part
#: (``weight``, ``bias``, ``running_mean``, ...).
JFZHANG95_HEAD_PREFIXES: tuple[tuple[str, str], ...] = (
    ("aspp.aspp1.atrous_conv.", "aspp.convs.0.0."),
    ("aspp.aspp1.bn.", "aspp.convs.0.1."),
    ("aspp.aspp2.atrous_conv.", "aspp.convs.1.0."),
    ("aspp.aspp2.bn.", "aspp.convs.1.1."),
    ("aspp.aspp3.atrous_conv.", "aspp.convs.2.0."),
    ("aspp.aspp3.bn.", "aspp.convs.2.1."),
    ("aspp.aspp4.atrous_conv.", "aspp.convs.3.0."),
    ("aspp.aspp4.bn.", "aspp.convs.3.1."),
    ("aspp.global_avg_pool.1.", "aspp.convs.4.1."),
    ("aspp.global_avg_pool.2.", "aspp.convs.4.2."),
    ("aspp.conv1.", "aspp.project.0."),
    ("aspp.bn1.", "aspp.project.1."),
    ("decoder.conv1.", "decoder.reduce_low_level.0."),
    ("decoder.bn1.", "decoder.reduce_low_level.1."),
    ("decoder.last_conv.0.", "decoder.refine.0."),
    ("decoder.last_conv.1.", "decoder.refine.1."),
    ("decoder.last_conv.4.", "decoder.refine.4."),
    ("decoder.last_conv.5.", "decoder.refine.5."),
    ("decoder.last_conv.8.", "decoder.classifier."),
)

#: Key prefixes of that repository's other backbones, to name them when they are given.
_OTHER_BACKBONES: tuple[tuple[str, str], ...] = (
    ("backbone.block", "xception"),
    ("backbone.entry", "xception"),
    ("backbone.features.", "mobilenet"),
    ("backbone.layer0.", "drn"),
    ("backbone.layer5.", "drn"),
)

#: Blocks per stage of torchvision's ResNets, and whether the block is a Bottleneck.
_RESNET_LAYOUTS: dict[tuple[bool, tuple[int, int, int, int]], str] = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}


class NotConvertible(ValueError):
    """The state dict is not a jfzhang95 ResNet DeepLab; the message is one line."""


@dataclass(frozen=True)
class ConvertedWeights:
    """A state dict in this project's names and the architecture it needs.

    Attributes:
        state_dict: entries in the source's order, renamed for :class:`DeepLab`.
        backbone: canonical backbone name, e.g. ``"resnet101"``.
        num_classes: classes of the decoder's classifier.
        renamed: how many source entries were renamed (the rest kept their names).
        added: ``num_batches_tracked`` entries the source lacked (PyTorch before 0.4.1 did not
            store them; evaluation never reads them), added as 0.
    """

    state_dict: dict[str, torch.Tensor]
    backbone: str
    num_classes: int
    renamed: int
    added: int


def strip_data_parallel_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` that ``nn.DataParallel`` puts before every key (if all have it)."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def convert_jfzhang95_resnet(state_dict: Mapping[str, torch.Tensor]) -> ConvertedWeights:
    """Rename a jfzhang95/pytorch-deeplab-xception ``--backbone resnet`` state dict.

    Args:
        state_dict: the checkpoint's ``"state_dict"`` entry, with or without the ``module.``
            prefix of ``nn.DataParallel``. Any ResNet depth converts (their code builds
            ResNet-101 only; the names are those of every torchvision ResNet).

    Returns:
        The renamed entries, the backbone they fit and the class count. Load them into
        ``DeepLab(backbone=..., num_classes=..., align_corners=True)`` with ``strict=True``; the
        output stride is not stored in weights (theirs: 16 unless trained with ``--out-stride 8``).

    Raises:
        NotConvertible: another backbone (xception, mobilenet, drn), or entries that are not of
            that DeepLab at all.
    """
    state_dict = strip_data_parallel_prefix(state_dict)
    for prefix, name in _OTHER_BACKBONES:
        if any(key.startswith(prefix) for key in state_dict):
            raise NotConvertible(
                f"holds a jfzhang95 DeepLab with the {name!r} backbone; only the 'resnet' "
                "backbone has an equivalent here"
            )
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    renamed = added = 0
    for key, value in state_dict.items():
        new_key = _rename(key)
        if new_key is None:
            unknown.append(key)
            continue
        renamed += new_key != key
        converted[new_key] = value
        if key.endswith(".running_var"):
            counter = new_key[: -len("running_var")] + "num_batches_tracked"
            source_counter = key[: -len("running_var")] + "num_batches_tracked"
            if source_counter not in state_dict:
                converted[counter] = torch.tensor(0, dtype=torch.long)
                added += 1
    if unknown:
        raise NotConvertible(
            f"is not a jfzhang95 ResNet DeepLab state dict: {len(unknown)} unknown entries "
            f"({_first(unknown)})"
        )
    if "decoder.classifier.weight" not in converted:
        raise NotConvertible("has no decoder classifier (decoder.last_conv.8.weight)")
    return ConvertedWeights(
        state_dict=converted,
        backbone=_resnet_name(converted),
        num_classes=int(converted["decoder.classifier.weight"].shape[0]),
        renamed=renamed,
        added=added,
    )


def state_dict_mismatch(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Why ``model.load_state_dict(state_dict, strict=True)`` would fail, in one line ("" if not).

    Lists the count and first names of missing, unexpected and wrongly shaped entries.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    problems = [
        f"{len(keys)} {label}: {_first(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", wrong_shape))
        if keys
    ]
    return "; ".join(problems)


def load_jfzhang95_resnet(
    state_dict: Mapping[str, torch.Tensor], *, output_stride: int = 16
) -> tuple[DeepLab, ConvertedWeights]:
    """A :class:`DeepLab` (``align_corners=True``) holding a converted jfzhang95 state dict.

    Args:
        state_dict: as for :func:`convert_jfzhang95_resnet`.
        output_stride: the stride the source was trained with, 16 or 8 (not stored in weights).

    Raises:
        NotConvertible: as for :func:`convert_jfzhang95_resnet`, or the entries do not fit the
            architecture they describe (a truncated or edited state dict).
    """
    converted = convert_jfzhang95_resnet(state_dict)
    model = DeepLab(backbone=converted.backbone, output_stride=output_stride,
                    num_classes=converted.num_classes, align_corners=True)
    mismatch = state_dict_mismatch(model, converted.state_dict)
    if mismatch:
        raise NotConvertible(
            f"does not fit a {converted.backbone} DeepLab with {converted.num_classes} classes "
            f"({mismatch})"
        )
    model.load_state_dict(converted.state_dict, strict=True)
    return model, converted


def _rename(key: str) -> str | None:
    if key.startswith("backbone."):
        return key
    for theirs, ours in JFZHANG95_HEAD_PREFIXES:
        if key.startswith(theirs) and "." not in key[len(theirs):]:
            return ours + key[len(theirs):]
    return None


def _resnet_name(state_dict: Mapping[str, torch.Tensor]) -> str:
    blocks = []
    for stage in range(1, 5):
        prefix = f"backbone.layer{stage}."
        indices = {key[len(prefix):].split(".", 1)[0]
                   for key in state_dict if key.startswith(prefix)}
        blocks.append(len(indices))
    bottleneck = "backbone.layer1.0.conv3.weight" in state_dict
    name = _RESNET_LAYOUTS.get((bottleneck, tuple(blocks)))
    if name is None:
        kind = "Bottleneck" if bottleneck else "BasicBlock"
        raise NotConvertible(
            f"has a ResNet backbone with {tuple(blocks)} {kind} blocks per stage, which is none "
            f"of {', '.join(sorted(_RESNET_LAYOUTS.values()))}"
        )
    return name


def _first(keys: list[str], shown: int = 3) -> str:
    return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")
