#!/usr/bin/env bash
# A real scheduler test of the README's Slurm array job: brings up a one-node
# Slurm on this machine (Debian's slurm-wlm and munge, installed with apt-get if
# missing), submits the array job on a tiny grid, requeues one shard while a run
# trains, and checks that every run completed exactly once with all its epochs.
#
# Needs root (daemons, /etc/slurm); MNIST from MNIST_DIR or data/mnist, else
# the subset in tests/data.
# Exits 77 when Slurm cannot be set up here, so callers can say they skipped it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SKIP=77

skip() {
    echo "slurm-check: skipped: $*" >&2
    exit "$SKIP"
}

[ "$(id -u)" = 0 ] || skip "needs root to run the Slurm daemons"
if ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || skip "no sbatch and no apt-get to install slurm-wlm"
    echo "slurm-check: installing slurm-wlm and munge" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends slurm-wlm munge; } >/tmp/slurm-check-apt.log 2>&1 ||
        skip "apt-get could not install slurm-wlm (log: /tmp/slurm-check-apt.log)"
fi

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

# --- a one-node cluster, unless one already answers -------------------------
start_cluster() {
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    memory=$(awk '/MemTotal/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge /etc/slurm \
        /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    cat >/etc/slurm/slurm.conf <<EOF
ClusterName=mnistlab
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=60
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=check Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && return 0
        sleep 1
    done
    echo "slurm-check: the node never became idle:" >&2
    sinfo >&2 || true
    tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    exit 1
}
if ! sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    start_cluster
fi
sinfo

# --- the README's array job on a tiny grid -----------------------------------
WORK=$(mktemp -d /tmp/slurm-check.XXXXXX)
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
