"""What one training step uses besides the model and the batch: the loss, SGD with the head at
10x the backbone's learning rate, the per-iteration schedule, and a GradScaler for fp16."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from utils.losses import DEFAULT_TOP_K, LOSSES, loss_spec, top_k_fraction
from utils.lr_scheduler import SCHEDULERS
from utils.plan import DEFAULT_BATCH_PER_DEVICE, REFERENCE_BATCH, REFERENCE_LR
from utils.errors import UserError

logger = logging.getLogger(__name__)

#: SGD settings the flags give (``--momentum``, ``--weight-decay``, ``--nesterov``); the learning
#: rate is the schedule's (:mod:`utils.lr_scheduler`).
FLAG_HYPERPARAMETERS = ("momentum", "weight_decay", "nesterov")


@dataclass
class Optimisation:
    """The loss (taking the model's output dict), optimiser, schedule and fp16 scaler."""

    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None

    @property
    def lr(self) -> float:
        """The backbone's learning rate for the next step."""
        return self.optimizer.param_groups[0]["lr"]


def build_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float,
                    nesterov: bool) -> torch.optim.SGD:
    """SGD over two groups: the backbone at ``lr``, the head (ASPP, decoder, aux) at ``10 * lr``.

    Args:
        model: a :class:`modeling.deeplab.DeepLab` (its ``backbone_parameters`` and
            ``head_parameters`` split the rates).
    """
    return torch.optim.SGD(
        [{"params": list(model.backbone_parameters()), "lr": lr},
         {"params": list(model.head_parameters()), "lr": lr * 10}],
        lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A GradScaler when autocasting to fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict,
                         iteration: int) -> list[str]:
    """Load a checkpoint's optimiser state (momentum buffers), keeping this optimiser's
    :data:`FLAG_HYPERPARAMETERS`: a run resumed with another ``--momentum``, ``--weight-decay`` or
    ``--nesterov`` trains with them from the checkpoint's iteration on, as it does with another
    ``--epochs`` or ``--lr`` (``Optimizer.load_state_dict`` alone would bring back the old values
    while settings.json records the new ones). A warning names what changed.

    Returns:
        The changes, as ``"momentum 0.9 -> 0.8"``.
    """
    wanted = [{key: group[key] for key in FLAG_HYPERPARAMETERS} for group in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    changed = []
    for group, values in zip(optimizer.param_groups, wanted, strict=True):
        for key, value in values.items():
            if group[key] != value:
                change = f"{key} {group[key]!r} -> {value!r}"
                changed += [change] * (change not in changed)
                group[key] = value
    if changed:
        logger.warning("optimiser settings changed since the checkpoint (%s): applied from "
                       "iteration %d on", ", ".join(changed), iteration)
    return changed


def check_optimisation_flags(flags: Mapping[str, Any]) -> None:
    """The SGD and schedule settings torch would refuse, refused first in one line naming the
    flags (``flags``: train.py's, ``vars(args)``).

    Raises:
        UserError: a negative ``--lr``, ``--momentum`` or ``--weight-decay``, ``--nesterov``
            without momentum, or a step schedule without a positive ``--lr-step``.
    """
    if flags["lr_scheduler"] == "step" and flags["lr_step"] <= 0:
        raise UserError(f"--lr-step must be a positive number of epochs, got {flags['lr_step']}")
    for name in ("lr", "momentum", "weight_decay"):
        if flags[name] is not None and not flags[name] >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be at least 0, got {flags[name]}")
    if flags["nesterov"] and flags["momentum"] == 0:
        raise UserError("--nesterov needs a positive --momentum (it is 0): drop --nesterov or set "
                        "--momentum")


def add_optimisation_args(parser: argparse.ArgumentParser, *, default_epochs: str) -> None:
    """train.py's flags for the loss, SGD, the schedule and the run's length (``default_epochs``
    says what ``--epochs`` defaults to)."""
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help=f"default: {default_epochs}")
    optim.add_argument("--batch-size", type=int, help=f"images per step in this process "
                       f"(default {DEFAULT_BATCH_PER_DEVICE} per GPU used by it)")
    optim.add_argument("--lr", type=float, help=f"backbone learning rate; the head gets 10x "
                       f"(default {REFERENCE_LR} x total batch / {REFERENCE_BATCH})")
    optim.add_argument("--lr-scheduler", default="poly", choices=SCHEDULERS)
    optim.add_argument("--lr-step", type=int, default=10, help="epochs between step decays")
    optim.add_argument("--lr-gamma", type=float, default=0.1, help="step decay factor")
    optim.add_argument("--warmup-iters", type=int, default=0, help="linear warm-up iterations")
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight-decay", type=float, default=1e-4)
    optim.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False)
    optim.add_argument("--loss-type", default="ce", type=loss_spec, metavar="SPEC",
                       help=f"loss: one of {', '.join(LOSSES)}, or a weighted sum of them written "
                       f"[WEIGHT*]NAME+[WEIGHT*]NAME, e.g. ce+dice or 0.5*ce+1.0*dice")
    optim.add_argument("--focal-gamma", type=float, default=2.0,
                       help="focusing exponent of the focal loss")
    optim.add_argument("--ohem-top-k", type=top_k_fraction, default=DEFAULT_TOP_K,
                       metavar="FRACTION",
                       help="ohem loss: the fraction of scored pixels with the largest "
                       "cross-entropy that it averages (detectron2's DeepLab: 0.2)")
