"""The plan of a training run: batch, learning rate, how many iterations, and how often the
loop logs, saves and evaluates. One :class:`TrainPlan` carries these numbers to every part of
the loop, so that none keeps its own copy."""
from __future__ import annotations

from dataclasses import dataclass

from utils.errors import UserError
from utils.hardware import Placement, dataparallel_chunks, usable_batch_size

#: Images per device when the batch size is not given.
DEFAULT_BATCH_PER_DEVICE = 4
#: Linear scaling rule when the learning rate is not given: 0.01 for 16 images per step.
REFERENCE_LR, REFERENCE_BATCH = 0.01, 16


@dataclass(frozen=True)
class TrainPlan:
    """How long and how fast a run trains, and how often it reports.

    Attributes:
        batch_size: images per step in this process.
        total_batch: images per step over all processes.
        lr: backbone learning rate; the head gets 10x.
        epochs: epochs of the whole run (resumed runs included).
        iters_per_epoch: optimiser steps per epoch in every process.
        print_freq: iterations between log points (TensorBoard writes, NaN checks, and under
            DDP the ranks' agreement on a stop signal).
        save_interval: also save every this many iterations (0: at epoch ends only).
        eval_interval: evaluate every this many epochs (and after the last).
    """

    batch_size: int
    total_batch: int
    lr: float
    epochs: int
    iters_per_epoch: int
    print_freq: int = 20
    save_interval: int = 0
    eval_interval: int = 1

    @property
    def total_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    def epoch_of(self, iteration: int) -> int:
        """The epoch that optimiser step ``iteration + 1`` belongs to."""
        return iteration // self.iters_per_epoch

    def evaluates_after(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with an evaluation."""
        return (epoch + 1) % max(self.eval_interval, 1) == 0 or epoch + 1 >= self.epochs

    def __str__(self) -> str:
        return (f"{self.epochs} epochs x {self.iters_per_epoch} iterations of {self.total_batch} "
                f"images, lr {self.lr:g} (head {10 * self.lr:g})")


def resolve_plan(*, train_size: int, batch_size: int | None, epochs: int, lr: float | None,
                 placement: Placement, print_freq: int = 20, save_interval: int = 0,
                 eval_interval: int = 1) -> TrainPlan:
    """Resolve the batch size (default 4 per device), the learning rate (default: the linear
    scaling rule on the total batch) and the iterations per epoch.

    Args:
        train_size: images in the train split.
        placement: this process's DataParallel devices (1 on a CPU or under torchrun) and the
            number of processes training together.

    Raises:
        UserError: a batch DataParallel would split into a chunk of 1 (the ASPP image-pooling
            BatchNorm needs 2 per device), or fewer training images than one batch.
    """
    devices, world_size = placement.hardware.devices_per_process, placement.context.world_size
    batch_size = DEFAULT_BATCH_PER_DEVICE * devices if batch_size is None else batch_size
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
    return TrainPlan(batch_size=batch_size, total_batch=total_batch, lr=lr, epochs=epochs,
                     iters_per_epoch=iters_per_epoch, print_freq=max(print_freq, 1),
                     save_interval=save_interval, eval_interval=eval_interval)
