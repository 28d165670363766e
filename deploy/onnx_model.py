"""DeepLabV3+ as a self-describing ONNX file: export, and the settings stored inside it.

The graph takes ``image``: float32 ``(N, C, H, W)`` (C = the ``in_channels`` setting, 3 for RGB)
normalised as ``(x - mean) / std`` per channel, x on the unit scale (uint8 / 255, uint16 / 65535,
float as is),
and returns ``logits``: float32 ``(N, num_classes, H, W)``; batch, height and width are dynamic.
The file's ``metadata_props`` hold the class names, palette, normalisation and architecture, so
``inference.py --ckpt model.onnx`` needs nothing else.
"""
from __future__ import annotations

import io
import json
import warnings
from typing import Any, Mapping

import torch
from torch import nn

#: metadata_props key holding every setting as JSON (the others are for people reading the file).
SETTINGS_KEY = "deeplab_settings"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
OPSET = 17


class _Logits(nn.Module):
    """The model's ``"out"`` logits alone (an auxiliary head is a training aid, not exported)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["out"]


def export_onnx(model: nn.Module, settings: Mapping[str, Any] | None = None) -> bytes:
    """Serialise ``model`` (eval mode, on the CPU, fp32) as an ONNX model.

    Uses the TorchScript-based exporter (``dynamo=False``): the dynamo exporter needs the extra
    ``onnxscript`` package and took longer for this model. A 64x64 example input is traced (the
    sizes are dynamic, so its size does not matter and a small one traces fastest); constant
    folding is left to onnxruntime and OpenVINO, which fold again at load, and halves the time.

    Args:
        model: returns ``{"out": logits}``; put in eval mode here and left so.
        settings: the checkpoint's settings, written to ``metadata_props`` (needs the ``onnx``
            package); None writes none (the in-memory model inference.py builds).

    Returns:
        The serialised ``ModelProto``.
    """
    model = model.eval()
    wrapper = _Logits(model).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter announces its deprecation and tracing notes on every export.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (torch.zeros(1, input_channels(settings, model), 64, 64),), buffer, dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=False,
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                          OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}},
        )
    data = buffer.getvalue()
    return data if settings is None else with_metadata(data, settings)


def input_channels(settings: Mapping[str, Any] | None, model: nn.Module | None = None) -> int:
    """The image channels a model takes: its settings' ``in_channels`` (3 in older ones)."""
    if settings is not None and "in_channels" in settings:
        return int(settings["in_channels"])
    return int(getattr(model, "in_channels", 3))


def metadata_for(settings: Mapping[str, Any], precision: str = "fp32") -> dict[str, str]:
    """The ``metadata_props`` entries (strings) describing a model with these settings."""
    return {
        "precision": precision,
        SETTINGS_KEY: json.dumps(dict(settings), sort_keys=True),
        "class_names": json.dumps(list(settings["class_names"])),
        "palette": json.dumps([list(map(int, color)) for color in settings["palette"]]),
        "mean": json.dumps(list(settings["mean"])),
        "std": json.dumps(list(settings["std"])),
        "in_channels": str(input_channels(settings)),
        "input": (f"{INPUT_NAME}: float32 (N, {input_channels(settings)}, H, W), (x - mean) / std "
                  f"per channel, x = pixel / 255 (uint8), / 65535 (uint16), as is (float)"),
        "output": f"{OUTPUT_NAME}: float32 (N, num_classes, H, W); argmax over dim 1 = class id",
        "architecture": (f"DeepLabV3+ {settings['backbone']}, output stride "
                         f"{settings['output_stride']}, {settings['num_classes']} classes"),
    }


def with_metadata(data: bytes, settings: Mapping[str, Any], precision: str = "fp32") -> bytes:
    """``data`` (a serialised ONNX model) with :func:`metadata_for` in its ``metadata_props``."""
    import onnx  # only exporting with metadata needs the onnx package

    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata_for(settings, precision))
    return proto.SerializeToString()


def settings_from_metadata(metadata: Mapping[str, str], source: str) -> dict[str, Any]:
    """The settings an exported file carries.

    Raises:
        ValueError: ``metadata`` lacks them (an ONNX file not written by export.py).
    """
    if SETTINGS_KEY not in metadata:
        raise ValueError(f"{source} has no {SETTINGS_KEY!r} metadata: it was not written by this "
                         f"project's export.py; export the checkpoint with export.py")
    return json.loads(metadata[SETTINGS_KEY])
