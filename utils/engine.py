"""The training loop's machinery: one epoch of SGD steps, full-resolution evaluation, the stop
flag, the loss window, and the training state that checkpoints hold.

Everything here takes plain keyword arguments; train.py turns the command line into them.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from utils.distributed import DistributedContext, any_true, broadcast_buffers, ranks_in_sync
from utils.errors import UserError
from utils.fileio import atomic_write_text
from utils.figures import evaluation_figures, save_figures
from utils.hardware import Hardware, cudnn_benchmark, dataparallel_chunks, usable_batch_size
from utils.losses import build_loss
from utils.lr_scheduler import build_lr_scheduler
from utils.metrics import Evaluator, WorstImages, metrics_json
from utils.saver import Saver, get_rng_state, set_rng_state
from utils.summaries import TensorboardSummary
from modeling.predict import predict_labels


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; training stops without saving the bad weights."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run exits."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress
    iteration: int = 0  # optimiser steps completed since the start of training
    best_pred: float = 0.0  # best val mIoU so far
    eval_pending: bool = False  # the epoch has trained; its evaluation was interrupted


@dataclass
class Optimisation:
    """What one training step uses besides the model and the batch."""

    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    aux_weight: float


#: Images per device when the batch size is not given.
DEFAULT_BATCH_PER_DEVICE = 4
#: Linear scaling rule when the learning rate is not given: 0.01 for 16 images per step.
REFERENCE_LR, REFERENCE_BATCH = 0.01, 16


@dataclass
class Schedule:
    """How long and how fast training runs."""

    batch_size: int  # images per step in this process
    total_batch: int  # images per step over all processes
    lr: float  # backbone learning rate; the head gets 10x
    epochs: int
    iters_per_epoch: int
    total_iters: int

    def __str__(self) -> str:
        return (f"{self.epochs} epochs x {self.iters_per_epoch} iterations of {self.total_batch} "
                f"images, lr {self.lr:g} (head {10 * self.lr:g})")


def make_schedule(*, train_size: int, batch_size: int | None, devices: int, world_size: int,
                  epochs: int, lr: float | None) -> Schedule:
    """Resolve the batch size (default 4 per device), the learning rate (default: the linear
    scaling rule on the total batch) and the iterations per epoch.

    Raises:
        UserError: a batch DataParallel would split into a chunk of 1 (the ASPP image-pooling
            BatchNorm needs 2 per device), or fewer training images than one batch.
    """
    batch_size = batch_size or DEFAULT_BATCH_PER_DEVICE * devices
    if usable_batch_size(batch_size, devices) != batch_size:
        good = max(2, -(-batch_size // devices)) * devices  # chunks of equal size, >= 2
        raise UserError(f"--batch-size {batch_size} splits over {devices} device(s) as "
                        f"{dataparallel_chunks(batch_size, devices)}; BatchNorm in ASPP's image "
                        f"pooling needs 2 per device: use --batch-size {good}")
    total_batch = batch_size * world_size
    iters_per_epoch = train_size // world_size // batch_size
    if iters_per_epoch == 0:
        raise UserError(f"the train split has {train_size} images, fewer than one batch of "
                        f"{total_batch}: lower --batch-size")
    lr = lr if lr is not None else REFERENCE_LR * total_batch / REFERENCE_BATCH
    return Schedule(batch_size=batch_size, total_batch=total_batch, lr=lr, epochs=epochs,
                    iters_per_epoch=iters_per_epoch, total_iters=epochs * iters_per_epoch)


def make_optimisation(model: nn.Module, *, lr: float, momentum: float, weight_decay: float,
                      nesterov: bool, scheduler: str, total_iters: int, warmup_iters: int,
                      step_size: int, gamma: float, loss: str, class_weight: torch.Tensor | None,
                      focal_gamma: float, aux_weight: float, ignore_index: int,
                      hardware: Hardware) -> Optimisation:
    """SGD with the head (ASPP, decoder, aux) at 10x the backbone's ``lr``, a per-iteration
    schedule (:func:`utils.lr_scheduler.build_lr_scheduler`), the loss, and a GradScaler when
    autocasting to fp16.

    Args:
        model: a :class:`modeling.deeplab.DeepLab` (its ``backbone_parameters`` and
            ``head_parameters`` split the rates).
        step_size: iterations between decays of the ``step`` schedule.
        class_weight: per-class loss weights, or None.
    """
    criterion = build_loss(loss, ignore_index=ignore_index, gamma=focal_gamma,
                           weight=None if class_weight is None else
                           class_weight.to(hardware.device))
    optimizer = torch.optim.SGD(
        [{"params": list(model.backbone_parameters()), "lr": lr},
         {"params": list(model.head_parameters()), "lr": lr * 10}],
        lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    schedule = build_lr_scheduler(optimizer, scheduler, total_iters=total_iters,
                                  warmup_iters=warmup_iters, step_size=step_size, gamma=gamma)
    scaler = (torch.amp.GradScaler(hardware.device.type)
              if hardware.amp_dtype == torch.float16 else None)
    return Optimisation(criterion=criterion, optimizer=optimizer, scheduler=schedule,
                        scaler=scaler, aux_weight=aux_weight)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves and exits at the next iteration boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        """Catch SIGINT and SIGTERM with this flag inside the block; restore the old handlers."""
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class LossWindow:
    """Per-iteration losses kept on the device until the next log point, so that the NaN check
    and per-iteration TensorBoard scalars cost one host-device synchronisation per window."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, torch.Tensor, float]] = []

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.entries.append((step, loss.detach().float(), lr))

    def drain(self) -> list[tuple[int, float, float]]:
        """``(step, loss, lr)`` of every iteration since the last drain.

        Raises:
            NonFiniteLoss: naming the first iteration whose loss is NaN or infinite.
        """
        if not self.entries:
            return []
        values = torch.stack([loss for _, loss, _ in self.entries]).cpu().tolist()
        entries = [(step, value, lr) for (step, _, lr), value in zip(self.entries, values)]
        self.entries = []
        for step, value, _ in entries:
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at iteration {step}")
        return entries


class TrainLog:
    """The loss window plus images-per-second, written to TensorBoard and the progress bar."""

    def __init__(self, summary: TensorboardSummary | None, progress: tqdm, world_size: int):
        self.window = LossWindow()
        self.summary, self.progress, self.world_size = summary, progress, world_size
        self.images_seen, self.tic = 0, time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, lr: float, images: int) -> None:
        self.window.add(step, loss, lr)
        self.images_seen += images

    def flush(self, iteration: int) -> None:
        """Check and write the window. Also called before every save: weights a NaN has reached
        are never written."""
        entries = self.window.drain()
        if entries and self.summary is not None:
            for step, value, lr in entries:
                self.summary.add_scalar("train/loss", value, step)
                self.summary.add_scalar("train/lr", lr, step)
            elapsed = max(time.perf_counter() - self.tic, 1e-9)
            self.summary.add_scalar("train/images_per_second",
                                    self.images_seen * self.world_size / elapsed, iteration)
            self.progress.set_postfix(loss=f"{entries[-1][1]:.4f}")
        self.images_seen, self.tic = 0, time.perf_counter()


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
               optimisation: Optimisation, hardware: Hardware) -> torch.Tensor:
    """One forward/backward/update; returns the (device) loss."""
    criterion, optimizer, scaler = (optimisation.criterion, optimisation.optimizer,
                                    optimisation.scaler)
    with hardware.autocast():
        outputs = model(images)
        loss = criterion(outputs["out"].float(), targets)
        if "aux" in outputs:
            loss = loss + optimisation.aux_weight * criterion(outputs["aux"].float(), targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss


def step_batch(batch: dict[str, Any], hardware: Hardware, context: DistributedContext,
               agree: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The part of a loaded batch one step trains on (on the device), or None to skip the step.

    BatchNorm in ASPP's image pooling needs 2 images per device: a batch that
    ``--skip-bad-images`` shrank is cut to the largest size DataParallel splits into chunks of
    at least 2, or skipped. With ``agree`` (DDP with skipping), the ranks skip together: a rank
    that sat out would leave the others waiting in SyncBatchNorm and the gradient all-reduce.
    """
    size = len(batch["image"]) if "image" in batch else 0
    usable = usable_batch_size(size, hardware.devices_per_process)
    if agree and any_true(usable == 0, context, hardware.device):
        return None
    if usable == 0:
        return None
    images, targets = hardware.inputs({"image": batch["image"][:usable],
                                       "label": batch["label"][:usable]})
    return images, targets


def train_one_epoch(
    *,
    model: nn.Module,
    optimisation: Optimisation,
    loader: torch.utils.data.DataLoader,
    hardware: Hardware,
    state: TrainState,
    iters_per_epoch: int,
    print_freq: int,
    save_interval: int,
    save: Callable[[bool], None],
    summary: TensorboardSummary | None,
    stop: StopFlag,
    context: DistributedContext,
    show_progress: bool,
    agree_on_skips: bool = False,
) -> int:
    """Run the rest of epoch ``state.epoch``; returns how many bad samples were skipped.

    Args:
        print_freq: iterations between log points (TensorBoard writes, NaN checks, and under DDP
            the ranks' agreement on a stop signal).
        save_interval: also save every this many iterations (0: only at the epoch's end).
        save: ``save(is_best)`` writes the training state (a no-op on ranks other than 0).
        agree_on_skips: under DDP with ``--skip-bad-images``, agree on skipped steps (one small
            collective per iteration; see :func:`step_batch`).

    Raises:
        NonFiniteLoss: the loss became NaN or infinite.
        Interrupted: a stop signal arrived; the state was saved first.
    """
    model.train()
    skipped = 0
    progress = tqdm(loader, desc=f"epoch {state.epoch}", disable=not show_progress,
                    initial=state.iteration % iters_per_epoch, total=iters_per_epoch,
                    dynamic_ncols=True)
    log = TrainLog(summary, progress, context.world_size)
    for batch in progress:
        skipped += int(batch["skipped"])
        inputs = step_batch(batch, hardware, context, agree_on_skips)
        if inputs is not None:
            loss = train_step(model, *inputs, optimisation, hardware)
            log.add(state.iteration + 1, loss, optimisation.optimizer.param_groups[0]["lr"],
                    len(inputs[0]))
        optimisation.scheduler.step()
        state.iteration += 1

        at_epoch_end = state.iteration % iters_per_epoch == 0
        at_log_point = state.iteration % print_freq == 0 or at_epoch_end
        if at_log_point:
            log.flush(state.iteration)
        if save_interval and state.iteration % save_interval == 0 and not at_epoch_end:
            log.flush(state.iteration)
            save(False)
        # One process reads its flag for free; under DDP all ranks must agree to stop at the same
        # iteration, which costs a collective, so they compare flags at log points only.
        if (stop.signum is not None if not context.enabled else
                at_log_point and any_true(stop.signum is not None, context, hardware.device)):
            log.flush(state.iteration)
            save(False)
            raise Interrupted(stop.signum or signal.SIGTERM)
    return skipped


#: Under DDP the ranks compare stop flags every this many evaluation batches (a collective).
EVAL_STOP_CHECK_INTERVAL = 10


def _stop_requested(stop: StopFlag | None, index: int, common_batches: int,
                    context: DistributedContext, device: torch.device) -> bool:
    """Whether evaluation should stop before batch ``index``. One process reads its flag; DDP
    ranks agree every :data:`EVAL_STOP_CHECK_INTERVAL` batches, while every rank still has
    batches (``common_batches``), so that all of them take part in the collective."""
    if stop is None:
        return False
    if not context.enabled:
        return stop.signum is not None
    if index % EVAL_STOP_CHECK_INTERVAL or index >= common_batches:
        return False
    return any_true(stop.signum is not None, context, device)


@torch.no_grad()
def evaluate(
    *,
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    num_classes: int,
    hardware: Hardware,
    scales: list[float],
    flip: bool,
    show_progress: bool,
    stop: StopFlag | None = None,
    context: DistributedContext = DistributedContext(),
    worst: WorstImages | None = None,
) -> tuple[Evaluator, dict | None]:
    """Score full-resolution predictions on every val image (summed over ranks).

    A stop signal (``stop``) ends evaluation within a few batches: a full COCO val takes
    minutes, longer than a pre-emption grace period. ``worst``, if given, scores each image too
    and ends holding the worst of all ranks (batches must carry ``"index"``, as the
    :func:`dataloader.samplers.resumable_loader` ones do).

    Returns:
        The evaluator and, for the TensorBoard grid, the first batch's tensors.

    Raises:
        Interrupted: ``stop`` was set during evaluation.
    """
    model.eval()
    evaluator = Evaluator(num_classes, device=hardware.device)
    first = None
    common_batches = len(loader.dataset) // context.world_size // (loader.batch_size or 1)
    progress = tqdm(loader, desc="val", disable=not show_progress, dynamic_ncols=True)
    with cudnn_benchmark(False):  # every full-resolution image has its own size
        for index, batch in enumerate(progress):
            if _stop_requested(stop, index, common_batches, context, hardware.device):
                raise Interrupted(stop.signum or signal.SIGTERM)
            if "image" not in batch:
                continue
            image, target = hardware.inputs(batch)
            # The prediction inference.py writes for the same image (one shared function).
            with hardware.autocast():
                prediction = predict_labels(model, image, tuple(target.shape[-2:]), scales, flip)
            evaluator.add_batch(target, prediction)
            if worst is not None:
                worst.add(batch["index"].tolist(), image, target, prediction)
            if first is None:
                first = {"image": F.interpolate(image.float(), size=tuple(target.shape[-2:]),
                                                mode="bilinear", align_corners=False).cpu(),
                         "target": target.cpu(), "prediction": prediction.cpu()}
    evaluator.all_reduce()
    if worst is not None:
        worst.all_gather()
    return evaluator, first


# --------------------------------------------------------------------------- training state


def training_state(*, model: nn.Module, optimisation: Optimisation, state: TrainState,
                   iters_per_epoch: int, settings: dict) -> dict[str, Any]:
    """Everything a checkpoint holds to continue exactly: weights, optimiser, schedule, scaler,
    progress, RNG states and the model settings. Plain types only (``weights_only`` loading)."""
    scaler = optimisation.scaler
    return {
        "model": model.state_dict(),
        "optimizer": optimisation.optimizer.state_dict(),
        "scheduler": optimisation.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": state.epoch,
        "iteration": state.iteration,
        "iters_per_epoch": iters_per_epoch,
        "best_pred": state.best_pred,
        "eval_pending": state.eval_pending,
        "rng": get_rng_state(),
        "settings": settings,
    }


def restore_training_state(checkpoint: dict[str, Any], *, optimisation: Optimisation,
                           iters_per_epoch: int, seed: int, rank: int = 0) -> TrainState:
    """Load what :func:`training_state` saved into ``optimisation`` and the RNGs (the model's
    weights were loaded when it was built); returns the progress to continue from.

    Only rank 0's RNG states are saved: the resume is exact for one process, and other ranks
    re-seed their dropout from ``seed``, their rank and the iteration.

    Raises:
        UserError: the checkpoint ran another number of iterations per epoch.
    """
    if "optimizer" not in checkpoint or "iters_per_epoch" not in checkpoint:
        raise UserError("--resume checkpoint holds weights without a training state (converted "
                        "or exported): fine-tune from it with --ft, or evaluate it with "
                        "--eval-only")
    if checkpoint.get("iters_per_epoch") != iters_per_epoch:
        raise UserError(f"--resume checkpoint ran {checkpoint.get('iters_per_epoch')} "
                        f"iterations per epoch, this set-up {iters_per_epoch}: keep "
                        f"--batch-size, the number of processes and the dataset")
    optimisation.optimizer.load_state_dict(checkpoint["optimizer"])
    optimisation.scheduler.load_state_dict(checkpoint["scheduler"])
    if optimisation.scaler is not None and checkpoint.get("scaler"):
        optimisation.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    if rank:
        torch.manual_seed(seed + rank + checkpoint["iteration"])
    pending = bool(checkpoint.get("eval_pending", False))
    return TrainState(epoch=checkpoint["epoch"] if pending else
                      checkpoint["iteration"] // iters_per_epoch,
                      iteration=checkpoint["iteration"], best_pred=checkpoint["best_pred"],
                      eval_pending=pending)


@dataclass
class Checkpointer:
    """Saves the training state through rank 0's Saver; a no-op on other ranks (``saver=None``)."""

    saver: Saver | None
    summary: TensorboardSummary | None
    model: nn.Module  # the plain (unwrapped) model
    optimisation: Optimisation
    iters_per_epoch: int
    settings: dict

    def save(self, state: TrainState, is_best: bool) -> None:
        if self.saver is None:
            return
        # Events up to the checkpoint are on disk; a resumed run purges the ones after it.
        if self.summary is not None:
            self.summary.flush()
        self.saver.save(training_state(model=self.model, optimisation=self.optimisation,
                                       state=state, iters_per_epoch=self.iters_per_epoch,
                                       settings=self.settings), is_best=is_best)


# --------------------------------------------------------------------------- the whole fit


@dataclass
class LoopSettings:
    """How the loop runs: its length, and how often it logs, saves and evaluates."""

    total_iters: int
    iters_per_epoch: int
    batch_size: int  # images per step in this process
    print_freq: int = 20
    save_interval: int = 0  # 0: save at epoch ends only
    eval_interval: int = 1  # epochs
    eval_scales: tuple[float, ...] = (1.0,)
    eval_flip: bool = False
    eval_worst: int = 8  # worst val images drawn after each evaluation (0: none)
    skip_bad_images: bool = False  # batches may shrink: DDP ranks agree on skipped steps


def worst_images_tracker(k: int, settings: dict,
                         loader: torch.utils.data.DataLoader) -> WorstImages | None:
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


def evaluate_and_report(*, model: nn.Module, loader: torch.utils.data.DataLoader,
                        class_names: list[str], hardware: Hardware, scales: list[float],
                        flip: bool, context: DistributedContext, header: str | None = None,
                        stop: StopFlag | None = None,
                        worst: WorstImages | None = None) -> tuple[dict, dict | None]:
    """Evaluate and print the per-class table on rank 0 (after ``header``).

    Returns the metrics of :meth:`Evaluator.results` and the first batch (see :func:`evaluate`).
    """
    evaluator, first = evaluate(model=model, loader=loader, num_classes=len(class_names),
                                hardware=hardware, scales=scales, flip=flip,
                                show_progress=context.is_main, stop=stop, context=context,
                                worst=worst)
    if context.is_main:
        if header:
            print(header)
        print(evaluator.format_table(class_names))
    return evaluator.results(class_names), first


def evaluate_checkpoint(*, model: nn.Module, loader: torch.utils.data.DataLoader, settings: dict,
                        hardware: Hardware, scales: list[float], flip: bool,
                        context: DistributedContext, json_path: str, worst_images: int = 8,
                        iteration: int = 0) -> dict:
    """Score a checkpoint's model (``--eval-only``) and write its metrics to ``json_path``.

    The evaluation figures go beside it as ``<json stem>_<figure>.png`` and into TensorBoard
    at step ``iteration`` (the checkpoint's), in the folder ``<json stem>/`` beside it: a
    TensorBoard run of its own, apart from the training run's curves.
    """
    worst = worst_images_tracker(worst_images, settings, loader)
    results, _ = evaluate_and_report(model=model, loader=loader,
                                     class_names=settings["class_names"], hardware=hardware,
                                     scales=scales, flip=flip, context=context, worst=worst)
    if context.is_main:
        atomic_write_text(json_path, metrics_json(results))
        print(f"metrics written to {json_path}")
        figures = draw_evaluation(results, worst, settings)
        if figures:
            stem = os.path.splitext(json_path)[0]
            save_figures(figures, os.path.dirname(stem), prefix=os.path.basename(stem) + "_")
            summary = TensorboardSummary(stem)
            summary.add_figures(figures, iteration)
            summary.close()
    return {"metrics": results}


def log_evaluation(results: dict, first: dict | None, *, state: TrainState, settings: dict,
                   saver: Saver | None, summary: TensorboardSummary | None,
                   worst: WorstImages | None = None) -> None:
    """TensorBoard scalars, image grid and figures, metrics.json and the figures' PNGs, for one
    evaluation (rank 0)."""
    if saver is None or summary is None:
        return
    summary.log_metrics(results, state.iteration, settings["class_names"])
    if first is not None:
        summary.visualize(first["image"], first["target"], first["prediction"],
                          palette=settings["palette"], mean=settings["mean"],
                          std=settings["std"], step=state.iteration)
    atomic_write_text(os.path.join(saver.experiment_dir, "metrics.json"),
                      metrics_json(dict(results, epoch=state.epoch, iteration=state.iteration)))
    figures = draw_evaluation(results, worst, settings)
    summary.add_figures(figures, state.iteration)
    save_figures(figures, saver.experiment_dir)


def _train_epoch(*, model: nn.Module, plain_model: nn.Module, optimisation: Optimisation,
                 loader: torch.utils.data.DataLoader, sampler: Any, state: TrainState,
                 checkpointer: Checkpointer, loop: LoopSettings, hardware: Hardware,
                 context: DistributedContext, stop: StopFlag) -> None:
    """Train the epoch ``state.iteration`` is in, from where it stands, and leave every rank
    with rank 0's BatchNorm statistics."""
    state.epoch = state.iteration // loop.iters_per_epoch
    sampler.set_epoch(state.epoch, start=(state.iteration % loop.iters_per_epoch)
                      * loop.batch_size)
    skipped = train_one_epoch(
        model=model, optimisation=optimisation, loader=loader, hardware=hardware, state=state,
        iters_per_epoch=loop.iters_per_epoch, print_freq=max(loop.print_freq, 1),
        save_interval=loop.save_interval, save=functools.partial(checkpointer.save, state),
        summary=checkpointer.summary, stop=stop, context=context,
        show_progress=context.is_main, agree_on_skips=context.enabled and loop.skip_bad_images)
    if skipped and context.is_main:
        print(f"epoch {state.epoch}: skipped {skipped} bad samples (--skip-bad-images)")
    broadcast_buffers(plain_model, context)


def fit(*, model: nn.Module, plain_model: nn.Module, optimisation: Optimisation,
        train_loader: torch.utils.data.DataLoader, train_sampler: Any,
        val_loader: torch.utils.data.DataLoader, state: TrainState, checkpointer: Checkpointer,
        loop: LoopSettings, hardware: Hardware, context: DistributedContext) -> dict | None:
    """Train from ``state`` to ``loop.total_iters``, evaluating every ``loop.eval_interval``
    epochs and at the end, saving after every epoch; returns the last evaluation's metrics.

    Args:
        model: the model to train (possibly wrapped: DDP, DataParallel, compiled).
        plain_model: the unwrapped model, for evaluation and checkpoints.
        train_sampler: the train loader's ``ResumableSampler``.
    """
    last_results = None
    with StopFlag().installed() as stop:
        while state.iteration < loop.total_iters or state.eval_pending:
            if not state.eval_pending:  # else a resumed run owes the last epoch's evaluation
                _train_epoch(model=model, plain_model=plain_model, optimisation=optimisation,
                             loader=train_loader, sampler=train_sampler, state=state,
                             checkpointer=checkpointer, loop=loop, hardware=hardware,
                             context=context, stop=stop)
                state.eval_pending = ((state.epoch + 1) % max(loop.eval_interval, 1) == 0
                                      or state.iteration >= loop.total_iters)
            is_best = False
            if state.eval_pending:
                worst = worst_images_tracker(loop.eval_worst, checkpointer.settings, val_loader)
                try:
                    last_results, first = evaluate_and_report(
                        model=plain_model, loader=val_loader,
                        class_names=checkpointer.settings["class_names"], hardware=hardware,
                        scales=list(loop.eval_scales), flip=loop.eval_flip, context=context,
                        header=f"epoch {state.epoch} (iteration {state.iteration}):", stop=stop,
                        worst=worst)
                except Interrupted:  # keep the epoch's training; --resume evaluates it first
                    checkpointer.save(state, is_best=False)
                    raise
                state.eval_pending = False
                miou = last_results["mean_iou"]  # None when nothing could be scored
                is_best = miou is not None and miou > state.best_pred
                state.best_pred = miou if is_best else state.best_pred
                log_evaluation(last_results, first, state=state, settings=checkpointer.settings,
                               saver=checkpointer.saver, summary=checkpointer.summary, worst=worst)
            checkpointer.save(state, is_best=is_best)
    if context.enabled:  # DDP must have kept the ranks identical
        same = ranks_in_sync(plain_model, context)
        if context.is_main:
            print(f"weights identical across {context.world_size} ranks: {'yes' if same else 'NO'}")
        if not same:
            raise RuntimeError("model weights differ across ranks after training")
    return last_results
