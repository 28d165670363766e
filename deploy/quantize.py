"""Post-training int8 quantization of an exported model with NNCF, OpenVINO's own quantizer.

On a CPU without bf16 or int8-dot-product instructions (AVX2 only), fp32 DeepLabV3+ already
runs close to the CPU's measured matrix-multiply rate (``python -m bench.compute_ceiling``), so
int8 is the one way to a large speed-up there. It is not
free: quantized masks differ from fp32 masks on some pixels, how many depends on the model
(pixels where two classes score nearly alike flip first). It is therefore never the default:
``export.py --int8`` writes it on purpose, and ``python -m bench.inference`` measures its agreement
with fp32 on the user's own images.

NNCF is used instead of onnxruntime's ``quantize_static`` because it corrects the bias that
quantization adds to each layer: with the same calibration images, its masks differ from fp32 on
fewer pixels (``python -m bench.quantizers``; doc/results.md: the NNCF against quantize_static
row).
"""
from __future__ import annotations

import logging
import os
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dataloader.custom_transforms import Normalize
from dataloader.images import ImageFiles, list_inputs
from dataloader.utils import DatasetError, verify_image
from modeling.inference_ops import DEFAULT_TILE, TILE_PIXEL_BUDGET
from utils.errors import UserError
from deploy.onnx_model import INPUT_NAME

INSTALL = "pip install -r requirements-deploy.txt -c constraints.txt"
#: Fewer calibration images give activation ranges of a few pictures: one 1x1 image was taken
#: without a word and its masks agreed with fp32 on 78-84 % of pixels.
MIN_CALIBRATION_IMAGES = 16


def require_packages(what: str = "export.py --int8") -> None:
    """Raises UserError naming what ``what`` needs and is not installed (NNCF calibrates
    ONNX models by running them in onnxruntime)."""
    missing = [name for name in ("nncf", "onnx", "onnxruntime") if find_spec(name) is None]
    if missing:
        raise UserError(f"{what} needs the {', '.join(missing)} package(s): {INSTALL}")


def calibration_images(in_path: str, count: int) -> list[str]:
    """The first ``count`` readable images ``in_path`` names (file, folder or list); each
    unreadable one is named on stderr and passed over.

    Raises:
        UserError: ``count`` is below :data:`MIN_CALIBRATION_IMAGES`, or ``in_path`` is missing
            or holds fewer readable images.
    """
    if count < MIN_CALIBRATION_IMAGES:
        raise UserError(f"--calibration-count must be at least {MIN_CALIBRATION_IMAGES}, got "
                        f"{count}: fewer images calibrate int8 on the ranges of a few pictures")
    try:
        inputs = list_inputs(in_path)
    except DatasetError as error:
        raise UserError(str(error).replace("--in-path", "--calibration")) from None
    chosen = readable([item.path for item in inputs], count, on_skip=lambda error: print(
        f"warning: calibration skips {error}", file=sys.stderr))
    if not chosen:
        raise UserError(f"--calibration {in_path} has no readable image: name a folder of "
                        f"images like the ones you will segment")
    if len(chosen) < MIN_CALIBRATION_IMAGES:
        raise UserError(f"--calibration {in_path} has {len(chosen)} readable image(s); int8 "
                        f"calibration needs at least {MIN_CALIBRATION_IMAGES}: add images like "
                        f"the ones you will segment")
    return chosen


def readable(paths: Sequence[str | os.PathLike], count: int,
             on_skip: Callable[[DatasetError], None] | None = None) -> list[str]:
    """The first ``count`` of ``paths`` that are readable images; each other one goes to
    ``on_skip`` (None: passed over in silence)."""
    found: list[str] = []
    for path in paths:
        if len(found) == count:
            break
        try:
            verify_image(path)
        except DatasetError as error:
            if on_skip is not None:
                on_skip(error)
            continue
        found.append(str(path))
    return found


def model_input(path: str, normalize: Normalize) -> np.ndarray:
    """A ``(1, C, H, W)`` float32 model input, read and normalised by inference.py's own code
    (EXIF orientation applied); an image inference.py would predict in windows gives its
    central window."""
    sample = ImageFiles([Path(path)])[0]
    if "error" in sample:  # it was readable when chosen
        raise UserError(f"--calibration: {sample['error']}")
    pixels = sample["image"]
    if pixels.shape[0] == 1 and len(normalize.mean) == 3:  # a grey photo, as the predictor
        pixels = pixels.expand(3, -1, -1)
    height, width = pixels.shape[-2:]
    if height * width > TILE_PIXEL_BUDGET:
        top, left = max(0, (height - DEFAULT_TILE) // 2), max(0, (width - DEFAULT_TILE) // 2)
        pixels = pixels[:, top:top + DEFAULT_TILE, left:left + DEFAULT_TILE]
    return normalize(pixels)[None].numpy()


def quantize_int8(data: bytes, paths: list[str], normalize: Normalize) -> bytes:
    """``data`` (a serialised fp32 ONNX model from :func:`deploy.onnx_model.export_onnx`) with
    int8 weights and activations (QuantizeLinear / DequantizeLinear pairs), calibrated on the
    images at ``paths``. The metadata_props are kept.

    Raises:
        UserError: nncf, onnx or onnxruntime is missing.
    """
    # NNCF imports torch.utils.cpp_extension, which warns that no CUDA runtime is found.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    require_packages()
    import nncf
    import onnx

    nncf.set_log_level(logging.ERROR)
    model = onnx.load_from_string(data)
    dataset = nncf.Dataset(paths, lambda path: {INPUT_NAME: model_input(path, normalize)})
    quantized = nncf.quantize(model, dataset, subset_size=len(paths))
    return quantized.SerializeToString()
