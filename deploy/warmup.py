"""``--engine auto``'s first run on a checkpoint, on a CPU: PyTorch now, OpenVINO from the next
run on.

OpenVINO runs a checkpoint once its graph is exported to ONNX and compiled, which the first run
on a ResNet-101 checkpoint pays for (about 10 s on 2 cores, doc/results.md); later runs read
both from the cache (:mod:`deploy.cache`) and start and predict sooner than PyTorch. A first
run on a few photos would spend longer exporting than predicting, and start slower than
PyTorch alone, so it runs PyTorch, and when its work is done it starts a background process, at
the lowest CPU priority, that exports and compiles the graph for the runs after it. Started at
the end, it takes no CPU from the run (started at the beginning, it slowed a one-photo run by
seconds on 2 cores); it outlives the run, holds the graph folder's lock so that one such
export runs at a time, and writes atomically, so a run that starts meanwhile finds no graph,
or a whole one. A job of
:data:`EXPORT_FIRST_FROM` inputs or more exports first, as a named ``--engine`` always does:
the export is won back within the job.

``DEEPLAB_BACKGROUND_EXPORT=0`` turns the background export off (the first runs then stay on
PyTorch until a large job or ``--engine openvino`` fills the cache).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from deploy.cache import compiled_models_dir, digest_path, graph_key, graph_path
from deploy.engines import resolve_engine
from utils.fileio import FolderInUse, FolderLock

#: Inputs from which a first run exports before it predicts instead of running PyTorch: about
#: where OpenVINO's faster predictions have paid for the export (a video counts as this many).
#: ResNet-101, whole process, 2 cores (doc/results.md), an Intel Xeon (AMX): PyTorch 0.97-1.04 s
#: a photo, OpenVINO 0.84-0.95 s, the export about 10 s, even from 50-110 photos; the Zen 4 of
#: issue 25: 0.88 s, 0.82 s and 7 s, even from about 120.
EXPORT_FIRST_FROM = 64
#: What turns the background export off: "0".
BACKGROUND_EXPORT = "DEEPLAB_BACKGROUND_EXPORT"
PRECISIONS = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Startup:
    """How a run starts: the engine to load, a note for the user, and the background export
    to start once the run's own work is done (None: none)."""

    engine: str
    note: str | None = None
    export: Callable[[], bool] | None = None


def startup_engine(ckpt: str, *, engine: str, device: torch.device, cache_dir: Path | None,
                   job_size: int, precision: str = "off") -> Startup:
    """How a run of ``job_size`` inputs loads ``ckpt``.

    ``auto`` on a CPU, for a checkpoint whose graph is not cached, in a job below
    :data:`EXPORT_FIRST_FROM` inputs: ``torch`` now, and an export to start when the run ends
    (:func:`export_in_background`; started then, it takes nothing from the run). Anything
    else: ``engine`` as it is.

    Args:
        precision: OpenVINO's precision the next run will ask for (``off``, ``bf16``,
            ``fp16``): the background process compiles for it.
    """
    if (engine != "auto" or device.type != "cpu" or cache_dir is None
            or job_size >= EXPORT_FIRST_FROM or ckpt.lower().endswith(".onnx")
            or not os.path.isfile(ckpt) or importlib.util.find_spec("onnx") is None):
        return Startup(engine)
    runtime = resolve_engine("auto", device)
    # A graph with its hash beside it: load_engine checks that hash (no need to hash it twice).
    graph = graph_path(Path(cache_dir), graph_key(ckpt))
    if runtime == "torch" or digest_path(graph).is_file() and graph.is_file():
        return Startup(engine)
    if os.environ.get(BACKGROUND_EXPORT, "1") == "0":
        return Startup("torch", (f"note: {ckpt} runs PyTorch until its {runtime} graph is "
                                 f"cached: a job of {EXPORT_FIRST_FROM} inputs or --engine "
                                 f"{runtime} exports it"))
    return Startup("torch", (f"note: a first run on {ckpt} runs PyTorch; when it ends, its "
                             f"{runtime} graph is exported in the background into {cache_dir} "
                             f"for the runs after it"),
                   functools.partial(export_in_background, ckpt, Path(cache_dir),
                                     runtime=runtime, precision=precision,
                                     threads=torch.get_num_threads()))


def export_in_background(ckpt: str, cache_dir: Path, *, runtime: str, precision: str,
                         threads: int) -> bool:
    """Start the background export (:func:`main` in a detached process of its own session, at
    the lowest priority); False when it cannot start."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    try:
        subprocess.Popen(
            [sys.executable, "-m", "deploy.warmup", ckpt, str(cache_dir), runtime, precision,
             str(threads)], env=dict(os.environ, PYTHONPATH=path),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # neither a terminal's Ctrl-C nor the run's end stops it
    except OSError:
        return False
    return True


def warm(ckpt: str, cache_dir: Path, *, runtime: str, precision: str, threads: int) -> int:
    """Export ``ckpt``'s graph into ``cache_dir`` and, for OpenVINO, compile it as a run with
    ``threads`` threads in ``precision`` will ask; returns 0 done (or already done), 1 another
    export holds the lock or the cache cannot be written, 2 a bad checkpoint."""
    from deploy.engines import OpenVinoEngine
    from deploy.predictor import _export_child, cache_graph

    folder = graph_path(cache_dir, "").parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(folder)
    except (FolderInUse, OSError):
        return 1
    status = 0

    def export(ckpt: str, graph: Path) -> bool:  # in this process: it is the background one
        nonlocal status
        status = _export_child(ckpt, str(graph))
        return status == 0

    with lock:
        graph = cache_graph(ckpt, cache_dir, graph_key(ckpt), export)
        if graph is None:
            return status
        if runtime == "openvino":
            OpenVinoEngine(str(graph), threads=threads, amp_dtype=PRECISIONS[precision],
                           cache_dir=compiled_models_dir(cache_dir))
    return 0


def lowest_priority() -> None:
    """The lowest CPU priority for this process, against every other one: the user's next
    runs come first. Where the kernel groups processes by session (autogroup), a nice value
    only ranks a process within its session, and this one has a session of its own, so the
    session's priority is lowered too."""
    os.nice(19)
    try:
        Path("/proc/self/autogroup").write_text("19")
    except OSError:  # no autogroup here: the nice value is enough
        pass


def main(argv: list[str]) -> int:
    ckpt, cache_dir, runtime, precision, threads = argv
    lowest_priority()
    torch.set_num_threads(1)
    return warm(ckpt, Path(cache_dir), runtime=runtime, precision=precision,
                threads=int(threads))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
