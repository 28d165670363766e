#!/usr/bin/env python
"""inference.py against VainF/DeepLabV3Plus-Pytorch's ``predict.py``, whole process, on the same
photos: the speed table of doc/results.md, one CPU kind per run.

Each round runs VainF's ``predict.py`` (DeepLabV3+ ResNet-101, output stride 16, random weights,
fp32, batch 1, as it ships; its unused optional imports stubbed) and then each of this project's
paths on the same checkpoint architecture, alternating, so that a busy machine slows both alike:

- ``first``: one photo with an empty cache (a new user's first run); the background export it
  starts as it ends (:mod:`deploy.warmup`) is waited for, untimed, before the next run;
- ``second``: the same photo again (the cache warm);
- ``export first``: one photo with an empty cache and ``--engine openvino``, which exports and
  compiles before predicting (what a first run cost before :mod:`deploy.warmup`);
- ``fp32``, ``bf16``, ``int8``: every photo with the defaults, ``--amp bf16`` and ``--int8``
  (calibrated on ``--calibration``), each cache filled by an untimed run first;
- ``torch``: every photo with ``--engine torch``;
- ``cold``: every photo with an empty cache.

With ``--trained CKPT`` it then prints each path's pixel agreement with ``--engine torch --amp
off`` on the photos, for a trained model of any backbone (random weights agree trivially).

    python -m bench.vainf --vf-dir ~/DeepLabV3Plus-Pytorch --images coco/val2017 \
        --calibration coco/train2017 --trained run/demo/model_best.pth.tar

``--vf-dir``: a checkout of https://github.com/VainF/DeepLabV3Plus-Pytorch.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataloader.images import list_inputs
from deploy.warmup import BACKGROUND_EXPORT

REPO = Path(__file__).resolve().parents[1]

#: VainF's optional imports that predict.py never uses, stubbed so that none must be installed.
STUBS = {"visdom.py": "class Visdom: pass\n", "sklearn/__init__.py": "",
         "sklearn/metrics.py": "def confusion_matrix(*a, **k): raise NotImplementedError\n",
         "matplotlib/__init__.py": "def use(*a, **k): pass\n", "matplotlib/pyplot.py": ""}
RUNNER = """import functools, runpy, sys
sys.path.insert(0, {vf!r})
import network.modeling as modeling
setattr(modeling, {model!r}, functools.partial(getattr(modeling, {model!r}),
                                               pretrained_backbone=False))
sys.argv = ["predict.py"] + sys.argv[1:]
runpy.run_path({predict!r}, run_name="__main__")
"""
#: Caps every kernel library at AVX2 (each reads its own variable; OpenVINO needs both of its
#: own and oneDNN's, set together): the kernels an AVX2-only CPU runs, on this CPU's cores,
#: caches and memory, which an AVX2-only CPU does not have.
ISA_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OV_CPU_MAX_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}

#: Each path's inference.py flags besides --in-path, --out-path, --ckpt.
PATHS = {"fp32": [], "bf16": ["--amp", "bf16"], "int8": ["--int8"], "torch": ["--engine", "torch"]}


class VainF:
    """VainF's predict.py with a random-weight checkpoint of ``model`` (output stride 16, 21
    classes; ``deeplabv3plus_mobilenet`` is its MobileNetV2 model), ready to time."""

    def __init__(self, vf_dir: Path, scratch: Path,
                 model: str = "deeplabv3plus_resnet101") -> None:
        self.vf_dir, self.scratch, self.model = vf_dir.resolve(), scratch, model
        if not (self.vf_dir / "predict.py").is_file():
            raise SystemExit(f"error: --vf-dir {vf_dir} has no predict.py: clone "
                             f"VainF/DeepLabV3Plus-Pytorch there")
        self.stubs = scratch / "stubs"
        for name, text in STUBS.items():
            (self.stubs / name).parent.mkdir(parents=True, exist_ok=True)
            (self.stubs / name).write_text(text)
        self.runner = scratch / "run_vainf.py"
        self.runner.write_text(RUNNER.format(vf=str(self.vf_dir), model=model,
                                             predict=str(self.vf_dir / "predict.py")))
        self.ckpt = scratch / f"vainf-{model}.pth"
        subprocess.run([sys.executable, "-c", (
            "import sys, torch; sys.path.insert(0, '.'); import network; "
            f"m = network.modeling.{model}(num_classes=21, output_stride=16, "
            f"pretrained_backbone=False); torch.save({{'model_state': m.state_dict()}}, "
            f"{str(self.ckpt)!r})")], cwd=self.vf_dir, env=self.env(), check=True)

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(self.stubs))

    def command(self, images: Path, out: Path) -> tuple[list[str], dict[str, str], Path]:
        return ([sys.executable, str(self.runner), "--input", str(images), "--dataset", "voc",
                 "--model", self.model, "--output_stride", "16", "--ckpt",
                 str(self.ckpt), "--save_val_results_to", str(out)], self.env(), self.vf_dir)


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds the whole process takes; its failure ends the benchmark with its output."""
    tic = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - tic
    if result.returncode:
        raise SystemExit(f"{' '.join(command[:3])}... failed:\n{result.stderr[-2000:]}")
    return seconds


def ours(ckpt: Path, images: Path, out: Path, flags: list[str], cache: Path,
         calibration: Path | None) -> tuple[list[str], dict[str, str], Path]:
    """inference.py on ``images`` with ``flags`` and the cache folder ``cache``."""
    extra = ["--calibration", str(calibration)] if "--int8" in flags and calibration else []
    return ([sys.executable, "inference.py", "--in-path", str(images), "--out-path", str(out),
             "--ckpt", str(ckpt), "--overwrite", *flags, *extra],
            dict(os.environ, DEEPLAB_CACHE_DIR=str(cache), PYTHONPATH=str(REPO)), REPO)


def wait_for_background_export() -> None:
    """Until no background export (deploy.warmup, started as a first run ends) is running."""
    while any(b"deploy.warmup" in cmdline for cmdline in _command_lines()):
        time.sleep(0.2)


def _command_lines() -> list[bytes]:
    lines = []
    for entry in Path("/proc").iterdir():
        try:
            lines.append((entry / "cmdline").read_bytes() if entry.name.isdigit() else b"")
        except OSError:  # it ended meanwhile
            continue
    return lines


def fill_cache(ckpt: Path, images: Path, out: Path, cache: Path,
               calibration: Path | None) -> None:
    """Run every path once, untimed, so that ``cache`` holds what each reads (the graph, the
    compiled models, the int8 model) and no background export is left running."""
    for flags in PATHS.values():
        timed(*ours(ckpt, images, out, flags, cache, calibration))
        wait_for_background_export()


def one_photo(images: Path, scratch: Path) -> Path:
    folder = scratch / "one"
    folder.mkdir(exist_ok=True)
    first = list_inputs(str(images))[0].path
    if not (folder / first.name).exists():
        (folder / first.name).symlink_to(first.resolve())
    return folder


def run_rounds(args: argparse.Namespace, vainf: VainF, scratch: Path) -> dict[str, list[float]]:
    """Every timed run, round after round, VainF first in each round."""
    one = one_photo(args.images, scratch)
    warm = scratch / "cache-warm"
    if not args.first_photo_only:
        fill_cache(args.ckpt, args.images, scratch / "warm-up", warm, args.calibration)
    times: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        runs = {"VainF 1 photo": vainf.command(one, scratch / "vf1"),
                "VainF": vainf.command(args.images, scratch / "vf")}
        empty = scratch / f"cache-empty-{round_index}"
        runs["first (1 photo, empty cache)"] = ours(args.ckpt, one, scratch / "o1", [], empty,
                                                    None)
        runs["second (1 photo, cache warm)"] = ours(args.ckpt, one, scratch / "o1", [], empty,
                                                    None)
        runs["export first (1 photo, empty cache, --engine openvino)"] = ours(
            args.ckpt, one, scratch / "o1", ["--engine", "openvino"],
            scratch / f"cache-export-{round_index}", None)
        for name, flags in PATHS.items():
            runs[name] = ours(args.ckpt, args.images, scratch / name, flags, warm,
                              args.calibration)
        runs["cold (empty cache)"] = ours(args.ckpt, args.images, scratch / "cold", [],
                                          scratch / f"cache-cold-{round_index}", None)
        if args.first_photo_only:
            runs = {name: runs[name] for name in ("VainF 1 photo", "first (1 photo, empty cache)")}
        for name, command in runs.items():
            times.setdefault(name, []).append(timed(*command))
            print(f"round {round_index} {name}: {times[name][-1]:.1f} s", flush=True)
            if name.startswith(("first", "cold")):  # its background export, untimed
                wait_for_background_export()
    return times


def agreement(args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    """Percent of pixels each path's masks share with ``--engine torch --amp off``'s, for the
    trained checkpoint."""
    cache = scratch / "cache-trained"
    fill_cache(args.trained, args.images, scratch / "trained-warm-up", cache, args.calibration)
    outputs = {}
    for name, flags in {"reference": ["--engine", "torch", "--amp", "off"], **PATHS}.items():
        outputs[name] = scratch / f"trained-{name}"
        timed(*ours(args.trained, args.images, outputs[name], flags, cache, args.calibration))
    found = {}
    reference = sorted(outputs["reference"].rglob("*.png"))
    for name in PATHS:
        same = total = 0
        for path in reference:
            expected = np.asarray(Image.open(path))
            mask = np.asarray(Image.open(outputs[name] / path.relative_to(outputs["reference"])))
            same, total = same + int((mask == expected).sum()), total + expected.size
        found[name] = 100 * same / total
    return found


def report(times: dict[str, list[float]], found: dict[str, float], count: int) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    flags = set(Path("/proc/cpuinfo").read_text().split())
    capped = {name: os.environ[name] for name in ISA_CAP if name in os.environ}
    print(f"\n{cpu}; {os.cpu_count()} cores; "
          f"{' '.join(f for f in ('avx2', 'avx512_bf16', 'avx512_vnni', 'amx_tile') if f in flags)}"
          + (f" (capped: {' '.join(f'{k}={v}' for k, v in capped.items())})" if capped else "")
          + f"; torch {torch.__version__}; seconds of each round, whole process")
    print("| run | seconds | VainF / run | agreement with fp32 |\n|---|---|---|---|")
    for name, seconds in times.items():
        base = times["VainF 1 photo" if "1 photo" in name else "VainF"]
        ratio = min(base) / min(seconds)
        shown = f"{found[name]:.3f} %" if name in found else ""
        label = name if "photo" in name else f"{name} ({count} photos)"
        print(f"| {label} | {', '.join(f'{s:.1f}' for s in seconds)} | {ratio:.2f}x | {shown} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vainf",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--vf-dir", type=Path, required=True,
                        help="a checkout of VainF/DeepLabV3Plus-Pytorch")
    parser.add_argument("--images", type=Path, required=True, help="folder of photos")
    parser.add_argument("--calibration", type=Path, required=True,
                        help="--int8's calibration images (not --images)")
    parser.add_argument("--ckpt", type=Path,
                        help="a ResNet-101 output-stride-16 checkpoint (default: random weights)")
    parser.add_argument("--trained", type=Path, help="a trained checkpoint for the agreement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--first-photo-only", action="store_true",
                        help="only the one-photo first runs (empty cache), VainF's beside each")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="cap oneDNN, OpenVINO and PyTorch kernels at AVX2 in every run, "
                             "both sides: an estimate for AVX2-only CPUs, not a measurement")
    args = parser.parse_args(argv)
    os.environ.pop(BACKGROUND_EXPORT, None)
    if args.emulate_avx2:
        os.environ.update(ISA_CAP)
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        if args.ckpt is None:
            args.ckpt = random_resnet101(scratch / "r101.pth.tar")
        vainf = VainF(args.vf_dir, scratch)
        times = run_rounds(args, vainf, scratch)
        count = len(list_inputs(str(args.images)))
        report(times, {}, count)  # printed now: the agreement runs take minutes more
        if args.trained:
            report(times, agreement(args, scratch), count)


def random_resnet101(path: Path) -> Path:
    """A ResNet-101 output-stride-16 checkpoint of random weights, as train.py writes one."""
    from dataloader.utils import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASS_NAMES, palette_for
    from modeling.deeplab import DeepLab

    torch.manual_seed(0)
    model = DeepLab(backbone="resnet101", output_stride=16, num_classes=21).eval()
    settings = dict(model.settings(), class_names=list(VOC_CLASS_NAMES), palette=palette_for(21),
                    mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    torch.save({"model": model.state_dict(), "settings": settings}, path)
    return path


if __name__ == "__main__":
    main()
