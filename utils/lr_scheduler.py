"""Per-iteration learning-rate schedules (poly, step, cosine) with optional linear warmup.

The scheduler is stepped once per training iteration, after ``optimizer.step()``. With base
learning rate ``b`` (each parameter group keeps its own, e.g. backbone 1x and head 10x),
iteration ``t`` (0-based; the rate is the one used FOR iteration ``t``), ``W`` warmup iterations,
``s = min(t - W, S)`` and ``S = total_iters - W``:

- warmup, ``t < W``: ``b * (f + (1 - f) * t / W)`` with ``f = warmup_factor``;
- ``poly``: ``b * (1 - s / S) ** power`` (DeepLab's poly_lr);
- ``step``: ``b * gamma ** (t // step_size)``, ``step_size`` in iterations counted from ``t = 0``;
- ``cos``: ``b * 0.5 * (1 + cos(pi * s / S))``.

The scheduler's ``state_dict()`` holds only plain Python values, so it travels in a checkpoint
loaded with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

logger = logging.getLogger(__name__)

#: Names accepted by :func:`build_lr_scheduler` (``train.py`` takes its choices from here).
SCHEDULERS = ("poly", "step", "cos")

#: Attributes that define the schedule; a resumed run reports when the checkpoint's differ.
_SCHEDULE_KEYS = (
    "name", "total_iters", "warmup_iters", "warmup_factor", "power", "step_size", "gamma",
)


def _lr_factor(
    iteration: int,
    *,
    name: str,
    total_iters: int,
    warmup_iters: int,
    warmup_factor: float,
    power: float,
    step_size: int,
    gamma: float,
) -> float:
    """The multiplier of the base learning rate for 0-based ``iteration`` (see module docstring)."""
    if iteration < warmup_iters:
        return warmup_factor + (1.0 - warmup_factor) * iteration / warmup_iters
    if name == "step":
        return gamma ** (iteration // step_size)
    schedule_length = total_iters - warmup_iters
    # Past the end the rate stays at its final value instead of going negative (poly) or back
    # up (cos).
    progress = min(iteration - warmup_iters, schedule_length) / schedule_length
    if name == "poly":
        return (1.0 - progress) ** power
    if name == "cos":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(_unknown_schedule(name))


def _unknown_schedule(name: str) -> str:
    return f"unknown learning-rate schedule {name!r}; choose one of {', '.join(SCHEDULERS)}"


class WarmupLRScheduler(LRScheduler):
    """Poly, step or cosine decay after an optional linear warmup, stepped per iteration.

    Prefer :func:`build_lr_scheduler`, which validates the arguments. All attributes are plain
    ``int``/``float``/``str`` values so the state dict is safe to load with ``weights_only=True``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        name: str,
        total_iters: int,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        power: float = 0.9,
        step_size: int = 0,
        gamma: float = 0.1,
    ):
        self.name = name
        self.total_iters = int(total_iters)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.power = float(power)
        self.step_size = int(step_size)
        self.gamma = float(gamma)
        super().__init__(optimizer)  # at iteration 0: a resume loads its state_dict

    def _factor(self, iteration: int) -> float:
        return _lr_factor(iteration, **{key: getattr(self, key) for key in _SCHEDULE_KEYS})

    def get_lr(self) -> list[Any]:
        """Learning rates for iteration ``self.last_epoch``, one per parameter group."""
        factor = self._factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    # Closed form: step(epoch) jumps straight to an iteration.
    _get_closed_form_lr = get_lr

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the iteration and write the resumed iteration's rate into the optimizer.

        The schedule this scheduler was built with (the resumed run's flags: ``--epochs``,
        ``--lr-scheduler``, ``--lr``, ...) wins over the checkpoint's, so a run resumed for more
        epochs continues along the curve of the new length instead of training the extra
        iterations at the old curve's end (rate 0 for poly), and one resumed with another base
        rate (``base_lrs``) trains at that rate's point of the curve. A warning names what
        changed.
        """
        schedule = {key: getattr(self, key) for key in (*_SCHEDULE_KEYS, "base_lrs")}
        changed = [
            f"{key} {state_dict[key]!r} -> {value!r}"
            for key, value in schedule.items()
            if key in state_dict and state_dict[key] != value
        ]
        super().load_state_dict(state_dict)
        for key, value in schedule.items():
            setattr(self, key, value)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base_lr  # what a scheduler built on this optimizer would read
        if changed:
            logger.warning(
                "learning-rate schedule changed since the checkpoint (%s): continuing at "
                "iteration %d of the new schedule", ", ".join(changed), self.last_epoch
            )
        # Without this the optimizer would use the rate of iteration 0 (set when this scheduler was
        # built) until the next step() if its own state was not loaded.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            if isinstance(group["lr"], Tensor):  # capturable optimizers keep lr as a tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [
            group["lr"].clone() if isinstance(group["lr"], Tensor) else group["lr"]
            for group in self.optimizer.param_groups
        ]


def build_lr_scheduler(
    optimizer: Optimizer,
    name: str,
    total_iters: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    power: float = 0.9,
    step_size: int = 0,
    gamma: float = 0.1,
) -> LRScheduler:
    """Build a per-iteration schedule; the optimizer's rates become those of iteration 0.

    Args:
        optimizer: its param groups' current ``lr`` values are the base rates.
        name: one of :data:`SCHEDULERS`.
        total_iters: length of training in iterations (epochs x iterations per epoch).
        warmup_iters: iterations of linear warmup from ``warmup_factor * b`` towards ``b``.
        warmup_factor: start of the warmup as a fraction of the base rate, in ``[0, 1]``.
        power: exponent of ``poly``.
        step_size: ``step`` only: iterations between decays (> 0).
        gamma: ``step`` only: multiplier applied at each decay.

    Raises:
        ValueError: unknown ``name`` (the message lists the choices) or inconsistent lengths.
    """
    if name not in SCHEDULERS:
        raise ValueError(_unknown_schedule(name))
    if total_iters < 1:
        raise ValueError(f"total_iters must be >= 1, got {total_iters}")
    if not 0 <= warmup_iters < total_iters:
        raise ValueError(
            f"warmup_iters must be in [0, total_iters = {total_iters}), got {warmup_iters}"
        )
    if not 0.0 <= warmup_factor <= 1.0:
        raise ValueError(f"warmup_factor must be in [0, 1], got {warmup_factor}")
    if name == "step" and step_size <= 0:
        raise ValueError(f"the step schedule needs step_size > 0 (in iterations), got {step_size}")
    return WarmupLRScheduler(
        optimizer,
        name=name,
        total_iters=total_iters,
        warmup_iters=warmup_iters,
        warmup_factor=warmup_factor,
        power=power,
        step_size=step_size,
        gamma=gamma,
    )


def step_schedule(scheduler: LRScheduler) -> None:
    """Advance the learning-rate schedule by one iteration, whether or not the step before
    updated the weights (a GradScaler skip, a skipped bad batch), as torchvision's reference
    does: the schedule is a function of the iteration (see ``train.train_step``).

    PyTorch warns when the first ``scheduler.step()`` comes before any ``optimizer.step()``,
    which in fp16 is the rule rather than a mistake (the first steps of a new model overflow
    until the scale comes down): that warning is silenced, here only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` "
                                r"before `optimizer\.step\(\)`")
        scheduler.step()
