"""The sbatch scripts of slurm/ on a real Slurm: slurmctld + two slurmd emulating nodes n1 and n2
on this machine (cluster/local_slurm.sh). Skipped only when not root (it installs and starts
daemons); CI runs as root."""
import json
import os
import re
import subprocess
import time

import pytest

from conftest import ROOT
from hvd_ba.train import read_jsonl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a local Slurm needs root (apt, daemons)")

# 192 training images over 2 ranks at unique batch 8: 12 steps per epoch.
SETTINGS = ["data.workers=1", "data.copies=2", "data.unique_batch=8", "model.ghost_size=16",
            "optim.warmup_epochs=0", "optim.milestones=[]", "run.log_every=2", "run.sync_every=2",
            "run.threads=1"]  # the two emulated nodes share this machine's 2 cores


@pytest.fixture(scope="module")
def slurm():
    r = subprocess.run(["bash", str(ROOT / "cluster/local_slurm.sh"), "start"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return True


def submit(script, data, out, *overrides, **env) -> str:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "DATA": str(data), "OUT": str(out),
               "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "120", **env}
    r = subprocess.run(["sbatch", "--parsable", f"--output={out}.slurm.out", str(ROOT / "slurm" / script),
                        *SETTINGS, *overrides], capture_output=True, text=True, cwd=ROOT, env=environ, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_fields(job_id) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def wait_done(job_id, timeout=420, hurry_requeue=False) -> dict:
    """The job's final fields. hurry_requeue: Slurm holds a requeued job for about 2 minutes
    (Reason=BeginTime; measured here: 142 s); the test moves its start to 10 s from now to save
    most of that wait. Not to now: slurmd revoked the first run's credential, and a credential
    issued within the same second counts as revoked too ("Killing non-startable batch job: Job
    credential revoked", seen once in CI when the start was moved to now)."""
    deadline = time.time() + timeout
    hurried = False
    while time.time() < deadline:
        fields = job_fields(job_id)
        if (hurry_requeue and not hurried and fields.get("JobState") == "PENDING"
                and fields.get("Reason") == "BeginTime"):
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+10"], check=True)
            hurried = True
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return fields
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise TimeoutError(f"job {job_id} still {job_fields(job_id).get('JobState')} after {timeout} s")


def slurm_log(out) -> str:
    path = f"{out}.slurm.out"
    return open(path).read() if os.path.exists(path) else ""


def test_cpu_script_trains_on_two_nodes_with_srun(slurm, small_data, tmp_path):
    out = tmp_path / "run"
    job = submit("cpu.sbatch", small_data, out, "optim.epochs=2")
    fields = wait_done(job)
    log = slurm_log(out)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-4000:]
    assert fields["NodeList"] == "n[1-2]" and fields["Restarts"] == "0"

    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[-1]["val_top1"] is not None
    assert json.loads((out / "result.json").read_text())["world"] == 2
    assert (out / "checkpoints" / "latest").exists() and (out / "model.pt").exists()
    digests = {json.loads((out / f"rank{r}.json").read_text())["param_sha256"] for r in (0, 1)}
    assert len(digests) == 1  # the two nodes' ranks ended with the same parameters

    job_dir = out / "logs" / f"job-{job}"
    attempt = (job_dir / "attempt-0.log").read_text()
    assert "resolved config" in attempt and "copies: 2" in attempt  # the config, before training
    assert "epoch 2 done" in attempt and "run complete" in attempt
    assert (job_dir / "attempt-0.exit").read_text().strip() == "0"
    assert "SLURM_JOB_NODELIST=n[1-2]" in (job_dir / "attempt-0.env").read_text()
    assert "epoch 2 done" in log and "\r" not in log  # plain lines in the Slurm log, no progress bar


@pytest.mark.parametrize("launcher", ["srun", "horovodrun"])
def test_preemption_signal_checkpoints_requeues_and_resumes(slurm, small_data, tmp_path, launcher):
    """srun passes the signal to the ranks; ranks under horovodrun see it through run.stop_file."""
    out = tmp_path / "run"
    job = submit("cpu.sbatch", small_data, out, "optim.epochs=3", LAUNCHER=launcher)
    deadline = time.time() + 300
    while not (out / "steps.jsonl").exists() or len(read_jsonl(out / "steps.jsonl")) < 2:
        assert time.time() < deadline, slurm_log(out)[-3000:]
        assert job_fields(job).get("JobState") in ("PENDING", "RUNNING"), slurm_log(out)[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    fields = wait_done(job, timeout=600, hurry_requeue=True)
    log = slurm_log(out)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-4000:]
    assert fields["Restarts"] == "1", log[-4000:]

    job_dir = out / "logs" / f"job-{job}"
    first, second = (job_dir / "attempt-0.log").read_text(), (job_dir / "attempt-1.log").read_text()
    if launcher == "srun":
        # The ranks exit 75 together; srun reports 75, or 143 when --kill-on-bad-exit ended the
        # second rank's exit after the first rank's 75.
        assert (job_dir / "attempt-0.exit").read_text().strip() in ("75", "143")
        assert "task 0: Exited with exit code 75" in first or "task 1: Exited with exit code 75" in first
    else:
        assert "stop requested (stop file" in first  # horovodrun's ranks learnt it from OUT/STOP
    assert "signal USR1" in first and "requeueing" in first
    stopped = int(re.search(r"checkpoint \S+ckpt-0*(\d+)\.pt \(step (\d+)\)", first).group(2))
    assert 0 < stopped < 36
    assert "resumed from" in second and f"step {stopped}," in second
    steps = [s["step"] for s in read_jsonl(out / "steps.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 36  # no step lost or repeated
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((out / "result.json").read_text())["steps"] == 36


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_other_launchers_with_node_local_staging(slurm, small_data, tmp_path, launcher):
    out = tmp_path / "run"
    local = tmp_path / "local"
    job = submit("cpu.sbatch", small_data, out, "optim.epochs=1", "data.manifest_dir=null",
                 LAUNCHER=launcher, STAGE="1", LOCAL_DATA=f"{local}/$SLURMD_NODENAME")
    fields = wait_done(job)
    log = slurm_log(out)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-4000:]
    records = sorted(p.relative_to(local).parts[0] + "/" + p.name for p in local.rglob("rank*-of2.json"))
    if launcher == "mpirun":
        # Open MPI started one daemon per node through srun: each node staged into its own folder,
        # and mpi4py gathered the totals.
        assert records == ["n1/rank0-of2.json", "n2/rank1-of2.json"], log[-3000:]
        assert "stage: all 2 ranks: 240 files" in log
    else:
        # horovodrun runs hosts that resolve to this machine (n1, n2 -> 127.0.0.1) as local
        # processes of the batch step, on n1: both ranks stage into n1's folder.
        assert records == ["n1/rank0-of2.json", "n1/rank1-of2.json"], log[-3000:]
    assert "stage: rank 0 of 2" in log and "stage: rank 1 of 2" in log
    metrics = read_jsonl(out / "metrics.jsonl")
    assert metrics[-1]["bad_files"] == 0 and metrics[-1]["files_read"] > 0
    assert json.loads((out / "result.json").read_text())["world"] == 2


def test_a_bad_override_fails_before_anything_launches(slurm, small_data, tmp_path):
    out = tmp_path / "run"
    job = submit("cpu.sbatch", small_data, out, "data.copies=0")
    fields = wait_done(job)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0"
    log = slurm_log(out)
    assert "config key 'data.copies': must be >= 1" in log and "nothing launched" in log
    assert not (out / "steps.jsonl").exists()
