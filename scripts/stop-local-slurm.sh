#!/usr/bin/env bash
# Stop the daemons that `scripts/start-local-slurm.sh --record FILE` noted in FILE as started by it
# (never one that was already running), newest first, and wait until each has exited.
#
#   scripts/stop-local-slurm.sh FILE
set -uo pipefail

RECORD=${1:?usage: stop-local-slurm.sh FILE}
[[ -s $RECORD ]] || exit 0
status=0
while read -r name pidfile; do
    pid=$(cat "$pidfile" 2>/dev/null) || continue
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || continue
    kill "$pid"
    for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    if [[ -d /proc/$pid ]]; then
        echo "stop-local-slurm: $name ($pid) is still running after 10 s" >&2
        status=1
    else
        echo "stop-local-slurm: stopped $name ($pid)"
    fi
done < <(tac "$RECORD")
exit $status
