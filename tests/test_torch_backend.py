"""run.backend=torch: torch.distributed (Gloo) with DistributedDataParallel, launched by
`torchrun --nproc_per_node 2`: exact evaluation, resume across backends, the stall watchdog,
set-up without Horovod, and the refusals (the proof that 2 ranks equal 1 is in test_proof.py, the
faults that both backends share in test_resume.py)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from hvd_ba import dist
from hvd_ba.cluster import Launch, RendezvousError, launch_info, rendezvous
from hvd_ba.config import ConfigError, load_config
from hvd_ba.train.checkpoint import find_checkpoint
from helpers import (ENV, NO_COLLECTIVE_BUT_STEPS, OTHER_SUMMATION, PROOF, ROOT, RUN, TORCH,
                     assert_evaluation_equals_one_process, assert_same_run, kill_tree, launch, no_process_left,
                     rank_process, read_jsonl, read_steps, run_backend, side_by_side, start, torch_command, torchrun,
                     train_alone, wait_for_step)

# ------------------------------------------------------------------------------- evaluation


@pytest.mark.integration
def test_torch_two_rank_evaluation_equals_one_process(small_data, tmp_path):
    out = tmp_path / "run"
    r = torchrun(small_data, out, [*PROOF, "run.max_steps_per_epoch=4"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_evaluation_equals_one_process(small_data, out)


# ---------------------------------------------------------------- resume across backends

CROSS = [*RUN, "optim.epochs=1", "run.checkpoint_every=null", "run.sync_every=2"]


@pytest.mark.integration
def test_a_checkpoint_resumes_under_the_other_backend_at_the_exact_step(small_data, tmp_path):
    """A run stopped at an agreed step (its stop file) and resumed under the other backend gives
    the per-step losses and parameters of an uninterrupted run: horovod -> torch and torch ->
    horovod, their runs two at a time."""
    pairs = [("horovod", "torch"), ("torch", "horovod")]

    def stopped_and_resumed(first, second):
        """The run of `first` stopped by its stop file: its status and output, its checkpoint's
        step and its recorded steps; then its resume under `second`."""
        out, stop_file = tmp_path / f"{first}-then-{second}", tmp_path / f"stop-{first}"
        proc = start(first, small_data, out, [*CROSS, f"run.stop_file={stop_file}"])
        try:
            wait_for_step(out, 1, proc)
            stop_file.touch()  # after the start: an older one is a stale file of an earlier attempt
            output, _ = proc.communicate(timeout=120)
        except BaseException:
            if proc.poll() is None:  # (a launcher already gone was reaped: nothing of it to kill)
                kill_tree(proc)
            raise
        _, payload = find_checkpoint("auto", out)
        steps = [s["step"] for s in read_jsonl(out / "steps.jsonl")]
        stop_file.unlink()
        return proc.returncode, output, payload["step"], steps, \
            run_backend(second, small_data, out, [*CROSS, "run.resume=auto"])

    *stops, whole_torch, whole_horovod = side_by_side(
        *[lambda f=f, s=s: stopped_and_resumed(f, s) for f, s in pairs],
        lambda: run_backend("torch", small_data, tmp_path / "whole-torch", CROSS),
        lambda: run_backend("horovod", small_data, tmp_path / "whole-horovod", CROSS))
    for r in (whole_torch, whole_horovod):
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for (first, second), (code, output, stopped, steps, r) in zip(pairs, stops):
        where = f"{first} -> {second}"
        assert code != 0 and "stopped at step" in output, (where, output[-3000:])
        assert 2 <= stopped < 6 and steps == list(range(1, stopped + 1)), (where, stopped, steps)
        assert r.returncode == 0, where + "\n" + r.stdout[-3000:] + r.stderr[-3000:]
        assert "resumed from" in r.stdout + r.stderr, where
        try:  # the steps before the stop summed by the other backend
            assert_same_run(tmp_path / f"{first}-then-{second}", tmp_path / f"whole-{second}", steps=6,
                            atol=OTHER_SUMMATION)
        except AssertionError as err:
            raise AssertionError(f"{where}: {err}") from None


# ------------------------------------------------------------------------------ faults


@pytest.mark.integration
def test_torch_stopped_rank_ends_the_job_through_the_other_ranks_watchdog(small_data, tmp_path):
    out = tmp_path / "run"
    timeout = 12
    proc = start("torch", small_data, out, [*RUN, *NO_COLLECTIVE_BUT_STEPS, "optim.epochs=50", f"run.stall_timeout={timeout}"])
    wait_for_step(out, 3, proc)
    rank_process(proc, 1, "torch").send_signal(signal.SIGSTOP)
    t0 = time.time()
    output, _ = proc.communicate(timeout=120)
    seconds = time.time() - t0
    print(f"stopped rank -> job exit: {seconds:.1f} s (run.stall_timeout {timeout} s)")
    assert proc.returncode != 0
    # rank 0's watchdog ends it after 1.25 x the timeout; torchrun then sends the frozen rank SIGTERM
    # and waits its fixed 30 s grace (torch.distributed.elastic's shutdown timeout) before SIGKILL
    assert 1.25 * timeout <= seconds < 1.25 * timeout + 30 + 30, seconds
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s+exitcode\s*:\s*70 ", output), output[-3000:]
    assert re.search(r"hvd_ba: rank 0 on host \S+ stalled: no progress for \d+ s \(run.stall_timeout 12 s\) while "
                     r"waiting for step \d+ to finish", output), output[-3000:]
    time.sleep(1)
    assert no_process_left(out)


# ------------------------------------------------------------- without Horovod; refusals


def no_horovod_env(tmp_path) -> dict:
    """An environment where `import horovod` fails, as on a machine where it never built."""
    fake = tmp_path / "no_horovod" / "horovod"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named horovod (hidden by the test)')\n")
    return {**ENV, "PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}


@pytest.mark.integration
def test_the_torch_backend_trains_where_horovod_does_not_import(small_data, tmp_path):
    env = no_horovod_env(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import horovod"], capture_output=True, text=True, env=env)
    assert check.returncode != 0 and "hidden by the test" in check.stderr
    out = tmp_path / "run"
    r = torchrun(small_data, out, [*RUN, "optim.epochs=1"], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["world"] == 2
    r = subprocess.run([sys.executable, "-m", "hvd_ba", "train", "--config", "demo", "--set",
                        f"data.path={small_data}", f"run.out_dir={tmp_path / 'h'}", *RUN],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(
        "hvd_ba: error: run.backend=horovod needs Horovod, which does not import here"), r.stderr[-2000:]
    assert "run.backend=torch" in r.stderr
    # doctor: Horovod missing is a failure for the default backend, not for run.backend=torch
    r = subprocess.run([sys.executable, "-m", "hvd_ba", "doctor", "--config", "demo", "--set", *TORCH],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "not needed: run.backend=torch" in r.stdout, r.stdout + r.stderr


@pytest.mark.integration
def test_a_backend_started_by_the_other_backends_launcher_is_one_line(small_data, tmp_path):
    r = launch("gloo", small_data, tmp_path / "a", extra=TORCH)
    assert r.returncode != 0
    lines = [l for l in (r.stdout + r.stderr).splitlines() if "hvd_ba: error:" in l]
    assert len(lines) == 1 and "run.backend=torch, but horovodrun started this rank" in lines[0], r.stdout[-2000:]
    r = subprocess.run([*torch_command(small_data, tmp_path / "b", []), "run.backend=horovod"], capture_output=True,
                       text=True, timeout=120, env=ENV, cwd=ROOT)
    assert r.returncode != 0
    lines = [l for l in (r.stdout + r.stderr).splitlines() if "hvd_ba: error:" in l]
    assert len(lines) == 1 and "run.backend=horovod, but torchrun started this rank" in lines[0], r.stderr[-2000:]


@pytest.mark.unit
def test_torch_backend_config_refusals_name_the_key(small_data):
    with pytest.raises(ConfigError, match=r"optim.adasum.*no torch.distributed counterpart"):
        load_config("demo", [*TORCH, "optim.adasum=true"])
    with pytest.raises(ConfigError, match=r"optim.gradient_predivide_factor.*no torch.distributed counterpart"):
        load_config("demo", [*TORCH, "optim.gradient_predivide_factor=2.0"])
    with pytest.raises(ConfigError, match=r"run.backend.*must be one of"):
        load_config("demo", ["run.backend=nccl"])


@pytest.mark.unit
def test_rendezvous_from_torchrun_slurm_and_open_mpi_variables():
    srun = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "1",
            "SLURM_JOB_NODELIST": "gpu[07-08]"}
    launch = launch_info(srun)
    assert (launch.launcher, launch.rank, launch.world, launch.local_rank, launch.local_size) == ("srun", 3, 4, 1, 2)
    address, port = rendezvous(launch, srun)
    assert address == "gpu07" and 10000 <= port < 32768
    assert rendezvous(launch, {**srun, "SLURM_JOB_ID": "4243"})[1] != port  # another job, another port
    assert rendezvous(launch, {**srun, "SLURM_STEP_ID": "1"})[1] != port  # another step of the job too
    assert rendezvous(launch, {**srun, "SLURM_STEP_NODELIST": "gpu08"})[0] == "gpu08"
    assert rendezvous(launch, {**srun, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}) == ("head", 1234)
    missing = {k: v for k, v in srun.items() if k != "SLURM_JOB_NODELIST"}
    with pytest.raises(RendezvousError, match=r"SLURM_STEP_NODELIST and SLURM_JOB_NODELIST \(Slurm job 4242\)"):
        rendezvous(launch, missing)
    run = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400", **srun}  # torchrun inside a Slurm step
    assert launch_info(run) == Launch("torchrun", 1, 2, 1, 2, False)
    assert rendezvous(launch_info(run), run) == ("127.0.0.1", 29400)
    ompi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_NAMESPACE": "prterun-host-123@1"}
    address, port = rendezvous(launch_info(ompi), ompi)
    assert address == "127.0.0.1" and 10000 <= port < 32768
    spread = {**ompi, "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}  # two nodes, no Slurm, no MASTER_ADDR
    with pytest.raises(RendezvousError, match="MASTER_ADDR is unset and this is no Slurm job"):
        rendezvous(launch_info(spread), spread)


@pytest.mark.unit
def test_the_backend_that_commands_without_a_training_config_join():
    """analyze, doctor and bench breakdown under a launcher: HVD_BA_BACKEND (job.sh sets it)
    first, then the launcher's kind; a rank alone joins none."""
    srun_pmix = Launch("srun", 0, 2, 0, 1, pmi=True)
    assert dist.launched_backend(srun_pmix, {}) == "horovod"
    assert dist.launched_backend(srun_pmix, {"HVD_BA_BACKEND": "torch"}) == "torch"
    assert dist.launched_backend(Launch("torchrun", 0, 2, 0, 2), {}) == "torch"
    assert dist.launched_backend(Launch("horovodrun", 0, 2, 0, 2), {}) == "horovod"
    assert dist.launched_backend(Launch("srun", 0, 2, 0, 1), {}) is None
    assert dist.launched_backend(Launch("alone", 0, 1, 0, 1), {"HVD_BA_BACKEND": "torch"}) is None


ONE_ALLREDUCE = r"""
import contextlib, json, os, socket, sys
import torch, torch.distributed as td
from hvd_ba import dist
from hvd_ba.cluster import Launch
from hvd_ba.config import load_config
from hvd_ba.data.manifest import load_index
from hvd_ba.data.pipeline import make_train_loader
from hvd_ba.train import engine
from hvd_ba.train.run import build_state

data, sync_every_pass = sys.argv[1], sys.argv[2] == "1"
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
dist._torch_world = Launch("torchrun", 0, 1, 0, 1)
if sync_every_pass:  # what the step would do without no_sync
    dist.accumulating = lambda model, last: contextlib.nullcontext()
counts = {}
for chunks, impl in ((1, "split"), (2, "accumulate")):
    cfg = load_config("demo", [f"data.path={data}", "data.manifest_dir=null", "data.workers=0", "data.copies=2",
                               "data.unique_batch=8", "model.ghost_size=8", f"model.ghost_impl={impl}"])
    batch = next(iter(make_train_loader(load_index(data, "train", None), cfg, 0, 1)))
    state = build_state(cfg, 4, torch.device("cpu"), 1, 10)
    calls = []
    def hook(_, bucket):
        calls.append(bucket.index())
        fut = torch.futures.Future(); fut.set_result(bucket.buffer()); return fut
    state.model.register_comm_hook(None, hook)
    state.model.train()
    engine.train_step(state, batch, 0.1, cfg)
    counts[impl] = (state.forward_chunks, len(calls))
print(json.dumps(counts))
"""


@pytest.mark.integration
@pytest.mark.parametrize("sync_every_pass", [False, True])
def test_ghost_bn_accumulation_allreduces_once_per_step_under_ddp(sync_every_pass, small_data):
    """DDP's comm hook counts the allreduced buckets: the accumulate form (2 forward/backward
    passes) sends as many as the split form (1), because the first pass runs under no_sync;
    the same step without no_sync (the second case) sends more."""
    r = subprocess.run([sys.executable, "-c", ONE_ALLREDUCE, str(small_data), "1" if sync_every_pass else "0"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    (one_pass, split), (two_passes, accumulate) = counts["split"], counts["accumulate"]
    assert (one_pass, two_passes) == (1, 2) and split >= 1
    if sync_every_pass:  # every pass allreduced (DDP rebuilds its buckets after the first: not exactly 2x)
        assert accumulate > split, counts
    else:
        assert accumulate == split, counts


@pytest.mark.integration
def test_torch_resume_on_another_number_of_ranks_reads_the_same_files_at_the_same_lr(small_data, tmp_path):
    """Killed mid-epoch on 2 torch ranks, resumed on 1 (no process group) with the unique global
    batch kept: every step reads the files and uses the LR of an uninterrupted 2-rank run."""
    settings = {w: [*RUN, f"data.unique_batch={16 // w}", "run.record_reads=true"] for w in (1, 2)}
    reference, out = tmp_path / "reference", tmp_path / "run"

    def killed():
        proc = start("torch", small_data, out, settings[2])
        try:
            wait_for_step(out, 9, proc)
        finally:
            kill_tree(proc)

    r, _ = side_by_side(lambda: torchrun(small_data, reference, settings[2]), killed)  # independent runs
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref_files, ref_lrs = read_steps(reference)
    assert find_checkpoint("auto", out)[1]["world"] == 2
    r = train_alone(small_data, out, [*TORCH, *settings[1], "run.resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming a run of 2 ranks on 1" in r.stdout + r.stderr
    files, lrs = read_steps(out)
    assert sorted(files) == list(range(1, 13)) and files == ref_files
    assert lrs == pytest.approx(ref_lrs, rel=1e-12)
