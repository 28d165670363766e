"""SLURM: the tasks of an ``srun`` step form the DDP group, and the warning signal ahead of a time
limit saves, requeues the job and lets ``--auto-resume`` continue it exactly.

The first part runs everywhere (host lists, launch variables, the signal flag, the requeue call).
The end-to-end part needs a SLURM that answers: ``scripts/slurm/local_cluster.sh start`` runs a
one-node cluster on this machine (``.ci/run`` does); elsewhere those tests skip with the reason,
and with ``DEEPLAB_REQUIRE_SLURM=1`` (CI) they fail instead.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import inference
import train
from dataloader.datasets.coco import COCOSegmentation
from dataloader.datasets.demo import generate_demo_dataset
from inference_testing import assert_same_masks
from utils.distributed import DistributedContext, launch_context
from utils.signals import Interrupted, StopFlag
from utils.slurm import expand_hostlist, parse_signal, requeue_job

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- host lists

HOSTLISTS = {
    "node[01-03,7],gpu5": ["node01", "node02", "node03", "node7", "gpu5"],
    "gpu5": ["gpu5"],
    "a,b,c": ["a", "b", "c"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],  # the low bound "8" has no leading zero
    "n[098-101]": ["n098", "n099", "n100", "n101"],  # "098": width 3
    "n[01-2]": ["n01", "n02"],
    "a[1-2]b[3-4]": ["a1b3", "a1b4", "a2b3", "a2b4"],
    "rack[1-2]-node[01-02]": ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"],
    "n[1-3,2]": ["n1", "n2", "n3", "n2"],  # duplicates stay
    "n[1-2],,m": ["n1", "n2", "m"],  # empty items go
    "c1,c[2-3]": ["c1", "c2", "c3"],
    " n1": ["n1"],
}


@pytest.mark.parametrize("hostlist", HOSTLISTS)
def test_expand_hostlist_by_hand(hostlist):
    assert expand_hostlist(hostlist) == HOSTLISTS[hostlist]


@pytest.mark.parametrize("hostlist", ["n[3-1]", "n[]", "n[a-c]", "n[1-2", "n1]", "n[1-[2]]",
                                      "n[1-]"])
def test_expand_hostlist_refuses_malformed_lists(hostlist):
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(hostlist)


def test_expand_hostlist_agrees_with_scontrol(tmp_path):
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        pytest.skip("scontrol not installed (apt-get install slurm-client): compared by hand only")
    # scontrol reads a configuration even to expand a list; a minimal one needs no daemon.
    config = tmp_path / "slurm.conf"
    config.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\n")
    env = dict(os.environ, SLURM_CONF=str(config))
    for hostlist, expected in HOSTLISTS.items():
        completed = subprocess.run([scontrol, "show", "hostnames", hostlist], env=env,
                                   capture_output=True, text=True, timeout=30)
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.split() == expected == expand_hostlist(hostlist), hostlist


# --------------------------------------------------------------------------- launch variables

#: Task 5 of a 16-task step of job 123456 on gpu07 and gpu08 (8 tasks each).
SRUN_TASK = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}


def test_srun_task_is_a_rank_with_a_rendezvous_on_the_first_node():
    context, init_method = launch_context(SRUN_TASK)
    assert context == DistributedContext(rank=5, world_size=16, local_rank=5)
    assert init_method == "tcp://gpu07:18456"  # 15000 + 123456 % 10000


def test_second_task_on_the_second_node():
    environ = dict(SRUN_TASK, SLURM_PROCID="9", SLURM_LOCALID="1")
    assert launch_context(environ) == (DistributedContext(rank=9, world_size=16, local_rank=1),
                                       "tcp://gpu07:18456")


def test_world_size_is_the_steps_task_count_not_the_jobs():
    # srun -n 8 inside a 16-task job: 8 ranks meet at the rendezvous; waiting for 16 would hang.
    environ = dict(SRUN_TASK, SLURM_PROCID="7", SLURM_LOCALID="7", SLURM_STEP_NUM_TASKS="8")
    assert launch_context(environ)[0] == DistributedContext(rank=7, world_size=8, local_rank=7)


def test_rendezvous_on_the_steps_first_node_not_the_jobs():
    # A step on nodes 2-3 of a 3-node job: its task 0 runs on gpu08.
    environ = dict(SRUN_TASK, SLURM_JOB_NODELIST="gpu[07-09]", SLURM_STEP_NODELIST="gpu[08-09]")
    assert launch_context(environ)[1] == "tcp://gpu08:18456"


def test_master_addr_and_port_win_over_slurms():
    environ = dict(SRUN_TASK, MASTER_ADDR="10.1.2.3", MASTER_PORT="29500")
    assert launch_context(environ)[1] == "tcp://10.1.2.3:29500"
    assert launch_context(dict(SRUN_TASK, MASTER_ADDR="fd00::7"))[1] == "tcp://[fd00::7]:18456"


def test_torchrun_variables_win_over_slurms():
    # torchrun started by an srun task: torchrun's ranks, torchrun's rendezvous.
    environ = dict(SRUN_TASK, RANK="3", WORLD_SIZE="32", LOCAL_RANK="3")
    assert launch_context(environ) == (DistributedContext(rank=3, world_size=32, local_rank=3),
                                       "env://")


def test_the_batch_script_itself_is_one_process():
    # sbatch -n 16 running python train.py directly: the job's SLURM_NTASKS, but no step.
    environ = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")}
    environ.update(SLURM_PROCID="0", SLURM_LOCALID="0")
    assert launch_context(environ) == (DistributedContext(), None)


def test_a_one_task_step_is_one_process():
    environ = dict(SRUN_TASK, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1",
                   SLURM_STEP_NUM_TASKS="1")
    assert launch_context(environ) == (DistributedContext(), None)


def test_no_launcher_is_one_process():
    assert launch_context({"PATH": "/usr/bin"}) == (DistributedContext(), None)


def test_world_size_from_ntasks_when_the_step_count_is_missing():
    environ = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert launch_context(dict(environ, SLURM_NTASKS="4"))[0].world_size == 4


# --------------------------------------------------------------------------- signal and requeue


@pytest.mark.parametrize("name", ["USR1", "usr1", "SIGUSR1", str(int(signal.SIGUSR1))])
def test_parse_signal_names(name):
    assert parse_signal(name) == signal.SIGUSR1


@pytest.mark.parametrize("name", ["TERM", "SIGINT", "KILL", "NOPE", "999"])
def test_parse_signal_refuses_reserved_and_unknown(name):
    with pytest.raises(Exception, match="signal|requeue"):
        parse_signal(name)


def test_train_flag_defaults_to_usr1_and_refuses_term(capsys):
    parser = train.get_args_parser()
    assert parser.parse_args([]).requeue_signal == signal.SIGUSR1
    assert parser.parse_args(["--requeue-signal", "USR2"]).requeue_signal == signal.SIGUSR2
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--requeue-signal", "TERM"])
    assert exit_info.value.code == 2
    assert "--requeue-signal" in capsys.readouterr().err


def test_stop_flag_catches_the_extra_signal_and_restores_the_handler():
    before = signal.getsignal(signal.SIGUSR2)
    with StopFlag((signal.SIGUSR2,)).installed() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while stop.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.signum == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) == before


@pytest.fixture
def fake_scontrol(tmp_path) -> Path:
    """An ``scontrol`` that records its arguments and exits with $FAKE_SCONTROL_STATUS."""
    script = tmp_path / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n'
                      'echo "scontrol: error: Requested operation is presently disabled" >&2\n'
                      'exit "${FAKE_SCONTROL_STATUS:-0}"\n')
    script.chmod(0o755)
    return script


def test_requeue_runs_scontrol_requeue_with_the_job_id(fake_scontrol, caplog):
    caplog.set_level(logging.INFO, logger="utils.slurm")
    assert requeue_job({"SLURM_JOB_ID": "42"}, scontrol=str(fake_scontrol))
    assert requeue_job({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "40",
                        "SLURM_ARRAY_TASK_ID": "3"}, scontrol=str(fake_scontrol))
    calls = (fake_scontrol.parent / "calls").read_text().splitlines()
    assert calls == ["requeue 42", "requeue 40_3"]
    assert "job 42 requeued" in caplog.text


def test_a_refused_requeue_is_logged_not_raised(fake_scontrol, caplog, monkeypatch):
    # The capture's own level too: a library imported by an earlier test (the int8 export's)
    # can leave the root handlers at ERROR.
    caplog.set_level(logging.WARNING, logger="utils.slurm")
    monkeypatch.setenv("FAKE_SCONTROL_STATUS", "1")
    assert not requeue_job(dict(os.environ, SLURM_JOB_ID="42"), scontrol=str(fake_scontrol))
    assert "could not requeue job 42" in caplog.text and "presently disabled" in caplog.text
    assert not requeue_job({"SLURM_JOB_ID": "42"}, scontrol=str(fake_scontrol.parent / "none"))
    assert not requeue_job({}, scontrol=str(fake_scontrol))  # not under SLURM: nothing to call
    assert (fake_scontrol.parent / "calls").read_text().splitlines() == ["requeue 42"]


@pytest.mark.parametrize("signum, environ, requeued", [
    (signal.SIGUSR1, {}, True),  # one process
    (signal.SIGUSR1, {"RANK": "0", "WORLD_SIZE": "2"}, True),
    (signal.SIGUSR1, {"RANK": "1", "WORLD_SIZE": "2"}, False),  # rank 0 asks, once
    (signal.SIGTERM, {}, False),  # a pre-emption: saved, the cluster decides
])
def test_cli_requeues_on_the_requeue_signal_only(monkeypatch, signum, environ, requeued):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    calls = []

    def interrupted(args):
        raise Interrupted(signum)

    monkeypatch.setattr(train, "main", interrupted)
    monkeypatch.setattr(train, "requeue_job", lambda env: calls.append(env) or True)
    assert train.cli(["--dataset", "demo"]) == 128 + signum
    assert len(calls) == int(requeued)


# --------------------------------------------------------------------------- on a SLURM cluster

TINY = ["--backbone", "resnet18", "--no-pretrained", "--no-cuda", "--amp", "off", "--crop-size",
        "64", "--base-size", "64", "--eval-size", "48", "--dataset", "demo", "--lr", "0.01",
        "--workers", "0", "--batch-size", "2"]
LOCAL_CLUSTER = "deeplab-local"  # scripts/slurm/local_cluster.sh's ClusterName


def _no_cluster(reason: str) -> None:
    if os.environ.get("DEEPLAB_REQUIRE_SLURM") == "1":
        pytest.fail(f"DEEPLAB_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment for srun and sbatch on the local test cluster (launch variables of any
    enclosing job removed); skips where none answers."""
    missing = [tool for tool in ("srun", "sbatch", "scontrol", "squeue", "scancel")
               if shutil.which(tool) is None]
    if missing:
        _no_cluster(f"SLURM is not installed ({', '.join(missing)} not found): apt-get install "
                    f"slurm-wlm munge, then scripts/slurm/local_cluster.sh start")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    if env.get("SLURM_CONF") and not os.path.isfile(env["SLURM_CONF"]):  # scontrol would retry
        _no_cluster(f"SLURM_CONF names {env['SLURM_CONF']}, which does not exist")
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True,
                              timeout=20)
        config = subprocess.run(["scontrol", "show", "config"], env=env, capture_output=True,
                                text=True, timeout=20).stdout
    except subprocess.TimeoutExpired:
        ping, config = None, ""
    if ping is None or ping.returncode != 0 or "UP" not in ping.stdout:
        _no_cluster("no SLURM controller answers (scontrol ping): start one with "
                    "`eval \"$(scripts/slurm/local_cluster.sh start)\"`")
    cluster = re.search(r"ClusterName\s*=\s*(\S+)", config)
    if not cluster or cluster.group(1) != LOCAL_CLUSTER:
        # These tests submit jobs and wait for them: never on a shared cluster's queue.
        _no_cluster(f"the SLURM that answers is cluster {cluster and cluster.group(1)!r}, not "
                    f"scripts/slurm/local_cluster.sh's {LOCAL_CLUSTER!r}")
    return env


@pytest.fixture(scope="module")
def odd_val_demo(tmp_path_factory) -> Path:
    # 16 train images: 4 iterations of 2 x 2 images. 5 val images over 2 ranks: 3 and 2.
    root = tmp_path_factory.mktemp("odd") / "demo"
    generate_demo_dataset(root, seed=1, num_train=16, num_val=5, image_size=(64, 48))
    return root


def _only_folder(run_root: Path) -> Path:
    folders = sorted(run_root.glob("demo/deeplab-resnet18/*"))
    assert len(folders) == 1, folders
    return folders[0]


@pytest.fixture(scope="module")
def srun_training(slurm_env, odd_val_demo, tmp_path_factory) -> tuple[str, Path]:
    """``srun -n 2 train.py`` (output, run folder)."""
    run_root = tmp_path_factory.mktemp("srun") / "runs"
    completed = subprocess.run(
        ["srun", "--ntasks", "2", "--overcommit", "--time", "5", sys.executable,
         str(REPO / "train.py"), *TINY, "--data-root", str(odd_val_demo), "--epochs", "1",
         "--run-root", str(run_root)],
        cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=300)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    return output, _only_folder(run_root)


@pytest.mark.slow
def test_srun_two_tasks_train_as_torchrun_does(srun_training, slurm_env, odd_val_demo,
                                               tmp_path):
    output, folder = srun_training
    assert "process 0 of 2" in output and "process 1 of 2" in output
    assert "weights identical across 2 ranks: yes" in output
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["world_size"] == 2
    assert settings["iters_per_epoch"] == 16 // 2 // 2

    run_root = tmp_path / "torchrun"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train.py"), *TINY, "--data-root", str(odd_val_demo), "--epochs", "1",
         "--run-root", str(run_root)],
        cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    reference = _only_folder(run_root)

    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics == json.loads((reference / "metrics.json").read_text())
    # Every val pixel scored once over the two ranks' slices.
    val_set = COCOSegmentation(str(odd_val_demo), split="val")
    assert metrics["pixels"] == sum(int((np.asarray(val_set.label_at(i)) != 255).sum())
                                    for i in range(len(val_set)))
    # Same slices of the same data, same all-reduced gradients: the same weights, bit for bit.
    srun_weights = torch.load(folder / "checkpoint.pth.tar", weights_only=True)["model"]
    torchrun_weights = torch.load(reference / "checkpoint.pth.tar", weights_only=True)["model"]
    assert srun_weights.keys() == torchrun_weights.keys()
    for name, tensor in torchrun_weights.items():
        assert torch.equal(srun_weights[name], tensor), name


@pytest.mark.slow
def test_srun_two_tasks_split_inference_and_change_no_output(srun_training, slurm_env,
                                                             odd_val_demo, tmp_path):
    checkpoint = srun_training[1] / "checkpoint.pth.tar"
    common = ["--in-path", str(odd_val_demo / "val2017"), "--ckpt", str(checkpoint),
              "--engine", "torch", "--workers", "0", "--no-cuda"]
    assert inference.cli(common + ["--out-path", str(tmp_path / "one")]) == 0
    completed = subprocess.run(
        ["srun", "--ntasks", "2", "--overcommit", "--time", "5", sys.executable,
         str(REPO / "inference.py"), *common, "--out-path", str(tmp_path / "two")],
        cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # One report for both tasks: rank 0 sums the counts (two lone processes would print two).
    assert completed.stdout.count("inputs segmented") == 1
    assert "5 inputs segmented" in completed.stdout
    assert re.search(r"\| 3/3 ", completed.stderr)  # rank 0's progress: inputs 0, 2 and 4
    assert_same_masks(tmp_path / "one", tmp_path / "two", 5)


def _job_state(job: str, env: dict[str, str]) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                           text=True, timeout=30).stdout
    match = re.search(r"JobState=(\w+)", shown)
    return match.group(1) if match else "UNKNOWN"


def _eligible(job: str, env: dict[str, str]) -> bool:
    """Whether the job's EligibleTime (the cluster's local time) has passed."""
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                           text=True, timeout=30).stdout
    match = re.search(r"EligibleTime=(\S+)", shown)
    if match is None or match.group(1) in ("Unknown", "None"):
        return True
    return datetime.datetime.now() > datetime.datetime.fromisoformat(match.group(1))


def _wait_for(condition, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = log.read_text(errors="replace") if log.exists() else "(no job log)"
            pytest.fail(f"{what} did not happen within {timeout} s; job log:\n{text[-3000:]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_usr1_mid_epoch_requeues_the_job_and_it_ends_bit_identical(slurm_env, tmp_path):
    # 64 train images: one epoch of 32 steps of 2 images; no interval saves, so the checkpoint
    # the requeued job starts from exists only because the signal saved it.
    data = tmp_path / "demo"
    generate_demo_dataset(data, seed=2, num_train=64, num_val=4, image_size=(64, 48))
    command = [sys.executable, str(REPO / "train.py"), *TINY, "--data-root", str(data),
               "--epochs", "1", "--print-freq", "1"]
    # The uninterrupted reference, on the other core meanwhile, with the job's thread count.
    reference = subprocess.Popen(command + ["--run-dir", str(tmp_path / "reference")], cwd=REPO,
                                 env=slurm_env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    run_dir, log = tmp_path / "requeued", tmp_path / "job.log"
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n"
                      f"srun {' '.join(command)} --auto-resume --run-dir {run_dir}\n")
    job = subprocess.run(
        ["sbatch", "--parsable", "--ntasks", "1", "--time", "5", "--requeue",
         "--open-mode", "append", "--output", str(log), "--job-name", "deeplab-requeue-test",
         str(script)], cwd=REPO, env=slurm_env, capture_output=True, text=True,
        timeout=30).stdout.strip()
    assert job.isdigit(), job
    try:
        progress = re.compile(r"epoch 0:\s+\d+%\|[^|]*\|\s*([3-9]|1\d)/32")
        _wait_for(lambda: log.exists() and progress.search(log.read_text(errors="replace")),
                  "progress to step 3", log, timeout=180)
        # As SLURM does ahead of a time limit (--signal=USR1@120): to the tasks, not the shell.
        subprocess.run(["scancel", "--signal", "USR1", job], env=slurm_env, check=True,
                       timeout=30)
        _wait_for(lambda: _job_state(job, slurm_env) in ("PENDING", "COMPLETED", "FAILED"),
                  "the requeue", log, timeout=120)
        assert _job_state(job, slurm_env) == "PENDING", log.read_text()[-3000:]
        saved = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
        assert 3 <= saved["iteration"] < 32  # mid-epoch, where the signal arrived

        # A requeued job may start once the killed start's credential has expired (EligibleTime:
        # cred_expire after the requeue, 10 s on the local cluster, 120 s by default); started
        # sooner, slurmd refuses it ("Job credential revoked") and the job fails.
        _wait_for(lambda: _eligible(job, slurm_env), "the requeued job's EligibleTime", log,
                  timeout=180)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env,
                       check=True, timeout=30)
        _wait_for(lambda: _job_state(job, slurm_env) not in ("PENDING", "RUNNING",
                                                             "CONFIGURING", "COMPLETING"),
                  "the requeued job's end", log, timeout=300)
        text = log.read_text(errors="replace")
        shown = subprocess.run(["scontrol", "show", "job", job], env=slurm_env,
                               capture_output=True, text=True, timeout=30).stdout
        assert _job_state(job, slurm_env) == "COMPLETED", text[-3000:] + shown
    except BaseException:
        reference.kill()
        raise
    finally:
        subprocess.run(["scancel", job], env=slurm_env, timeout=30)
    assert text.count("interrupted by SIGUSR1: checkpoint saved") == 1
    # The requeue's own SIGTERM may end the task before it says "requeued"; Restarts says it.
    assert f"asking SLURM to requeue job {job}" in text
    assert re.search(r"Restarts=1\b", subprocess.run(
        ["scontrol", "show", "job", job], env=slurm_env, capture_output=True, text=True,
        timeout=30).stdout)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    expected = torch.load(tmp_path / "reference" / "checkpoint.pth.tar", weights_only=True)
    final = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert final["iteration"] == expected["iteration"] == 32
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), name
