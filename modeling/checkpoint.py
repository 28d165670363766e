"""The one way from a checkpoint file to a model: :func:`load_model`.

    model, settings = load_model("model_best.pth.tar")   # eval mode, weights loaded

train.py (``--resume``, ``--eval-only``, ``--ft``), the predictor, export.py and the tools all
call it, so a checkpoint is checked and rebuilt the same way everywhere. A checkpoint is
self-describing: ``{"model": state dict, "settings": {...}}``, the settings holding what
:meth:`modeling.deeplab.DeepLab.from_settings` needs (and, from train.py, the class names, palette
and normalisation). Files are read by :mod:`utils.checkpoint` (``weights_only=True``, never
unsafely).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from utils.checkpoint import CheckpointError, check_keys, load_checkpoint

if TYPE_CHECKING:  # torchvision is imported when a model is built, not to check settings
    from modeling.deeplab import DeepLab

#: The settings that rebuild the architecture (older checkpoints may lack the others).
ARCHITECTURE_SETTINGS = ("backbone", "output_stride", "num_classes")


def check_settings(settings: Any, source: str,
                   required: Sequence[str] = ARCHITECTURE_SETTINGS) -> dict[str, Any]:
    """``settings`` if it is a dict holding every ``required`` entry.

    Args:
        source: names the file (or flag and file) in the message.

    Raises:
        CheckpointError: an entry is missing (a checkpoint from another project or an older
            version); the message is one line.
    """
    missing = ([key for key in required if key not in settings]
               if isinstance(settings, dict) else list(required))
    if missing:
        raise CheckpointError(f"{source}: its settings lack {', '.join(map(repr, missing))}: it "
                              f"was not written by this project's train.py or export.py; train "
                              f"or export it again")
    return settings


def load_model(checkpoint: str | os.PathLike | Mapping[str, Any], *, source: str | None = None,
               required_settings: Sequence[str] = ARCHITECTURE_SETTINGS
               ) -> tuple[DeepLab, dict[str, Any]]:
    """The DeepLab a checkpoint describes, its weights loaded, in eval mode, and its settings.

    Args:
        checkpoint: a checkpoint file (read on the CPU), or one already read (a ``{"model",
            "settings"}`` dict, e.g. the ``--resume`` checkpoint whose training state train.py
            restores as well).
        source: how messages name the checkpoint; by default its path.
        required_settings: the settings the caller needs besides the architecture's (the
            predictor needs class names, palette and normalisation too).

    Returns:
        ``(model, settings)``: the tensors are the checkpoint's own (no initialisation is
        computed and then overwritten); ``settings`` is the checkpoint's dict.

    Raises:
        CheckpointError: a missing, unreadable or unsafe file, no model or settings, settings
            without a required entry, or weights that do not fit the architecture they name (one
            line, not PyTorch's list of every tensor).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = source or os.fspath(checkpoint)
        checkpoint = load_checkpoint(checkpoint, map_location="cpu",
                                     required_keys=("model", "settings"))
    source = source or "checkpoint"
    check_keys(checkpoint, ("model", "settings"), source)
    settings = check_settings(checkpoint["settings"], source,
                              tuple(dict.fromkeys([*ARCHITECTURE_SETTINGS, *required_settings])))
    from modeling.deeplab import DeepLab  # torchvision: a run from an ONNX file never needs it

    try:
        model = DeepLab.from_state_dict(settings, checkpoint["model"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{source}: its weights do not fit its settings (DeepLabV3+ "
                              f"{settings['backbone']}, output stride "
                              f"{settings['output_stride']}, {settings['num_classes']} classes): "
                              f"{_first_lines(error)}") from None
    return model.eval(), settings


def _first_lines(error: BaseException) -> str:
    """PyTorch's mismatch report (a line per tensor) shortened to one line of 160 characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = " ".join(lines[1:] or lines or [type(error).__name__])
    return detail if len(detail) <= 160 else detail[:157] + "..."
