"""Backbone registry, output-stride settings and weight loading.

Every backbone follows one contract: ``forward(x)`` returns a dict with ``"low_level"`` (stride 4),
``"aux"`` (the stage before the last) and ``"out"`` (stride ``output_stride``) feature maps, and the
module exposes ``low_level_channels``, ``aux_channels`` and ``out_channels``, ``input_conv`` (the
dotted name of the convolution that takes the image, whose input channels follow the data), and,
for ``pretrained``, ``imagenet_weights``: a torchvision ``WeightsEnum``. The heads are sized from
those numbers only. A new backbone is one builder added to :data:`BACKBONES`.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum

from modeling.backbone.mobilenet import mobilenetv3
from modeling.backbone.resnet import resnet18, resnet34, resnet50, resnet101, resnet152

#: name -> builder taking ``layer3_dilation``, ``layer4_dilation`` and ``multi_grid`` keywords.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "mobilenetv3": mobilenetv3,
}

#: Names kept for the original repository's ``--backbone resnet``.
BACKBONE_ALIASES: dict[str, str] = {"resnet": "resnet101"}


class PretrainedWeightsUnavailable(Exception):
    """ImageNet weights could neither be downloaded nor found in the torch hub cache (offline)."""


@dataclass(frozen=True)
class AtrousSettings:
    """How one output stride is reached, and the ASPP rates that keep the same field of view.

    ``layer3`` and ``layer4`` are the ResNet names of the stages that reach stride 16 and 32;
    other backbones apply the same dilations to their own two last stages.

    Attributes:
        layer3_dilation: 1 keeps layer3's stride 2; 2 replaces it (output stride 8).
        layer4_dilation: base dilation of layer4, whose stride 2 is always replaced.
        multi_grid: layer4 block ``i`` uses ``layer4_dilation * multi_grid[i]`` (DeepLabV3,
            sec. 3.2; a two-block layer4, as in ResNet-18, uses the first two). ResNets only:
            MobileNetV3 dilates its last stage uniformly, as torchvision does.
        aspp_rates: dilations of the three 3x3 ASPP branches.
    """

    layer3_dilation: int
    layer4_dilation: int
    multi_grid: tuple[int, ...]
    aspp_rates: tuple[int, int, int]


def atrous_settings(output_stride: int) -> AtrousSettings:
    """The one place an output stride becomes dilations (backbone) and atrous rates (ASPP).

    Args:
        output_stride: input size / high-level feature size; 16 (faster) or 8 (finer).

    Raises:
        ValueError: for any other value.
    """
    if output_stride == 16:
        return AtrousSettings(layer3_dilation=1, layer4_dilation=2, multi_grid=(1, 2, 4),
                              aspp_rates=(6, 12, 18))
    if output_stride == 8:
        # Twice the resolution, so twice the rates to see the same image area.
        return AtrousSettings(layer3_dilation=2, layer4_dilation=4, multi_grid=(1, 2, 4),
                              aspp_rates=(12, 24, 36))
    raise ValueError(f"output_stride must be 16 or 8, got {output_stride!r}")


def canonical_backbone_name(name: str) -> str:
    """Resolve an alias (``"resnet"`` -> ``"resnet101"``); unknown names raise ``ValueError``."""
    name = BACKBONE_ALIASES.get(name, name)
    if name not in BACKBONES:
        choices = ", ".join(sorted(BACKBONES) + sorted(BACKBONE_ALIASES))
        raise ValueError(f"unknown backbone {name!r}; choose one of: {choices}")
    return name


def build_backbone(
    name: str,
    output_stride: int,
    pretrained: bool = False,
    weights_path: str | os.PathLike | None = None,
    in_channels: int = 3,
) -> nn.Module:
    """Build a backbone dilated for ``output_stride``, optionally with ImageNet weights.

    Args:
        name: a key of :data:`BACKBONES` or :data:`BACKBONE_ALIASES`.
        output_stride: 16 or 8, see :func:`atrous_settings`.
        pretrained: download (or take from the torch hub cache) torchvision's ImageNet weights.
        weights_path: a local torchvision state dict of the same architecture to load instead
            of downloading (the ImageNet classifier's entries are ignored); wins over
            ``pretrained``.
        in_channels: image channels the first convolution takes; pretrained RGB weights are
            adapted to them by :func:`adapt_input_conv`.

    Raises:
        ValueError: unknown name, unsupported output stride, or a weights file that does not fit.
        FileNotFoundError: ``weights_path`` does not exist.
        PretrainedWeightsUnavailable: ``pretrained`` without network and without a cached copy.
    """
    name = canonical_backbone_name(name)
    settings = atrous_settings(output_stride)
    backbone = BACKBONES[name](
        layer3_dilation=settings.layer3_dilation,
        layer4_dilation=settings.layer4_dilation,
        multi_grid=settings.multi_grid,
    )
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels!r}")
    _set_input_channels(backbone, in_channels)
    if weights_path is not None:
        state_dict = read_state_dict(weights_path, "backbone weights",
                                     "save model.state_dict() of the torchvision model")
        _load_into(backbone, state_dict, source=os.fspath(weights_path), name=name)
    elif pretrained:
        weights = backbone.imagenet_weights
        _load_into(backbone, download_state_dict(
            weights, "ImageNet weights", "looked for the cached copy {cached_file}"),
            source=weights.url, name=name)
    return backbone


def _set_input_channels(backbone: nn.Module, in_channels: int) -> None:
    """Replace the backbone's ``input_conv`` by one taking ``in_channels`` (same kernel, stride,
    padding and dilation; its weights come from :func:`adapt_input_conv` when loaded)."""
    parent_name, _, attribute = backbone.input_conv.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    old = getattr(parent, attribute)
    if old.in_channels == in_channels:
        return
    setattr(parent, attribute, nn.Conv2d(in_channels, old.out_channels, old.kernel_size,
                                         stride=old.stride, padding=old.padding,
                                         dilation=old.dilation, bias=old.bias is not None))


def adapt_input_conv(in_channels: int, weight: torch.Tensor) -> torch.Tensor:
    """An RGB first-convolution weight ``(out, 3, kh, kw)`` adapted to ``in_channels`` inputs.

    timm's ``adapt_input_conv`` rule, chosen because it keeps what ImageNet taught the filters
    and the scale of their response, where a fresh initialisation would throw the first layer
    away:

    - 3 channels: the weights as they are (an RGB dataset starts from exactly ImageNet's).
    - 1 channel: the sum over R, G, B: a grey image ``g`` then gives the response the RGB filter
      gives the colour image ``(g, g, g)``.
    - N channels: the RGB weights repeated ``ceil(N / 3)`` times along the input axis, cut to N
      and scaled by ``3 / N``, so N inputs of similar statistics sum to a response of the
      ImageNet scale that the following BatchNorm was trained for.

    Returns:
        A new ``(out, in_channels, kh, kw)`` tensor of ``weight``'s dtype.
    """
    if weight.shape[1] != 3:
        raise ValueError(f"expected an RGB convolution weight (out, 3, kh, kw), got "
                         f"{tuple(weight.shape)}")
    if in_channels == 3:
        return weight.clone()
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // 3)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (3.0 / in_channels)


def read_state_dict(path: str | os.PathLike, what: str, save_hint: str
                    ) -> Mapping[str, torch.Tensor]:
    """A state dict saved with ``torch.save``, read with ``weights_only=True`` on the CPU.

    Args:
        what: the file's name in messages, e.g. ``"backbone weights"``.
        save_hint: how to write a good file, for the message when it holds no state dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable, needs unsafe loading, or not a state dict; one line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {os.fspath(path)}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read {what} {os.fspath(path)} with weights_only=True: "
                         f"{type(error).__name__}: {first_line}") from error
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{os.fspath(path)} holds a {type(state_dict).__name__}, not a state "
                         f"dict of {what} ({save_hint})")
    return state_dict


def download_state_dict(weights: WeightsEnum, what: str, advice: str) -> Mapping[str, torch.Tensor]:
    """torchvision's state dict for ``weights``, from the torch hub cache or downloaded into it.

    The file is read with ``weights_only=True`` (torch.hub's default is unsafe loading).

    Args:
        what: the weights' name in messages, e.g. ``"ImageNet weights"``.
        advice: what to do offline; ``{url}`` and ``{cached_file}`` are filled in.

    Raises:
        PretrainedWeightsUnavailable: offline and not cached, or a cached copy that needs unsafe
            loading; one line.
    """
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as error:
        raise PretrainedWeightsUnavailable(
            f"the cached copy of {weights.url} in {torch.hub.get_dir()}/checkpoints cannot be read "
            f"with weights_only=True ({' '.join(str(error).split())[:120]}); delete it to "
            "download it again"
        ) from error
    except (URLError, OSError, RuntimeError) as error:
        cached_file = os.path.join(
            torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path)
        )
        reason = " ".join(str(error).split())[:200]
        raise PretrainedWeightsUnavailable(
            f"cannot load {what} from {weights.url} ({type(error).__name__}: {reason}); "
            + advice.format(url=weights.url, cached_file=cached_file)
        ) from error


#: State-dict prefixes of torchvision's ImageNet classifiers: ResNet's ``fc``, MobileNet's
#: ``classifier`` (our backbones have no module of either name).
_IMAGENET_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def _load_into(
    backbone: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, name: str
) -> None:
    # The ImageNet classifier has no place in a segmentation backbone.
    state_dict = {key: value for key, value in state_dict.items()
                  if not key.startswith(_IMAGENET_CLASSIFIER_PREFIXES)}
    expected = backbone.state_dict()
    key = f"{backbone.input_conv}.weight"
    first = state_dict.get(key)
    if first is not None and first.dim() == 4 and first.shape[1] == 3 and \
            expected[key].shape[1] != 3:
        state_dict[key] = adapt_input_conv(expected[key].shape[1], first)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        key for key in set(expected) & set(state_dict)
        if tuple(expected[key].shape) != tuple(state_dict[key].shape)
    )
    if missing or unexpected or wrong_shape:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
                problems.append(f"{len(keys)} {label}: {shown}")
        raise ValueError(
            f"{source} is not a torchvision {name} state dict ({'; '.join(problems)})"
        )
    backbone.load_state_dict(state_dict)
