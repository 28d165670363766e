"""Stop signals: SIGINT, SIGTERM (and SLURM's warning signal, ``train.py --requeue-signal``) set
a flag that the training loop reads at step boundaries, so that a run saves its state and exits
instead of dying mid-write."""
from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator


class Interrupted(Exception):
    """A stop signal arrived; a checkpoint was saved and the run exits."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopFlag:
    """Set by SIGINT, SIGTERM or one of ``extra_signals``; the loop saves and exits at the next
    iteration boundary."""

    def __init__(self, extra_signals: tuple[int, ...] = ()) -> None:
        self.signum: int | None = None
        self.signals = (signal.SIGINT, signal.SIGTERM, *extra_signals)

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def is_set(self) -> bool:
        return self.signum is not None

    def interrupted(self) -> Interrupted:
        """The exception that ends the run (SIGTERM when another rank was signalled)."""
        return Interrupted(self.signum or signal.SIGTERM)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        """Catch the stop signals with this flag inside the block; restore the old handlers."""
        previous = {s: signal.signal(s, self) for s in self.signals}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
