"""slurm/job.sh's shell logic, run by bash on its own (no Slurm): the launcher's status after a
trapped signal, horovodrun's status of a preempted run, and the stop files touched per node."""
import os
import stat
import subprocess

import pytest

from helpers import ROOT

pytestmark = pytest.mark.integration

JOB_SH = ROOT / "slurm" / "job.sh"


def bash(script: str, tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source '{JOB_SH}'\n{script}"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={**os.environ, **env})


def test_a_signal_during_the_wait_records_the_launchers_status_not_the_shells(tmp_path):
    """The launcher ends (75) while the script's trap runs: `wait` said 138 (128 + USR1), the
    status the old loop recorded; run_step waits again and records the launcher's 75."""
    script = f"""
attempt_log='{tmp_path}/attempt.log'; LAUNCHER=srun
CMD=(bash -c 'trap "exit 75" USR1; while :; do sleep 0.05; done')
trap 'interrupted=1; kill -USR1 $pid; sleep 0.5' USR1
( sleep 1; kill -USR1 $$ ) &
run_step
echo "status=$status"
"""
    r = bash(script, tmp_path)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "status=75", r.stdout + r.stderr
    # TERM, as scancel sends it: the same.
    r = bash(script.replace("USR1", "TERM").replace('"exit 75" TERM', '"exit 75" TERM'), tmp_path)
    assert r.stdout.strip().splitlines()[-1] == "status=75", r.stdout + r.stderr


def test_horovodruns_status_of_a_preempted_run_is_the_ranks_75(tmp_path):
    """horovodrun exits 1 whatever its ranks' status; its message names the first rank's."""
    horovodrun_says = "Process name: 3\\nExit code: 75\\n"
    script = f"""
attempt_log='{tmp_path}/attempt.log'; echo 'an earlier step: Exit code: 75' > "$attempt_log"
LAUNCHER=horovodrun
CMD=(bash -c 'printf "{horovodrun_says}"; exit 1'); run_step; echo "preempted=$status"
CMD=(bash -c 'printf "Process name: 3\\nExit code: 1\\n"; exit 1'); run_step; echo "failed=$status"
LAUNCHER=srun; CMD=(bash -c 'printf "{horovodrun_says}"; exit 1'); run_step; echo "srun=$status"
"""
    r = bash(script, tmp_path)
    found = [line for line in r.stdout.splitlines() if line.split("=")[0] in ("preempted", "failed", "srun")]
    assert found == ["preempted=75", "failed=1", "srun=1"], r.stdout + r.stderr


def test_stop_files_are_touched_on_every_node(tmp_path):
    """A run.stop_file override naming $SLURMD_NODENAME: the script touches each node's file,
    since the ranks of each node look at their own."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames n[1-2]' ] && printf 'n1\\nn2\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    script = f"""
stop_file='{tmp_path}/STOP'; SLURM_JOB_NODELIST='n[1-2]'
sets=(data.path=/d 'run.stop_file={tmp_path}/STOP-$SLURMD_NODENAME' 'augment.scale=[0.25, 1.0]')
touch_stop_files
sets=('run.stop_file={tmp_path}/x/${{SLURMD_NODENAME}}.stop'); mkdir -p '{tmp_path}/x'; touch_stop_files
sets=(); touch_stop_files
"""
    r = bash(script, tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert r.returncode == 0, r.stderr
    made = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() and "bin" not in p.parts)
    assert made == ["STOP", "STOP-n1", "STOP-n2", "x/n1.stop", "x/n2.stop"]


def test_mpirun_passes_the_jobs_horovod_nccl_and_hvd_ba_settings_on(tmp_path):
    """mpirun forwards only the variables named with -x (srun and horovodrun forward all): a
    HOROVOD_CYCLE_TIME or NCCL_DEBUG set for the job must reach the ranks. Before: only PATH,
    LD_LIBRARY_PATH and HVD_BA_CPUS_PER_TASK went."""
    script = """
LAUNCHER=mpirun; SLURM_NTASKS=4; SLURM_CPUS_PER_TASK=1; PYTHON=python
launch_command -m hvd_ba train
printf '%s\\n' "${CMD[@]}"
"""
    r = bash(script, tmp_path, HOROVOD_CYCLE_TIME="20", NCCL_DEBUG="INFO", OMP_NUM_THREADS="1",
             UNRELATED_SECRET="x")
    words = r.stdout.split()
    assert r.returncode == 0 and words[:4] == ["env", "-u", "SLURM_EXACT", "-u"], r.stdout + r.stderr
    forwarded = {words[i + 1] for i, w in enumerate(words) if w == "-x"}
    assert {"HOROVOD_CYCLE_TIME", "NCCL_DEBUG", "OMP_NUM_THREADS", "HVD_BA_CPUS_PER_TASK", "PATH"} <= forwarded
    assert "UNRELATED_SECRET" not in forwarded
    assert words[-4:] == ["python", "-m", "hvd_ba", "train"]
    r = bash(script, tmp_path, MASTER_ADDR="head", GLOO_SOCKET_IFNAME="ib0", TORCH_DISTRIBUTED_DEBUG="INFO")
    forwarded = {w for i, w in enumerate(r.stdout.split()[1:]) if r.stdout.split()[i] == "-x"}
    assert {"MASTER_ADDR", "GLOO_SOCKET_IFNAME", "TORCH_DISTRIBUTED_DEBUG"} <= forwarded, r.stdout


def test_srun_starts_torch_ranks_without_mpi():
    """Horovod's ranks take their rank from PMIx; torch.distributed's from SLURM_PROCID, so a
    site without Slurm's PMIx plugin (or a set-up without mpi4py) still runs BACKEND=torch."""
    script = """
LAUNCHER=srun; SLURM_NTASKS=2; SLURM_CPUS_PER_TASK=2; PYTHON=python
launch_command -m hvd_ba train; echo "${CMD[1]}"
BACKEND=torch; launch_command -m hvd_ba train; echo "${CMD[1]}"
"""
    r = bash(script, ROOT)
    assert r.stdout.split() == ["--mpi=pmix", "--mpi=none"], r.stdout + r.stderr


def test_torchruns_status_of_a_preempted_run_is_the_ranks_75(tmp_path):
    """torchrun exits 1 whatever its ranks' status and lists each failed rank's exitcode: all 75
    (or 75 and the -15 of ranks srun ended after another node's 75) is a preemption."""
    def says(*codes):
        return "".join(f"  rank      : {i} (local_rank: {i})\\n  exitcode  : {c} (pid: 1{i})\\n"
                       for i, c in enumerate(codes))
    script = f"""
attempt_log='{tmp_path}/attempt.log'; echo '  exitcode  : 75 (pid: 9)' > "$attempt_log"
LAUNCHER=torchrun
CMD=(bash -c 'printf "{says(75, 75)}"; exit 1'); run_step; echo "both=$status"
CMD=(bash -c 'printf "{says(75, -15)}"; exit 1'); run_step; echo "ended_by_srun=$status"
CMD=(bash -c 'printf "{says(75, 75)}"; exit 143'); run_step; echo "srun_ended_the_other=$status"
CMD=(bash -c 'printf "{says(1, 75)}"; exit 1'); run_step; echo "one_failed=$status"
CMD=(bash -c 'printf "{says(-9)}"; exit 1'); run_step; echo "killed=$status"
CMD=(bash -c 'exit 1'); run_step; echo "nothing_said=$status"
"""
    r = bash(script, tmp_path)
    found = [line for line in r.stdout.splitlines() if "=" in line and " " not in line]
    assert found == ["both=75", "ended_by_srun=75", "srun_ended_the_other=75", "one_failed=1", "killed=1",
                     "nothing_said=1"], r.stdout + r.stderr


def test_torchrun_launch_is_one_torchrun_per_node_meeting_at_the_first_host(tmp_path):
    script = f"""
LAUNCHER=torchrun; SLURM_NTASKS=4; SLURM_JOB_NUM_NODES=2; SLURM_CPUS_PER_TASK=1; export SLURM_JOB_ID=4242
export SLURM_JOB_NODELIST='n[1-2]'; PYTHON={os.environ.get("PYTHON", "python")}
launch_command -m hvd_ba train && printf '%s\\n' "${{CMD[@]}}"
SLURM_NTASKS=3; launch_command -m hvd_ba train; echo "uneven=$?"
"""
    r = bash(script, tmp_path, PYTHONPATH=str(ROOT))
    words = r.stdout.split()
    assert words[:5] == ["srun", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=2", "--kill-on-bad-exit=0"], \
        r.stdout + r.stderr
    assert {"--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-id=4242"} <= set(words)
    endpoint = next(w for w in words if w.startswith("--rdzv-endpoint="))
    host, port = endpoint.split("=")[1].split(":")
    assert host == "n1" and 10000 <= int(port) < 32768
    assert "needs the same tasks on every node: 3 tasks on 2 nodes" in r.stdout and "uneven=2" in r.stdout


def test_a_crash_is_told_by_the_launchers_status_or_pythons_fault_line(tmp_path):
    """srun and mpirun exit 128+N for a rank's fatal signal; horovodrun and torchrun exit 1, and
    the rank's faulthandler line (prefixed by horovodrun) names it. Only this attempt's part of
    the log counts, and only with status 1: SIGKILL (the OOM killer) and SIGTERM are no crash,
    whatever a peer printed after them."""
    script = f"""
attempt_log='{tmp_path}/attempt.log'
echo '[1]<stderr>:Fatal Python error: Bus error' > "$attempt_log"  # an earlier launch's
offset=$(stat -c %s "$attempt_log")
for s in 139 134 135 132 136 137 143 1 0; do echo "$s=$(crash_signal $s $offset || echo none)"; done
echo '[0]<stderr>:Fatal Python error: Segmentation fault' >> "$attempt_log"
echo "hvd=$(crash_signal 1 $offset || echo none)"
echo "all=$(crash_signal 1 0 || echo none)"
for s in 137 143 2 0; do echo "after$s=$(crash_signal $s $offset || echo none)"; done
"""
    r = bash(script, tmp_path)
    found = dict(line.split("=") for line in r.stdout.splitlines() if "=" in line)
    assert found == {"139": "SIGSEGV", "134": "SIGABRT", "135": "SIGBUS", "132": "SIGILL", "136": "SIGFPE",
                     "137": "none", "143": "none", "1": "none", "0": "none", "hvd": "SIGSEGV", "all": "SIGBUS",
                     "after137": "none", "after143": "none", "after2": "none", "after0": "none"}, r.stdout + r.stderr


def test_crash_requeues_are_counted_and_end_when_spent_or_uncountable(tmp_path):
    """requeue_after_crash with a fake scontrol: requeues while the crashes recorded in
    attempt-<n>.crash (a line each, an attempt number that repeats included) are fewer than
    CRASH_REQUEUES; then says so and does not; never when the crash cannot be recorded (a requeue
    could repeat without end); a refused `scontrol requeue` is said, not hidden, and not counted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    fake = bin_dir / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> '{calls}'\n[ -z \"$REFUSE\" ]\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    logs = tmp_path / "logs"
    logs.mkdir()
    script = f"""
log_dir='{logs}'; attempt_log='{logs}/attempt.log'; SLURM_JOB_ID=7; status=139; CRASH_REQUEUES=2
restart=0; requeue_after_crash SIGSEGV training; echo "first=$?"
restart=0; requeue_after_crash SIGSEGV staging; echo "second=$?"  # an attempt number that repeated
restart=2; requeue_after_crash SIGSEGV training; echo "third=$?"
rm '{logs}'/attempt-*.crash; restart=3; REFUSE=1 requeue_after_crash SIGBUS training; echo "refused=$?"
[ -e '{logs}/attempt-3.crash' ] && echo "counted=yes" || echo "counted=no"
rm '{logs}'/attempt-*.crash; mkdir '{logs}/attempt-4.crash'  # a write there fails, even as root
restart=4; requeue_after_crash SIGSEGV training; echo "unrecorded=$?"
"""
    r = bash(script, tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    found = dict(line.split("=") for line in r.stdout.splitlines() if "=" in line and " " not in line)
    assert found == {"first": "0", "second": "0", "third": "1", "refused": "1", "counted": "no", "unrecorded": "1"}, \
        r.stdout + r.stderr
    assert calls.read_text().splitlines() == ["requeue 7"] * 3  # the first two, and the refused one
    log = (logs / "attempt.log").read_text()
    assert "a rank crashed during training (SIGSEGV, exit 139): requeueing job 7 (crash requeue 1 of 2)" in log
    assert "a rank crashed during staging (SIGSEGV, exit 139): requeueing job 7 (crash requeue 2 of 2)" in log
    assert "after 2 crash requeue(s) (CRASH_REQUEUES=2); not requeued" in log
    assert "error: scontrol requeue 7 failed" in log
    assert "a rank crashed during training (SIGSEGV, exit 139); not requeued: " in log
    assert "cannot record the crash (a requeue could repeat without end)" in log


def test_a_bad_crash_requeues_value_stops_the_job_before_anything_runs(tmp_path):
    """CRASH_REQUEUES must be a whole number 0-999: anything else is one line naming it, exit 2,
    nothing launched; a good value passes on to the next check (here a refused BACKEND)."""
    results = {}
    for value in ("abc", "-1", "1000", "", "0", "999"):
        script = f"""
OUT='{tmp_path}/out'; DATA=/data; CONFIG=demo; SLURM_JOB_ID=5; LAUNCHER=horovodrun; BACKEND=torch
CRASH_REQUEUES='{value}'
run_job; echo "rc=$?"
"""
        r = bash(script, tmp_path)
        results[value] = (r.stdout.strip().splitlines()[-1], "CRASH_REQUEUES=" in r.stdout, "BACKEND=torch" in r.stdout)
    # "" is the default (1), as unset
    assert results == {"abc": ("rc=2", True, False), "-1": ("rc=2", True, False), "1000": ("rc=2", True, False),
                       "": ("rc=2", False, True), "0": ("rc=2", False, True), "999": ("rc=2", False, True)}, results
    assert not (tmp_path / "out" / "steps.jsonl").exists()


def test_the_scripts_variables_are_checked_in_one_line_each(tmp_path):
    """LAUNCHER, BACKEND, STAGE, LOCAL_DATA, CRASH_REQUEUES: a bad value is one line and status 2,
    checked in this order before anything else of the job runs."""
    cases = [("LAUNCHER=ssh", "error: LAUNCHER='ssh' (choose srun, horovodrun, mpirun or torchrun)"),
             ("check_backend gpu srun", "error: BACKEND='gpu' (choose horovod or torch)"),
             ("check_backend torch horovodrun", "error: BACKEND=torch runs under LAUNCHER=srun, mpirun or torchrun"),
             ("check_stage yes /x", "error: STAGE='yes' (0: read DATA where it is, 1: copy each rank's shard"),
             ("check_stage 1 local", "error: LOCAL_DATA='local': an absolute path on each node's local disk"),
             ("check_crash_requeues -1", "error: CRASH_REQUEUES='-1': a whole number of requeues")]
    for command, line in cases:
        if command.startswith("LAUNCHER="):
            command = f"{command}; check_launcher \"$LAUNCHER\""
        r = bash(f"attempt_log='{tmp_path}/attempt.log'\n{command}\necho status=$?", tmp_path)
        said = [x for x in (r.stdout + r.stderr).splitlines() if "error:" in x]
        assert r.stdout.strip().splitlines()[-1] == "status=2" and len(said) == 1 and line in said[0], (command, r.stdout + r.stderr)
    for command in ("check_launcher torchrun", "check_stage 0 ''", "check_stage 1 '$SLURMD_NODENAME/x'",
                    "check_stage 1 /tmp/x", "check_crash_requeues 0"):
        r = bash(f"attempt_log='{tmp_path}/attempt.log'\n{command}\necho status=$?", tmp_path)
        assert r.stdout.strip().splitlines()[-1] == "status=0", (command, r.stdout + r.stderr)
