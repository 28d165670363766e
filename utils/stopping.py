"""When a training run stops: on a stop signal (saved first, then :class:`Interrupted`), on a
loss that is not finite (nothing saved after it), and how the processes of a DDP run agree on
either so that none is left waiting in a collective.

:class:`StepBoundary` runs between two training steps; :func:`eval_stop_requested` between two
evaluation batches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from utils.distributed import max_each
from utils.hardware import Placement
from utils.losses import NonFiniteLoss
from utils.plan import TrainPlan
from utils.signals import StopFlag

if TYPE_CHECKING:
    from utils.run_folder import Checkpointer, TrainProgress
    from utils.summaries import TrainLog

#: Under DDP the ranks compare stop flags every this many evaluation batches (a collective).
EVAL_STOP_CHECK_INTERVAL = 10


class StepBoundary:
    """What happens between two training steps: the losses are logged (and checked for NaN)
    every ``plan.print_freq`` steps and before every save, the progress is saved every
    ``plan.save_interval`` steps, and on a stop signal it is saved and :class:`Interrupted`
    raised. A stop at an epoch's end saves that epoch's evaluation as owed
    (``progress.eval_pending``) when one is due, so the resumed run gives it.

    One process reads its stop flag at every boundary. Under DDP the ranks compare their stop
    and NaN flags at log points and interval saves (one collective), so that they stop, or fail,
    at the same step: a rank leaving alone would keep the others waiting in the next all-reduce.
    Rank 0 does not wait for that to save after its own signal: every rank holds the same
    weights after a step, and a launcher's SIGKILL follows its SIGTERM within seconds.
    """

    def __init__(self, *, plan: TrainPlan, log: TrainLog, stop: StopFlag,
                 checkpointer: Checkpointer, placement: Placement) -> None:
        self.plan, self.log, self.stop, self.checkpointer = plan, log, stop, checkpointer
        self.context, self.device = placement.context, placement.hardware.device
        self.saved_since_stop = False
        self.nonfinite: NonFiniteLoss | None = None  # seen here, not yet agreed on

    def after_step(self, progress: TrainProgress) -> None:
        """Called after optimiser step ``progress.iteration``.

        Raises:
            NonFiniteLoss: a loss since the last check was NaN or infinite (on any rank).
            Interrupted: a stop signal arrived (at any rank); the progress was saved first.
        """
        plan, context, stop = self.plan, self.context, self.stop
        at_epoch_end = progress.iteration % plan.iters_per_epoch == 0
        at_log_point = progress.iteration % plan.print_freq == 0 or at_epoch_end
        save_due = bool(plan.save_interval) and progress.iteration % plan.save_interval == 0 \
            and not at_epoch_end  # epoch ends are saved by main, after the evaluation
        save_on_signal = stop.is_set and context.is_main and not self.saved_since_stop
        if not (at_log_point or save_due or save_on_signal):
            return
        try:
            self.log.flush(progress.iteration)
        except NonFiniteLoss as error:
            self.nonfinite = self.nonfinite or error
        agreed = not context.enabled or at_log_point or save_due
        stopping = stop.is_set and agreed
        if agreed and context.enabled:
            nonfinite, signal_precedence = max_each(
                (int(self.nonfinite is not None), stop.precedence), context, self.device)
            stop.adopt(signal_precedence)  # rank 0 requeues whichever rank was warned
            # What the ranks agreed on, not this rank's flag: a signal landing while it waited
            # in the all-reduce is read at the next agreement, by every rank together.
            stopping = signal_precedence > 0
            if nonfinite and self.nonfinite is None:
                self.nonfinite = NonFiniteLoss(f"loss is not finite on another rank, by "
                                               f"iteration {progress.iteration}")
        if agreed and self.nonfinite is not None:
            raise self.nonfinite
        progress.eval_pending = at_epoch_end and plan.evaluates_after(progress.epoch)
        if save_due or ((stop.is_set or stopping) and not self.saved_since_stop):
            # Unagreed, rank 0 cannot know of another rank's NaN but by the shared weights.
            if agreed or (self.nonfinite is None and _finite(self.checkpointer.model)):
                self.checkpointer.save(progress)
                self.saved_since_stop = stop.is_set or stopping
        if stopping:
            raise stop.interrupted()


def _finite(model: nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def eval_stop_requested(stop: StopFlag | None, index: int, common_batches: int,
                        placement: Placement) -> bool:
    """Whether evaluation should stop before batch ``index``. One process reads its flag; DDP
    ranks agree every :data:`EVAL_STOP_CHECK_INTERVAL` batches, while every rank still has
    batches (``common_batches``), so that all of them take part in the collective."""
    if stop is None:
        return False
    if not placement.context.enabled:
        return stop.is_set
    if index % EVAL_STOP_CHECK_INTERVAL or index >= common_batches:
        return False
    agreed = max_each((stop.precedence,), placement.context, placement.hardware.device)[0]
    stop.adopt(agreed)
    return agreed > 0  # not stop.is_set: a signal during the all-reduce waits for the next one
