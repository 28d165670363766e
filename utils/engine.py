"""The training loop's machinery: one epoch of SGD steps, full-resolution evaluation, the stop
flag, the loss window, and the training state that checkpoints hold.

Everything here takes plain keyword arguments; train.py turns the command line into them.
"""
from __future__ import annotations

import contextlib
import functools
import json
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
from utils.hardware import Hardware
from utils.metrics import Evaluator
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


@dataclass
class Optimisation:
    """What one training step uses besides the model and the batch."""

    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    aux_weight: float


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
) -> int:
    """Run the rest of epoch ``state.epoch``; returns how many bad samples were skipped.

    Args:
        print_freq: iterations between log points (TensorBoard writes, NaN checks, and under DDP
            the ranks' agreement on a stop signal).
        save_interval: also save every this many iterations (0: only at the epoch's end).
        save: ``save(is_best)`` writes the training state (a no-op on ranks other than 0).

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
        # BatchNorm in the image-pooling branch needs two samples per device.
        if "image" in batch and len(batch["image"]) >= 2 * hardware.devices_per_process:
            images, targets = hardware.inputs(batch)
            loss = train_step(model, images, targets, optimisation, hardware)
            log.add(state.iteration + 1, loss, optimisation.optimizer.param_groups[0]["lr"],
                    len(images))
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
) -> tuple[Evaluator, dict | None]:
    """Score full-resolution predictions on every val image (summed over ranks).

    Returns the evaluator and, for the TensorBoard grid, the first batch's tensors.
    """
    model.eval()
    evaluator = Evaluator(num_classes, device=hardware.device)
    first = None
    for batch in tqdm(loader, desc="val", disable=not show_progress, dynamic_ncols=True):
        if "image" not in batch:
            continue
        image, target = hardware.inputs(batch)
        # The prediction inference.py writes for the same image (one shared function).
        with hardware.autocast():
            prediction = predict_labels(model, image, tuple(target.shape[-2:]), scales, flip)
        evaluator.add_batch(target, prediction)
        if first is None:
            first = {"image": F.interpolate(image.float(), size=tuple(target.shape[-2:]),
                                            mode="bilinear", align_corners=False).cpu(),
                     "target": target.cpu(), "prediction": prediction.cpu()}
    evaluator.all_reduce()
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
    return TrainState(epoch=checkpoint["iteration"] // iters_per_epoch,
                      iteration=checkpoint["iteration"], best_pred=checkpoint["best_pred"])


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


def evaluate_and_report(*, model: nn.Module, loader: torch.utils.data.DataLoader,
                        class_names: list[str], hardware: Hardware, scales: list[float],
                        flip: bool, context: DistributedContext, header: str | None = None,
                        ) -> tuple[dict, dict | None]:
    """Evaluate and print the per-class table on rank 0 (after ``header``).

    Returns the metrics of :meth:`Evaluator.results` and the first batch (see :func:`evaluate`).
    """
    evaluator, first = evaluate(model=model, loader=loader, num_classes=len(class_names),
                                hardware=hardware, scales=scales, flip=flip,
                                show_progress=context.is_main)
    if context.is_main:
        if header:
            print(header)
        print(evaluator.format_table(class_names))
    return evaluator.results(class_names), first


def evaluate_checkpoint(*, model: nn.Module, loader: torch.utils.data.DataLoader, settings: dict,
                        hardware: Hardware, scales: list[float], flip: bool,
                        context: DistributedContext, json_path: str) -> dict:
    """Score a checkpoint's model (``--eval-only``) and write its metrics to ``json_path``."""
    results, _ = evaluate_and_report(model=model, loader=loader,
                                     class_names=settings["class_names"], hardware=hardware,
                                     scales=scales, flip=flip, context=context)
    if context.is_main:
        atomic_write_text(json_path, json.dumps(results, indent=2, sort_keys=True))
        print(f"metrics written to {json_path}")
    return {"metrics": results}


def log_evaluation(results: dict, first: dict | None, *, state: TrainState, settings: dict,
                   saver: Saver | None, summary: TensorboardSummary | None) -> None:
    """TensorBoard scalars and image grid, and metrics.json, for one evaluation (rank 0)."""
    if saver is None or summary is None:
        return
    summary.log_metrics(results, state.iteration, settings["class_names"])
    if first is not None:
        summary.visualize(first["image"], first["target"], first["prediction"],
                          palette=settings["palette"], mean=settings["mean"],
                          std=settings["std"], step=state.iteration)
    atomic_write_text(os.path.join(saver.experiment_dir, "metrics.json"),
                      json.dumps(dict(results, epoch=state.epoch, iteration=state.iteration),
                                 indent=2, sort_keys=True))


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
    settings, summary = checkpointer.settings, checkpointer.summary
    last_results = None
    with StopFlag().installed() as stop:
        while state.iteration < loop.total_iters:
            state.epoch = state.iteration // loop.iters_per_epoch
            train_sampler.set_epoch(state.epoch, start=(
                state.iteration % loop.iters_per_epoch) * loop.batch_size)
            skipped = train_one_epoch(
                model=model, optimisation=optimisation, loader=train_loader, hardware=hardware,
                state=state, iters_per_epoch=loop.iters_per_epoch,
                print_freq=max(loop.print_freq, 1), save_interval=loop.save_interval,
                save=functools.partial(checkpointer.save, state), summary=summary, stop=stop,
                context=context, show_progress=context.is_main)
            if skipped and context.is_main:
                print(f"epoch {state.epoch}: skipped {skipped} bad samples (--skip-bad-images)")
            is_best = False
            broadcast_buffers(plain_model, context)
            if ((state.epoch + 1) % max(loop.eval_interval, 1) == 0
                    or state.iteration >= loop.total_iters):
                last_results, first = evaluate_and_report(
                    model=plain_model, loader=val_loader, class_names=settings["class_names"],
                    hardware=hardware, scales=list(loop.eval_scales), flip=loop.eval_flip,
                    context=context, header=f"epoch {state.epoch} (iteration {state.iteration}):")
                miou = last_results["mean_iou"]  # None when nothing could be scored
                is_best = miou is not None and miou > state.best_pred
                state.best_pred = miou if is_best else state.best_pred
                log_evaluation(last_results, first, state=state, settings=settings,
                               saver=checkpointer.saver, summary=summary)
            checkpointer.save(state, is_best=is_best)
    if context.enabled:  # DDP must have kept the ranks identical
        same = ranks_in_sync(plain_model, context)
        if context.is_main:
            print(f"weights identical across {context.world_size} ranks: {'yes' if same else 'NO'}")
        if not same:
            raise RuntimeError("model weights differ across ranks after training")
    return last_results
