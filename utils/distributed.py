"""Process-group plumbing for runs launched by torchrun or SLURM's srun (one process per GPU, or
per CPU slot)."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist

from utils.slurm import env_int, slurm_task

logger = logging.getLogger(__name__)

_Decided = TypeVar("_Decided")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size``, on GPU ``local_rank`` if any."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: Collective timeout: rank 0's first start (the COCO index, class weights over 118k masks) can
#: keep the other ranks at a barrier far longer than PyTorch's default 10 minutes.
DEFAULT_TIMEOUT_MINUTES = 60


def launch_context(environ: Mapping[str, str]) -> tuple[DistributedContext, str | None]:
    """Where the launcher placed this process, and the process group's ``init_method``.

    torchrun's RANK / WORLD_SIZE / LOCAL_RANK come first (also when torchrun itself runs inside
    an srun task); else an srun step of several tasks gives SLURM_PROCID / SLURM_NTASKS /
    SLURM_LOCALID and a ``tcp://`` rendezvous on the step's first node (see
    :meth:`utils.slurm.SlurmTask.rendezvous`). Anything else is one process (init_method None).
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env_int(environ, "MASTER_PORT", 0)  # read by env://: checked here, in one line
        return DistributedContext(rank=env_int(environ, "RANK"),
                                  world_size=env_int(environ, "WORLD_SIZE"),
                                  local_rank=env_int(environ, "LOCAL_RANK", 0)), "env://"
    task = slurm_task(environ)
    if task is None or task.world_size < 2:
        return DistributedContext(), None
    address, port = task.rendezvous(environ)
    host = f"[{address}]" if ":" in address else address  # an IPv6 address
    return (DistributedContext(rank=task.rank, world_size=task.world_size,
                               local_rank=task.local_rank), f"tcp://{host}:{port}")


def init_distributed(use_cuda: bool,
                     timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistributedContext:
    """Join the process group torchrun (RANK / WORLD_SIZE / LOCAL_RANK) or an ``srun`` step of
    several tasks (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) describes; see
    :func:`launch_context`.

    Without those variables this is a single-process run and nothing is initialised. NCCL is used
    when the process drives a GPU, gloo on CPU; a collective that waits longer than
    ``timeout_minutes`` fails instead of hanging.
    """
    context, init_method = launch_context(os.environ)
    if init_method is None:
        return context
    if use_cuda:
        torch.cuda.set_device(context.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method=init_method,
                                rank=context.rank, world_size=context.world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    logger.info("process %d of %d (local rank %d, %s)", context.rank, context.world_size,
                context.local_rank, init_method)
    return context


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_process_first(context: DistributedContext) -> Iterator[None]:
    """Rank 0 runs the block first (it may write caches or generated data), the others after."""
    if not context.is_main:
        barrier(context)
    yield
    if context.is_main:
        barrier(context)


def any_true(flag: bool, context: DistributedContext, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (so all ranks stop together)."""
    if not context.enabled:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def any_true_each(flags: tuple[bool, ...], context: DistributedContext,
                  device: torch.device) -> tuple[bool, ...]:
    """:func:`any_true` of several flags in one collective."""
    return tuple(bool(value) for value in max_each(tuple(map(int, flags)), context, device))


def max_each(values: tuple[int, ...], context: DistributedContext,
             device: torch.device) -> tuple[int, ...]:
    """The largest of each value over all ranks, in one collective (the values unchanged in a
    single process)."""
    if not context.enabled:
        return tuple(values)
    tensor = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(int(value) for value in tensor.tolist())


def broadcast_buffers(module: torch.nn.Module, context: DistributedContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step each
    rank holds statistics updated by its own batch; evaluating or saving after this call gives
    the same numbers on every rank as rank 0's checkpoint gives in a single process.
    """
    if context.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def decided_by_main(decide: Callable[[], _Decided], context: DistributedContext) -> _Decided:
    """``decide()`` run by rank 0 alone, its result (or the exception it raised) given to every
    rank: a decision that reads files other ranks are about to change is made once, before
    any of them changes anything."""
    if not context.enabled:
        return decide()
    outcome: list = [None]
    failure = None
    if context.is_main:
        try:
            outcome[0] = ("result", decide())
        except Exception as error:  # every rank must leave the broadcast, then fail alike
            failure = error
            try:
                pickle.dumps(error)
            except Exception:  # noqa: BLE001 - an exception that cannot travel: its message
                error = RuntimeError(f"rank 0: {type(error).__name__}: {error}")
            outcome[0] = ("error", error)
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise failure or value
    return value


def cleanup(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def ranks_in_sync(model: torch.nn.Module, context: DistributedContext) -> bool:
    """Whether every rank holds the same parameters and buffers (compared by their sums)."""
    if not context.enabled:
        return True
    local = torch.stack([t.detach().double().sum() for t in model.state_dict().values()
                         if t.is_floating_point()])
    gathered = [torch.empty_like(local) for _ in range(context.world_size)]
    dist.all_gather(gathered, local)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def check_ranks_in_sync(model: torch.nn.Module, context: DistributedContext) -> None:
    """After training under DDP every rank must hold the same weights: rank 0 says so (stdout),
    every rank fails when they differ.

    Raises:
        RuntimeError: the weights differ across ranks (a bug, not a user's error).
    """
    if not context.enabled:
        return
    same = ranks_in_sync(model, context)
    if context.is_main:
        print(f"weights identical across {context.world_size} ranks: {'yes' if same else 'NO'}")
    if not same:
        raise RuntimeError("model weights differ across ranks after training")
