#!/usr/bin/env bash
# The Slurm check leaves the machine as it found it: runs scripts/slurm-check.sh
# (after installing what it needs, which is allowed to touch /etc) and fails if
# a munged, slurmctld, slurmd or slurmstepd that was not running before is
# running after it, or if a file under /etc was added, removed or changed.
# Passes on the check's own exit status (77: skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/slurm-check.sh --install-only || exit $?

# Live ones only: an exited slurmstepd may show as a zombie until it is reaped.
daemons() {
    ps -eo pid=,stat=,comm= | awk '$2 !~ /^Z/ && $3 ~ /^(munged|slurmctld|slurmd|slurmstepd)$/ { print $1 }' | sort
}
etc_files() {
    find /etc -xdev \( -type f -o -type l \) -printf '%p %s %T@ %m %u\n' 2>/dev/null | sort
}
SNAPSHOT=$(mktemp -d /tmp/slurm-check-clean.XXXXXX)
trap 'rm -rf "$SNAPSHOT"' EXIT
daemons >"$SNAPSHOT/daemons.before"
etc_files >"$SNAPSHOT/etc.before"

status=0
bash scripts/slurm-check.sh || status=$?

daemons >"$SNAPSHOT/daemons.after"
etc_files >"$SNAPSHOT/etc.after"
clean=yes
left=$(comm -13 "$SNAPSHOT/daemons.before" "$SNAPSHOT/daemons.after")
if [ -n "$left" ]; then
    echo "slurm-check-clean: daemons left running:" >&2
    # shellcheck disable=SC2086
    ps -o pid,args -p $(echo $left | tr ' ' ',') >&2 || true
    clean=no
fi
if ! diff "$SNAPSHOT/etc.before" "$SNAPSHOT/etc.after" >"$SNAPSHOT/etc.diff"; then
    echo "slurm-check-clean: files under /etc changed (< before, > after):" >&2
    cat "$SNAPSHOT/etc.diff" >&2
    clean=no
fi
if [ "$clean" = yes ]; then
    echo "slurm-check-clean: no daemon left behind, /etc untouched"
else
    exit 1
fi
exit "$status"
