"""Never lose a job: a run killed (SIGKILL, mid-epoch) and resumed with run.resume=auto gives the
same per-step losses and final parameters as an uninterrupted run; checkpoints survive crashes."""
import random
import re
import signal
import subprocess
import time

import psutil
import pytest
import torch

from conftest import ROOT
from hvd_ba.train.checkpoint import checkpoint_dir, find_checkpoint
from test_horovod import ENV, launch, read_jsonl, train_command

RUN = ["data.workers=1", "data.copies=2", "data.unique_batch=8", "model.ghost_size=16", "optim.epochs=2",
       "optim.warmup_epochs=0.5", "optim.base_lr=0.8", "optim.milestones=[1.5]", "run.max_steps_per_epoch=6",
       "run.log_every=1", "run.checkpoint_every=2", "run.keep_checkpoints=2"]
# A rank frozen after step 3 is met by its peers in a step's allreduce, not in a checkpoint's or
# an epoch end's collective (seen once in a full test run with checkpoints every 2 steps: the frozen rank had
# finished step 4's allreduce, and the watchdog named the checkpoint of step 4)
NO_COLLECTIVE_BUT_STEPS = ["run.checkpoint_every=null", "run.max_steps_per_epoch=12"]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it, and wait until all are gone (a killed
    rank not yet reaped still holds its run folder's lock for the next start)."""
    parent = psutil.Process(proc.pid)
    tree = parent.children(recursive=True) + [parent]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def start(data, out, extra=()):
    return subprocess.Popen(train_command("gloo", data, out, extra, settings=RUN), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)


def wait_for_step(out, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = read_jsonl(out / "steps.jsonl") if (out / "steps.jsonl").exists() else []
        if steps and steps[-1]["step"] >= step:
            return steps[-1]["step"]
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def test_killed_run_resumes_step_exactly(small_data, tmp_path):
    """With dropout (the global RNG of each rank draws every step): the RNG states come back, and
    no loader iterator draws from them (the loaders have their own generators)."""
    run = [*RUN, "model.dropout=0.3"]
    reference = tmp_path / "reference"
    r = launch("gloo", small_data, reference, settings=run)
    assert r.returncode == 0, r.stdout[-3000:]
    expected = read_jsonl(reference / "steps.jsonl")
    assert [s["step"] for s in expected] == list(range(1, 13))

    out = tmp_path / "killed"
    kill_at = random.Random().randint(3, 10)
    proc = start(small_data, out, extra=["model.dropout=0.3"])
    reached = wait_for_step(out, kill_at, proc)
    kill_tree(proc)  # SIGKILL the launcher and every rank: no chance to clean up
    saved = find_checkpoint("auto", out)
    assert saved is not None and saved[1]["step"] <= reached

    r = launch("gloo", small_data, out, settings=[*run, "run.resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"resumed from {saved[0]}" in r.stdout
    got = read_jsonl(out / "steps.jsonl")
    assert [s["step"] for s in got] == list(range(1, 13))  # no gap, no duplicate
    for a, b in zip(expected, got):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (kill_at, a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    final_a = torch.load(reference / "model.pt", weights_only=True)
    final_b = torch.load(out / "model.pt", weights_only=True)
    for name in final_a:
        assert torch.allclose(final_a[name].float(), final_b[name].float(), atol=1e-6), name
    # each epoch's metrics cover the whole epoch, the resumed one too (its partial sums were saved)
    for a, b in zip(read_jsonl(reference / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl"), strict=True):
        for key in ("epoch", "unique_images", "samples", "files_read", "bytes_read", "files_read_per_rank"):
            assert a[key] == b[key], (key, kill_at)
        for key in ("train_loss", "train_top1", "val_top1"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, kill_at)
    kept = sorted(p.name for p in checkpoint_dir(out).glob("ckpt-*.pt"))
    assert kept == ["ckpt-000000010.pt", "ckpt-000000012.pt"]  # the newest 2


def test_corrupt_latest_checkpoint_is_skipped(small_data, tmp_path, caplog):
    out = tmp_path / "run"
    r = launch("gloo", small_data, out, settings=[*RUN, "optim.epochs=1"])
    assert r.returncode == 0, r.stdout[-3000:]
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


def rank_process(proc: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of `rank` (not one of its loader workers) under this launcher."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                # a loader worker is a fork of its rank: same command line as its parent
                if p.cmdline()[1:3] == ["-m", "hvd_ba"] and p.parent().cmdline() != p.cmdline() \
                        and p.environ().get("HOROVOD_RANK") == str(rank):
                    return p
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    raise TimeoutError(f"rank {rank} not found")


def loader_workers(rank: psutil.Process) -> list[psutil.Process]:
    """A rank's loader workers: the children of its fork server (data.worker_start auto), or
    forks of the rank itself (same command line)."""
    workers = []
    for child in rank.children():
        line = child.cmdline()
        if "multiprocessing.forkserver" in " ".join(line):
            workers += child.children()
        elif line == rank.cmdline():
            workers.append(child)
    return workers


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM"])
def test_preemption_signal_on_one_rank_stops_all_with_a_checkpoint(signame, small_data, tmp_path):
    out = tmp_path / "run"
    proc = start(small_data, out, extra=["optim.epochs=20", "run.checkpoint_every=null", "run.sync_every=2"])
    wait_for_step(out, 3, proc)
    t0 = time.time()
    rank_process(proc, 1).send_signal(getattr(signal, signame))  # Slurm signals one task; all must stop
    output, _ = proc.communicate(timeout=60)
    assert time.time() - t0 < 30, "the stop must come within the grace time"
    assert proc.returncode != 0
    # Both ranks stopped at the same step and the first to exit gave the preemption status 75.
    # horovodrun then terminates the other rank's `sh -c` wrapper, which may report 143 although
    # the rank itself had finished (srun and mpirun see 75 from every task).
    stops = re.findall(r"\[(\d)\]<stdout>:\S+ \[rank \d\] stopped at step (\d+)", output)
    assert sorted(rank for rank, _ in stops) == ["0", "1"] and len({step for _, step in stops}) == 1, output[-3000:]
    statuses = re.findall(r"exit with status code (-?\d+)", output)
    assert statuses[0] == "75" and set(statuses) <= {"75", "143"}, statuses
    assert "143" not in statuses or "Terminating remaining workers after failure of Process" in output
    assert f"[rank 1] stop requested ({signame})" in output
    path, payload = find_checkpoint("auto", out)
    last = read_jsonl(out / "steps.jsonl")[-1]["step"]
    assert payload["step"] == last == int(stops[0][1]) >= 3  # the checkpoint is at the step where all stopped
    r = launch("gloo", small_data, out, settings=[*RUN, "run.resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:]
    assert [s["step"] for s in read_jsonl(out / "steps.jsonl")] == list(range(1, 13))


def test_dead_rank_ends_the_job_instead_of_hanging(small_data, tmp_path):
    out = tmp_path / "run"
    proc = start(small_data, out, extra=["optim.epochs=20"])
    wait_for_step(out, 2, proc)
    t0 = time.time()
    rank_process(proc, 1).send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=90)
    assert time.time() - t0 < 60
    assert proc.returncode != 0
    assert "Process 1 exit with status code" in output  # the launcher names the lost rank
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]


def test_non_finite_loss_stops_with_the_step(small_data, tmp_path):
    out = tmp_path / "run"
    r = launch("gloo", small_data, out, settings=[*RUN, "optim.base_lr=1e9", "optim.warmup_epochs=0"])
    assert r.returncode != 0
    assert "non-finite loss at step" in r.stdout + r.stderr
    steps = read_jsonl(out / "steps.jsonl")
    saved = find_checkpoint("auto", out)
    if saved is not None:  # a checkpoint written before the fault holds finite weights
        assert all(torch.isfinite(t).all() for t in saved[1]["model"].values() if t.is_floating_point())
    assert steps == [] or all(s["step"] < 12 for s in steps)


def test_stop_agreed_at_an_epochs_last_step_finishes_that_epoch(small_data, tmp_path):
    """With agreement only at the epoch's end, a signal in epoch 1 stops the job after epoch 1's
    evaluation and checkpoint; the resumed run starts cleanly at epoch 2 (not an empty epoch)."""
    out = tmp_path / "run"
    proc = start(small_data, out, extra=["run.sync_every=1000", "run.checkpoint_every=null"])
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
