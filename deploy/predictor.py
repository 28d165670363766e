"""Load a trained model (checkpoint or ONNX file) and predict class ids for decoded images.

    from deploy.predictor import Predictor
    predictor = Predictor.load("model_best.pth.tar")          # or "model.onnx"
    labels = predictor.predict(image)                          # uint8 (3, H, W) -> uint8 (H, W)

:class:`Predictor` normalises, batches same-size images, predicts large images window by window
in bounded memory, and averages scales and flips through :mod:`modeling.inference_ops`, whichever
runtime (:mod:`deploy.engines`) runs the model.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from dataloader.custom_transforms import Normalize
from deploy.cache import cached_graph, compiled_models_dir, graph_key, graph_path, prune_graphs
from deploy.engines import Engine, engine_from_model, engine_from_onnx, resolve_engine
from deploy.onnx_model import export_onnx
from modeling.inference_ops import (DEFAULT_TILE, TILE_PIXEL_BUDGET, predict_labels,
                              predict_labels_tiled, resize_labels)
from utils.distributed import DistributedContext
from utils.errors import UserError
from utils.fileio import atomic_write, remove_stale_temporaries
from utils.hardware import Hardware, cudnn_benchmark, resolve_hardware

logger = logging.getLogger(__name__)


#: What a checkpoint's (or ONNX file's) settings must hold to rebuild, run and draw the model.
REQUIRED_SETTINGS = ("backbone", "output_stride", "num_classes", "class_names", "palette",
                     "mean", "std")


def check_settings(settings: Any, source: str) -> dict[str, Any]:
    """``settings`` if it holds every :data:`REQUIRED_SETTINGS` entry.

    Raises:
        UserError: it does not (a checkpoint from another project or an older version).
    """
    missing = ([key for key in REQUIRED_SETTINGS if key not in settings]
               if isinstance(settings, dict) else list(REQUIRED_SETTINGS))
    if missing:
        raise UserError(f"{source}: its settings lack {', '.join(map(repr, missing))}: it was "
                        f"not written by this project's train.py or export.py; train or export "
                        f"it again")
    return settings


def model_from_checkpoint(checkpoint: dict[str, Any], source: str) -> nn.Module:
    """The eval-mode DeepLab a ``{"model", "settings"}`` checkpoint describes.

    Raises:
        UserError: the settings lack an entry, name no known architecture, or the weights do
            not fit the architecture they name (one line, not PyTorch's list of every tensor).
    """
    settings = check_settings(checkpoint["settings"], source)
    from modeling.deeplab import DeepLab  # imports torchvision, which an ONNX file's start-up skips

    try:
        return DeepLab.from_state_dict(settings, checkpoint["model"]).eval()
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = " ".join(lines[1:] or lines or [type(error).__name__])
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise UserError(f"{source}: its weights do not fit its settings (DeepLabV3+ "
                        f"{settings['backbone']}, output stride {settings['output_stride']}, "
                        f"{settings['num_classes']} classes): {detail}") from None


def load_engine(ckpt: str, hardware: Hardware, *, engine: str = "auto",
                amp_explicit: bool = False, compile_model: bool = False,
                cache_dir: str | os.PathLike | None = None) -> tuple[Engine, dict, str]:
    """The runtime running ``ckpt`` (a train.py checkpoint or an export.py ONNX file), the
    model's settings, and the runtime's name.

    Args:
        engine: ``auto`` or one of :data:`deploy.engines.ENGINES`.
        amp_explicit: a reduced precision was asked for by name (a runtime without it refuses).
        cache_dir: where the ONNX runtimes keep what a later run can reuse (the graph exported
            from a checkpoint, OpenVINO's compiled model; :mod:`deploy.cache`); None: nothing.

    Raises:
        UserError: a missing or unreadable file, settings or weights that do not describe a
            model, or an engine that cannot run it.
    """
    onnx_file = ckpt.lower().endswith(".onnx")
    engine_name = resolve_engine(engine, hardware.device, onnx_file=onnx_file)
    compiled = compiled_models_dir(Path(cache_dir)) if cache_dir is not None else None
    if onnx_file:
        runtime, settings = engine_from_onnx(engine_name, ckpt, hardware,
                                             amp_explicit=amp_explicit, cache_dir=compiled)
        return runtime, check_settings(settings, ckpt), engine_name
    if not os.path.isfile(ckpt):
        raise UserError(
            f"checkpoint {ckpt} not found: train one with `python train.py` (or `make demo`)"
            f" and pass --ckpt run/<dataset>/<checkname>/experiment_<k>/model_best.pth.tar")
    if (engine_name != "torch" and cache_dir is not None
            and importlib.util.find_spec("onnx") is not None):  # the graph's settings need onnx
        loaded = _engine_from_cache(ckpt, Path(cache_dir), engine_name, hardware,
                                    amp_explicit=amp_explicit, compiled=compiled)
        if loaded is not None:
            return loaded
    checkpoint = _read_checkpoint(ckpt)
    model = model_from_checkpoint(checkpoint, ckpt)
    runtime = engine_from_model(engine_name, model, hardware, amp_explicit=amp_explicit,
                                compile_model=compile_model)
    return runtime, checkpoint["settings"], engine_name


def _read_checkpoint(ckpt: str) -> dict[str, Any]:
    # Only here: a run from an ONNX file or a cached graph never reads a checkpoint.
    from utils.saver import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(ckpt, map_location="cpu", required_keys=("model", "settings"))
    except CheckpointError as error:
        raise UserError(str(error)) from None


def _engine_from_cache(ckpt: str, cache_dir: Path, engine_name: str, hardware: Hardware, *,
                       amp_explicit: bool, compiled: Path | None
                       ) -> tuple[Engine, dict, str] | None:
    """An ONNX runtime running the graph exported from ``ckpt``: the cached one, or one
    exported into the cache now; None when the cache cannot hold it."""
    key = graph_key(ckpt)
    graph = cached_graph(cache_dir, key)
    if graph is not None:
        try:
            runtime, settings = engine_from_onnx(engine_name, str(graph), hardware,
                                                 amp_explicit=amp_explicit, cache_dir=compiled)
            return runtime, check_settings(settings, ckpt), engine_name
        except UserError as error:
            logger.warning("exporting again: the cached %s failed (%s)", graph, error)
            graph.unlink(missing_ok=True)
    graph = graph_path(cache_dir, key)
    if not export_in_child(ckpt, graph):
        return None
    prune_graphs(cache_dir)
    runtime, settings = engine_from_onnx(engine_name, str(graph), hardware,
                                         amp_explicit=amp_explicit, cache_dir=compiled)
    return runtime, check_settings(settings, ckpt), engine_name


def export_in_child(ckpt: str, graph: Path) -> bool:
    """Export ``ckpt`` to the ONNX file ``graph`` (with its settings) in a child process, so
    that the exporter's imports (torchvision, TorchScript) and working memory never weigh on
    the process that goes on to predict; False when ``graph`` cannot be written there.

    Raises:
        UserError: the checkpoint cannot be read or describes no model (the child's line).
    """
    remove_stale_temporaries(graph)  # of a child killed while it wrote
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from deploy.predictor import _export_child; "
                               "sys.exit(_export_child(sys.argv[1], sys.argv[2]))", ckpt,
         str(graph)], env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True)
    lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
    if result.returncode == 2:
        raise UserError(lines[-1].removeprefix("error: "))
    if result.returncode != 0:
        logger.warning("cannot cache the exported model in %s: %s", graph.parent, lines[-1])
        return False
    return True


def _export_child(ckpt: str, graph: str) -> int:
    """The child process of :func:`export_in_child`: 0 written, 2 a bad checkpoint (its line
    on stderr), 1 not writable."""
    try:
        checkpoint = _read_checkpoint(ckpt)
        model = model_from_checkpoint(checkpoint, ckpt)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model.aux_classifier = None  # a training aid: inference reads the main head only
    data = export_onnx(model.float(), checkpoint["settings"])
    try:
        atomic_write(graph, lambda handle: handle.write(data))
    except OSError as error:
        print(f"cannot write {graph}: {error}", file=sys.stderr)
        return 1
    return 0


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
                                self.flip, dtype=torch.uint8)
        return list(labels.cpu())

    def windowed(self, sample: dict[str, Any], tile: int) -> torch.Tensor:
        """``(H, W)`` uint8 labels of one large sample, window by window."""
        labels = predict_labels_tiled(self.engine, sample["image"], self.prepare, tile=tile,
                                      overlap=self.tile_overlap, batch_size=self.batch_size,
                                      scales=list(self.scales), flip=self.flip)
        return resize_labels(labels, sample["size"])  # --size: back to the input's size

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
