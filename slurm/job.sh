# hvd_ba: what every sbatch script of slurm/ does, sourced by them (not run on its own).
#
# The script sets, before sourcing this file:
#   CONFIG      preset name or YAML path (python -m hvd_ba train --config)
#   DATA        ImageNet-layout root on the shared file system (train/, val/), or a packed folder (pack)
#   OUT         run directory on the shared file system (checkpoints, metrics, logs/)
#   LAUNCHER    srun | horovodrun | mpirun | torchrun (torchrun: BACKEND=torch only)
#   BACKEND     horovod (default) | torch: run.backend, how the ranks talk (hvd_ba/dist.py); torch
#               runs under srun, mpirun or torchrun (one torchrun per node, started by srun)
#   STAGE       1: copy each rank's static shard to LOCAL_DATA first (python -m hvd_ba stage)
#   LOCAL_DATA  node-local folder for STAGE=1; expanded on each task, so '$SLURMD_NODENAME' works.
#               Default: a private folder of this job under the node's $TMPDIR (or /tmp), created
#               mode 0700 by the staging step (refused if another user owns it or it is wider or
#               a symlink) and removed at the end of each attempt unless KEEP_LOCAL_DATA=1
#   STAGE_VERIFY hash (default): a file already staged is trusted only after its SHA-256 matches
#               the dataset's; size: trust the size (faster, for a folder only you can write)
#   SETTINGS    extra `--set` overrides, e.g. "data.workers=6 run.amp=bf16"; split as the shell
#               splits words (quote a value with spaces) but never globbed, and a bracketed value
#               stays whole: SETTINGS="augment.scale=[0.25, 1.0] run.amp=bf16"
#   PYTHON      the interpreter of the environment (default: python on PATH)
# and calls `run_job "$@"`: the sbatch command line's extra arguments are more overrides.
#
# A job: prints what it runs, stages if asked, launches the training in the background and
# waits. On the preemption signal (#SBATCH --signal=B:USR1@grace, or `scancel --signal=USR1
# --batch`) or SIGTERM, it asks the ranks to stop: it forwards the signal to srun (which passes
# it to every task) and creates OUT/STOP, which rank 0 sees whichever launcher started it. The
# ranks checkpoint at the same step and exit 75. After USR1 the job then requeues itself
# (`scontrol requeue`) and the next start resumes from OUT/checkpoints (run.resume=auto); after
# TERM alone (scancel, or Slurm's own preemption requeue) it only leaves the checkpoint. A rank
# killed by a fault (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) during staging or training requeues
# the job CRASH_REQUEUES times (default 1; 0: never), each rank's Python stack in the attempt's
# log. A run that failed for another reason is not requeued: its exit status is the job's.

PREEMPTED=75
DISK_FULL=74  # the run folder is full or read-only: requeueing would only fail again

job_log() { echo "[hvd_ba job $(date +%H:%M:%S)] $*"; }

launch_command() {
    # launch_command <python args...>: sets CMD to start one process per Slurm task with LAUNCHER,
    # each with the cores Slurm allocated to a task (--cpus-per-task).
    local np=${SLURM_NTASKS:?not inside a Slurm allocation (SLURM_NTASKS is unset)}
    # The ranks' share of a node (run.bind, hvd_ba/cluster.py), under a name of our own: the ranks
    # that mpirun's node daemons fork inherit the SLURM_CPUS_PER_TASK of the daemons' srun step.
    export HVD_BA_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-}
    local cpus=()
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    case "$LAUNCHER" in
        srun)
            # Since Slurm 22.05 srun does not take --cpus-per-task from the allocation: without it
            # (and with SLURM_EXACT=1 or --exact, as many sites set) each rank gets one core.
            # Horovod's ranks take their rank from PMIx; torch.distributed's from SLURM_PROCID
            # (no MPI: a site without Slurm's PMIx plugin, and a set-up without mpi4py, still work).
            local mpi=pmix
            [ "${BACKEND:-horovod}" = torch ] && mpi=none
            CMD=(srun --mpi="$mpi" --kill-on-bad-exit=1 ${cpus[@]+"${cpus[@]}"} "$PYTHON" "$@") ;;
        horovodrun)
            local hosts
            hosts=$("$PYTHON" -m hvd_ba hosts --np "$np") || return 2
            # horovodrun does not bind: each rank keeps its local rank's share of the node's cores.
            # shellcheck disable=SC2206  # HOROVODRUN_ARGS is a list of flags
            CMD=(horovodrun -np "$np" -H "$hosts" ${HOROVODRUN_ARGS:---gloo} "$PYTHON" "$@") ;;
        mpirun)
            local root_flag=()
            if [ "$(id -u)" = 0 ]; then root_flag=(--allow-run-as-root); fi
            # Inside an allocation Open MPI reads the nodes from Slurm and starts one daemon per node
            # with srun. Without SLURM_EXACT that step has all the job's cores of each node (under
            # SLURM_EXACT=1 the daemon, and so every rank of its node, had one core); each rank
            # then keeps its local rank's share (run.bind=auto, hvd_ba/cluster.py).
            # mpirun passes on only the variables named with -x (srun and horovodrun pass the whole
            # environment): the job's Horovod, NCCL, OpenMP, Gloo, torch.distributed (MASTER_ADDR,
            # MASTER_PORT, TORCH_*) and hvd_ba settings go too.
            local forward=(-x PATH -x LD_LIBRARY_PATH) name
            for name in $(compgen -e); do
                case "$name" in HOROVOD_*|NCCL_*|OMP_*|HVD_BA_*|PYTHONPATH|MASTER_ADDR|MASTER_PORT|GLOO_*|TORCH_*)
                    forward+=(-x "$name") ;;
                esac
            done
            CMD=(env -u SLURM_EXACT -u SRUN_CPUS_PER_TASK mpirun -np "$np" ${root_flag[@]+"${root_flag[@]}"}
                 --bind-to none --map-by slot "${forward[@]}" "$PYTHON" "$@") ;;
        torchrun)
            # One torchrun per node (srun starts it with all the cores of the node's tasks), each
            # starting that node's ranks; they meet at the first host, on a port from the job id.
            local nodes=${SLURM_JOB_NUM_NODES:?} endpoint
            if [ $((np % nodes)) != 0 ]; then
                job_log "error: LAUNCHER=torchrun needs the same tasks on every node: $np tasks on $nodes nodes"
                return 2
            fi
            endpoint=$("$PYTHON" -m hvd_ba hosts --format rendezvous) || return 2
            local node_cpus=()
            [ -n "${SLURM_CPUS_PER_TASK:-}" ] && node_cpus=(--cpus-per-task=$((SLURM_CPUS_PER_TASK * np / nodes)))
            # --kill-on-bad-exit=0: each torchrun ends when its ranks do (a rank that dies ends the
            # others through their collectives); srun killing the other node's torchrun while it
            # reported its ranks' 75 made the step's status 143 (seen in the 2x2 test)
            CMD=(srun --ntasks="$nodes" --ntasks-per-node=1 ${node_cpus[@]+"${node_cpus[@]}"} --kill-on-bad-exit=0
                 "$PYTHON" -m torch.distributed.run --nnodes="$nodes" --nproc-per-node=$((np / nodes))
                 --rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="$SLURM_JOB_ID" "$@") ;;
        *)
            job_log "error: LAUNCHER='$LAUNCHER' (choose srun, horovodrun, mpirun or torchrun)"; return 2 ;;
    esac
}

# run_step: runs CMD in the background, its output appended to the attempt's log, and waits for it;
# sets `status` to the launcher's own exit status and `step_log_start` to where its output begins
# in the attempt's log (the byte offset before the launch). A trapped signal ends `wait` early with 128+N
# while the launcher goes on stopping the ranks: wait again for the real status (the ranks' 75).
run_step() {
    step_log_start=$(stat -c %s "$attempt_log" 2>/dev/null || echo 0)
    local log_fd tee_pid i
    exec {log_fd}> >(tee -a "$attempt_log")
    tee_pid=$!
    "${CMD[@]}" >&"$log_fd" 2>&1 &
    pid=$!
    exec {log_fd}>&-  # the launcher holds the pipe alone now: tee ends when it (and its children) do
    while true; do
        interrupted=0
        wait "$pid"
        status=$?
        if [ "$interrupted" = 1 ] && [ "$status" -gt 128 ]; then continue; fi
        break
    done
    pid=""
    # tee may still be writing the launcher's last lines (the ranks' status, read below): give it
    # up to 10 s (a leftover child holding the pipe must not hold the job)
    for i in $(seq 100); do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.1; done
    # horovodrun and torchrun report 1 for any rank's failure; their messages name the ranks' status.
    if [ "$LAUNCHER" = horovodrun ] && [ "$status" = 1 ] \
            && tail -c +$((step_log_start + 1)) "$attempt_log" | grep -q "^Exit code: $PREEMPTED\$"; then
        status=$PREEMPTED
    fi
    if [ "$LAUNCHER" = torchrun ] && { [ "$status" = 1 ] || [ "$status" = 143 ]; }; then
        local codes; codes=$(tail -c +$((step_log_start + 1)) "$attempt_log" | sed -n 's/^ *exitcode *: *\(-\?[0-9]*\) .*/\1/p' | sort -u)
        # every rank stopped with a checkpoint (75), or was ended by srun after another node's did (-15)
        if echo "$codes" | grep -qx "$PREEMPTED" && ! echo "$codes" | grep -vqxE "$PREEMPTED|-15"; then
            status=$PREEMPTED
        fi
    fi
}

# remove_local_data: at the job's end (not before a requeue: the next attempt on the same node
# finds its copy, hash-checked), the default per-job folder on every node, one task per node
# (refused unless it is this user's private staging folder), unless KEEP_LOCAL_DATA=1. A
# LOCAL_DATA you set yourself is yours to remove.
remove_local_data() {
    [ "$STAGE" = 1 ] && [ "$local_data_default" = 1 ] && [ "${KEEP_LOCAL_DATA:-0}" != 1 ] || return 0
    trap '' USR1 TERM  # the job is ending: a late signal must not cut the removal short
    srun --ntasks-per-node=1 --nodes="$SLURM_JOB_NUM_NODES" --cpus-per-task=1 --kill-on-bad-exit=0 \
        "$PYTHON" -m hvd_ba stage --remove --config "$CONFIG" --set "${sets[@]}" 2>&1 | tee -a "$attempt_log"
}

# touch_stop_files: the stop file the ranks look at, on every node: run.stop_file as the overrides
# leave it, with $SLURMD_NODENAME / ${SLURMD_NODENAME} replaced by each node's name.
touch_stop_files() {
    local pattern=$stop_file word node
    for word in "${sets[@]}"; do
        case "$word" in run.stop_file=*) pattern=${word#run.stop_file=} ;; esac
    done
    for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null || echo "${SLURMD_NODENAME:-}"); do
        local f=${pattern//\$\{SLURMD_NODENAME\}/$node}
        touch "${f//\$SLURMD_NODENAME/$node}"
    done
}

# The attempt's state, set by run_job and read by the helpers above and below and by the signal
# handler (which can take no arguments): attempt_log, log_dir, restart, stop_file (OUT/STOP), sets
# (the --set overrides of every step), local_data_default; run_step's status, step_log_start and
# pid; the signals' interrupted, stop_asked, requeue_asked.
run_job() {
    set -u
    job_defaults
    restart=${SLURM_RESTART_COUNT:-0}
    log_dir="$OUT/logs/job-${SLURM_JOB_ID}"
    mkdir -p "$log_dir" || { job_log "error: cannot create $log_dir (OUT='$OUT')"; return 2; }
    attempt_log="$log_dir/attempt-$restart.log"
    stop_file="$OUT/STOP"
    # A stop asked of a previous attempt is removed by rank 0 once it holds the run's lock (a second
    # job on the same OUT must not delete the first one's pending STOP).

    # The signal traps come first: a preemption during the config check or the staging requeues too.
    requeue_asked=0 stop_asked=0 pid="" interrupted=0 status=0 sets=() step_log_start=0
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM

    sets=(data.path="$DATA" run.out_dir="$OUT" run.resume=auto run.stop_file="$stop_file")
    CRASH_REQUEUES=${CRASH_REQUEUES:-1}
    check_crash_requeues "$CRASH_REQUEUES" || return 2
    check_launcher "$LAUNCHER" || return 2
    BACKEND=${BACKEND:-horovod}
    check_backend "$BACKEND" "$LAUNCHER" || return 2
    check_stage "$STAGE" "$LOCAL_DATA" || return 2
    export HVD_BA_BACKEND=$BACKEND  # the backend that analyze, doctor and bench join under a launcher
    add_overrides "$@" || return 2
    log_attempt_start
    check_config || return 2

    if [ "$STAGE" = 1 ] && [ "$stop_asked" = 0 ]; then
        launch_staging || return 2
        run_step
        if [ "$status" != 0 ] && [ "$stop_asked" = 0 ]; then
            staging_failed "$status" "$step_log_start"
            return
        fi
    fi
    if [ "$stop_asked" = 0 ]; then
        launch_command -m hvd_ba train --config "$CONFIG" --set "${sets[@]}" || return 2
        job_log "launch: ${CMD[*]}" | tee -a "$attempt_log"
        run_step
    else
        job_log "stopped before training started" | tee -a "$attempt_log"
        status=$PREEMPTED
    fi
    trap - USR1 TERM
    echo "$status" > "$log_dir/attempt-$restart.exit"
    local crash=""
    crash=$(crash_signal "$status" "$step_log_start") || crash=""
    finish_attempt "$status" "$crash" "$stop_asked" "$requeue_asked"
}

# job_defaults: the defaults of the script's settings. LOCAL_DATA: a private folder of this job on
# each node's local disk (hvd_ba stage makes it 0700), removed at the job's end (local_data_default=1).
job_defaults() {
    PYTHON=${PYTHON:-python}
    STAGE=${STAGE:-0}
    SETTINGS=${SETTINGS:-}
    local_data_default=0
    if [ -z "${LOCAL_DATA:-}" ]; then
        LOCAL_DATA=${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/hvd_ba-$(id -un)-$SLURM_JOB_ID
        local_data_default=1
    fi
}

# on_signal USR1|TERM: asks the ranks to stop. USR1 (Slurm's --signal, or scancel --signal=USR1
# --batch): preemption, requeue after the checkpoint. TERM (scancel, or Slurm preempting with its
# own requeue): checkpoint only.
on_signal() {
    interrupted=1 stop_asked=1
    [ "$1" = USR1 ] && requeue_asked=1
    job_log "signal $1: asking the ranks to checkpoint and stop" | tee -a "$attempt_log"
    touch_stop_files
    if [ -n "$pid" ] && [ "$LAUNCHER" = srun ]; then kill -USR1 "$pid" 2>/dev/null; fi
    return 0
}

# check_crash_requeues VALUE: CRASH_REQUEUES is a whole number, 0 to 999.
check_crash_requeues() {
    case "$1" in
        ''|*[!0-9]*|????*) job_log "error: CRASH_REQUEUES='$1': a whole number of requeues after a crash, 0 to 999 (0: none)"; return 2 ;;
    esac
}

# check_launcher LAUNCHER: one of the four this script drives.
check_launcher() {
    case "$1" in
        srun|horovodrun|mpirun|torchrun) ;;
        *) job_log "error: LAUNCHER='$1' (choose srun, horovodrun, mpirun or torchrun)"; return 2 ;;
    esac
}

# check_stage STAGE LOCAL_DATA: STAGE is 0 or 1; with 1, LOCAL_DATA is an absolute path (it may
# name '$SLURMD_NODENAME', expanded on each task).
check_stage() {
    case "$1" in
        0) ;;
        1) case "$2" in
               /*|'$'*) ;;
               *) job_log "error: LOCAL_DATA='$2': an absolute path on each node's local disk (STAGE=1)"; return 2 ;;
           esac ;;
        *) job_log "error: STAGE='$1' (0: read DATA where it is, 1: copy each rank's shard to LOCAL_DATA first)"; return 2 ;;
    esac
}

# check_backend BACKEND LAUNCHER: the launcher can start the backend's ranks.
check_backend() {
    case "$1/$2" in
        horovod/torchrun) job_log "error: LAUNCHER=torchrun starts torch.distributed ranks: set BACKEND=torch"; return 2 ;;
        torch/horovodrun) job_log "error: BACKEND=torch runs under LAUNCHER=srun, mpirun or torchrun, not horovodrun"; return 2 ;;
        horovod/*|torch/*) ;;
        *) job_log "error: BACKEND='$1' (choose horovod or torch)"; return 2 ;;
    esac
}

# add_overrides ARGS...: appends to `sets` the backend, the static shards of LOCAL_DATA (STAGE=1),
# the words of SETTINGS, then ARGS (the sbatch command line's).
add_overrides() {
    [ "$BACKEND" = torch ] && sets+=(run.backend=torch)
    [ "$STAGE" = 1 ] && sets+=(data.shard=static data.local_path="$LOCAL_DATA")
    if [ -n "$SETTINGS" ]; then
        # Split by Python (quotes honoured, nothing globbed, a bracketed value kept whole).
        local words="$log_dir/attempt-$restart.settings"
        "$PYTHON" -m hvd_ba settings "$SETTINGS" > "$words" \
            || { job_log "error: SETTINGS='$SETTINGS' does not split into overrides; nothing launched" | tee -a "$attempt_log"; return 2; }
        local settings=()
        mapfile -d '' -t settings < "$words"
        sets+=("${settings[@]}")
    fi
    sets+=("$@")
}

# log_attempt_start: what this attempt runs, into its log; its environment beside it.
log_attempt_start() {
    {
        job_log "job $SLURM_JOB_ID attempt $restart ($SLURM_JOB_NAME): $SLURM_JOB_NUM_NODES nodes" \
                "[$SLURM_JOB_NODELIST], tasks per node $SLURM_TASKS_PER_NODE, cpus per task ${SLURM_CPUS_PER_TASK:-1}," \
                "launcher $LAUNCHER, backend $BACKEND"
        job_log "config $CONFIG; overrides:$(printf " '%s'" "${sets[@]}")"
        job_log "logs: $log_dir"
    } | tee -a "$attempt_log"
    env | grep -E '^(SLURM|SRUN|CUDA_VISIBLE|OMPI_|HOROVOD_|NCCL_)' | sort > "$log_dir/attempt-$restart.env"
}

# check_config: the resolved config, printed before anything runs (and checked: a bad key fails here).
check_config() {
    "$PYTHON" -m hvd_ba plan --show-config --config "$CONFIG" --ranks "$SLURM_NTASKS" --set "${sets[@]}" 2>&1 \
        | tee -a "$attempt_log"
    [ "${PIPESTATUS[0]}" = 0 ] || { job_log "error: the config does not load; nothing launched"; return 2; }
}

# launch_staging: CMD for the staging step (STAGE_VERIFY=size: trust the size of a file already there).
launch_staging() {
    local flags=()
    [ "${STAGE_VERIFY:-hash}" = size ] && flags=(--trust-size)
    job_log "staging static shards to $LOCAL_DATA" | tee -a "$attempt_log"
    launch_command -m hvd_ba stage ${flags[@]+"${flags[@]}"} --config "$CONFIG" --set "${sets[@]}"
}

# staging_failed STATUS OFFSET: the staging step ended with STATUS: a rank's crash requeues the job
# (while crash requeues are left: returns 0); else the job ends with 3, nothing trained.
staging_failed() {
    echo "$1" > "$log_dir/attempt-$restart.exit"
    local crash
    if crash=$(crash_signal "$1" "$2"); then
        trap - USR1 TERM  # the requeue's own TERM to this script is no preemption
        requeue_after_crash "$crash" staging "$1" && return 0
    fi
    job_log "error: staging failed (exit $1); nothing trained" | tee -a "$attempt_log"
    remove_local_data
    return 3
}

# finish_attempt STATUS CRASH STOP_ASKED REQUEUE_ASKED: what the training step's end means for the
# job, first match: the run is complete; its folder is full; it stopped with a checkpoint after
# USR1 (requeued); a rank crashed (requeued while crash requeues are left); else the job ends with
# the launcher's status (75 after a stop asked by TERM). Returns the job's exit status.
finish_attempt() {
    local status=$1 crash=$2 stop_asked=$3 requeue_asked=$4
    if run_complete "$status" "$crash" "$OUT"; then
        if [ -n "$crash" ]; then
            job_log "run complete: $OUT/result.json (a rank crashed after it was written: $crash, exit $status)" | tee -a "$attempt_log"
        else
            job_log "run complete: $OUT/result.json" | tee -a "$attempt_log"
        fi
        remove_local_data
        return 0
    fi
    if run_folder_full "$status" "$attempt_log"; then
        job_log "the run folder is full (exit $status): not requeued; free space in $OUT's file system, then" \
                "resubmit (it resumes from the last checkpoint)" | tee -a "$attempt_log"
        remove_local_data
        return "$status"
    fi
    if stopped_with_checkpoint "$status" "$requeue_asked" "$OUT"; then
        job_log "stopped with a checkpoint (exit $status${crash:+; a rank crashed: $crash}): requeueing job" \
                "$SLURM_JOB_ID" | tee -a "$attempt_log"
        requeue_job && return 0
        remove_local_data
        return "$status"
    fi
    # A rank killed by a fault (a segfault in a library: once in CI, rank 0 of a resumed attempt
    # under srun --mpi=pmix, seconds into its start-up) requeues the job CRASH_REQUEUES times
    # (default 1): the next attempt resumes from the last checkpoint. One more crash is taken as
    # the run's own. Not after a stop asked by TERM (scancel): the job was ending anyway.
    if [ -n "$crash" ] && { [ "$stop_asked" = 0 ] || [ "$requeue_asked" = 1 ]; }; then
        requeue_after_crash "$crash" training "$status" && return 0
    fi
    remove_local_data
    [ "$stop_asked" = 1 ] && [ "$status" = "$PREEMPTED" ] && return "$PREEMPTED"
    job_log "training failed with exit status $status; not requeued (see $attempt_log)" | tee -a "$attempt_log"
    return "$status"
}

# run_complete STATUS CRASH OUT: a result.json that parses and names the run of config.yaml (not a
# file that merely exists: a crash can leave an empty or torn one), after a clean exit or a rank's
# crash: one after it was written (in MPI's teardown) does not undo it.
run_complete() {
    { [ "$1" = 0 ] || [ -n "$2" ]; } && "$PYTHON" -m hvd_ba status --complete "$3" >/dev/null 2>&1
}

# run_folder_full STATUS LOG: the ranks' exit status for a full or read-only run folder; horovodrun
# reports 1 for any rank's status, so the ranks' one line in LOG tells it too.
run_folder_full() {
    [ "$1" = "$DISK_FULL" ] \
        || grep -qE "hvd_ba: rank [0-9]+: run folder .*(no space left on device|disk quota exceeded|read-only file system|is full)" "$2"
}

# stopped_with_checkpoint STATUS REQUEUE_ASKED OUT: the ranks stopped with a checkpoint after USR1.
# srun and mpirun pass the ranks' 75 on; horovodrun reports 1 for it, so the signal counts too. A
# stop before any training (config check, staging) requeues as well: nothing was lost.
stopped_with_checkpoint() {
    [ "$2" = 1 ] && { [ "$1" = "$PREEMPTED" ] || [ -e "$3/checkpoints/latest" ]; }
}

# requeue_job: scontrol requeue on this job; says so when Slurm refuses (a job submitted with
# --no-requeue, a site with JobRequeue=0) and fails.
requeue_job() {
    scontrol requeue "$SLURM_JOB_ID" && return 0
    job_log "error: scontrol requeue $SLURM_JOB_ID failed (submitted with --no-requeue, requeues off at this" \
            "site, or slurmctld unreachable): resubmit the job; it resumes from the last checkpoint" | tee -a "$attempt_log"
    return 1
}

# requeue_after_crash SIGNAL WHAT [STATUS]: requeues the job after a rank's crash during WHAT (staging,
# training; STATUS: the step's exit status, default $status) while it has crash requeues left; each is counted by a line in attempt-<n>.crash
# (appended: an attempt number that repeated would not reset the count), and a crash that cannot
# be counted (the log folder full or read-only) is not requeued: a requeue that could repeat
# without end is worse than a job that ends. A requeue that Slurm refuses is not counted.
requeue_after_crash() {
    local status=${3:-$status}
    local crashes; crashes=$(cat "$log_dir"/attempt-*.crash 2>/dev/null | wc -l)
    if [ "$crashes" -ge "$CRASH_REQUEUES" ]; then
        job_log "a rank crashed during $2 ($1, exit $status) after $crashes crash requeue(s)" \
                "(CRASH_REQUEUES=$CRASH_REQUEUES); not requeued" | tee -a "$attempt_log"
        return 1
    fi
    local record="$log_dir/attempt-$restart.crash"
    if ! echo "$1 during $2, exit $status" >> "$record"; then
        job_log "a rank crashed during $2 ($1, exit $status); not requeued: $log_dir cannot record the crash" \
                "(a requeue could repeat without end)" | tee -a "$attempt_log"
        return 1
    fi
    job_log "a rank crashed during $2 ($1, exit $status): requeueing job $SLURM_JOB_ID (crash requeue" \
            "$((crashes + 1)) of $CRASH_REQUEUES); its Python stack is in $attempt_log" | tee -a "$attempt_log"
    requeue_job && return 0
    sed -i '$d' "$record" 2>/dev/null  # not requeued: not counted
    [ -s "$record" ] || rm -f "$record"
    return 1
}

# crash_signal STATUS OFFSET: prints the fault that ended a rank (SIGSEGV, SIGBUS, SIGILL, SIGFPE,
# SIGABRT) and succeeds: srun and mpirun exit 128 + the signal; horovodrun and torchrun exit 1,
# and then the rank's faulthandler line in the attempt's log after OFFSET names it. SIGKILL (137:
# the OOM killer, an administrator) is no crash under srun and mpirun, whatever a peer printed
# after it; under horovodrun and torchrun a peer's abort after it still counts (one requeue).
crash_signal() {
    case "$1" in
        132) echo SIGILL; return 0 ;; 134) echo SIGABRT; return 0 ;; 135) echo SIGBUS; return 0 ;;
        136) echo SIGFPE; return 0 ;; 139) echo SIGSEGV; return 0 ;; 1) ;; *) return 1 ;;
    esac
    local line
    line=$(tail -c +$(($2 + 1)) "$attempt_log" 2>/dev/null \
           | grep -m1 -oE "Fatal Python error: (Segmentation fault|Bus error|Illegal instruction|Floating point exception|Aborted)")
    case "$line" in
        *Segmentation*) echo SIGSEGV ;; *Bus*) echo SIGBUS ;; *Illegal*) echo SIGILL ;; *Floating*) echo SIGFPE ;;
        *Aborted*) echo SIGABRT ;; *) return 1 ;;
    esac
}
