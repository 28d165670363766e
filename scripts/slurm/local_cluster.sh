#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests in tests/utils/test_slurm.py and for trying
# scripts/slurm/train.sbatch without a real cluster. Needs root, slurm-wlm and munge:
#
#     apt-get install slurm-wlm munge
#     eval "$(scripts/slurm/local_cluster.sh start)"    # exports SLURM_CONF
#     srun -n 2 hostname
#     scripts/slurm/local_cluster.sh stop
#
# Everything (munge key and socket, slurm.conf, state, spool, logs, pid files) lives in one folder,
# $DEEPLAB_SLURM_DIR (default /tmp/deeplab-slurm), so nothing under /etc changes and a munged or
# SLURM the machine already runs is left alone. `stop` ends the daemons it started, by their pid.
set -euo pipefail

DIR="${DEEPLAB_SLURM_DIR:-/tmp/deeplab-slurm}"
CTLD_PORT="${DEEPLAB_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${DEEPLAB_SLURMD_PORT:-6818}"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

stop_pid_file() {  # stop_pid_file NAME FILE: TERM the process, wait up to 10 s, then KILL
    local name=$1 file=$2 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
        echo "stopped $name (pid $pid)" >&2
    fi
    rm -f "$file"
}

stop() {
    # Jobs first, so that no task outlives the daemons (a test that failed half-way).
    if [ -f "$DIR/slurm.conf" ] && SLURM_CONF="$DIR/slurm.conf" scontrol ping >/dev/null 2>&1
    then
        SLURM_CONF="$DIR/slurm.conf" scancel --user="$(id -un)" 2>/dev/null || true
    fi
    stop_pid_file slurmd "$DIR/slurmd.pid"
    stop_pid_file slurmctld "$DIR/slurmctld.pid"
    stop_pid_file munged "$DIR/munge/munged.pid"
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "$what did not come up within $seconds s; see the logs in $DIR"
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root (the daemons run as root, munged as munge)"
    for tool in munged slurmctld slurmd scontrol; do
        command -v "$tool" >/dev/null || die "$tool not found: apt-get install slurm-wlm munge"
    done
    stop  # a previous cluster in the same folder
    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
    chmod 755 "$DIR"  # (mktemp -d makes 700) munged, not root, must reach its socket folder
    # munged refuses keys others can read and sockets others cannot reach: its folder is the
    # munge user's, open to all for the socket only.
    chown munge:munge "$DIR/munge"
    chmod 711 "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
    runuser -u munge -- munged --key-file="$DIR/munge/munge.key" \
        --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    cat > "$DIR/slurm.conf" <<CONF
ClusterName=deeplab-local
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$DIR/slurm.conf"
    slurmctld -c  # -c: a fresh controller, no jobs from a previous cluster's state
    slurmd
    wait_for 30 slurmctld scontrol ping
    wait_for 30 "node $host" sh -c "sinfo -h -N -o %t | grep -qx idle"
    echo "export SLURM_CONF=$DIR/slurm.conf"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop  (folder: \$DEEPLAB_SLURM_DIR, default /tmp/deeplab-slurm)" ;;
esac
