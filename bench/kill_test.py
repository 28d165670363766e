#!/usr/bin/env python
"""Kill a training run with SIGKILL at random moments, restart it with --auto-resume each time,
and compare the final weights with an uninterrupted run's (bit-identical for one process).

    python -m bench.kill_test --kills 20 --seed 0

The run trains ResNet-18 on a small generated demo set on the CPU, saving every
``--save-interval`` iterations. Each kill lands at a random moment before the run's end (a random
iteration, plus up to one iteration's time: data loading, the step, evaluation, or while a
checkpoint is written); the script then checks that the
checkpoint on disk loads (``weights_only=True``), restarts the same command, and reports how many
iterations each kill lost (reached before the kill minus the checkpoint's). It exits 1 if any
checkpoint was unreadable, a kill lost more than ``--save-interval`` iterations, or the final
weights differ from the uninterrupted run's.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from dataloader.datasets.demo import generate_demo_dataset

REPO = Path(__file__).resolve().parents[1]

#: tqdm's progress line: "epoch 2:  38%|###   | 3/8 [...]".
_PROGRESS = re.compile(r"epoch (\d+):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def train_command(data_root: Path, run_dir: Path, *, epochs: int, save_interval: int,
                  seed: int) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--dataset", "demo", "--data-root",
            str(data_root), "--backbone", "resnet18", "--no-pretrained", "--no-cuda", "--amp",
            "off", "--crop-size", "64", "--base-size", "64", "--eval-size", "48",
            "--batch-size", "4", "--lr", "0.01", "--epochs", str(epochs), "--workers", "1",
            "--save-interval", str(save_interval), "--print-freq", "1", "--seed", str(seed),
            "--auto-resume", "--run-dir", str(run_dir)]


class Run:
    """A training process in its own session, its output collected as it comes."""

    def __init__(self, command: list[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            self.output += chunk

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def started(self) -> bool:
        return "run folder:" in self.text()

    def reached(self, iters_per_epoch: int) -> int:
        """Iterations the progress bar showed done (0 if none)."""
        matches = _PROGRESS.findall(self.text())
        if not matches:
            return 0
        epoch, done, _ = (int(v) for v in matches[-1])
        return epoch * iters_per_epoch + done

    def phase(self) -> str:
        tail = self.text()[-200:]
        return "evaluation" if "val:" in tail.rsplit("epoch", 1)[-1] else "training"

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float | None = None) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join()
        return code


def checkpoint_iteration(run_dir: Path) -> int:
    """The iteration of the run folder's checkpoint (0 if none); raises if it is unreadable."""
    path = run_dir / "checkpoint.pth.tar"
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["iteration"])


def run_to_end(command: list[str], timeout: float = 600) -> float:
    """Run ``command`` to its end; returns the seconds it took after start-up (imports, data)."""
    run = Run(command)
    while not run.started() and run.process.poll() is None:
        time.sleep(0.01)
    tic = time.monotonic()
    if run.wait(timeout) != 0:
        raise RuntimeError(f"run failed:\n{run.text()[-3000:]}")
    return time.monotonic() - tic


def kill_test(*, kills: int, seed: int, epochs: int, save_interval: int, workdir: Path,
              log=print) -> dict:
    """Run the test in ``workdir``; returns a report (see the module docstring)."""
    rng = random.Random(seed)
    data_root = workdir / "demo"
    generate_demo_dataset(data_root, seed=1, num_train=32, num_val=4)
    iters_per_epoch = 32 // 4
    reference_dir, killed_dir = workdir / "reference", workdir / "killed"
    work_seconds = run_to_end(train_command(data_root, reference_dir, epochs=epochs,
                                            save_interval=save_interval, seed=seed))
    log(f"uninterrupted run: {epochs * iters_per_epoch} iterations in {work_seconds:.1f} s "
        f"after start-up")
    command = train_command(data_root, killed_dir, epochs=epochs, save_interval=save_interval,
                            seed=seed)
    report = {"kills": [], "unreadable": 0}
    total = epochs * iters_per_epoch
    # Kill k waits until the run has done iteration targets[k], then up to one iteration's time
    # more: every kill lands before the run's end, anywhere in it (loading after a restart, a
    # step, an evaluation, a save).
    targets = sorted(rng.randrange(1, total) for _ in range(kills))
    iteration_seconds = work_seconds / total
    for target in targets:
        run = Run(command)
        while run.reached(iters_per_epoch) < target and run.process.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, iteration_seconds))
        if run.process.poll() is not None:
            log(f"the run ended before its kill at iteration {target}:\n{run.text()[-2000:]}")
            break
        reached, phase = run.reached(iters_per_epoch), run.phase()
        saving = any(killed_dir.glob(".checkpoint.pth.tar.*.tmp"))
        run.kill()
        try:
            saved = checkpoint_iteration(killed_dir)
        except Exception as error:  # noqa: BLE001 - any failure to load is the finding
            report["unreadable"] += 1
            log(f"kill {len(report['kills']) + 1}: checkpoint unreadable: {error}")
            saved = -1
        entry = {"reached": reached, "checkpoint": saved, "lost": max(reached - saved, 0),
                 "phase": "saving" if saving else phase}
        report["kills"].append(entry)
        log(f"kill {len(report['kills']):2d} during {entry['phase']:10s}: reached iteration "
            f"{reached:3d}, checkpoint at {saved:3d}, lost {entry['lost']}")
    run_to_end(command)
    reference = torch.load(reference_dir / "checkpoint.pth.tar", weights_only=True)
    resumed = torch.load(killed_dir / "checkpoint.pth.tar", weights_only=True)
    report["iteration"] = (reference["iteration"], resumed["iteration"])
    report["identical"] = (reference["iteration"] == resumed["iteration"] and all(
        torch.equal(tensor, resumed["model"][name]) for name, tensor in reference["model"].items()))
    report["best_pred"] = (reference["best_pred"], resumed["best_pred"])
    report["max_lost"] = max((k["lost"] for k in report["kills"]), default=0)
    # Temporaries of writes a kill interrupted are removed when the run restarts.
    report["leftover_temporaries"] = len(list(killed_dir.glob(".*.tmp")))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kill_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="kill moments and training seed")
    parser.add_argument("--epochs", type=int, default=5, help="of 8 iterations each")
    parser.add_argument("--save-interval", type=int, default=2)
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(args.workdir or temporary)
        report = kill_test(kills=args.kills, seed=args.seed, epochs=args.epochs,
                           save_interval=args.save_interval, workdir=workdir)
    ok = (report["unreadable"] == 0 and report["identical"] and not report["leftover_temporaries"]
          and report["max_lost"] <= args.save_interval and len(report["kills"]) == args.kills)
    phases = sorted({k["phase"] for k in report["kills"]})
    print(f"{len(report['kills'])} kills ({', '.join(phases)}); unreadable checkpoints: "
          f"{report['unreadable']}; temporaries left: {report['leftover_temporaries']}; most iterations lost by one kill: {report['max_lost']} "
          f"(--save-interval {args.save_interval}); final weights bit-identical to the "
          f"uninterrupted run: {'yes' if report['identical'] else 'NO'}; best mIoU "
          f"{report['best_pred'][1]:.4f} vs {report['best_pred'][0]:.4f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
