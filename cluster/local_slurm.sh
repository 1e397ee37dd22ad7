#!/bin/bash
# A private Slurm on this one machine, for the tests of slurm/ and for trying the sbatch scripts:
# Debian's slurm-wlm + munge, one slurmctld and two slurmd daemons that emulate the nodes n1 and
# n2, configured the way production sites are: tasks bound to cores (TaskPlugin=task/affinity,
# SelectTypeParameters=CR_Core).
#
#   bash cluster/local_slurm.sh start    install what is missing, configure, start (idempotent)
#   bash cluster/local_slurm.sh stop     stop the daemons this script started (by their pid files)
#   bash cluster/local_slurm.sh status   sinfo of the private Slurm
#   eval "$(bash cluster/local_slurm.sh env)"   point sbatch/srun/squeue of this shell at it
#
# Everything lives in one private folder, HVD_BA_SLURM_DIR (default /var/lib/hvd_ba-slurm):
# slurm.conf (commands find it through SLURM_CONF, daemons through -f), state, spool, logs, pid
# files, the emulated nodes' TmpFS, and a private munged with its own key and socket. Its ports
# (HVD_BA_SLURM_PORT, default 16817, and the two after it) are not Slurm's default 6817. Nothing is
# written to /etc/slurm, /etc/munge or /etc/hosts, and no daemon is stopped by name: the names
# n1 and n2 resolve to 127.0.0.1 inside a private mount namespace in which the daemons (and so
# every job step) see a private copy of /etc/hosts. It refuses to start (exit 3, naming the
# process) where a slurmctld or slurmd that it did not start runs: a host with a real Slurm is
# left alone.
#
# Needs root (apt, slurmd runs jobs as their users). What one machine cannot emulate: separate
# disks, network links and failures per node; the two "nodes" share CPUs, memory and file systems.
set -euo pipefail

action=${1:-start}
CPUS_PER_NODE=${HVD_BA_SLURM_CPUS:-2}   # per emulated node: both bind to the machine's first cores
MEM_PER_NODE=${HVD_BA_SLURM_MEM_MB:-4000}
DIR=${HVD_BA_SLURM_DIR:-/var/lib/hvd_ba-slurm}
PORT=${HVD_BA_SLURM_PORT:-16817}
CONF=$DIR/slurm.conf
NODES="n1 n2"
FOREIGN=3   # exit status: another Slurm runs on this host; nothing started
[[ $PORT =~ ^[0-9]+$ ]] || { echo "local_slurm: error: HVD_BA_SLURM_PORT must be a number, got '$PORT'" >&2; exit 2; }

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: error: $1" >&2; exit "${2:-1}"; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    say "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # The packages' own services are not started (policy-rc.d): only our private daemons run.
    local policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when apt fails
    fi
    apt-get install -y -qq slurm-wlm munge >/dev/null
    return 0
}

# --- processes ---------------------------------------------------------------------------------

pid_files() { echo "$DIR/run/munged.pid $DIR/run/slurmctld.pid $DIR/run/slurmd-n1.pid $DIR/run/slurmd-n2.pid"; }

# our_pid FILE NAME: the pid in FILE when that process runs (not an unreaped zombie), is NAME and
# was started with this folder's files (a recycled pid, another Slurm's daemon, is not ours).
our_pid() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -dc 0-9 < "$1")
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/" || return 1
    echo "$pid"
}

ours() {
    local f name
    for f in $(pid_files); do
        name=$(basename "$f" .pid); name=${name%%-*}
        our_pid "$f" "$name" || true
    done
}

# Slurm daemons on this host that this script did not start.
foreign() {
    local mine pid
    mine=" $(ours | tr '\n' ' ') "
    for pid in $(pgrep -x slurmctld; pgrep -x slurmd; pgrep -x slurmdbd); do
        case "$mine" in *" $pid "*) continue ;; esac
        [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] && continue  # exited, not reaped
        echo "$pid $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)"
    done
}

running() { [ -n "$(our_pid "$DIR/run/$1.pid" "${1%%-*}")" ]; }

stop() {
    local pid pids
    mapfile -t pids < <(ours)
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -f $(pid_files)
    remove_cpu_cgroup
}

# The private cpu cgroup goes with the daemons. What still runs in it descends from our slurmd
# (a job step's slurmstepd and tasks, orphaned when the daemons went): it is killed first.
remove_cpu_cgroup() {
    local cg; cg=$(cat "$DIR/run/cgroup" 2>/dev/null) || return 0
    [[ $cg =~ ^/sys/fs/cgroup/([a-z,_]+/)?hvd_ba-slurm-[0-9]+$ ]] || return 0  # ours only, never a parent
    if [ -d "$cg" ]; then
        local left=""
        for _ in $(seq 100); do
            rmdir "$cg" 2>/dev/null && break  # an empty procs list may still hold unreaped tasks
            left=$(tr '\n' ' ' < "$cg/cgroup.procs" 2>/dev/null || true)
            # shellcheck disable=SC2086  # a list of pids
            [ -n "${left// /}" ] && { kill -9 $left 2>/dev/null || true; }
            sleep 0.1
        done
        [ ! -d "$cg" ] || { say "could not remove the cpu cgroup $cg (still in it: $left)"; return 0; }
    fi
    rm -f "$DIR/run/cgroup"
}

# --- configuration -----------------------------------------------------------------------------

start_munge() {
    local m=$DIR/munge
    mkdir -p "$m"
    chown munge:munge "$m"; chmod 755 "$m"
    if [ ! -s "$m/munge.key" ]; then
        dd if=/dev/urandom bs=1 count=1024 of="$m/munge.key" status=none
    fi
    chown munge:munge "$m/munge.key"; chmod 400 "$m/munge.key"
    running munged && return 0
    touch "$DIR/run/munged.pid"; chown munge:munge "$DIR/run/munged.pid"
    runuser -u munge -- /usr/sbin/munged --force --socket="$m/munge.socket" --key-file="$m/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed"
    for _ in $(seq 50); do munge -S "$m/munge.socket" -n 2>/dev/null | unmunge -S "$m/munge.socket" >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "the private munged did not start (see $DIR/munge/munged.log)"
}

# Tasks are bound as sites bind them: task/affinity sets each task's CPU mask, task/cgroup puts
# each step in a cpuset of its allocated cores (a task cannot widen its mask beyond them). Both
# work in this container (cgroup v1 cpuset, measured); HVD_BA_SLURM_TASK_PLUGIN=task/affinity
# leaves cgroups out where they do not.
if [ -d /sys/fs/cgroup/cpuset ]; then
    TASK_PLUGIN=${HVD_BA_SLURM_TASK_PLUGIN:-task/affinity,task/cgroup}
else  # no cgroup v1 cpuset controller (a cgroup-v2-only host): binding by affinity alone
    TASK_PLUGIN=${HVD_BA_SLURM_TASK_PLUGIN:-task/affinity}
fi

write_conf() {
    local host; host=$(hostname -s)
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/run"
    for n in $NODES; do mkdir -p "$DIR/spool/$n" "$DIR/tmp/$n"; done
    chmod 1777 "$DIR/tmp"/*
    local new; new=$(mktemp "$DIR/slurm.conf.XXXXXX")
    cat > "$new" <<EOF
# Written by hvd_ba cluster/local_slurm.sh: a private Slurm, two emulated nodes on one host.
ClusterName=hvdba
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmctldPort=$PORT
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
TmpFS=$DIR/tmp/%n
ProctrackType=proctrack/linuxproc
TaskPlugin=$TASK_PLUGIN
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=30
JobRequeue=1
SchedulerType=sched/backfill
# A job that becomes eligible when its BeginTime passes (a requeued job) starts at the next
# periodic scheduling pass, no event starts it: the tests' requeued jobs waited 0-30 s after their
# start time (the default bf_interval=30; 14 s on average), and with bf_interval=1 alone up to the
# main loop's 60 s (the backfill loop skipped them). A pass every second costs nothing here.
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=$CPUS_PER_NODE CoresPerSocket=$CPUS_PER_NODE ThreadsPerCore=1 RealMemory=$MEM_PER_NODE State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=$CPUS_PER_NODE CoresPerSocket=$CPUS_PER_NODE ThreadsPerCore=1 RealMemory=$MEM_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
    printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=yes\nConstrainCores=yes\n' > "$DIR/cgroup.conf"
    if [ -f "$CONF" ] && cmp -s "$new" "$CONF"; then rm -f "$new"; return 1; fi
    mv "$new" "$CONF"; chmod 644 "$CONF"
    return 0
}

# One scheduling group for both nodes. The emulated nodes share this machine's cores: with 2 ranks
# per node on 2 cores, a rank of n1 and a rank of n2 are bound to the same core. slurmstepd starts
# each node's tasks in a session of their own, and under the kernel's autogroup
# (kernel.sched_autogroup_enabled=1) each session is a scheduling group of its own. Measured here
# (4 ranks, 2 per node, 1 core each, hvd.init + 20 allreduces under srun --mpi=pmix): a busy-polling
# MPI rank of one group kept the other group's rank on the same core runnable but without CPU time
# for minutes, and Open MPI's first collective (MPI_Comm_dup in hvd.init) stalled (3 of 3 tries
# over 60 s; 0.3 s with autogroup off). On a real node one step's ranks share one session, and two
# nodes never share a core. So the slurmd daemons, and with them every job step, run in one private
# cpu cgroup: tasks in a cgroup other than the root one are not put in autogroups, every rank is
# scheduled as a plain task (10 of 10 tries: hvd.init 0.3 s). Nothing host-wide changes; stop removes
# the cgroup (and what is left in it). Where no cpu controller is mounted (cgroup v1) or enabled
# (v2), or the cgroup cannot be made (a read-only /sys/fs/cgroup), start says so and goes on.
cpu_cgroup() {
    local root
    root=$(awk '$3 == "cgroup" && $4 ~ /(^|,)cpu(,|$)/ {print $2; exit}' /proc/mounts)
    if [ -z "$root" ] && grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
        root=/sys/fs/cgroup
    fi
    [ -n "$root" ] && echo "$root/hvd_ba-slurm-$PORT"
    return 0
}

# Each daemon runs in namespaces of its own: a mount namespace where /etc/hosts is a private copy
# that also names n1 and n2 (horovodrun and mpirun resolve the node names they are given), and
# for each slurmd a UTS namespace whose host name is its node's, so that every task sees the
# host name of its node, as on separate machines (Open MPI names its shared-memory segments and
# session folders by host name: with one name for both nodes, 2 ranks per node collided and
# crashed in btl/vader).
start_daemons() {
    { cat /etc/hosts; for n in $NODES; do echo "127.0.0.1 $n"; done; } > "$DIR/hosts"
    local private="mount --make-rprivate / 2>/dev/null; mount --bind '$DIR/hosts' /etc/hosts || exit 1"
    local cg join=":"; cg=$(cpu_cgroup)
    if [ -z "$cg" ]; then
        say "no cpu cgroup controller: each node's tasks are scheduled as a session (autogroup); 2 ranks per node may stall"
    elif ! mkdir -p "$cg" 2>/dev/null; then
        say "cannot create the cpu cgroup $cg: each node's tasks are scheduled as a session (autogroup); 2 ranks per node may stall"
        cg=""
    else
        echo "$cg" > "$DIR/run/cgroup"
        join="echo \$\$ > '$cg/cgroup.procs' || exit 1"
        # The whole cgroup yields to the host's own threads (cpu.idle): with it at normal weight,
        # checkpoint fsyncs of the 4-rank horovodrun test took 59-299 s in 4 of 5 runs (the rank
        # in D state waiting for writeback, whose kernel workers compete with the cgroup); its
        # tasks still share the cores fairly among themselves. The price: beside a busy process of
        # the host (a parallel test run, a build) the jobs get almost no CPU.
        if [ -w "$cg/cpu.idle" ]; then echo 1 > "$cg/cpu.idle" 2>/dev/null || true; fi
    fi
    if ! running slurmctld; then
        # -c: a cold start, without the jobs of an earlier start: a test run killed mid-job left
        # its job in the saved state, and its nodes came back allocated ("did not become idle")
        unshare --mount --propagation private bash -c "$private; slurmctld -c -f '$CONF'" \
            || die "slurmctld did not start (log: $DIR/log/slurmctld.log)"
    fi
    for n in $NODES; do
        running "slurmd-$n" && continue
        unshare --mount --uts --propagation private bash -c "$join; $private; hostname $n; slurmd -f '$CONF' -N $n" \
            || die "slurmd -N $n did not start (log: $DIR/log/slurmd-$n.log)"
    done
    if [ -n "$cg" ]; then  # slurmd daemons of an earlier start, not in it yet
        local pid
        for n in $NODES; do
            if pid=$(our_pid "$DIR/run/slurmd-$n.pid" slurmd) && ! grep -qx "$pid" "$cg/cgroup.procs"; then
                echo "$pid" > "$cg/cgroup.procs" && say "moved slurmd -N $n into $cg"
            fi
        done
    fi
    return 0
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root (installs slurm-wlm and munge, starts daemons that run jobs)"
    local others; others=$(foreign)
    # Ours, all running already: a no-op whatever else runs. Otherwise nothing starts beside a
    # Slurm that this script did not start.
    if [ -n "$others" ] && ! { running munged && running slurmctld && running slurmd-n1 && running slurmd-n2; }; then
        die "a Slurm not started by this script runs on this host; not starting a second one:
$others" "$FOREIGN"
    fi
    install
    mkdir -p "$DIR/run" "$DIR/log"; chmod 755 "$DIR"
    start_munge
    if write_conf; then
        say "wrote $CONF"
        running slurmctld && { say "configuration changed: restarting the daemons"; stop; start_munge; }
    fi
    export SLURM_CONF=$CONF
    start_daemons
    for _ in $(seq 100); do
        if [ "$(sinfo -h -o '%t' -p debug 2>/dev/null | sort -u | tr -d '\n')" = idle ]; then
            say "up: $(sinfo -h -o '%P %D nodes %N %t' -p debug) (SLURM_CONF=$CONF)"
            return 0
        fi
        # Nodes left down by an earlier run come back with an explicit resume.
        scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
        sleep 0.3
    done
    sinfo >&2 || true
    die "nodes did not become idle (logs: $DIR/log/)"
}

case "$action" in
    start) start ;;
    stop) stop; say "stopped" ;;
    status) SLURM_CONF=$CONF sinfo ;;
    env) echo "export SLURM_CONF='$CONF'" ;;
    owned) ours ;;                 # pids of the daemons this script started
    cgroup) cat "$DIR/run/cgroup" 2>/dev/null || true ;;  # the daemons' private cpu cgroup (none: empty)
    foreign) foreign ;;            # Slurm daemons on this host that it did not start
    *) die "unknown action '$action' (start, stop, status, env, owned, foreign or cgroup)" ;;
esac
