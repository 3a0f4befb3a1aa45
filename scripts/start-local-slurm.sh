#!/usr/bin/env bash
# Start a single-node Slurm on this machine, for tests/test_slurm.py (Debian/Ubuntu, as root).
#
#   scripts/start-local-slurm.sh                 # ~25 s the first time (apt-get install), a few seconds later on
#   scripts/start-local-slurm.sh --record FILE   # also note in FILE each daemon it starts, for
#                                                # scripts/stop-local-slurm.sh FILE (what .ci/run does)
#
# If Slurm already answers (`sinfo` works), nothing is changed. Otherwise it installs Debian's
# slurm-wlm and munge packages if they are missing, writes a minimal /etc/slurm/slurm.conf (this
# host as the only node with its real CPUs and memory, one partition `local`, no cgroups, no
# accounting) unless one exists, starts munged, slurmctld and slurmd directly (no systemd needed)
# and waits until the node is idle. Running it again finds the daemons running and does nothing.
# Logs: /var/log/slurm/, /var/log/munge/. Exit codes: 0 Slurm is up; 1 it cannot be installed here
# (not root, no apt-get, no network); 3 it is installed but does not come up (see the logs).
set -euo pipefail

RECORD=/dev/null
if [[ ${1:-} == --record ]]; then RECORD=${2:?--record needs a file}; fi
CONF=/etc/slurm/slurm.conf
MARK="# written by ihstudy scripts/start-local-slurm.sh"
WAIT_S=${SLURM_START_TIMEOUT:-90}

die() { echo "start-local-slurm: $*" >&2; exit 1; }
broken() { echo "start-local-slurm: $*" >&2; exit 3; }
say() { echo "start-local-slurm: $*"; }

node_state() { sinfo -h -N -o %t 2>/dev/null | head -n1; }

# A daemon runs if its pid file names a live process of that name.
running() {  # name pidfile
    local pid
    pid=$(cat "$2" 2>/dev/null) || return 1
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]
}

# Start a daemon (name, pidfile, command...) unless it runs; note the one started in $RECORD.
start_daemon() {
    local name=$1 pidfile=$2
    shift 2
    running "$name" "$pidfile" && return
    "$@" || return 1
    echo "$name $pidfile" >>"$RECORD"
}

install_packages() {
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
}

write_config() {
    local node
    # slurmd -C prints this machine's node line: CPUs, sockets, cores, threads, RealMemory.
    node=$(slurmd -C | head -n1)
    mkdir -p /etc/slurm
    cat >"$CONF" <<EOF
$MARK: a one-node cluster on this host.
ClusterName=ihstudy-local
SlurmctldHost=$(hostname)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups: processes are tracked through /proc, CPUs are not pinned.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
# A node that went down (e.g. slurmd restarted) comes back by itself.
ReturnToService=2
# Keep finished jobs visible to squeue/scontrol for 10 minutes.
MinJobAge=600
$node State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    say "wrote $CONF"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    start_daemon munged /run/munge/munged.pid runuser -u munge -- munged ||
        broken "munged does not start (see /var/log/munge/munged.log)"
    munge -n | unmunge >/dev/null || broken "munged does not answer (see /var/log/munge/munged.log)"
}

start_slurm() {
    mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    start_daemon slurmctld /run/slurmctld.pid slurmctld || broken "slurmctld does not start (see /var/log/slurm/slurmctld.log)"
    start_daemon slurmd /run/slurmd.pid slurmd || broken "slurmd does not start (see /var/log/slurm/slurmd.log)"
}

wait_until_idle() {
    local deadline=$((SECONDS + WAIT_S)) state
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
            idle | mix | alloc) say "Slurm is up: node $(hostname) $state, partition $(sinfo -h -o %P | head -n1)"; return ;;
            drain* | down* | fail*)  # e.g. left down by a killed slurmd: it is back now
                scontrol update nodename="$(hostname)" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    broken "the node is not idle after ${WAIT_S} s (state: ${state:-none}; see /var/log/slurm/)"
}

if command -v sinfo >/dev/null && [[ $(node_state) =~ ^(idle|mix|alloc|comp) ]]; then
    say "Slurm is already running: $(sinfo -h -o '%P %D %t' | head -n1)"
    exit 0
fi
((EUID == 0)) || die "needs root to install and start Slurm"
command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
    command -v munged >/dev/null || install_packages
if [[ ! -e $CONF ]]; then
    write_config
elif ! grep -qF "$MARK" "$CONF"; then
    say "using the existing $CONF"
fi
start_munge
start_slurm
wait_until_idle
