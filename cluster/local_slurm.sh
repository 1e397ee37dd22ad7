#!/bin/bash
# A real Slurm on this one machine, for the tests of slurm/ and for trying the sbatch scripts:
# Debian's slurm-wlm + munge, one slurmctld and two slurmd daemons that emulate the nodes n1 and
# n2 (each with its own port, spool, log and TmpFS; both are this host, 127.0.0.1).
#
#   bash cluster/local_slurm.sh start    install what is missing, configure, start (idempotent)
#   bash cluster/local_slurm.sh stop     stop the daemons
#   bash cluster/local_slurm.sh status   sinfo
#
# Needs root (apt, /etc/slurm, daemons). What one machine cannot emulate: separate disks, network
# links and failures per node; the two "nodes" share CPUs, memory, /tmp and the file system.
set -euo pipefail

action=${1:-start}
CPUS_PER_NODE=${HVD_BA_SLURM_CPUS:-2}   # declared per emulated node (the machine's cores are shared)
MEM_PER_NODE=${HVD_BA_SLURM_MEM_MB:-4000}
CONF=/etc/slurm/slurm.conf
NODES="n1 n2"

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (installs slurm-wlm and munge, writes /etc/slurm, starts daemons)"

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    say "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --force
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
        munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
    fi
}

write_conf() {
    local host; host=$(hostname -s)
    mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
    for n in $NODES; do mkdir -p "/var/spool/slurmd/$n" "/tmp/slurm-$n"; done
    local new; new=$(mktemp)
    cat > "$new" <<EOF
# Written by hvd_ba cluster/local_slurm.sh: two emulated nodes on one host.
ClusterName=hvdba
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmctldPort=6817
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=/var/run/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/var/run/slurmd-%n.pid
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
TmpFS=/tmp/slurm-%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=30
JobRequeue=1
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS_PER_NODE RealMemory=$MEM_PER_NODE State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS_PER_NODE RealMemory=$MEM_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && cmp -s "$new" "$CONF"; then rm -f "$new"; return 1; fi
    mv "$new" "$CONF"; chmod 644 "$CONF"
    return 0
}

hosts_entries() {
    # horovodrun and mpirun resolve the node names they are given.
    for n in $NODES; do
        grep -qE "^[0-9.]+[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
    done
}

running() { pgrep -x "$1" >/dev/null 2>&1; }

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 50); do running slurmd || running slurmctld || break; sleep 0.1; done
}

start() {
    install
    start_munge
    hosts_entries
    if write_conf; then
        say "wrote $CONF"
        stop
    fi
    running slurmctld || slurmctld
    for n in $NODES; do
        pgrep -f "slurmd -N $n\$" >/dev/null || slurmd -N "$n"
    done
    for _ in $(seq 100); do
        if [ "$(sinfo -h -o '%t' -p debug 2>/dev/null | sort -u | tr -d '\n')" = idle ]; then
            say "up: $(sinfo -h -o '%P %D nodes %N %t' -p debug)"
            return 0
        fi
        # Nodes left down by an earlier run come back with an explicit resume.
        scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
        sleep 0.3
    done
    sinfo >&2 || true
    die "nodes did not become idle (logs: /var/log/slurm/)"
}

case "$action" in
    start) start ;;
    stop) stop; say "stopped" ;;
    status) sinfo ;;
    *) die "unknown action '$action' (start, stop or status)" ;;
esac
