"""Runs that users re-run, resize and preempt: a run folder belongs to one run, a resume checks
what it resumes (and may change the number of ranks on purpose), a complete run stays complete,
signals during start-up, ranks that disagree on the data, and a stalled rank."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hvd_ba.train.checkpoint import checkpoint_dir, find_checkpoint, save_checkpoint
from hvd_ba.data.index import FileIndex
from hvd_ba.data.manifest import _folder_state, load_index, manifest_path, write_manifest
from helpers import (ENV, NO_COLLECTIVE_BUT_STEPS, ONE_EPOCH, ROOT, RUN, cli, gone, kill_tree, killed_on_failure,
                     launch, loader_workers, no_process_left, rank_process, read_jsonl, read_steps, run_cli,
                     side_by_side, signalled, snapshot, train_alone, train_command, wait_for_step)


@pytest.mark.integration
def test_fresh_start_over_a_run_is_refused_and_overwrite_moves_it_aside(small_data, one_rank_run, tmp_path):
    out = shutil.copytree(one_rank_run, tmp_path / "run")  # a completed train_alone run of ONE_EPOCH
    first = json.loads((out / "result.json").read_text())
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", first["run_id"])
    assert f"run_id: {first['run_id']}" in (out / "config.yaml").read_text()
    assert torch.load(find_checkpoint("auto", out)[0], weights_only=True)["run_id"] == first["run_id"]
    before = snapshot(out)

    r = train_alone(small_data, out, ONE_EPOCH)  # the same command again: refused, nothing touched
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"run.out_dir '{out}' already holds a run ({first['run_id']})" in lines[0], r.stderr
    for choice in ("run.resume=auto", "another run.out_dir", "run.overwrite=true"):
        assert choice in lines[0]
    assert snapshot(out) == before

    r = train_alone(small_data, out, ONE_EPOCH, ["run.overwrite=true"])
    assert r.returncode == 0, r.stderr[-2000:]
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and snapshot(moved[0]) == before  # moved whole, never deleted
    second = json.loads((out / "result.json").read_text())
    assert second["run_id"] != first["run_id"]
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1]


@pytest.mark.unit
def test_pruning_removes_only_this_runs_checkpoints_and_latest_names_a_file(tmp_path):
    def save(run_id, step):
        return save_checkpoint(tmp_path, {"step": step, "run_id": run_id, "model": {"w": torch.zeros(2)}}, keep=2)

    for step in (81, 162, 243):  # an older run with higher steps
        save("old", step)
    folder = checkpoint_dir(tmp_path)
    (folder / "ckpt-000000300.pt").write_bytes(b"not a checkpoint")  # unknown: never pruned
    for step in (2, 4, 6):
        newest = save("new", step)
        assert (folder / (folder / "latest").read_text()).is_file()
    names = sorted(p.name for p in folder.glob("ckpt-*.pt"))
    assert names == ["ckpt-000000004.pt", "ckpt-000000006.pt", "ckpt-000000162.pt", "ckpt-000000243.pt",
                     "ckpt-000000300.pt"]
    assert (folder / "latest").read_text() == newest.name == "ckpt-000000006.pt"
    # keep=1: the checkpoint just written stays even where an older step of the run sorts above it
    save_checkpoint(tmp_path, {"step": 5, "run_id": "new", "model": {}}, keep=1)
    assert (folder / "latest").read_text() == "ckpt-000000005.pt" and (folder / "ckpt-000000005.pt").is_file()
    assert not (folder / "ckpt-000000006.pt").exists() and (folder / "ckpt-000000243.pt").exists()


@pytest.mark.integration
def test_demo_run_twice_goes_to_a_fresh_folder(small_data, tmp_path, monkeypatch):
    quick = ["optim.epochs=1", "optim.warmup_epochs=0", "optim.milestones=[]", "run.max_steps_per_epoch=3",
             "data.workers=0", "data.unique_batch=8", "data.copies=2", "model.ghost_size=16"]
    outputs = []
    for _ in range(2):
        r = run_cli("demo", "--data", str(small_data), "--set", *quick, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        outputs.append(r.stdout)
    assert "runs/demo holds an earlier run; this one goes to runs/demo-2" in outputs[1]
    ids = [json.loads((tmp_path / d / "result.json").read_text())["run_id"] for d in ("runs/demo", "runs/demo-2")]
    assert ids[0] != ids[1]
    assert len(read_jsonl(tmp_path / "runs/demo/metrics.jsonl")) == 1
    monkeypatch.chdir(tmp_path)  # refused before any launch: in this process
    r = cli("demo", "--data", str(small_data), "--out", "runs/demo", "--set", *quick)
    assert r.returncode == 2 and "already holds a run" in r.stderr and "run.resume=auto" in r.stderr


@pytest.mark.integration
def test_resume_refuses_a_changed_schedule_or_data_order_in_one_line(small_data, two_rank_run, tmp_path):
    out = shutil.copytree(two_rank_run, tmp_path / "run")  # a completed run of ONE_EPOCH: 2 ranks x 8 unique images
    before = snapshot(out)
    # the measured case: a 2-rank checkpoint resumed on 1 rank with the same per-rank batch
    r = train_alone(small_data, out, [*ONE_EPOCH, "optim.epochs=2", "run.resume=auto"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for part in ("ranks 2 -> 1", "unique global batch 16 -> 8", "peak LR 0.05 -> 0.025",
                 "--set data.unique_batch=16 keeps the unique global batch of 16"):
        assert part in lines[0], lines[0]
    r = launch("gloo", small_data, out, settings=[*ONE_EPOCH, "optim.epochs=2", "run.resume=auto", "run.seed=3",
                                                  "optim.milestones=[0.5]", "data.copies=4", "optim.weight_decay=0.001",
                                                  "model.width=2"])
    assert r.returncode != 0
    message = [line for line in r.stderr.splitlines() if "hvd_ba: error" in line]
    assert len(message) == 1
    for part in ("data.copies 2 -> 4", "run.seed 0 -> 3", "optim.milestones [1.5] -> [0.5]",
                 "optim.weight_decay 0.0001 -> 0.001", "model.width 1.0 -> 2.0"):
        assert part in message[0], message[0]
    assert snapshot(out) == before  # nothing trained, nothing rewritten


@pytest.mark.integration
def test_resume_on_another_number_of_ranks_reads_the_same_files_at_the_same_lr(small_data, tmp_path):
    """Killed mid-epoch on one number of ranks, resumed on another with the unique global batch
    kept (2 ranks -> 1, and 1 -> 2): every step reads the same global set of files with the same LR
    as an uninterrupted run (one 2-rank reference for both)."""
    per_rank = {1: 16, 2: 8}
    settings = {w: [*RUN, f"data.unique_batch={per_rank[w]}", "run.record_reads=true"] for w in (1, 2)}
    reference = tmp_path / "reference"

    def killed_and_resumed(first, then):
        """The run on `first` ranks killed at step 9, its checkpoint, then its resume on `then`."""
        out = tmp_path / f"run-{first}-{then}"
        if first == 2:
            proc = subprocess.Popen(train_command("gloo", small_data, out, settings=settings[2]),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
        else:
            proc = subprocess.Popen([sys.executable, "-m", "hvd_ba", "train", "--config", "demo", "--set",
                                     f"data.path={small_data}", f"run.out_dir={out}", *settings[1]],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
        try:
            wait_for_step(out, 9, proc)
        finally:
            kill_tree(proc)
        saved = find_checkpoint("auto", out)[1]
        resume = [*settings[then], "run.resume=auto"]
        r = launch("gloo", small_data, out, settings=resume) if then == 2 else train_alone(small_data, out, resume)
        return out, saved, r

    # independent runs, two at a time: each killed run and its resume, and the reference
    *runs, r = side_by_side(lambda: killed_and_resumed(2, 1), lambda: killed_and_resumed(1, 2),
                            lambda: launch("gloo", small_data, reference, settings=settings[2]))
    assert r.returncode == 0, r.stdout[-3000:]
    ref_files, ref_lrs = read_steps(reference)
    assert sorted(ref_files) == sorted(ref_lrs) == list(range(1, 13))

    for (first, then), (out, saved, r) in zip([(2, 1), (1, 2)], runs):
        where = f"{first} ranks -> {then}"
        assert 2 <= saved["step"] <= 9 and saved["world"] == first, (where, saved["step"], saved["world"])
        assert r.returncode == 0, where + "\n" + r.stdout[-3000:] + r.stderr[-3000:]
        assert f"resuming a run of {first} ranks on {then}" in r.stdout + r.stderr, where
        files, lrs = read_steps(out)
        assert sorted(files) == sorted(lrs) == list(range(1, 13)), where
        assert files == ref_files, where
        assert lrs == pytest.approx(ref_lrs, rel=1e-12), where
        assert json.loads((out / "result.json").read_text())["world"] == then, where
        epochs = read_jsonl(out / "metrics.jsonl")
        assert [m["unique_images"] for m in epochs] == [6 * 16, 6 * 16], where  # the resumed epoch counted whole


@pytest.mark.integration
def test_a_complete_run_stays_complete(small_data, tmp_path):
    out = tmp_path / "run"
    stop_file = tmp_path / "STOP"
    # a stop asked during the only epoch, agreed only at its end = the final epoch's last step
    proc = subprocess.Popen([sys.executable, "-m", "hvd_ba", "train", "--config", "demo", "--set",
                             f"data.path={small_data}", f"run.out_dir={out}", *ONE_EPOCH, "run.sync_every=1000",
                             "run.checkpoint_every=null", f"run.stop_file={stop_file}", "data.workers=0",
                             "run.max_steps_per_epoch=20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    wait_for_step(out, 1, proc)
    stop_file.write_text("")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "stop requested (stop file" in output
    result = json.loads((out / "result.json").read_text())
    assert result["val_top1"] is not None and result["steps"] == 20
    stop_file.unlink()
    before = snapshot(out)
    r = train_alone(small_data, out, [*ONE_EPOCH, "run.resume=auto", "run.max_steps_per_epoch=20"])
    assert r.returncode == 0 and "is complete" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert snapshot(out) == before  # result.json, metrics, checkpoints: not a byte rewritten
    # killed after its last checkpoint, before result.json: the resume writes the outputs
    (out / "result.json").unlink()
    (out / "model.pt").unlink()
    r = train_alone(small_data, out, [*ONE_EPOCH, "run.resume=auto", "run.max_steps_per_epoch=20"])
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((out / "result.json").read_text())
    assert again["val_top1"] == result["val_top1"] and again["run_id"] == result["run_id"]
    rewritten = torch.load(out / "model.pt", weights_only=True)
    original = torch.load(io.BytesIO(before[Path("model.pt")]), weights_only=True)
    assert rewritten.keys() == original.keys() and all(torch.equal(rewritten[k], original[k]) for k in original)
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1]


@pytest.mark.integration
def test_a_slow_checkpoint_write_is_not_a_stall_and_one_that_never_returns_ends_the_job(small_data, tmp_path):
    """Rank 0's checkpoint write (its fsyncs) takes 18 s, longer than 1.25 x run.stall_timeout
    (12 s), within run.checkpoint_timeout: both ranks wait for it (rank 1 in the broadcast that
    follows) and the run completes. Measured on this machine's disk: one fsync of a 5.6 MB
    checkpoint took 144 s, which a 300 s stall_timeout nearly cut. Beside it (both runs mostly
    wait), a rank whose write never returns ends the job naming run.checkpoint_timeout."""
    out, hung = tmp_path / "run", tmp_path / "hung"
    settings = [*ONE_EPOCH, "run.checkpoint_every=null", "run.stall_timeout=12", "run.checkpoint_timeout=120"]
    pause = 18

    def slow():
        t0 = time.time()
        r = subprocess.run(train_command("gloo", small_data, out, settings=settings), capture_output=True, text=True,
                           timeout=300, cwd=ROOT,
                           env={**ENV, "HVD_BA_PAUSE_AT": "checkpoint_write", "HVD_BA_PAUSE_SECONDS": str(pause)})
        return r, time.time() - t0

    def never_returns():
        return train_alone(small_data, hung, [*ONE_EPOCH, "run.checkpoint_every=null", "run.checkpoint_timeout=3"],
                           env_extra={"HVD_BA_PAUSE_AT": "checkpoint_write", "HVD_BA_PAUSE_SECONDS": "60"})

    (r, seconds), h = side_by_side(slow, never_returns)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "hvd_ba: rank 0 paused at checkpoint_write" in r.stdout and "stalled: no progress" not in r.stdout + r.stderr
    assert seconds > pause and (out / "checkpoints" / "latest").exists()
    assert json.loads((out / "result.json").read_text())["world"] == 2

    assert h.returncode == 70, h.stdout[-3000:] + h.stderr[-3000:]  # the pause's end would give 0
    assert re.search(r"hvd_ba: rank 0 on host \S+ stalled: no progress for \d+ s \(run.checkpoint_timeout 3 s\) while "
                     r"waiting for its write of the checkpoint of step 6 to \S+/checkpoints; ending the job",
                     h.stderr), h.stderr[-3000:]


@pytest.mark.integration
@pytest.mark.parametrize("phase,rank,signame,everyone", [("indexes", 0, "SIGUSR1", False),
                                                          ("resume", 1, "SIGTERM", False),
                                                          ("indexes", 0, "SIGTERM", True)])
def test_a_signal_during_start_up_ends_the_job_with_75(phase, rank, signame, everyone, small_data, two_rank_run,
                                                       tmp_path):
    """One rank signalled (the others learn it from the launcher), or every rank as srun does
    (the one waiting in a collective sees Horovod shut down and knows it was stopping too)."""
    out = shutil.copytree(two_rank_run, tmp_path / "run")  # a completed 2-rank run of ONE_EPOCH, resumed for epoch 2
    before = snapshot(checkpoint_dir(out))
    env = {**ENV, "HVD_BA_PAUSE_AT": phase, "HVD_BA_PAUSE_RANK": str(rank)}
    proc = subprocess.Popen(train_command("gloo", small_data, out, settings=[*ONE_EPOCH, "optim.epochs=2",
                                                                             "run.resume=auto"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"rank {rank} paused at {phase}" in line:
            break
    else:
        raise AssertionError("".join(lines)[-3000:])
    for r in ((0, 1) if everyone else (rank,)):
        rank_process(proc, r).send_signal(getattr(signal, signame))
    t0 = time.time()
    rest, _ = proc.communicate(timeout=60)
    output = "".join(lines) + rest
    assert time.time() - t0 < 30
    assert f"Process {rank} exit with status code 75" in output, output[-3000:]
    assert f"rank {rank} stopped ({signame} during start-up)" in output
    assert not re.search(r"\[\d\]<std(out|err)>:Traceback", output), output[-3000:]  # none from a rank
    assert snapshot(checkpoint_dir(out)) == before  # the last checkpoint stays the resume point
    assert no_process_left(out)


@pytest.mark.integration
def test_ranks_that_see_different_data_stop_before_the_first_step(small_data, tmp_path):
    """A stale manifest on one node (emulated: rank 1 has its own cache with 2 files missing)."""
    cache = tmp_path / "manifests"
    train = small_data / "train"
    full = load_index(small_data, "train", None)
    stale = FileIndex.from_lists(full.root, full.paths[2:], full.labels[2:], full.sizes[2:], full.classes)
    write_manifest(manifest_path(train, cache / "1"), stale, _folder_state(train, list(full.classes)))
    out = tmp_path / "run"
    r = launch("gloo", small_data, out, settings=[*ONE_EPOCH, f"data.manifest_dir={cache}/$HOROVOD_RANK"])
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "hvd_ba: error" in line]
    assert len(errors) == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"rank 1 on host \S+ sees 190 training and 48 validation files, rank 0 on host \S+ sees 192 "
                     r"and 48", errors[0]), errors[0]
    assert not (out / "steps.jsonl").exists()


@pytest.mark.integration
def test_a_stalled_loader_worker_or_a_stopped_rank_ends_the_job_within_the_timeout(small_data, tmp_path):
    """Two jobs side by side (each mostly waits for a watchdog): in one, rank 1's loader worker is
    stopped as on a stalled file system, and rank 1's watchdog ends the job within the timeout; in
    the other, rank 1 itself is stopped (a deadlocked or frozen rank), and rank 0's watchdog ends
    the job after 1.25 x the timeout. No process of either is left, the stopped worker neither."""
    timeout = 12
    settings = [*RUN, *NO_COLLECTIVE_BUT_STEPS, "optim.epochs=50", f"run.stall_timeout={timeout}"]

    def stopped(what):
        """The job of `what` ('worker' or 'rank') to its end after the SIGSTOP: its status, its
        output, the seconds from the signal to its end, and whether 1 s later no process of it is
        left (the stopped one included)."""
        out = tmp_path / what
        proc = subprocess.Popen(train_command("gloo", small_data, out, settings=settings),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
        with killed_on_failure(proc):
            wait_for_step(out, 3, proc)
            if what == "worker":
                target = loader_workers(rank_process(proc, 1))
                assert len(target) == 1  # data.workers=1
                target = target[0]  # blocked as on a stalled file system
            else:
                target = rank_process(proc, 1)  # a deadlocked or frozen rank
            output, seconds = signalled(proc, lambda: target.send_signal(signal.SIGSTOP), 120)
        time.sleep(1)
        return proc.returncode, output, seconds, no_process_left(out) and gone(target)

    (code, output, seconds, worker_gone), (rank_code, rank_output, rank_seconds, rank_gone) = \
        side_by_side(lambda: stopped("worker"), lambda: stopped("rank"))

    print(f"stalled worker -> job exit: {seconds:.1f} s (run.stall_timeout {timeout} s)")
    assert code != 0
    assert timeout <= seconds < timeout + 30, seconds
    message = re.search(r"hvd_ba: rank 1 on host \S+ stalled: no progress for \d+ s \(run.stall_timeout 12 s\) while "
                        r"waiting for its data loader \(the batch of step \d+ of epoch \d+: (\S+)", output)
    assert message and os.path.isfile(message.group(1).rstrip(",")), output[-3000:]
    assert "leaked semaphore" not in output, output[-3000:]  # the watchdog's exit releases them too

    print(f"stopped rank -> job exit: {rank_seconds:.1f} s (run.stall_timeout {timeout} s)")
    assert rank_code != 0
    assert 1.25 * timeout <= rank_seconds < 1.25 * timeout + 30, rank_seconds
    assert re.search(r"hvd_ba: rank 0 on host \S+ stalled: no progress for \d+ s \(run.stall_timeout 12 s\) while "
                     r"waiting for step \d+ to finish \(forward, backward, allreduce with the other ranks\)",
                     rank_output), rank_output[-3000:]
    assert worker_gone  # no process of its job left, the stopped worker too
    assert rank_gone


def make_format_1(path, out):
    """A checkpoint as hvd_ba wrote it before run ids and plans (format 1)."""
    payload = torch.load(path, weights_only=True)
    for key in ("run_id", "plan", "partial"):
        payload.pop(key)
    payload["format"] = 1
    payload["rng"] = [states["cpu"] for states in payload["rng"]]
    folder = checkpoint_dir(out)
    folder.mkdir(parents=True)
    torch.save(payload, folder / path.name)
    (folder / "latest").write_text(path.name)
    return folder / path.name


@pytest.mark.integration
def test_format_1_checkpoints_resume_at_an_epoch_end_and_are_refused_mid_epoch(small_data, one_rank_run, tmp_path):
    source = one_rank_run  # [*RUN, "optim.epochs=1"] alone: checkpoints at steps 4 and 6 (epoch end); only read
    mid = make_format_1(checkpoint_dir(source) / "ckpt-000000004.pt", tmp_path / "mid")
    r = train_alone(small_data, tmp_path / "mid", [*RUN, "run.resume=auto"])
    assert r.returncode == 2 and "global shard order (hvd_ba version; a format-1 checkpoint mid-epoch) 1 -> 2" \
        in r.stderr, r.stderr
    make_format_1(checkpoint_dir(source) / "ckpt-000000006.pt", tmp_path / "end")
    r = train_alone(small_data, tmp_path / "end", [*RUN, "run.resume=auto", "optim.warmup_from=base"])
    assert r.returncode == 2 and "optim.warmup_from zero -> base" in r.stderr \
        and "continues with --set optim.warmup_from=zero" in r.stderr, r.stderr
    r = train_alone(small_data, tmp_path / "end", [*RUN, "run.resume=auto"])  # the demo preset: from zero
    assert r.returncode == 0, r.stderr[-2000:]
    assert [s["step"] for s in read_jsonl(tmp_path / "end" / "steps.jsonl")] == list(range(7, 13))
    # the adopted format-1 checkpoint is pruned like the run's own (keep 2)
    assert sorted(p.name for p in checkpoint_dir(tmp_path / "end").glob("ckpt-*")) == [
        "ckpt-000000010.pt", "ckpt-000000012.pt"]
    assert mid.is_file()


@pytest.mark.integration
def test_resume_without_a_checkpoint_never_retrains_over_a_runs_records(small_data, one_rank_run, tmp_path):
    out = shutil.copytree(one_rank_run, tmp_path / "run")  # a completed train_alone run of ONE_EPOCH
    shutil.rmtree(checkpoint_dir(out))  # checkpoints deleted to save quota; the run is complete
    before = snapshot(out)
    r = train_alone(small_data, out, [*ONE_EPOCH, "run.resume=auto"])
    assert r.returncode == 0 and "is complete" in r.stdout and snapshot(out) == before, r.stderr[-2000:]
    (out / "result.json").unlink()  # not complete, epochs recorded, nothing to resume from
    before = snapshot(out)
    r = train_alone(small_data, out, [*ONE_EPOCH, "run.resume=auto"])
    assert r.returncode == 2 and "with 1 epochs recorded but no checkpoint that loads" in r.stderr
    assert "run.overwrite=true" in r.stderr and snapshot(out) == before


@pytest.mark.integration
def test_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(small_data, tmp_path):
    out = tmp_path / "run"
    settings = [*RUN, "run.keep_checkpoints=10"]
    r = train_alone(small_data, out, settings)
    assert r.returncode == 0
    folder = checkpoint_dir(out)
    r = train_alone(small_data, out, [*settings, f"run.resume={folder / 'ckpt-000000004.pt'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from step 4: 4 later checkpoints of this run moved to" in r.stdout + r.stderr
    (aside,) = folder.glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == [f"ckpt-0000000{s:02d}.pt" for s in (6, 8, 10, 12)]
    assert sorted(p.name for p in folder.glob("ckpt-*")) == [f"ckpt-0000000{s:02d}.pt" for s in (2, 4, 6, 8, 10, 12)]


@pytest.mark.integration
def test_overwrite_of_a_symlinked_folder_and_of_the_working_directory(small_data, one_rank_run, tmp_path):
    real, link = tmp_path / "scratch" / "run", tmp_path / "run"
    real.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    shutil.copytree(one_rank_run, real)  # the link's target holds a completed train_alone run of ONE_EPOCH
    r = train_alone(small_data, link, [*ONE_EPOCH, "run.overwrite=true"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert link.is_symlink() and (real / "result.json").is_file()
    assert len(list((tmp_path / "scratch").glob("run.old-*"))) == 1  # the target was moved, the link kept
    r = run_cli("train", "--config", "demo", "--set", f"data.path={small_data}", "run.out_dir=.", *ONE_EPOCH,
                "run.overwrite=true", cwd=real)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "hvd_ba: error: run.overwrite: run.out_dir '.' is the working directory or holds it; it cannot be moved "
        "aside from here: choose another run.out_dir; nothing was started"]


@pytest.mark.integration
def test_a_stop_signal_while_a_stopped_rank_exits_keeps_its_75(small_data, tmp_path):
    """srun --kill-on-bad-exit and mpirun end the other tasks with SIGTERM as soon as one rank has
    exited 75; a rank still leaving (its checkpoint written, the interpreter shutting down) must
    keep its 75. Measured before the fix: CPython's shutdown resets Python signal handlers to the
    default, so such a SIGTERM turned the 75 into 143 (a Slurm CI run of srun 2x1)."""
    out, stop_file = tmp_path / "run", tmp_path / "STOP"
    proc = subprocess.Popen([sys.executable, "-m", "hvd_ba", "train", "--config", "demo", "--set",
                             f"data.path={small_data}", f"run.out_dir={out}", *RUN, "optim.epochs=20",
                             "run.checkpoint_every=null", "run.sync_every=1", f"run.stop_file={stop_file}",
                             "data.workers=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    wait_for_step(out, 1, proc)
    stop_file.write_text("")
    output = []
    for line in proc.stdout:  # wait for the stop, then signal the leaving rank until it is gone
        output.append(line)
        if "stopped at step" in line:
            break
    sent = 0
    while proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.002)
    output.append(proc.stdout.read())
    assert proc.wait() == 75, "".join(output)[-3000:]
    assert sent > 0


def interruptible() -> None:
    """In the child before exec: Ctrl-C's default action. A suite started in the background (`cmd &`
    in a script) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    the demo would not see the Ctrl-C the test sends."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.integration
def test_ctrl_c_on_the_demo_prints_where_it_stopped_and_the_resume_command(small_data, tmp_path):
    """Ctrl-C (SIGINT to the demo's process group: the demo and horovodrun): the ranks checkpoint
    and exit 75, the demo waits for horovodrun and ends with one line, the stop step, the run
    folder and the command that resumes it; no traceback of its own. That command finishes the run."""
    import shlex

    out = tmp_path / "out"
    quick = ["optim.epochs=6", "optim.warmup_epochs=0", "optim.milestones=[]", "run.max_steps_per_epoch=3",
             "data.workers=0", "data.unique_batch=8", "data.copies=2", "model.ghost_size=16", "run.log_every=1"]
    proc = subprocess.Popen([sys.executable, "-m", "hvd_ba", "demo", "--data", str(small_data), "--out", str(out),
                             "--set", *quick], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=tmp_path, start_new_session=True, preexec_fn=interruptible)
    wait_for_step(out, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    statuses = re.findall(r"exit with status code (-?\d+)", stdout)
    assert statuses and set(statuses) == {"75"}, stdout[-3000:]
    step = find_checkpoint("auto", out)[1]["step"]
    assert step < 18
    lines = [line for line in stderr.splitlines() if line.startswith("demo:")]
    assert len(lines) == 1 and lines == stderr.strip().splitlines()[-1:], stderr[-3000:]
    assert f"stopped at step {step} (run folder {out})" in lines[0]
    # horovodrun's own report of a failed rank is a traceback of horovodrun's; none is ours
    assert stderr.count("Traceback") == stderr.count("bin/horovodrun\", line"), stderr[-3000:]
    command = shlex.split(lines[0].split("resume it with: ", 1)[1])
    assert command[:4] == ["python", "-m", "hvd_ba", "demo"] and command[-1] == "run.resume=auto"
    r = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from" in r.stdout, r.stdout[-2000:]
    assert [s["step"] for s in read_jsonl(out / "steps.jsonl")] == list(range(1, 19))
    assert json.loads((out / "result.json").read_text())["steps"] == 18
