"""int8 in one flag: a checkpoint quantized by NNCF on the user's images, cached, and checked.

``inference.py --int8`` and ``Predictor.load(ckpt, int8=...)`` come here. The checkpoint's fp32
graph (the cached one of :mod:`deploy.cache`, or exported now) is quantized by
:func:`deploy.quantize.quantize_int8` on up to :data:`MAX_CALIBRATION` images, and the int8
model runs in OpenVINO (or onnxruntime when that is the engine). When it is built, its argmax
masks are compared with the fp32 graph's, in the same runtime, on up to :data:`MAX_HELD_OUT`
images that did not calibrate it, and the figure is printed; quantized masks differ from fp32
on some pixels, and how many depends on the model and the images.

The int8 model is kept in ``<cache>/int8/<key>.onnx`` (its SHA-256 beside it, checked before
use, as the graphs) with ``<key>.json`` holding the calibration count and the agreement, so
a later run prints the same figure without quantizing again. The key is the checkpoint's
graph key (its bytes, the exporter), the calibration images' contents (order-independent),
the NNCF version and this quantizer's code: another image, or one whose bytes changed, builds
a new model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Sequence, Union

import torch

from dataloader.custom_transforms import Normalize
from deploy.cache import (compiled_models_dir, file_digest, graph_key, prune, record_digest,
                          verified)
from deploy.engines import (Engine, OnnxRuntimeEngine, OpenVinoEngine, onnx_engine,
                            resolve_engine)
from deploy.onnx_model import settings_from_metadata, with_metadata
from deploy.predictor import REQUIRED_SETTINGS, exported_graph, inference_graph
from deploy.quantize import (MIN_CALIBRATION_IMAGES, calibration_images, model_input,
                             quantize_int8, readable, require_packages)
from modeling.checkpoint import check_settings, load_model
from utils.errors import UserError
from utils.fileio import atomic_write, atomic_write_text
from utils.hardware import Hardware

logger = logging.getLogger(__name__)

#: Calibration images used at most: NNCF's default subset is 300; 64 photos bound the time.
MAX_CALIBRATION = 64
#: Images the agreement with fp32 is measured on, at most.
MAX_HELD_OUT = 8
#: int8 models kept in the cache (a ResNet-101 one is about 60 MB); the least recently used go.
INT8_KEPT = 4


@dataclass(frozen=True)
class CalibrationSet:
    """The images an int8 model is calibrated on, those its agreement with fp32 is measured
    on (never among the former), and, when there are none of those, why, in words."""

    images: list[str]
    held_out: list[str] = field(default_factory=list)
    no_held_out: str = ""


#: What ``Predictor.load(int8=...)`` takes: a folder, an image or a ``.txt`` list of them
#: (str or Path), image paths (a run's own inputs), or a :class:`CalibrationSet`.
Int8Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], CalibrationSet]


def check_int8_request(ckpt: str, engine: str) -> None:
    """Refuse, in one line each, what ``--int8`` cannot do, before anything is read: an ONNX
    file (export.py quantizes it), the PyTorch engine, a missing package.

    Raises:
        UserError: naming the flag and what to do instead.
    """
    if str(ckpt).lower().endswith(".onnx"):
        raise UserError(f"--int8 quantizes a .pth.tar checkpoint, and --ckpt {ckpt} is an ONNX "
                        f"file: pass the checkpoint, or quantize it yourself with `python "
                        f"export.py --ckpt CKPT --out model-int8.onnx --int8 --calibration DIR`")
    if engine == "torch":
        raise UserError("--int8 runs the quantized model in OpenVINO or onnxruntime, not "
                        "PyTorch: drop --engine torch (or name openvino / onnxruntime)")
    require_packages("inference.py --int8")


def from_folder(path: str | os.PathLike, spare: Sequence[str | os.PathLike] = ()
                ) -> CalibrationSet:
    """The first :data:`MAX_CALIBRATION` readable images ``path`` names (a folder, an image or
    a ``.txt`` list) calibrate; the next :data:`MAX_HELD_OUT` of it measure the agreement, or,
    when it has no more, up to as many readable ``spare`` images that are not among them (the
    run's own inputs).

    Raises:
        UserError: ``path`` is missing or has fewer than 16 readable images.
    """
    found = calibration_images(str(path), MAX_CALIBRATION + MAX_HELD_OUT)
    images, held_out = found[:MAX_CALIBRATION], found[MAX_CALIBRATION:]
    if not held_out:
        used = {Path(image).resolve() for image in images}
        held_out = readable([item for item in spare if Path(item).resolve() not in used],
                            MAX_HELD_OUT)
    return CalibrationSet(images, held_out, no_held_out=(
        "" if held_out else f"all {len(images)} images of --calibration {path} calibrated it "
                            f"and there is no other photo; a --calibration with more than "
                            f"{MAX_CALIBRATION} images, or more inputs, leaves some to measure it"))


def from_inputs(paths: Sequence[str | os.PathLike]) -> CalibrationSet:
    """A run's own photos split in two: of the ``n`` readable ones (at most
    ``MAX_CALIBRATION + MAX_HELD_OUT`` looked at, in their order), ``min(8, n - 16)`` are held
    out to measure the agreement with fp32 (none when ``n`` is 16), and the first
    ``min(64, n - held)`` calibrate: a calibration never shrinks below 16 to measure it, and
    the held-out images are the ones after the calibration images.

    Raises:
        UserError: fewer than 16 readable photos (one line naming ``--calibration`` and 16).
    """
    found = readable(paths, MAX_CALIBRATION + MAX_HELD_OUT)
    if len(found) < MIN_CALIBRATION_IMAGES:
        raise UserError(f"--int8 calibrates on the photos it segments, at least "
                        f"{MIN_CALIBRATION_IMAGES} (fewer fit int8 to a few pictures), and this "
                        f"run has {len(found)}: add --calibration DIR with at least "
                        f"{MIN_CALIBRATION_IMAGES} images like the ones you segment")
    held = min(MAX_HELD_OUT, len(found) - MIN_CALIBRATION_IMAGES)
    count = min(MAX_CALIBRATION, len(found) - held)
    return CalibrationSet(found[:count], found[count:count + held], no_held_out=(
        "" if held else f"all {count} of the run's photos calibrated it; with more than "
                        f"{MIN_CALIBRATION_IMAGES}, up to {MAX_HELD_OUT} are held out to "
                        f"measure it (or pass --calibration DIR)"))


def calibration_set(source: Int8Source) -> CalibrationSet:
    """``source`` as :data:`Int8Source` describes it: a path is :func:`from_folder`'s, a
    sequence of paths :func:`from_inputs`'."""
    if isinstance(source, CalibrationSet):
        return source
    if isinstance(source, (str, os.PathLike)):
        return from_folder(source)
    return from_inputs(list(source))


def int8_key(ckpt: str, images: Sequence[str]) -> str:
    """The cache name of ``ckpt`` quantized on ``images``: their contents in any order."""
    import nncf

    digest = hashlib.sha256(f"{graph_key(ckpt)}|nncf {nncf.__version__}|".encode())
    for source in ("deploy.quantize", "deploy.int8"):  # what the model's calibration reads
        digest.update(Path(find_spec(source).origin).read_bytes())
    for image_digest in sorted(file_digest(image) for image in images):
        digest.update(image_digest.encode())
    return digest.hexdigest()[:32]


def int8_engine(ckpt: str, source: Int8Source, hardware: Hardware, *, engine: str = "auto",
                amp_explicit: bool = False, cache_dir: str | os.PathLike | None = None
                ) -> tuple[Engine, dict[str, Any], str]:
    """:func:`deploy.predictor.load_engine`'s answer for ``ckpt`` quantized to int8 on the
    images of ``source``: the runtime, the settings (with ``settings["int8"]``, the
    :func:`int8_summary` record: ``calibration_images``, ``held_out_images``, ``agreement``
    (a fraction of pixels, or None with ``not_measured`` saying why) and ``cached``), and the
    runtime's name. ``cache_dir`` None builds it and keeps nothing.

    Raises:
        UserError: an ONNX ``ckpt``, ``engine`` torch, a missing package or checkpoint, or
            fewer than 16 readable calibration images; all before anything slow.
    """
    check_int8_request(ckpt, engine)
    if not os.path.isfile(ckpt):
        raise UserError(f"checkpoint {ckpt} not found: pass a train.py checkpoint to --ckpt")
    chosen = calibration_set(source)
    engine_name = resolve_engine(engine, hardware.device, onnx_file=True)
    cache = Path(cache_dir) if cache_dir is not None else None
    compiled = compiled_models_dir(cache) if cache is not None else None
    key = int8_key(ckpt, chosen.images) if cache is not None else ""
    found = cached_int8(cache, key) if cache is not None else None
    if found is not None:
        runtime, settings = run_onnx(engine_name, found[0], hardware, amp_explicit, compiled)
        return runtime, dict(settings, int8=dict(found[1], cached=True)), engine_name
    fp32 = fp32_graph(ckpt, cache)
    model = quantized(fp32, chosen.images, ckpt)
    stored = store_int8(cache, key, model) if cache is not None else None
    runtime, settings = run_onnx(engine_name, stored or model, hardware, amp_explicit, compiled)
    record = measure_record(chosen, runtime, fp32, hardware, settings)
    if stored is not None:
        _keep(lambda: atomic_write_text(stored.with_suffix(".json"), json.dumps(record) + "\n"))
    return runtime, dict(settings, int8=dict(record, cached=False)), engine_name


def run_onnx(engine_name: str, model: Path | bytes, hardware: Hardware, amp_explicit: bool,
             compiled: Path | None) -> tuple[Engine, dict[str, Any]]:
    """The runtime running ``model`` (OpenVINO's compiled model kept in ``compiled``) and the
    settings in its metadata."""
    runtime = onnx_engine(engine_name, str(model) if isinstance(model, Path) else model,
                          hardware, amp_explicit=amp_explicit, cache_dir=compiled)
    settings = settings_from_metadata(runtime.metadata(), "the int8 model")
    return runtime, check_settings(settings, "the int8 model", REQUIRED_SETTINGS)


def cached_int8(cache_dir: Path, key: str) -> tuple[Path, dict[str, Any]] | None:
    """The cached int8 model of ``key`` and its record, when both are there and the model is
    intact (:func:`deploy.cache.verified`), marked as just used; else None."""
    path = int8_path(cache_dir, key)
    try:
        record = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if not verified(path, "the cached int8 model"):
        return None
    os.utime(path)
    return path, record


def int8_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "int8" / f"{key}.onnx"


def fp32_graph(ckpt: str, cache_dir: Path | None) -> bytes:
    """The fp32 ONNX graph of ``ckpt``: the cached one, exported into the cache now (in a
    child, as :func:`deploy.predictor.load_engine` does), or, without a usable cache,
    exported in this process."""
    if cache_dir is not None:
        graph = exported_graph(ckpt, Path(cache_dir))
        if graph is not None:
            return graph.read_bytes()
    return inference_graph(*load_model(ckpt, required_settings=REQUIRED_SETTINGS))


def quantized(fp32: bytes, images: list[str], ckpt: str) -> bytes:
    """``fp32`` quantized on ``images`` (fed in the order of their contents' hashes, so the
    model depends on which images they are, not on how they were listed), described as such
    in its metadata."""
    import onnx

    metadata = {prop.key: prop.value for prop in onnx.load_from_string(fp32).metadata_props}
    settings = settings_from_metadata(metadata, ckpt)
    ordered = sorted(images, key=file_digest)
    # NNCF draws its progress bars on stdout, which is the scripts' (their result lines).
    with contextlib.redirect_stdout(sys.stderr):
        model = quantize_int8(fp32, ordered, Normalize(settings["mean"], settings["std"]))
    return with_metadata(model, settings,
                         precision=f"int8, calibrated on {len(images)} images by inference.py")


def store_int8(cache_dir: Path, key: str, model: bytes) -> Path | None:
    """Write ``model`` into the cache with its hash (older ones pruned); None when it cannot."""
    path = int8_path(cache_dir, key)

    def write() -> None:
        atomic_write(path, lambda handle: handle.write(model))
        record_digest(path)
        prune_int8(cache_dir)

    return path if _keep(write) else None


def _keep(write: Any) -> bool:
    """Run a cache write; a cache that cannot be written is a warning, not the end of a run."""
    try:
        write()
    except OSError as error:
        logger.warning("cannot keep the int8 model in the cache: %s", error)
        return False
    return True


def prune_int8(cache_dir: Path) -> None:
    """Drop the least recently used int8 models beyond :data:`INT8_KEPT`, with their records."""
    folder = cache_dir / "int8"
    prune(folder, "*.onnx", INT8_KEPT)
    for record in folder.glob("*.json"):
        if not record.with_suffix(".onnx").exists():
            record.unlink(missing_ok=True)


def measure_record(chosen: CalibrationSet, int8: OnnxRuntimeEngine | OpenVinoEngine,
                   fp32: bytes, hardware: Hardware, settings: dict[str, Any]) -> dict[str, Any]:
    """What is kept beside a new int8 model: how many images calibrated it, and its pixel
    agreement (argmax masks) with the ``fp32`` graph in the same runtime, in fp32, on the
    held-out images, or why it was not measured."""
    record: dict[str, Any] = {"calibration_images": len(chosen.images),
                              "held_out_images": len(chosen.held_out), "agreement": None,
                              "not_measured": chosen.no_held_out}
    if chosen.held_out:
        normalize = Normalize(settings["mean"], settings["std"])
        reference = onnx_engine(int8.name, fp32, hardware, amp_explicit=False)
        record["agreement"] = pixel_agreement(int8, reference, chosen.held_out, normalize)
    return record


def pixel_agreement(first: Engine, second: Engine, images: Sequence[str],
                    normalize: Normalize) -> float:
    """The fraction of pixels of ``images`` (read as calibration reads them) whose argmax
    class is the same in both engines, all pixels of all images weighed alike."""
    same = total = 0
    with torch.inference_mode():
        for image in images:
            pixels = torch.from_numpy(model_input(image, normalize))
            one, two = (engine(pixels)["out"].argmax(1) for engine in (first, second))
            same += int((one == two).sum())
            total += one.numel()
    return same / total


def int8_summary(record: dict[str, Any]) -> str:
    """One line on an int8 model: its calibration and its agreement with fp32."""
    line = f"int8 model: calibrated on {record['calibration_images']} images, "
    if record.get("agreement") is None:
        line += f"agreement with fp32 not measured: {record.get('not_measured') or 'no image left'}"
    else:
        line += (f"agrees with fp32 on {100 * record['agreement']:.2f} % of pixels of "
                 f"{record['held_out_images']} held-out images")
    return line + (" (cached)" if record.get("cached") else "")
