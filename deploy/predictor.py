"""Load a trained model (checkpoint or ONNX file) and predict class ids for decoded images.

    from deploy.predictor import Predictor
    predictor = Predictor.load("model_best.pth.tar")          # or "model.onnx"
    labels = predictor.predict(image)                          # uint8 (3, H, W) -> uint8 (H, W)

:class:`Predictor` normalises, batches same-size images, predicts large images window by window
in bounded memory, and averages scales and flips through :mod:`modeling.predict`, whichever
runtime (:mod:`deploy.engines`) runs the model.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from dataloader.custom_transforms import Normalize
from deploy.engines import Engine, engine_from_model, engine_from_onnx, resolve_engine
from modeling.predict import (DEFAULT_TILE, TILE_PIXEL_BUDGET, predict_labels,
                              predict_labels_tiled)
from utils.distributed import DistributedContext
from utils.errors import UserError
from utils.hardware import Hardware, cudnn_benchmark, resolve_hardware
from utils.saver import CheckpointError, load_checkpoint

logger = logging.getLogger(__name__)


def load_engine(ckpt: str, hardware: Hardware, *, engine: str = "auto",
                amp_explicit: bool = False, compile_model: bool = False
                ) -> tuple[Engine, dict, str]:
    """The runtime running ``ckpt`` (a train.py checkpoint or an export.py ONNX file), the
    model's settings, and the runtime's name.

    Args:
        engine: ``auto`` or one of :data:`deploy.engines.ENGINES`.
        amp_explicit: a reduced precision was asked for by name (a runtime without it refuses).

    Raises:
        UserError: a missing or unreadable file, or an engine that cannot run it.
    """
    onnx_file = ckpt.lower().endswith(".onnx")
    engine_name = resolve_engine(engine, hardware.device, onnx_file=onnx_file)
    if onnx_file:
        runtime, settings = engine_from_onnx(engine_name, ckpt, hardware,
                                             amp_explicit=amp_explicit)
        return runtime, settings, engine_name
    if not os.path.isfile(ckpt):
        raise UserError(
            f"checkpoint {ckpt} not found: train one with `python train.py` (or `make demo`)"
            f" and pass --ckpt run/<dataset>/<checkname>/experiment_<k>/model_best.pth.tar")
    try:
        checkpoint = load_checkpoint(ckpt, map_location="cpu", required_keys=("model", "settings"))
    except CheckpointError as error:
        raise UserError(str(error)) from None
    settings = checkpoint["settings"]
    from modeling.deeplab import DeepLab  # imports torchvision, which an ONNX file's start-up skips

    model = DeepLab.from_state_dict(settings, checkpoint["model"]).eval()
    runtime = engine_from_model(engine_name, model, hardware, amp_explicit=amp_explicit,
                                compile_model=compile_model)
    return runtime, settings, engine_name


@dataclass
class Predictor:
    """Class ids for decoded samples: normalisation, batching, windows, scales and flips."""

    engine: Engine
    hardware: Hardware
    normalize: Normalize
    scales: Sequence[float] = (1.0,)
    flip: bool = False
    tile: int | None = None  # None: whole images below the pixel budget, windows above it
    tile_overlap: int = 256
    batch_size: int = 1

    @classmethod
    def load(cls, ckpt: str, *, engine: str = "auto", device: str | None = None,
             amp: str = "auto", **options: Any) -> tuple["Predictor", dict]:
        """A predictor for ``ckpt`` (checkpoint or ONNX file) and the model's settings (class
        names, palette, ...), without a command line.

        Args:
            device: ``"cpu"`` or ``"cuda"``; None picks a GPU when there is one.
            amp: ``auto``, ``off``, ``bf16`` or ``fp16``, as inference.py's ``--amp`` (see
                :func:`utils.hardware.resolve_amp`).
            options: the other fields (``scales``, ``flip``, ``tile``, ``tile_overlap``,
                ``batch_size``).
        """
        hardware = resolve_hardware(no_cuda=device == "cpu", gpu_ids=None, amp=amp,
                                    channels_last=True, context=DistributedContext())
        runtime, settings, engine_name = load_engine(
            ckpt, hardware, engine=engine, amp_explicit=amp not in ("auto", "off"))
        if engine_name != "torch":
            hardware.channels_last = False  # the ONNX runtimes take plain NCHW arrays
        return cls(engine=runtime, hardware=hardware,
                   normalize=Normalize(settings["mean"], settings["std"]), **options), settings

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` -> the normalised model input on the device."""
        return self.hardware.images(self.normalize(pixels.to(self.hardware.device)))

    def window(self, pixels: torch.Tensor) -> int | None:
        """The window side for this ``(3, H, W)`` input, or None to predict it whole."""
        if self.tile is not None:
            return self.tile or None
        return DEFAULT_TILE if pixels.shape[-1] * pixels.shape[-2] > TILE_PIXEL_BUDGET else None

    def whole(self, samples: list[dict[str, Any]]) -> list[torch.Tensor]:
        """``(H, W)`` uint8 labels of same-size samples, predicted in one batch."""
        images = self.prepare(torch.stack([sample["image"] for sample in samples]))
        labels = predict_labels(self.engine, images, samples[0]["size"], list(self.scales),
                                self.flip)
        return list(labels.to(torch.uint8).cpu())

    def windowed(self, sample: dict[str, Any], tile: int) -> torch.Tensor:
        """``(H, W)`` uint8 labels of one large sample, window by window."""
        labels = predict_labels_tiled(self.engine, sample["image"], self.prepare, tile=tile,
                                      overlap=self.tile_overlap, batch_size=self.batch_size,
                                      scales=list(self.scales), flip=self.flip)
        if tuple(labels.shape) != tuple(sample["size"]):  # --size: back to the input's size
            labels = torch.nn.functional.interpolate(
                labels[None, None].float(), size=sample["size"], mode="nearest")[0, 0]
        return labels.to(torch.uint8)

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """``(H, W)`` uint8 class ids of one uint8 ``(3, H, W)`` RGB image."""
        sample = {"image": image, "size": tuple(image.shape[-2:])}
        tile = self.window(image)
        # No cuDNN autotuning: nearly every photo has its own size, and would be tuned anew.
        with torch.inference_mode(), cudnn_benchmark(False):
            return self.windowed(sample, tile) if tile is not None else self.whole([sample])[0]


def display_pixels(sample: dict[str, Any]) -> torch.Tensor:
    """The pixels an overlay is drawn on: the decoded image before ``--size`` resized it."""
    return sample.get("original", sample["image"])


def predict_all(samples: Iterable[dict[str, Any]], predictor: Predictor,
                emit: Callable[[dict[str, Any], torch.Tensor], None],
                on_error: Callable[[str], None]) -> int:
    """Predict every sample and hand ``(sample, labels)`` to ``emit``; returns how many samples
    could not be read (each reported through ``on_error``; the others go on).

    Whole images are grouped by size into batches of ``predictor.batch_size`` (a batched mask
    equals the one-image mask: nothing is padded); at most twice that many wait at once.
    """
    bad = 0
    waiting: dict[tuple, list[dict[str, Any]]] = {}

    def flush(key: tuple) -> None:
        batch = waiting.pop(key)
        for sample, labels in zip(batch, predictor.whole(batch)):
            emit(sample, labels)

    for sample in samples:
        if "error" in sample:
            on_error(sample["error"])
            bad += 1
            continue
        tile = predictor.window(sample["image"])
        if tile is not None:
            emit(sample, predictor.windowed(sample, tile))
            continue
        # The model input's size and the output's (with --size, two sizes can give one input).
        key = (tuple(sample["image"].shape[-2:]), tuple(sample["size"]))
        waiting.setdefault(key, []).append(sample)
        if len(waiting[key]) >= predictor.batch_size:
            flush(key)
        elif sum(map(len, waiting.values())) > 2 * predictor.batch_size:
            flush(max(waiting, key=lambda k: len(waiting[k])))
    for key in list(waiting):
        flush(key)
    return bad
