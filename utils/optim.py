"""What one training step uses besides the model and the batch: the loss, SGD with the head at
10x the backbone's learning rate, the per-iteration schedule, and a GradScaler for fp16."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

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
