"""utils.stopping: the ranks of a DDP run stop together on the signal one of them got, and the
requeue signal (SLURM's warning) outranks SIGTERM, so rank 0 requeues whichever rank was warned."""
from __future__ import annotations

import datetime
import signal
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.distributed import DistributedContext
from utils.hardware import Hardware, Placement
from utils.signals import Interrupted, StopFlag
from utils.stopping import StepBoundary, eval_stop_requested

CPU = Hardware(device=torch.device("cpu"), gpu_ids=[], amp_dtype=None, channels_last=False)
REQUEUE = signal.SIGUSR1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flag_with(signum: int | None) -> StopFlag:
    stop = StopFlag(extra_signals=(REQUEUE,))
    if signum is not None:
        stop(signum, None)
    return stop


def boundary(stop: StopFlag, placement: Placement) -> tuple[StepBoundary, list]:
    """A StepBoundary at a log point (every step is one) whose saves are recorded."""
    saves = []
    plan = SimpleNamespace(iters_per_epoch=100, print_freq=1, save_interval=0,
                           evaluates_after=lambda epoch: True)
    checkpointer = SimpleNamespace(save=saves.append, model=torch.nn.Linear(1, 1))
    log = SimpleNamespace(flush=lambda iteration: None)
    return StepBoundary(plan=plan, log=log, stop=stop, checkpointer=checkpointer,
                        placement=placement), saves


#: (name, each rank's signal, where the ranks check): one pair of processes runs them all.
SCENARIOS = [
    ("requeue to rank 1", [None, REQUEUE], "training"),
    ("SIGTERM to rank 0, requeue to rank 1", [signal.SIGTERM, REQUEUE], "training"),
    ("requeue to rank 0, SIGTERM to rank 1", [REQUEUE, signal.SIGTERM], "training"),
    ("SIGTERM to rank 1", [None, signal.SIGTERM], "training"),
    ("no signal", [None, None], "training"),
    ("requeue to rank 1 in evaluation", [None, REQUEUE], "evaluation"),
]


def _check(stop: StopFlag, placement: Placement, where: str) -> tuple:
    if where == "evaluation":
        return eval_stop_requested(stop, 0, 5, placement), stop.signum
    step, saves = boundary(stop, placement)
    try:
        step.after_step(SimpleNamespace(iteration=1, epoch=0, eval_pending=False))
        return False, None, len(saves)
    except Interrupted as error:
        return True, error.signum, len(saves)


def _stop_on_rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        placement = Placement(CPU, DistributedContext(rank=rank, world_size=2))
        for name, signals, where in SCENARIOS:
            results[name, rank] = _check(flag_with(signals[rank]), placement, where)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes() -> dict:
    """Each scenario's outcome on each of two gloo ranks: (stopped, signal[, saves])."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_stop_on_rank, args=(free_port(), results), nprocs=2,
                           start_method="spawn")
        return dict(results)


@pytest.mark.parametrize("name", ["requeue to rank 1", "SIGTERM to rank 0, requeue to rank 1",
                                  "requeue to rank 0, SIGTERM to rank 1"])
def test_every_rank_stops_on_the_requeue_signal_whichever_rank_got_it(outcomes, name):
    assert outcomes[name, 0] == (True, REQUEUE, 1)  # rank 0 saved, and raises the requeue signal
    assert outcomes[name, 1][:2] == (True, REQUEUE)


def test_a_sigterm_to_one_rank_stops_both_without_a_requeue(outcomes):
    assert outcomes["SIGTERM to rank 1", 0] == (True, signal.SIGTERM, 1)
    assert outcomes["SIGTERM to rank 1", 1][:2] == (True, signal.SIGTERM)


def test_evaluation_stops_on_the_requeue_signal_another_rank_got(outcomes):
    name = "requeue to rank 1 in evaluation"
    assert outcomes[name, 0] == (True, REQUEUE) and outcomes[name, 1] == (True, REQUEUE)


def test_without_a_signal_no_rank_stops(outcomes):
    assert outcomes["no signal", 0] == outcomes["no signal", 1] == (False, None, 0)


def test_the_requeue_signal_outranks_sigint_and_sigterm():
    assert flag_with(REQUEUE).precedence > flag_with(signal.SIGTERM).precedence \
        > flag_with(signal.SIGINT).precedence > flag_with(None).precedence == 0
    stop = flag_with(None)
    stop.adopt(flag_with(REQUEUE).precedence)
    assert stop.signum == REQUEUE and stop.interrupted().signum == REQUEUE


def signal_during_the_collective(stop: StopFlag, signum: int):
    """A max_each whose other ranks had no signal, while ``signum`` reaches this rank as it
    waits in the all-reduce: Python runs the handler as soon as the call returns."""
    def max_each(values, context, device):
        stop(signum, None)
        return tuple(values)
    return max_each


@pytest.mark.parametrize("where", ["training", "evaluation"])
def test_a_signal_during_the_collective_waits_for_the_next_agreement(monkeypatch, where):
    # The CI failure (torchrun, SIGTERM to rank 1, --print-freq 1): rank 1 read its own flag
    # just after the all-reduce that had agreed on "no stop", left alone, and rank 0 died in the
    # next forward's collective. Every rank must act on what they agreed, and stop at the next
    # agreement.
    import utils.stopping
    stop = flag_with(None)
    placement = Placement(CPU, DistributedContext(rank=1, world_size=2))
    monkeypatch.setattr(utils.stopping, "max_each", signal_during_the_collective(stop, signal.SIGTERM))
    if where == "evaluation":
        assert eval_stop_requested(stop, 0, 5, placement) is False
        monkeypatch.setattr(utils.stopping, "max_each", lambda values, context, device: values)
        assert eval_stop_requested(stop, 10, 50, placement) is True
        return
    step, _ = boundary(stop, placement)
    step.after_step(SimpleNamespace(iteration=1, epoch=0, eval_pending=False))  # no stop yet
    monkeypatch.setattr(utils.stopping, "max_each", lambda values, context, device: values)
    with pytest.raises(Interrupted) as raised:
        step.after_step(SimpleNamespace(iteration=2, epoch=0, eval_pending=False))
    assert raised.value.signum == signal.SIGTERM
