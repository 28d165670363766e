"""Stop signals: SIGINT, SIGTERM (and SLURM's warning signal, ``train.py --requeue-signal``) set
a flag that the training loop reads at step boundaries, so that a run saves its state and exits
instead of dying mid-write; or, for scripts whose writes are atomic and run on threads
(inference, export), raise :class:`Interrupted` where the main thread is, so the script can let
the writes in flight finish and say where it stopped."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Interrupted(Exception):
    """A stop signal arrived: the run saves what it must and exits with ``exit_status``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """What a shell reports for a process this signal ended: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum


#: Above every signal number (Linux's go to 64): ranks an extra signal above the others.
_EXTRA = 128


class StopFlag:
    """Set by SIGINT, SIGTERM or one of ``extra_signals``; the loop saves and exits at the next
    iteration boundary."""

    def __init__(self, extra_signals: tuple[int, ...] = ()) -> None:
        self.signum: int | None = None
        self.signals = (signal.SIGINT, signal.SIGTERM, *extra_signals)
        self.extra_signals = tuple(extra_signals)

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def is_set(self) -> bool:
        return self.signum is not None

    @property
    def precedence(self) -> int:
        """This flag's signal as a number the ranks of a run compare (the largest wins): 0 for
        none, an extra signal (the requeue signal) above SIGINT and SIGTERM, so the run requeues
        when any rank was warned, whichever got the signal (delivery across nodes is skewed)."""
        if self.signum is None:
            return 0
        return self.signum + _EXTRA * (self.signum in self.extra_signals)

    def adopt(self, precedence: int) -> None:
        """Take the signal the ranks agreed on (:attr:`precedence` of the winning rank)."""
        if precedence:
            self.signum = precedence % _EXTRA

    def interrupted(self) -> Interrupted:
        """The exception that ends the run: this rank's signal, or the one the ranks agreed on
        (:meth:`adopt`); SIGTERM if neither is known."""
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


@contextlib.contextmanager
def raise_on_stop_signals() -> Iterator[None]:
    """Inside the block the first SIGINT or SIGTERM raises :class:`Interrupted` in the main
    thread (not a KeyboardInterrupt from deep inside a runtime, nor death mid-write); later ones
    are ignored while the caller cleans up. Outside the main thread the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
