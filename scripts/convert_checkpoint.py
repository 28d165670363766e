#!/usr/bin/env python
"""Convert a jfzhang95/pytorch-deeplab-xception checkpoint into a checkpoint of this project.

    python -m scripts.convert_checkpoint deeplab-resnet.pth.tar deeplab-resnet-voc.pth.tar
    python inference.py --in-path imgs --ckpt deeplab-resnet-voc.pth.tar

The source is a file written by that repository's ``train.py`` with ``--backbone resnet`` (a dict
with ``state_dict`` and usually ``optimizer``, ``epoch``, ``best_pred``; keys may start with
``module.``), such as its published Pascal VOC ResNet-101 model. The result holds the weights
(renamed, unchanged) and the settings ``inference.py`` and ``train.py --eval-only / --ft`` need,
with ``align_corners`` on, so the model computes what the original computed.

Both files are read with ``torch.load(..., weights_only=True)`` only (plus NumPy scalars, which
that repository stores as ``best_pred``); a file that needs unsafe loading is refused.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dataloader.datasets.folder import read_class_names
from dataloader.utils import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VOC_CLASS_NAMES,
    DatasetError,
    palette_for,
)
from modeling.convert import NotConvertible, load_jfzhang95_resnet
from modeling.deeplab import DeepLab
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

SOURCE_REPOSITORY = "jfzhang95/pytorch-deeplab-xception"


class ConversionError(Exception):
    """A source file or option that cannot be converted; reported in one line, exit status 2."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.convert_checkpoint",
        description=f"Convert a {SOURCE_REPOSITORY} ResNet checkpoint for this project",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help=f"checkpoint written by {SOURCE_REPOSITORY}")
    parser.add_argument("dst", metavar="DST", help="converted checkpoint to write")
    parser.add_argument("--out-stride", type=int, default=16, choices=(8, 16),
                        help="output stride the source was trained with (not stored in it)")
    parser.add_argument("--classes", metavar="FILE",
                        help="class names, one per line, background first (default: the 21 "
                             "Pascal VOC classes, those of the published model)")
    return parser


def _numpy_scalar_globals() -> list[Any]:
    """NumPy scalars (their ``best_pred``) under the names NumPy 1 and NumPy 2 pickle them by.

    Rebuilding a scalar from its dtype and bytes runs no code; anything else stays refused.
    """
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    return [np.dtype, type(np.dtype("float64")), type(np.dtype("int64")),
            (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]


def read_source(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of a jfzhang95 checkpoint and what it says about itself.

    Returns:
        ``(state_dict, info)``: ``info`` holds ``epoch`` and ``best_pred`` as plain numbers, or
        ``None`` when the file has none (a bare state dict).

    Raises:
        ConversionError: missing, truncated, unsafe, or not a checkpoint at all.
    """
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe_globals is None:  # PyTorch < 2.5: NumPy scalars are refused like any object
            checkpoint = load_checkpoint(path, map_location="cpu")
        else:
            with safe_globals(_numpy_scalar_globals()):
                checkpoint = load_checkpoint(path, map_location="cpu")
    except CheckpointError as error:
        raise ConversionError(str(error)) from None
    if "state_dict" in checkpoint:
        state_dict = checkpoint["state_dict"]
    elif checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        state_dict = checkpoint  # a bare model.state_dict()
    else:
        raise ConversionError(
            f"{path} has no 'state_dict' entry: it is not a checkpoint written by "
            f"{SOURCE_REPOSITORY}'s train.py"
        )
    if not isinstance(state_dict, dict) or not all(
            isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ConversionError(f"{path}: its 'state_dict' entry is not a dict of tensors")
    info = {key: _plain_number(checkpoint.get(key)) for key in ("epoch", "best_pred")}
    return state_dict, info


def checkpoint_settings(model: DeepLab, class_names: Sequence[str]) -> dict[str, Any]:
    """The ``settings`` entry train.py writes (the model's settings and the dataset's
    ``metadata()``: class names, palette, normalisation), plain types only."""
    return dict(
        model.settings(),
        class_names=list(class_names),
        palette=palette_for(len(class_names)),
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
    )


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    output_stride: int = 16,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Read ``src``, rename its weights and write a self-describing checkpoint to ``dst``.

    Args:
        src: a jfzhang95/pytorch-deeplab-xception ``--backbone resnet`` checkpoint.
        dst: where the converted checkpoint goes (written atomically; its folder is created).
        output_stride: the stride the source was trained with, 16 or 8.
        class_names: one per output class, background first; default: the 21 Pascal VOC names.

    Returns:
        What ``dst`` holds: ``{"model": state dict, "settings": ..., "converted_from": ...}``.

    Raises:
        ConversionError: an unreadable or unsafe file, another architecture, a class list of the
            wrong length.
    """
    state_dict, info = read_source(src)
    try:
        model, converted = load_jfzhang95_resnet(state_dict, output_stride=output_stride)
    except NotConvertible as error:
        raise ConversionError(f"{src} {error}") from None
    class_names = list(VOC_CLASS_NAMES if class_names is None else class_names)
    if len(class_names) != converted.num_classes:
        raise ConversionError(
            f"{len(class_names)} class names for a model with {converted.num_classes} classes "
            f"({src}): pass --classes FILE with {converted.num_classes} names"
        )
    checkpoint = {
        "model": model.state_dict(),
        "settings": checkpoint_settings(model, class_names),
        "converted_from": dict(info, file=Path(src).name, repository=SOURCE_REPOSITORY,
                               entries=len(converted.state_dict)),
    }
    save_checkpoint(checkpoint, dst)
    return checkpoint


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Convert as the flags say and print a one-line summary."""
    class_names = None
    if args.classes:
        try:
            class_names = read_class_names(Path(args.classes))
        except (OSError, DatasetError) as error:
            raise ConversionError(f"--classes {args.classes}: {error}") from None
    checkpoint = convert(args.src, args.dst, output_stride=args.out_stride,
                         class_names=class_names)
    settings, source = checkpoint["settings"], checkpoint["converted_from"]
    print(f"{args.dst}: {settings['backbone']}, output stride {settings['output_stride']}, "
          f"{settings['num_classes']} classes, {source['entries']} entries converted"
          + (f" (epoch {source['epoch']}, best mIoU {source['best_pred']})"
             if source["epoch"] is not None else ""))
    return checkpoint


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _plain_number(value: Any) -> int | float | None:
    if isinstance(value, (bool, np.bool_)) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return None


if __name__ == "__main__":
    sys.exit(cli())
