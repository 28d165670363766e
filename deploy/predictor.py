"""Load a trained model (checkpoint or ONNX file) and predict class ids for decoded images.

    from deploy.predictor import Predictor
    predictor, settings = Predictor.load("model_best.pth.tar")  # or "model.onnx"
    labels = predictor.predict(image)    # uint8 (3, H, W) tensor, (H, W, 3) array or PIL image
                                         # -> uint8 (H, W) class ids; names: settings["class_names"]

:class:`Predictor` normalises, batches same-size images, predicts large images window by window
in bounded memory, and averages scales and flips through :mod:`modeling.inference_ops`, whichever
runtime (:mod:`deploy.engines`) runs the model.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from dataloader.custom_transforms import Normalize
from deploy.cache import (cached_graph, compiled_models_dir, graph_key, graph_path,
                          prune_graphs, record_digest)
from deploy.engines import (Engine, TorchEngine, engine_from_model, engine_from_onnx,
                            resolve_engine)
from deploy.onnx_model import export_onnx
from modeling.checkpoint import check_settings, load_model
from modeling.inference_ops import (DEFAULT_TILE, MIN_TILE, TILE_PIXEL_BUDGET, predict_labels,
                                    predict_maps_tiled, resize_labels)
from utils.errors import UserError
from utils.fileio import FolderLock, atomic_write, remove_stale_temporaries
from utils.hardware import Hardware, cudnn_benchmark, resolve_amp

if TYPE_CHECKING:  # deploy.int8 imports this module
    from deploy.int8 import Int8Source

logger = logging.getLogger(__name__)


#: What a checkpoint's (or ONNX file's) settings must hold to rebuild, run and draw the model.
REQUIRED_SETTINGS = ("backbone", "output_stride", "num_classes", "class_names", "palette",
                     "mean", "std")


def load_engine(ckpt: str, hardware: Hardware, *, engine: str = "auto",
                amp_explicit: bool = False, compile_model: bool = False,
                cache_dir: str | os.PathLike | None = None,
                int8: Int8Source | None = None) -> tuple[Engine, dict, str]:
    """The runtime running ``ckpt`` (a train.py checkpoint or an export.py ONNX file), the
    model's settings, and the runtime's name.

    Args:
        engine: ``auto`` or one of :data:`deploy.engines.ENGINES`.
        amp_explicit: a reduced precision was asked for by name (a runtime without it refuses).
        cache_dir: where the ONNX runtimes keep what a later run can reuse (the graph exported
            from a checkpoint, OpenVINO's compiled model; :mod:`deploy.cache`); None: nothing.
        int8: calibration images (:data:`deploy.int8.Int8Source`) to run ``ckpt`` quantized
            to int8 (:func:`deploy.int8.int8_engine`); None: as trained.

    Raises:
        UserError: a missing or unreadable file, settings or weights that do not describe a
            model, or an engine that cannot run it.
    """
    if int8 is not None:
        from deploy.int8 import int8_engine  # it imports this module's exporter
        return int8_engine(ckpt, int8, hardware, engine=engine, amp_explicit=amp_explicit,
                           cache_dir=cache_dir)
    onnx_file = ckpt.lower().endswith(".onnx")
    engine_name = resolve_engine(engine, hardware.device, onnx_file=onnx_file)
    compiled = compiled_models_dir(Path(cache_dir)) if cache_dir is not None else None
    if onnx_file:
        runtime, settings = engine_from_onnx(engine_name, ckpt, hardware,
                                             amp_explicit=amp_explicit, cache_dir=compiled)
        return runtime, check_settings(settings, ckpt, REQUIRED_SETTINGS), engine_name
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
    model, settings = load_model(ckpt, required_settings=REQUIRED_SETTINGS)
    runtime = engine_from_model(engine_name, model, hardware, amp_explicit=amp_explicit,
                                compile_model=compile_model)
    return runtime, settings, engine_name


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
            return runtime, check_settings(settings, ckpt, REQUIRED_SETTINGS), engine_name
        except UserError as error:
            logger.warning("exporting again: the cached %s failed (%s)", graph, error)
            graph.unlink(missing_ok=True)
    graph = exported_graph(ckpt, cache_dir, key)
    if graph is None:
        return None
    runtime, settings = engine_from_onnx(engine_name, str(graph), hardware,
                                         amp_explicit=amp_explicit, cache_dir=compiled)
    return runtime, check_settings(settings, ckpt, REQUIRED_SETTINGS), engine_name


def exported_graph(ckpt: str, cache_dir: Path, key: str | None = None) -> Path | None:
    """The cached graph of ``ckpt`` (``key``: its :func:`deploy.cache.graph_key`), exported
    into the cache now if it is not there; None when the cache cannot hold it.

    Raises:
        UserError: the checkpoint cannot be read or describes no model.
    """
    key = key or graph_key(ckpt)
    with export_lock(graph_path(cache_dir, key).parent):  # after a background export, if any
        return cache_graph(ckpt, cache_dir, key, export_in_child)


def cache_graph(ckpt: str, cache_dir: Path, key: str,
                export: Callable[[str, Path], bool]) -> Path | None:
    """The cached graph of ``ckpt`` under ``key``, written by ``export(ckpt, graph)`` (True:
    written) if it is not there, with its hash beside it; None when ``export`` failed. The
    caller holds the graph folder's lock."""
    graph = graph_path(cache_dir, key)
    if cached_graph(cache_dir, key) is None:
        if not export(ckpt, graph):
            return None
        record_digest(graph)  # checked before every later use (deploy.cache.verified)
        prune_graphs(cache_dir)
    return graph


@contextlib.contextmanager
def export_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock (waiting for another export there to end), or nothing where the
    folder cannot be written: the export then fails there, and says so."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(folder, wait=True)
    except OSError:
        yield
        return
    with lock:
        yield


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
        model, settings = load_model(ckpt, required_settings=REQUIRED_SETTINGS)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    data = inference_graph(model, settings)
    try:
        atomic_write(graph, lambda handle: handle.write(data))
    except OSError as error:
        print(f"cannot write {graph}: {error}", file=sys.stderr)
        return 1
    return 0


def inference_graph(model: torch.nn.Module, settings: dict) -> bytes:
    """The ONNX graph (fp32, ``settings`` in its metadata) that the ONNX runtimes run of a
    checkpoint's loaded ``model``."""
    model.aux_classifier = None  # a training aid: inference reads the main head only
    return export_onnx(model.float(), settings)


def as_pixels(image: Any) -> torch.Tensor:
    """One RGB image as uint8 ``(3, H, W)`` pixels, for :meth:`Predictor.predict`.

    Accepted: a torch tensor ``(3, H, W)`` (torchvision's layout), ``(1, 3, H, W)``, grey
    ``(H, W)`` or ``(1, H, W)`` (repeated to RGB) or RGBA ``(4, H, W)`` (alpha dropped); a
    numpy array in the same shapes but channels last, ``(H, W, 3)`` (PIL's, imageio's layout;
    RGB, not OpenCV's BGR), ``(H, W)``, ``(H, W, 1)``, ``(H, W, 4)``; a PIL image of any mode
    (converted to RGB, alpha dropped). Pixels must be uint8 0-255: float images (torchvision's
    0-1 convention, or 0-255 floats) are refused, not guessed.

    Raises:
        ValueError: anything else, naming what it got and what is expected.
    """
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        channels_last = image.ndim == 3
        tensor = torch.from_numpy(np.array(image))  # a copy: the caller's may be read-only
        image = tensor.permute(2, 0, 1) if channels_last else tensor
        layout = "numpy (H, W, 3)"
    elif isinstance(image, torch.Tensor):
        layout = "torch (3, H, W)"
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
    else:
        raise ValueError(f"Predictor.predict takes a uint8 torch tensor (3, H, W), a numpy array "
                         f"(H, W, 3) or a PIL image; got {type(image).__name__}")
    shape = tuple(image.shape)
    if image.dtype != torch.uint8:
        raise ValueError(f"Predictor.predict takes uint8 pixels 0-255, got {image.dtype} of "
                         f"shape {shape}; a 0-1 float image x: (x * 255).round().to(torch.uint8)")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4) or 0 in image.shape:
        raise ValueError(f"Predictor.predict takes one RGB image, {layout} (grey or RGBA too); "
                         f"got shape {shape}")
    return image[:3] if image.shape[0] != 1 else image.expand(3, -1, -1)


class SameSizeBatches:
    """Groups decoded samples into what one model call predicts: a batch of whole images of one
    size (at most ``batch_size``; a batched mask equals the one-image mask, nothing is padded),
    or one image predicted window by window. At most twice ``batch_size`` samples wait.

    Iterating yields ``(samples, window)`` pairs, ``window`` None for whole images; samples
    that could not be read are reported through ``on_error`` and counted in ``errors``.
    """

    def __init__(self, samples: Iterable[dict[str, Any]], *,
                 window: Callable[[torch.Tensor], int | None], batch_size: int,
                 on_error: Callable[[str], None]) -> None:
        self.samples, self.window, self.batch_size = samples, window, batch_size
        self.on_error = on_error
        self.errors = 0
        self.waiting: dict[tuple, list[dict[str, Any]]] = {}

    def __iter__(self) -> Iterator[tuple[list[dict[str, Any]], int | None]]:
        for sample in self.samples:
            if "error" in sample:
                self.on_error(sample["error"])
                self.errors += 1
                continue
            window = self.window(sample["image"])
            if window is not None:
                yield [sample], window
                continue
            # The model input's size and the output's (with --size, two sizes give one input).
            key = (tuple(sample["image"].shape), sample["image"].dtype, tuple(sample["size"]))
            self.waiting.setdefault(key, []).append(sample)
            if len(self.waiting[key]) >= self.batch_size:
                yield self.waiting.pop(key), None
            elif sum(map(len, self.waiting.values())) > 2 * self.batch_size:
                yield self.waiting.pop(self.fullest()), None
        while self.waiting:
            yield self.waiting.pop(next(iter(self.waiting))), None

    def fullest(self) -> tuple:
        return max(self.waiting.items(), key=_batch_length)[0]


def _batch_length(item: tuple[tuple, list]) -> int:
    return len(item[1])


@dataclass
class Predictor:
    """Class ids for decoded samples: normalisation, batching, windows, scales and flips.

    Its calls may come from several threads at once (a web server's): every engine runs
    concurrent calls correctly.
    """

    engine: Engine
    hardware: Hardware
    normalize: Normalize
    scales: Sequence[float] = (1.0,)
    flip: bool = False
    tile: int | None = None  # None: whole images below the pixel budget, windows above it
    tile_overlap: int = 256
    batch_size: int = 1
    confidence: bool = False  # also the chosen class's probability (sample["confidence"])
    in_channels: int = 3  # the model's image channels (its checkpoint's ``in_channels``)

    def __post_init__(self) -> None:
        problem = window_problem(self.tile, self.tile_overlap)
        if problem or self.batch_size < 1:
            raise ValueError(problem or f"batch_size must be at least 1, got {self.batch_size}")

    @classmethod
    def load(cls, ckpt: str, *, engine: str = "auto", device: str | torch.device | None = None,
             amp: str = "auto", channels_last: bool = True,
             cache_dir: str | os.PathLike | None = None, int8: Int8Source | None = None,
             **options: Any) -> tuple["Predictor", dict]:
        """A predictor for ``ckpt`` (checkpoint or ONNX file) and the model's settings (class
        names, palette, ...), without a command line.

        Args:
            engine: ``auto`` or one of :data:`deploy.engines.ENGINES`, as inference.py's
                ``--engine``.
            device: ``"cpu"``, ``"cuda"`` or ``"cuda:<i>"``; None picks a GPU when there is one
                (without one, the CPU, whatever was asked).
            amp: ``auto``, ``off``, ``bf16`` or ``fp16``, as inference.py's ``--amp`` (see
                :func:`utils.hardware.resolve_amp`).
            channels_last: the PyTorch engine's memory format.
            cache_dir: where the ONNX runtimes keep what a later run reuses (:mod:`deploy.cache`;
                inference.py passes ``$DEEPLAB_CACHE_DIR``); None: nothing is kept.
            int8: run ``ckpt`` (a checkpoint) quantized to int8 by NNCF, calibrated on these
                images: a folder, an image or a ``.txt`` list of them (str or Path; 16-64
                calibrate, up to 8 more measure the agreement with fp32), or a list of image
                paths (up to 8 held out to measure it when there are over 16); the model and
                its agreement are cached in ``cache_dir`` (:mod:`deploy.int8`), the agreement
                is in ``settings["int8"]``. None: fp32, as trained.
            options: the other fields (``scales``, ``flip``, ``tile``, ``tile_overlap``,
                ``batch_size``).

        Raises:
            UserError: a missing or unreadable file, or an engine that cannot run it.
            ValueError: options that cannot work (a window below :data:`MIN_TILE`).
        """
        hardware = hardware_for(device, amp=amp, channels_last=channels_last)
        runtime, settings, engine_name = load_engine(
            ckpt, hardware, engine=engine, amp_explicit=amp not in ("auto", "off"),
            cache_dir=cache_dir, int8=int8)
        if engine_name != "torch":
            hardware.channels_last = False  # the ONNX runtimes take plain NCHW arrays
        return cls(engine=runtime, hardware=hardware,
                   normalize=Normalize(settings["mean"], settings["std"]),
                   in_channels=int(settings.get("in_channels", 3)), **options), settings

    @property
    def engine_name(self) -> str:
        """``torch``, ``onnxruntime`` or ``openvino`` (another callable: its type's name)."""
        return getattr(self.engine, "name", type(self.engine).__name__)

    def compile(self) -> None:
        """``torch.compile`` the PyTorch engine's model (the ONNX runtimes compile their own)."""
        if isinstance(self.engine, TorchEngine):
            self.engine.model = torch.compile(self.engine.model)

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` pixels (uint8 0-255, or float on the unit scale) -> the normalised
        model input on the device; one grey band feeds an RGB model as (g, g, g)."""
        if pixels.shape[-3] == 1 and self.in_channels == 3:
            pixels = pixels.expand(*pixels.shape[:-3], 3, *pixels.shape[-2:])
        return self.hardware.images(self.normalize(pixels.to(self.hardware.device)))

    def _fits(self, sample: dict[str, Any]) -> dict[str, Any]:
        """``sample``, or an error sample when its channels are not the model's."""
        channels = sample["image"].shape[-3] if "image" in sample else self.in_channels
        if channels == self.in_channels or (channels == 1 and self.in_channels == 3):
            return sample
        name = sample.get("path", f"input {sample.get('index')}")
        return {"index": sample.get("index"), "error": f"{name} has {channels} channel(s) but "
                f"the model takes {self.in_channels}-channel images"}

    def window(self, pixels: torch.Tensor) -> int | None:
        """The window side for this ``(3, H, W)`` input, or None to predict it whole."""
        if self.tile is not None:
            return self.tile or None
        return DEFAULT_TILE if pixels.shape[-1] * pixels.shape[-2] > TILE_PIXEL_BUDGET else None

    def whole(self, samples: list[dict[str, Any]]) -> list[torch.Tensor]:
        """``(H, W)`` uint8 labels of same-size samples, predicted in one batch (with
        ``confidence``, each sample's ``(H, W)`` uint8 confidence put in it)."""
        images = self.prepare(torch.stack([sample["image"] for sample in samples]))
        labels = predict_labels(self.engine, images, samples[0]["size"], list(self.scales),
                                self.flip, dtype=torch.uint8, with_confidence=self.confidence)
        return self._keep_confidence(samples, labels)

    def tiled(self, sample: dict[str, Any], tile: int) -> list[torch.Tensor]:
        """The labels of one large image predicted window by window, resized to its size."""
        maps = predict_maps_tiled(
            self.engine, sample["image"], self.prepare, scales=list(self.scales), flip=self.flip,
            windows=(tile, self.tile_overlap, self.batch_size), with_confidence=self.confidence)
        if self.confidence:  # nearest, as the labels: each pixel keeps its class's probability
            maps = tuple(resize_labels(found, sample["size"])[None] for found in maps)
        else:
            maps = resize_labels(maps, sample["size"])[None]
        return self._keep_confidence([sample], maps)

    def _keep_confidence(self, samples: list[dict[str, Any]], maps: Any) -> list[torch.Tensor]:
        if not self.confidence:
            return list(maps.cpu())
        labels, confidence = maps
        for sample, found in zip(samples, confidence.cpu()):
            sample["confidence"] = found
        return list(labels.cpu())

    def predict(self, image: Any) -> torch.Tensor:
        """``(H, W)`` uint8 class ids of one RGB image: uint8 pixels as a torch ``(3, H, W)``
        tensor, a numpy ``(H, W, 3)`` array or a PIL image (grey and RGBA too; see
        :func:`as_pixels`).

        Raises:
            ValueError: an input of another kind, shape or dtype (float pixels among them).
        """
        pixels = as_pixels(image)
        found: list[torch.Tensor] = []
        self.predict_all([{"image": pixels, "size": tuple(pixels.shape[-2:])}],
                         _Collect(found), on_error=_raise)
        return found[0]

    def predict_all(self, samples: Iterable[dict[str, Any]],
                    emit: Callable[[dict[str, Any], torch.Tensor], None],
                    on_error: Callable[[str], None]) -> int:
        """Predict every decoded sample (``{"image": (C, h, w) uint8 or unit-scale float,
        "size": (H, W)}``, the
        output's size, or ``{"error": message}``) and hand ``(sample, (H, W) uint8 labels)`` to
        ``emit``, in the order the batches finish (with ``confidence``, the sample holds its
        ``(H, W)`` uint8 ``"confidence"``, 255 = certain); returns how many samples could not
        be read (each reported through ``on_error``; the others go on). Batches as
        :class:`SameSizeBatches` forms them.
        """
        batches = SameSizeBatches(map(self._fits, samples), window=self.window,
                                  batch_size=self.batch_size,
                                  on_error=on_error)
        # No cuDNN autotuning: nearly every photo has its own size, and would be tuned anew.
        with torch.inference_mode(), cudnn_benchmark(False):
            for batch, tile in batches:
                # one large image: windows of it, then back to its size (--size)
                labels = self.whole(batch) if tile is None else self.tiled(batch[0], tile)
                for sample, mask in zip(batch, labels):
                    emit(sample, mask)
        return batches.errors


class _Collect:
    """An ``emit`` for :meth:`Predictor.predict_all` that keeps the labels in a list."""

    def __init__(self, found: list[torch.Tensor]) -> None:
        self.found = found

    def __call__(self, sample: dict[str, Any], labels: torch.Tensor) -> None:
        self.found.append(labels)


def _raise(message: str) -> None:
    raise ValueError(message)


def window_problem(tile: int | None, overlap: int, *,
                   names: tuple[str, str] = ("tile", "tile_overlap")) -> str | None:
    """Why windows of ``tile`` pixels overlapping by ``overlap`` cannot work, in one line that
    calls the two by ``names``; None when they can. ``tile`` None is the automatic
    :data:`DEFAULT_TILE` for large inputs, 0 never windows."""
    if tile is not None and tile != 0 and tile < MIN_TILE:
        return (f"{names[0]} must be at least {MIN_TILE} pixels, the span of the model's widest "
                f"ASPP branch (smaller windows see mostly padding), got {tile}; {names[0]} 0 "
                f"predicts whole images")
    window = DEFAULT_TILE if tile is None else tile
    # At most half a window: more would multiply the windows (at tile - 1, one per pixel).
    if overlap < 0 or (window and 2 * overlap > window):
        return (f"{names[1]} {overlap} must be at most half the window ({window // 2} for "
                + (f"{names[0]} {tile}" if tile else f"the automatic {window}-pixel windows")
                + ")")
    return None


def hardware_for(device: str | torch.device | None, *, amp: str,
                 channels_last: bool) -> Hardware:
    """Where and how a :class:`Predictor` computes: ``device`` (None: a GPU when there is one;
    a GPU asked for on a machine without one: the CPU), the autocast dtype ``amp`` resolves
    to there, and the memory format."""
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if not use_cuda:
        device = torch.device("cpu")
    else:
        device = torch.device(device if device is not None else "cuda")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return Hardware(device=device, gpu_ids=[device.index] if use_cuda else [],
                    amp_dtype=resolve_amp(amp, device), channels_last=channels_last)
