"""What a process learns from SLURM: which task of an ``srun`` step it is, where that step's rank
0 listens, and how to ask for the job to be requeued before its time runs out.

``srun`` starts one process per task and describes it through ``SLURM_*`` variables; the batch
script itself (``sbatch`` running ``python train.py`` directly) is no step and stays one process.
"""
from __future__ import annotations

import argparse
import logging
import re
import signal
import subprocess
from dataclasses import dataclass
from typing import Mapping

from utils.errors import UserError

logger = logging.getLogger(__name__)

#: The signal SLURM sends ahead of the time limit in the example batch script
#: (``#SBATCH --signal=USR1@120``); ``train.py --requeue-signal`` changes it.
DEFAULT_REQUEUE_SIGNAL = signal.SIGUSR1

#: Rendezvous ports are ``PORT_BASE + job id % PORT_SPAN``: below Linux's ephemeral ports
#: (32768 and up), and different for jobs that share a node unless their ids are PORT_SPAN apart.
PORT_BASE, PORT_SPAN = 15000, 10000

#: Signals the loop already stops on, or that no process can catch.
_RESERVED = {signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def _expand_ranges(spec: str, hostlist: str) -> list[str]:
    """``01-03,7`` -> ``["01", "02", "03", "7"]``: each range keeps its low bound's width."""
    numbers = []
    for part in spec.split(","):
        low, dash, high = part.partition("-")
        high = high if dash else low
        if not low.isdigit() or not high.isdigit() or int(high) < int(low):
            raise ValueError(f"invalid range {part!r} in hostlist {hostlist!r}")
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return numbers


def _split_top_level(hostlist: str) -> list[str]:
    """Split at the commas outside brackets: ``n[1,3],m`` -> ``["n[1,3]", "m"]``."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(hostlist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in hostlist {hostlist!r}")
        if char == "," and depth == 0:
            items.append(hostlist[start:index])
            start = index + 1
    if depth:
        raise ValueError(f"unbalanced brackets in hostlist {hostlist!r}")
    return items + [hostlist[start:]]


def expand_hostlist(hostlist: str) -> list[str]:
    """The host names of a SLURM host list, in order, as ``scontrol show hostnames`` lists them.

    ``node[01-03,7],gpu5`` -> ``node01 node02 node03 node7 gpu5``; several bracket groups in one
    name give their product (``a[1-2]b[3-4]`` -> ``a1b3 a1b4 a2b3 a2b4``). Duplicates are kept
    and empty items dropped, as scontrol does.

    Raises:
        ValueError: unbalanced brackets, or a range that is empty, reversed or not numeric.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        item = item.strip()
        if not item:
            continue
        names = [""]
        position = 0
        for match in _BRACKETS.finditer(item):
            prefix = item[position:match.start()]
            names = [name + prefix + number for name in names
                     for number in _expand_ranges(match.group(1), hostlist)]
            position = match.end()
        hosts += [name + item[position:] for name in names]
    return hosts


@dataclass(frozen=True)
class SlurmTask:
    """One task of an ``srun`` step: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int
    job_id: str
    nodelist: str  # the step's nodes, in SLURM's compressed form

    def rendezvous(self, environ: Mapping[str, str]) -> tuple[str, int]:
        """``(address, port)`` where rank 0 listens: ``MASTER_ADDR`` / ``MASTER_PORT`` if set,
        else the step's first node (where srun places task 0) and a port from the job id."""
        address = environ.get("MASTER_ADDR") or expand_hostlist(self.nodelist)[0]
        if "MASTER_PORT" in environ:
            return address, env_int(environ, "MASTER_PORT")
        digits = re.sub(r"\D", "", self.job_id)
        return address, PORT_BASE + int(digits or 0) % PORT_SPAN


def env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    """The whole number in the environment variable ``name`` (``default`` when unset).

    Raises:
        UserError: the variable is empty or not a whole number (names it and its value).
    """
    text = environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except (TypeError, ValueError):
        raise UserError(f"environment variable {name}={text!r} is not a whole number: set it "
                        f"to one or unset it") from None


def slurm_task(environ: Mapping[str, str]) -> SlurmTask | None:
    """The ``srun`` task this process is, or None: not under SLURM, or not in a step (the batch
    script and ``salloc``'s shell carry ``SLURM_NTASKS`` of the whole job but run one process).
    """
    if "SLURM_STEP_ID" not in environ or "SLURM_PROCID" not in environ:
        return None
    return SlurmTask(
        rank=env_int(environ, "SLURM_PROCID"),
        world_size=env_int(environ, "SLURM_STEP_NUM_TASKS" if environ.get("SLURM_STEP_NUM_TASKS")
                           else "SLURM_NTASKS", 1),
        local_rank=env_int(environ, "SLURM_LOCALID", 0),
        job_id=environ.get("SLURM_JOB_ID", "0"),
        nodelist=(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                  or environ.get("SLURM_NODELIST") or "localhost"))


def parse_signal(name: str) -> signal.Signals:
    """``USR1``, ``SIGUSR1`` or ``10`` -> ``signal.SIGUSR1`` (argparse ``type=``)."""
    text = name.strip().upper()
    try:
        signum = signal.Signals(int(text)) if text.isdigit() else signal.Signals[
            text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown signal {name!r} (e.g. USR1, USR2)") from None
    if signum in _RESERVED:
        raise argparse.ArgumentTypeError(
            f"{signum.name} cannot be the requeue signal (SIGINT and SIGTERM already save and "
            f"exit): use e.g. USR1 or USR2")
    return signum


def requeue_job(environ: Mapping[str, str], *, scontrol: str = "scontrol") -> bool:
    """Ask SLURM to requeue this job (``scontrol requeue``); whether it accepted.

    A refusal (a job submitted with ``--no-requeue``, an interactive ``srun``, no ``scontrol``)
    is logged, not raised: the checkpoint is saved either way, and ``--auto-resume`` continues
    from it when the job is submitted again.
    """
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        logger.info("not running under SLURM: no job to requeue")
        return False
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    # Said first: SLURM ends this job's tasks (SIGTERM) as it requeues it, possibly before
    # scontrol returns here.
    logger.info("asking SLURM to requeue job %s", job_id)
    try:
        completed = subprocess.run([scontrol, "requeue", job_id], capture_output=True,
                                   text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("could not requeue job %s: %s", job_id, error)
        return False
    if completed.returncode != 0:
        logger.warning("could not requeue job %s: scontrol requeue exited %d: %s", job_id,
                       completed.returncode, (completed.stderr or completed.stdout).strip())
        return False
    logger.info("job %s requeued: it continues from the checkpoint when SLURM restarts it",
                job_id)
    return True
