"""The runtimes inference can run a model with: PyTorch, onnxruntime and OpenVINO.

Each engine is a callable with the model's contract, ``engine(image) -> {"out": logits}`` on
torch tensors, so :mod:`modeling.inference_ops` (scales, flips, windows) drives them all alike. The
ONNX runtimes take a file written by export.py, or a checkpoint exported in memory on the fly.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from utils.errors import UserError
from utils.hardware import Hardware
from deploy.cache import checked_compiled_models, model_identity
from deploy.onnx_model import INPUT_NAME, OUTPUT_NAME, export_onnx, settings_from_metadata

ENGINES = ("torch", "onnxruntime", "openvino")
ENGINE_CHOICES = ("auto",) + ENGINES
#: OpenVINO first: on the CPUs measured (doc/results.md) the ONNX runtimes ran faster than
#: PyTorch fp32, and OpenVINO also runs the int8 files of ``export.py --int8``
#: (``python -m bench.inference --configs openvino:int8 onnxruntime:int8`` measures yours).
CPU_PREFERENCE = ("openvino", "onnxruntime", "torch")
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}

Engine = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def is_installed(engine: str) -> bool:
    """Whether ``engine``'s package can be imported (checked without importing it)."""
    return engine == "torch" or importlib.util.find_spec(_PACKAGES[engine]) is not None


def onnxruntime_has_cuda() -> bool:
    """Whether the installed onnxruntime is the build with the CUDA provider."""
    if not is_installed("onnxruntime"):
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def resolve_engine(engine: str, device: torch.device, *, onnx_file: bool = False) -> str:
    """``auto``: PyTorch on GPUs, else the first installed of :data:`CPU_PREFERENCE`. An ONNX
    file (``onnx_file``), which PyTorch cannot run, goes to onnxruntime on GPUs where its CUDA
    build is installed, else to the first installed of OpenVINO and onnxruntime on the CPU.

    Raises:
        UserError: the named engine's package is not installed, or no ONNX runtime is for an
            ONNX file (the line says how to install).
    """
    if engine == "auto":
        if onnx_file:
            if device.type == "cuda" and onnxruntime_has_cuda():
                return "onnxruntime"
            runtimes = [name for name in CPU_PREFERENCE if name != "torch" and is_installed(name)]
            if not runtimes:
                raise UserError("an ONNX file runs with onnxruntime or OpenVINO, and neither is "
                                "installed: pip install -r requirements-deploy.txt -c "
                                "constraints.txt, or pass the .pth.tar checkpoint")
            return runtimes[0]
        if device.type == "cuda":
            return "torch"
        return next(name for name in CPU_PREFERENCE if is_installed(name))
    if not is_installed(engine):
        raise UserError(f"--engine {engine} needs the {_PACKAGES[engine]} package: "
                        f"pip install -r requirements-deploy.txt -c constraints.txt")
    return engine


class TorchEngine:
    """A PyTorch model under the chosen autocast precision."""

    name = "torch"

    def __init__(self, model: nn.Module, hardware: Hardware) -> None:
        self.model, self.hardware = model, hardware

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.hardware.autocast():
            return {"out": self.model(image)["out"]}


class OnnxRuntimeEngine:
    """An ONNX model in an onnxruntime session (CUDA when the GPU build and a GPU are there)."""

    name = "onnxruntime"

    def __init__(self, model: str | bytes, *, threads: int, use_cuda: bool) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if use_cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(model, options, providers=providers)

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]
        return {"out": torch.from_numpy(logits)}


class OpenVinoEngine:
    """An ONNX model compiled by OpenVINO for the CPU.

    Callable from several threads at once: each thread runs its own infer request (one
    request serves one call at a time; a shared one answers "Infer Request is busy").
    """

    name = "openvino"

    def __init__(self, model: str | bytes, *, threads: int, amp_dtype: torch.dtype | None,
                 cache_dir: str | os.PathLike | None = None) -> None:
        import openvino

        core = openvino.Core()
        graph = core.read_model(model)
        precision = {None: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[amp_dtype]
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                  "INFERENCE_PRECISION_HINT": precision}
        if cache_dir is None:
            self.compiled = core.compile_model(graph, "CPU", config)
        else:  # the compiled model is kept there, checked, and read back next time
            key = hashlib.sha256(f"{openvino.__version__}|{sorted(config.items())}|"
                                 f"{model_identity(model)}".encode()).hexdigest()[:32]
            with checked_compiled_models(Path(cache_dir), key) as usable:
                if usable:
                    core.set_property({"CACHE_DIR": str(cache_dir)})
                self.compiled = core.compile_model(graph, "CPU", config)
        self._requests = threading.local()
        # The graph holds a copy of every weight beside the compiled model's: keep only its
        # metadata.
        self._metadata = _framework_metadata(graph)
        del graph

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        result = request.infer({INPUT_NAME: array}, share_inputs=True)
        return {"out": torch.from_numpy(result[self.compiled.output(0)])}


def _framework_metadata(model: Any) -> dict[str, str]:
    """An OpenVINO model's ONNX ``metadata_props`` (they arrive under ``framework``)."""
    info = model.get_rt_info()
    if "framework" not in info.keys():
        return {}
    return {key: model.get_rt_info(["framework", key]).astype(str) for key in info["framework"]}


def onnx_engine(name: str, model: str | bytes, hardware: Hardware, *, amp_explicit: bool,
                cache_dir: str | os.PathLike | None = None
                ) -> OnnxRuntimeEngine | OpenVinoEngine:
    """An ONNX runtime running ``model`` (a path or serialised bytes) in this precision;
    OpenVINO keeps its compiled model in ``cache_dir`` when given.

    Raises:
        UserError: a reduced precision asked for (``amp_explicit``) that the runtime lacks.
    """
    threads = torch.get_num_threads()
    if name == "onnxruntime":
        if amp_explicit and hardware.amp_dtype is not None:
            raise UserError("--engine onnxruntime runs in fp32: use --amp off (or auto), or "
                            "--engine openvino / torch for bf16")
        return OnnxRuntimeEngine(model, threads=threads, use_cuda=hardware.device.type == "cuda")
    # OpenVINO computes on the CPU even on a GPU machine, where --amp auto's choice is the GPU's.
    return OpenVinoEngine(model, threads=threads,
                          amp_dtype=hardware.amp_dtype if amp_explicit else None,
                          cache_dir=cache_dir)


def engine_from_onnx(name: str, path: str, hardware: Hardware, *, amp_explicit: bool,
                     cache_dir: str | os.PathLike | None = None
                     ) -> tuple[Engine, dict[str, Any]]:
    """Run an exported file; its settings come from its metadata.

    Raises:
        UserError: ``--engine torch`` on an ONNX file, or a file without this project's metadata.
    """
    if name == "torch":
        raise UserError(f"--ckpt {path} is an ONNX file: run it with --engine onnxruntime or "
                        f"openvino, or pass the .pth.tar checkpoint for --engine torch")
    if not os.path.isfile(path):
        raise UserError(f"--ckpt {path} not found: export one with `python export.py --ckpt "
                        f"CKPT --out {path}`")
    try:
        engine = onnx_engine(name, path, hardware, amp_explicit=amp_explicit,
                             cache_dir=cache_dir)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - each runtime reports bad files its own way
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(f"--ckpt {path} cannot be read by {name} ({reason}): export it again "
                        f"with export.py") from None
    try:
        return engine, settings_from_metadata(engine.metadata(), path)
    except ValueError as error:
        raise UserError(f"--ckpt {error}") from None


def engine_from_model(name: str, model: nn.Module, hardware: Hardware, *,
                      amp_explicit: bool, compile_model: bool = False) -> Engine:
    """Run a PyTorch model with ``name``: directly, or exported to ONNX in memory (a few
    seconds for ResNet-101) for the ONNX runtimes."""
    if getattr(model, "aux_classifier", None) is not None:
        model.aux_classifier = None  # a training aid: inference reads the main head only
    if name == "torch":
        model.to(hardware.device)
        if hardware.channels_last:
            model.to(memory_format=torch.channels_last)
        return TorchEngine(torch.compile(model) if compile_model else model, hardware)
    return onnx_engine(name, export_onnx(model.cpu().float()), hardware,
                       amp_explicit=amp_explicit)
