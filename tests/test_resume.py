"""Never lose a job, under either backend (horovodrun and torchrun): a run killed (SIGKILL,
mid-epoch) and resumed with run.resume=auto gives the same per-step losses and final parameters
as an uninterrupted run; a preempted rank stops all at one step with a checkpoint; a dead rank
ends the job; a non-finite loss stops it; checkpoints survive crashes."""
import random
import re
import shutil
import signal
import time

import pytest
import torch

from hvd_ba.train.checkpoint import checkpoint_dir, find_checkpoint
from helpers import (BACKENDS, RUN, assert_same_epochs, assert_same_run, kill_tree, killed_on_failure, launch,
                     no_process_left, rank_process, read_jsonl, run_backend, side_by_side, signalled, start,
                     wait_for_step)

pytestmark = pytest.mark.integration


def test_killed_run_resumes_step_exactly(small_data, tmp_path):
    """SIGKILL of the whole launcher tree mid-epoch, then run.resume=auto: the same per-step
    losses, epoch records and final parameters as an uninterrupted run, under each backend (their
    runs two at a time). With dropout (the global RNG of each rank draws every step): the RNG
    states come back, and no loader iterator draws from them (the loaders have their own
    generators)."""
    run = [*RUN, "model.dropout=0.3"]
    kill_at = {backend: random.Random().randint(3, 10) for backend in BACKENDS}

    def killed_and_resumed(backend):
        """The run killed at its step: the step reached, its checkpoint; then its resume."""
        out = tmp_path / f"killed-{backend}"
        proc = start(backend, small_data, out, run)
        try:
            reached = wait_for_step(out, kill_at[backend], proc)
        finally:
            kill_tree(proc)  # SIGKILL the launcher and every rank: no chance to clean up
        saved = find_checkpoint("auto", out)
        return reached, saved, run_backend(backend, small_data, out, [*run, "run.resume=auto"])

    # independent runs: each backend's killed run and its resume, and its uninterrupted reference
    *killed, ref_horovod, ref_torch = side_by_side(
        *[lambda b=b: killed_and_resumed(b) for b in BACKENDS],
        *[lambda b=b: run_backend(b, small_data, tmp_path / f"reference-{b}", run) for b in BACKENDS])
    for backend, ref, (reached, saved, r) in zip(BACKENDS, (ref_horovod, ref_torch), killed):
        out, reference = tmp_path / f"killed-{backend}", tmp_path / f"reference-{backend}"
        assert ref.returncode == 0, backend + "\n" + ref.stdout[-3000:] + ref.stderr[-3000:]
        assert saved is not None and saved[1]["step"] <= reached, backend
        assert r.returncode == 0, backend + "\n" + r.stdout[-3000:] + r.stderr[-3000:]
        assert f"resumed from {saved[0]}" in r.stdout + r.stderr, (backend, kill_at[backend])
        try:
            assert_same_run(out, reference, steps=12)
            # each epoch's metrics cover the whole epoch, the resumed one too (its partial sums were saved)
            assert_same_epochs(out, reference)
        except AssertionError as err:
            raise AssertionError(f"{backend}, killed at step {kill_at[backend]}: {err}") from None
        kept = sorted(p.name for p in checkpoint_dir(out).glob("ckpt-*.pt"))
        assert kept == ["ckpt-000000010.pt", "ckpt-000000012.pt"], backend  # the newest 2


def test_corrupt_latest_checkpoint_is_skipped(small_data, two_rank_run, tmp_path, caplog):
    out = shutil.copytree(two_rank_run, tmp_path / "run")  # a completed 2-rank Horovod run of [*RUN, "optim.epochs=1"]
    folder = checkpoint_dir(out)
    assert (folder / "latest").read_text() == "ckpt-000000006.pt"
    newest = folder / "ckpt-000000006.pt"
    # a writer killed mid-write leaves only its temporary file; the checkpoints stay whole
    (folder / ".ckpt-000000008.pt.4242.tmp").write_bytes(newest.read_bytes()[:1000])
    assert find_checkpoint("auto", out)[0] == newest
    newest.write_bytes(newest.read_bytes()[:1000])  # a damaged file (disk full, copied half)
    import logging

    with caplog.at_level(logging.WARNING, logger="hvd_ba"):
        path, payload = find_checkpoint("auto", out)
    assert path.name == "ckpt-000000004.pt" and payload["step"] == 4
    assert f"skipping checkpoint {newest}" in caplog.text
    r = launch("gloo", small_data, out, settings=[*RUN, "optim.epochs=1", "run.max_steps_per_epoch=6",
                                                  "run.resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:]
    assert "resumed from" in r.stdout and "ckpt-000000004.pt" in r.stdout
    assert not list(folder.glob(".*.tmp"))  # the dead writer's temporary file is cleaned up


@pytest.mark.parametrize("backend", BACKENDS)
def test_preemption_signal_on_one_rank_stops_all_with_a_checkpoint(backend, small_data, tmp_path):
    """SIGUSR1 and SIGTERM (two jobs side by side): each signal to one rank stops all ranks at one
    step with a checkpoint there, within the grace time, and the run resumes to its end."""

    def preempted(signame):
        """The job whose rank 1 gets `signame`: its seconds from the signal to its end, its status
        and output, then the resume's result."""
        out = tmp_path / signame
        proc = start(backend, small_data, out, [*RUN, "optim.epochs=20", "run.checkpoint_every=null",
                                                "run.sync_every=2"])
        with killed_on_failure(proc):
            wait_for_step(out, 3, proc)
            # Slurm signals one task; all must stop
            output, seconds = signalled(proc, lambda: rank_process(proc, 1, backend).send_signal(
                getattr(signal, signame)), 60)
        path, payload = find_checkpoint("auto", out)
        last = read_jsonl(out / "steps.jsonl")[-1]["step"]
        return seconds, proc.returncode, output, payload["step"], last, \
            run_backend(backend, small_data, out, [*RUN, "run.resume=auto"])

    for signame, (seconds, code, output, saved, last, r) in zip(
            ["SIGUSR1", "SIGTERM"], side_by_side(lambda: preempted("SIGUSR1"), lambda: preempted("SIGTERM"))):
        assert seconds < 30, ("the stop must come within the grace time", signame)
        assert code != 0, signame
        # both ranks stopped at the same step
        stops = re.findall(r"\[rank (\d)\] stopped at step (\d+)", output)
        assert sorted(rank for rank, _ in stops) == ["0", "1"] and len({step for _, step in stops}) == 1, \
            (signame, output[-3000:])
        if backend == "horovod":
            # The first to exit gave the preemption status 75. horovodrun then terminates the other
            # rank's `sh -c` wrapper, which may report 143 although the rank itself had finished (srun
            # and mpirun see 75 from every task).
            statuses = re.findall(r"exit with status code (-?\d+)", output)
            assert statuses[0] == "75" and set(statuses) <= {"75", "143"}, (signame, statuses)
            assert "143" not in statuses or "Terminating remaining workers after failure of Process" in output, signame
        else:  # torchrun itself exits 1 when any rank fails; it reports each rank's own status
            assert len(re.findall(r"exitcode\s*:\s*75 ", output)) == 2, (signame, output[-3000:])
        assert f"[rank 1] stop requested ({signame})" in output
        assert saved == last == int(stops[0][1]) >= 3, signame  # the checkpoint is at the step where all stopped
        assert r.returncode == 0, signame + "\n" + r.stdout[-3000:] + r.stderr[-3000:]
        assert [s["step"] for s in read_jsonl(tmp_path / signame / "steps.jsonl")] == list(range(1, 13)), signame


# How long the launcher takes to end the job after a rank's SIGKILL: torchrun sees its child die;
# horovodrun learns it from its Gloo rendezvous and then terminates the other ranks.
DEAD_RANK_SECONDS = {"horovod": 60, "torch": 30}


def test_dead_rank_ends_the_job_instead_of_hanging(small_data, tmp_path):
    """Under each backend (two jobs side by side, each mostly waiting for its launcher), a rank
    killed mid-run ends the job within its launcher's time, the launcher names the lost rank, and
    no process is left."""

    def dead_rank(backend):
        """The job of `backend` whose rank 1 is SIGKILLed: its seconds to its end, its status and
        output, and whether no process of it is left (under torchrun: 1 s later)."""
        out = tmp_path / backend
        proc = start(backend, small_data, out, [*RUN, "optim.epochs=20"])
        with killed_on_failure(proc):
            wait_for_step(out, 2, proc)
            output, seconds = signalled(proc, lambda: rank_process(proc, 1, backend).send_signal(signal.SIGKILL), 90)
        if backend == "torch":
            time.sleep(1)  # torchrun returns once its children are signalled, not reaped
        return seconds, proc.returncode, output, no_process_left(out)

    for backend, (seconds, code, output, none_left) in zip(
            BACKENDS, side_by_side(*[lambda b=b: dead_rank(b) for b in BACKENDS])):
        print(f"{backend}: dead rank -> job exit: {seconds:.1f} s")
        assert code != 0 and seconds < DEAD_RANK_SECONDS[backend], (backend, seconds, output[-3000:])
        if backend == "horovod":  # the launcher names the lost rank
            assert "Process 1 exit with status code" in output, output[-3000:]
        else:
            assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*-9", output), output[-3000:]
        assert none_left, backend


def test_non_finite_loss_stops_with_the_step(small_data, tmp_path):
    """Under each backend (two jobs side by side): a non-finite loss stops the run at its step; a
    checkpoint written before the fault holds finite weights."""
    setting = [*RUN, "optim.base_lr=1e9", "optim.warmup_epochs=0"]
    results = side_by_side(*[lambda b=b: run_backend(b, small_data, tmp_path / b, setting) for b in BACKENDS])
    for backend, r in zip(BACKENDS, results):
        out = tmp_path / backend
        assert r.returncode != 0, backend
        assert "non-finite loss at step" in r.stdout + r.stderr, backend
        steps = read_jsonl(out / "steps.jsonl")
        saved = find_checkpoint("auto", out)
        if saved is not None:  # a checkpoint written before the fault holds finite weights
            assert all(torch.isfinite(t).all() for t in saved[1]["model"].values() if t.is_floating_point()), backend
        assert steps == [] or all(s["step"] < 12 for s in steps), backend


def test_stop_agreed_at_an_epochs_last_step_finishes_that_epoch(small_data, tmp_path):
    """With agreement only at the epoch's end, a signal in epoch 1 stops the job after epoch 1's
    evaluation and checkpoint; the resumed run starts cleanly at epoch 2 (not an empty epoch)."""
    out = tmp_path / "run"
    proc = start("horovod", small_data, out, [*RUN, "run.sync_every=1000", "run.checkpoint_every=null"])
    wait_for_step(out, 2, proc)
    rank_process(proc, 0).send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=60)
    assert "[rank 0] stopped at step 6" in output, output[-3000:]
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1]
    path, payload = find_checkpoint("auto", out)
    assert (payload["step"], payload["epoch"], payload["step_in_epoch"]) == (6, 1, 0)
    r = launch("gloo", small_data, out, settings=[*RUN, "run.resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:]
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert [s["step"] for s in read_jsonl(out / "steps.jsonl")] == list(range(1, 13))


def test_ctrl_c_under_horovodrun_checkpoints_and_every_rank_exits_75(small_data, tmp_path):
    """Ctrl-C in a terminal: SIGINT to horovodrun's process group. horovodrun sends its ranks
    SIGTERM and kills them (137) after 5 s; they agree on a stop, checkpoint and leave with their
    own 75 before that. The run resumes to its end."""
    import os
    import subprocess

    from helpers import ENV, ROOT, backend_command

    out = tmp_path / "run"
    proc = subprocess.Popen(backend_command("horovod", small_data, out, [*RUN, "optim.epochs=20"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    wait_for_step(out, 3, proc)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    seconds = time.time() - t0
    statuses = re.findall(r"exit with status code (-?\d+)", output)
    assert statuses and set(statuses) == {"75"}, (statuses, output[-3000:])  # never killed: no 137
    assert proc.returncode == 1  # horovodrun's own report of a failed rank, as slurm/job.sh reads it
    stops = re.findall(r"\[rank (\d)\] stopped at step (\d+)", output)
    assert sorted(rank for rank, _ in stops) == ["0", "1"] and len({step for _, step in stops}) == 1, output[-3000:]
    assert seconds < 20, seconds  # horovodrun's grace is 5 s; measured about 1.5 s on a loaded 2-core machine
    _, payload = find_checkpoint("auto", out)
    assert payload["step"] == read_jsonl(out / "steps.jsonl")[-1]["step"] == int(stops[0][1])
    r = run_backend("horovod", small_data, out, [*RUN, "run.resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [s["step"] for s in read_jsonl(out / "steps.jsonl")] == list(range(1, 13))
