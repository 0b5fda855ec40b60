#!/usr/bin/env bash
# A real scheduler test of the README's Slurm array job: submits the array job
# on a tiny grid, requeues one shard while a run trains, and checks that every
# run completed exactly once with all its epochs.
#
# It brings up a private one-node cluster: munged, slurmctld and slurmd with
# their config, key, sockets, state, spool and logs in this check's own temp
# folder and on ports of their own, so nothing under /etc, /var or /run is
# written, and a cluster already on the machine is neither used nor disturbed.
# Every daemon it starts is stopped when it ends, however it ends (a trap, by
# the PIDs it started). A real cluster is used only when asked:
# SLURM_CHECK_USE_CLUSTER=1 SLURM_CHECK_PARTITION=<partition>.
#
# What it does to the machine: installs Debian's slurm-wlm and munge with
# apt-get when they are missing (`--install-only` does just that and stops).
# The private cluster needs root (its daemons run as root). MNIST from
# MNIST_DIR or data/mnist, else the subset in tests/data. Exits 77 when it
# cannot run here, so callers can say they skipped it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SKIP=77

skip() {
    echo "slurm-check: skipped: $*" >&2
    exit "$SKIP"
}

USE_CLUSTER=${SLURM_CHECK_USE_CLUSTER:-0}
if [ "$USE_CLUSTER" != 1 ]; then
    [ "$(id -u)" = 0 ] || skip "needs root to run a private cluster's daemons"
fi
if ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    [ "$USE_CLUSTER" != 1 ] || skip "SLURM_CHECK_USE_CLUSTER=1, but no sbatch here"
    command -v apt-get >/dev/null || skip "no sbatch and no apt-get to install slurm-wlm"
    echo "slurm-check: installing slurm-wlm and munge" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends slurm-wlm munge; } >/tmp/slurm-check-apt.log 2>&1 ||
        skip "apt-get could not install slurm-wlm (log: /tmp/slurm-check-apt.log)"
fi
[ "${1:-}" != --install-only ] || exit 0

# Full MNIST as the binary finds it, else the subset the tests ship (enough
# for this grid's few thousand images).
has_mnist() { [ -e "$1/train-images-idx3-ubyte.gz" ] || [ -e "$1/train-images-idx3-ubyte" ]; }
for candidate in "${MNIST_DIR:-}" "$ROOT/data/mnist" "$ROOT/tests/data/mnist-subset"; do
    if [ -n "$candidate" ] && has_mnist "$candidate"; then
        MNIST_DIR=$candidate
        break
    fi
done
has_mnist "${MNIST_DIR:-}" || { echo "slurm-check: no MNIST found" >&2; exit 1; }
export MNIST_DIR

cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/mnist-lab

WORK=$(mktemp -d /tmp/slurm-check.XXXXXX)
DAEMONS=()
JOB=

# Cancels the job, then stops the daemons this check started, newest first
# (slurmd and slurmctld still talk to munged as they stop).
stop_cluster() {
    local status=$? pid i
    trap - EXIT INT TERM
    if [ -n "$JOB" ] && [ -n "$(squeue -h -j "$JOB" 2>/dev/null)" ]; then
        scancel "$JOB" 2>/dev/null || true
        for _ in $(seq 90); do
            [ -z "$(squeue -h -j "$JOB" 2>/dev/null)" ] && break
            sleep 1
        done
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        pid=${DAEMONS[i]}
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    exit "$status"
}
trap stop_cluster EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- a private one-node cluster, or the machine's when asked ----------------
start_private_cluster() {
    local cluster=$WORK/cluster host cpus memory ports
    mkdir -p "$cluster"/{munge,state,spool,log,run}
    chmod 0700 "$cluster" "$cluster/munge"
    dd if=/dev/urandom of="$cluster/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$cluster/munge/munge.key"
    local socket=$cluster/munge/munge.socket
    /usr/sbin/munged --foreground --force --socket="$socket" \
        --key-file="$cluster/munge/munge.key" --pid-file="$cluster/run/munged.pid" \
        --log-file="$cluster/log/munged.log" --seed-file="$cluster/munge/munged.seed" \
        >>"$cluster/log/munged.out" 2>&1 &
    DAEMONS+=($!)
    # Two ports free now, not Slurm's usual 6817 and 6818.
    ports=$(python3 -c '
import socket
found = []
for _ in range(2):
    s = socket.socket()
    s.bind(("", 0))
    found.append(s.getsockname()[1])
    s.close()
print(*found)')
    host=$(hostname -s)
    cpus=$(nproc)
    memory=$(awk '/MemTotal/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
    : >"$cluster/plugstack.conf"
    cat >"$cluster/slurm.conf" <<CONF
ClusterName=mnistlabcheck
SlurmctldHost=$host
SlurmctldPort=${ports% *}
SlurmdPort=${ports#* }
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
PlugStackConfig=$cluster/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=60
StateSaveLocation=$cluster/state
SlurmdSpoolDir=$cluster/spool
SlurmctldPidFile=$cluster/run/slurmctld.pid
SlurmdPidFile=$cluster/run/slurmd.pid
SlurmctldLogFile=$cluster/log/slurmctld.log
SlurmdLogFile=$cluster/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    # Every Slurm command and daemon from here on reads this config.
    export SLURM_CONF=$cluster/slurm.conf
    for _ in $(seq 50); do
        [ -S "$socket" ] && break
        sleep 0.1
    done
    [ -S "$socket" ] || {
        tail -20 "$cluster"/log/munged.* >&2 || true
        echo "slurm-check: munged did not start" >&2
        exit 1
    }
    slurmctld -D -i >>"$cluster/log/slurmctld.out" 2>&1 &
    DAEMONS+=($!)
    slurmd -D >>"$cluster/log/slurmd.out" 2>&1 &
    DAEMONS+=($!)
    for _ in $(seq 60); do
        sinfo -h -p "$PARTITION" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && return 0
        sleep 1
    done
    echo "slurm-check: the private node never became idle:" >&2
    sinfo >&2 || true
    tail -20 "$cluster"/log/* >&2 || true
    exit 1
}

if [ "$USE_CLUSTER" = 1 ]; then
    PARTITION=${SLURM_CHECK_PARTITION:-}
    [ -n "$PARTITION" ] || {
        echo "slurm-check: SLURM_CHECK_USE_CLUSTER=1 needs SLURM_CHECK_PARTITION=<partition>" >&2
        exit 2
    }
    echo "slurm-check: on the machine's cluster, partition $PARTITION"
else
    PARTITION=check
    start_private_cluster
    echo "slurm-check: private cluster up (config $SLURM_CONF)"
fi
sinfo -p "$PARTITION"

# --- the README's array job on a tiny grid -----------------------------------
cat >"$WORK/grid.toml" <<'EOF'
name = "grid"
[data]
train_size = 6000
validation_size = 1000
test_size = 1000
[train]
epochs = 4
[sweep]
"optimizer.lr" = [0.01, 0.03]
"model.batch_norm" = [false, true]
EOF
cat >"$WORK/job.sh" <<EOF
#!/bin/bash
#SBATCH --job-name=mnist-grid
#SBATCH --partition=$PARTITION
#SBATCH --array=0-1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:20:00
#SBATCH --requeue
#SBATCH --signal=TERM@120
#SBATCH --output=$WORK/job-%A_%a.log
#SBATCH --open-mode=append
srun $BIN sweep $WORK/grid.toml --runs-dir $WORK/runs \\
    --shard "\${SLURM_ARRAY_TASK_ID}/\${SLURM_ARRAY_TASK_COUNT}" --threads "\${SLURM_CPUS_PER_TASK}" \\
    --resume "$WORK/runs/sweep-grid-\${SLURM_ARRAY_JOB_ID}-shard\${SLURM_ARRAY_TASK_ID}"
EOF
JOB=$(sbatch --parsable "$WORK/job.sh")
echo "slurm-check: submitted array job $JOB (work folder $WORK)"

# Requeue shard 0 once one of its runs has completed an epoch but not its last.
RECORD0=$WORK/runs/sweep-grid-$JOB-shard0/sweep.json
requeued=no
for _ in $(seq 600); do
    if [ -f "$RECORD0" ] && python3 - "$RECORD0" <<'EOF'
import json, sys
record = json.load(open(sys.argv[1]))
for entry in record["runs"]:
    if entry["status"] == "running" and entry["run_dir"]:
        try:
            summary = json.load(open(entry["run_dir"] + "/summary.json"))
        except OSError:
            continue
        if 1 <= summary["epochs_completed"] < summary["epochs"]:
            sys.exit(0)
sys.exit(1)
EOF
    then
        scontrol requeue "${JOB}_0"
        requeued=yes
        echo "slurm-check: requeued ${JOB}_0 mid-run"
        # A requeued job waits about two minutes before it may start again;
        # this check need not.
        for _ in $(seq 60); do
            if [ "$(squeue -h -j "${JOB}_0" -o %T 2>/dev/null)" = PENDING ]; then
                scontrol update JobId="${JOB}_0" StartTime=now 2>/dev/null || true
                break
            fi
            sleep 0.5
        done
        break
    fi
    # A job that left the queue before then failed: say how.
    [ -n "$(squeue -h -j "$JOB" 2>/dev/null)" ] || break
    sleep 0.2
done
if [ "$requeued" != yes ]; then
    echo "slurm-check: shard 0 never ran mid-epoch; the jobs' logs:" >&2
    tail -5 "$WORK"/job-*.log >&2 || true
    exit 1
fi

for _ in $(seq 600); do
    [ -z "$(squeue -h -j "$JOB" 2>/dev/null)" ] && break
    sleep 1
done
[ -z "$(squeue -h -j "$JOB")" ] || { echo "slurm-check: job $JOB still queued" >&2; squeue >&2; exit 1; }

# --- every run completed exactly once, with all its epochs ------------------
python3 - "$WORK/runs" "$JOB" <<'EOF'
import glob, json, os, sys
runs, job = sys.argv[1], sys.argv[2]
records = sorted(glob.glob(f"{runs}/sweep-grid-{job}-shard*/sweep.json"))
assert len(records) == 2, records
names, resumed = [], 0
for path in records:
    for entry in json.load(open(path))["runs"]:
        assert entry["status"] == "completed", (path, entry["name"], entry["status"])
        summary = json.load(open(os.path.join(entry["run_dir"], "summary.json")))
        assert summary["status"] == "completed" and summary["epochs_completed"] == 4, summary
        names.append(entry["name"])
        resumed += len(summary.get("resumed_at", []))
run_dirs = [d for d in os.listdir(runs) if not d.startswith("sweep-")]
assert sorted(names) == sorted(set(names)) and len(names) == 4, names
assert len(run_dirs) == 4, f"each run once, got {run_dirs}"
assert resumed >= 1, "the requeued shard resumed its interrupted run"
print(f"slurm-check: ok: 4 runs completed once each over 2 shards; {resumed} resumed after the requeue")
EOF
