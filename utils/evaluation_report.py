"""What an evaluation writes (rank 0): the per-class table, TensorBoard, the metrics JSON and the
evaluation figures of :mod:`utils.figures`.

The training loop saves the epoch's checkpoint before any of this runs, and the parts that only
illustrate (the TensorBoard image grid and the figures) are optional: an error in one of them is
one warning line and the run goes on (:func:`optional`). A run of days is not lost to a class
name matplotlib cannot typeset or to a figure too large for memory.

``--eval-only`` names its files after the checkpoint it evaluates (:func:`eval_json_path`), so
the evaluations of ``model_best.pth.tar`` and ``checkpoint.pth.tar`` in one folder keep apart,
and an evaluation run again replaces its own files and TensorBoard events.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from utils.distributed import DistributedContext
from utils.figures import EVALUATION_FIGURES, evaluation_figures, save_figures
from utils.errors import UserError
from utils.fileio import atomic_write_text, remove_stale_temporaries_of
from utils.metrics import WorstImages, metrics_json
from utils.run_folder import CHECKPOINT_NAME, SETTINGS_NAME, Checkpointer, TrainProgress

logger = logging.getLogger(__name__)

#: Largest --eval-worst: the worst-images figure gets a row per image, and every rank keeps that
#: many thumbnails and sends them to the others.
MAX_EVAL_WORST = 64
#: TensorBoard's event files (``events.out.tfevents.<time>.<host>.<pid>.<n>``).
_EVENT_FILES = "events.out.tfevents.*"


def add_evaluation_args(parser: argparse.ArgumentParser) -> None:
    """train.py's flags for :class:`EvaluationOptions`, ``--eval-only`` and how often to
    evaluate."""
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs")
    group.add_argument("--eval-only", action="store_true", help="evaluate --resume and exit")
    group.add_argument("--eval-size", type=int,
                       help="short side of val inputs (labels: full size)")
    group.add_argument("--eval-scales", type=float, nargs="+", default=[1.0],
                       help="multi-scale testing: input scales whose softmax is averaged")
    group.add_argument("--eval-flip", action=argparse.BooleanOptionalAction, default=False,
                       help="also average horizontally flipped inputs")
    group.add_argument("--eval-json", help="where --eval-only writes its metrics (default: "
                       "eval_<checkpoint name>.json beside the checkpoint)")
    group.add_argument("--eval-worst", type=int, default=8, metavar="K",
                       help=f"draw the K val images with the lowest mIoU after each evaluation, "
                            f"beside the confusion matrix and per-class IoU figures (0: none, "
                            f"at most {MAX_EVAL_WORST})")


@dataclass(frozen=True)
class EvaluationOptions:
    """How to evaluate and what to draw, as the flags say.

    Attributes:
        scales: input scales whose softmax is averaged (``--eval-scales``).
        flip: also average horizontally flipped inputs (``--eval-flip``).
        worst: draw this many worst val images, 0 for none (``--eval-worst``).
        json_path: where ``--eval-only`` writes its metrics (``--eval-json``), None for the
            default of :func:`eval_json_path`.
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    worst: int = 0
    json_path: str | None = None

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "EvaluationOptions":
        """The options train.py's flags (``vars(args)``) give.

        Raises:
            UserError: ``--eval-worst`` or ``--eval-scales`` out of range.
        """
        if not 0 <= flags["eval_worst"] <= MAX_EVAL_WORST:
            raise UserError(f"--eval-worst must be 0 (off) or a number of images up to "
                            f"{MAX_EVAL_WORST}, got {flags['eval_worst']}")
        if any(s <= 0 for s in flags["eval_scales"]):
            raise UserError(f"--eval-scales must be positive, got {flags['eval_scales']}")
        return cls(scales=tuple(flags["eval_scales"]), flip=flags["eval_flip"],
                   worst=flags["eval_worst"], json_path=flags["eval_json"])


@dataclass
class Evaluation:
    """One pass over the val set (the same on every rank).

    Attributes:
        results: the scores of :meth:`utils.metrics.Evaluator.results`.
        table: those scores as the fixed-width per-class table.
        first: the first val batch for the TensorBoard grid (:func:`grid_batch`), if any.
        worst: the worst images of all ranks, when they were tracked.
    """

    results: dict
    table: str
    first: dict | None = None
    worst: WorstImages | None = None


def grid_batch(image: torch.Tensor, target: torch.Tensor, prediction: torch.Tensor) -> dict:
    """A val batch kept on the CPU for the TensorBoard grid: ``image`` ``(N, 3, h, w)`` resized
    to its labels' ``(H, W)``, ``target`` and ``prediction`` ``(N, H, W)``."""
    size = tuple(target.shape[-2:])
    return {"image": F.interpolate(image.float(), size=size, mode="bilinear",
                                   align_corners=False).cpu(),
            "target": target.cpu(), "prediction": prediction.cpu()}


@contextlib.contextmanager
def optional(what: str) -> Iterator[None]:
    """Run a step that only illustrates: any error in it becomes one warning line naming
    ``what`` and the error, and the caller goes on."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - memory, matplotlib's parser, a full disk...
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        logger.warning("%s skipped: %s%s", what, type(error).__name__,
                       f": {reason}" if reason else "")


def worst_images_tracker(k: int, settings: dict, loader) -> WorstImages | None:
    """A :class:`WorstImages` for one evaluation pass over ``loader`` (None when ``k`` is 0),
    naming images by the val dataset's ``sample_name``."""
    if k <= 0:
        return None
    dataset = getattr(loader.dataset, "dataset", loader.dataset)  # inside SeededDataset
    return WorstImages(k, len(settings["class_names"]), mean=settings["mean"],
                       std=settings["std"], name_of=dataset.sample_name)


def draw_evaluation(results: dict, worst: WorstImages | None, settings: dict) -> dict:
    """The evaluation figures of :func:`utils.figures.evaluation_figures` ({} without
    matplotlib)."""
    return evaluation_figures(confusion_matrix=results["confusion_matrix"],
                              class_names=settings["class_names"], palette=settings["palette"],
                              worst=worst.worst() if worst is not None else ())


def report_epoch(evaluation: Evaluation, *, progress: TrainProgress,
                 checkpointer: Checkpointer) -> None:
    """After an epoch's evaluation and its checkpoint (rank 0; a no-op elsewhere): print the
    per-class table, write the scores to TensorBoard and metrics.json, then the optional image
    grid of the first val batch and the evaluation figures (PNGs and TensorBoard)."""
    folder, summary, settings = checkpointer.folder, checkpointer.summary, checkpointer.settings
    if folder is None or summary is None:
        return
    results, first = evaluation.results, evaluation.first
    print(f"epoch {progress.epoch} (iteration {progress.iteration}):")
    print(evaluation.table)
    summary.log_metrics(results, progress.iteration, settings["class_names"])
    atomic_write_text(folder.metrics_path, metrics_json(
        dict(results, epoch=progress.epoch, iteration=progress.iteration)))
    if first is not None:
        with optional("the TensorBoard image grid"):
            summary.visualize(first["image"], first["target"], first["prediction"],
                              palette=settings["palette"], mean=settings["mean"],
                              std=settings["std"], step=progress.iteration)
    with optional("the evaluation figures"):
        figures = draw_evaluation(results, evaluation.worst, settings)
        summary.add_figures(figures, progress.iteration)
        save_figures(figures, folder.experiment_dir)


def eval_json_path(checkpoint: str, json_path: str | None) -> str:
    """Where ``--eval-only`` writes its metrics: ``json_path`` (``--eval-json``) if given, else
    ``eval_<name>.json`` beside the checkpoint, ``<name>`` its file name without
    ``.pth.tar`` (or its one other extension): ``eval_model_best.json``,
    ``eval_checkpoint.json``."""
    if json_path:
        return json_path
    name = os.path.basename(checkpoint)
    name = name[:-len(".pth.tar")] if name.endswith(".pth.tar") else os.path.splitext(name)[0]
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"eval_{name}.json")


def report_checkpoint(evaluation: Evaluation, *, settings: dict, iteration: int,
                      json_path: str, context: DistributedContext) -> dict:
    """``--eval-only``: rank 0 prints the per-class table and writes the metrics to
    ``json_path``; then, optional, the evaluation figures beside it as
    ``<json stem>_<figure>.png`` and into TensorBoard at step ``iteration`` (the checkpoint's),
    in the folder ``<json stem>/``: a TensorBoard run of its own, apart from the training run's
    curves, whose event file replaces that of an earlier evaluation written there.

    Returns:
        ``{"metrics": results}``, on every rank.
    """
    if context.is_main:
        print(evaluation.table)
        stem = os.path.splitext(json_path)[0]
        # Temporaries a killed evaluation left (no other process writes these names).
        remove_stale_temporaries_of([json_path, *(f"{stem}_{name}.png" for name in
                                                  EVALUATION_FIGURES)])
        atomic_write_text(json_path, metrics_json(evaluation.results))
        print(f"metrics written to {json_path}")
        with optional("the evaluation figures"):
            _write_figures(draw_evaluation(evaluation.results, evaluation.worst, settings),
                           stem=stem, iteration=iteration)
    return {"metrics": evaluation.results}


def _write_figures(figures: dict, *, stem: str, iteration: int) -> None:
    """``--eval-only``'s figures as ``<stem>_<name>.png`` and into TensorBoard in ``<stem>/``,
    replacing an earlier evaluation's event file there."""
    from utils.summaries import TensorboardSummary  # TensorBoard: only this report needs it

    if not figures:
        return
    save_figures(figures, os.path.dirname(stem), prefix=os.path.basename(stem) + "_")
    earlier = _earlier_event_files(stem)
    summary = TensorboardSummary(stem)
    summary.add_figures(figures, iteration)
    summary.close()
    for path in earlier:
        path.unlink(missing_ok=True)


def _earlier_event_files(folder: str) -> list[Path]:
    """The event files an earlier ``--eval-only`` wrote into ``folder``, which the new one
    replaces; none in a training run's folder (an ``--eval-json`` beside its folder's name)."""
    folder = Path(folder)
    if (folder / SETTINGS_NAME).exists() or (folder / CHECKPOINT_NAME).exists():
        return []
    return sorted(folder.glob(_EVENT_FILES))
