"""Crash consistency of everything a run writes: a kill at every file operation, a torn record,
a full disk, two jobs on one folder, data-layout errors as one line."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from hvd_ba.train.checkpoint import checkpoint_dir, save_checkpoint
from hvd_ba.fsio import DiskFull, read_records, trim_records
from helpers import (ENV, ONE_EPOCH, ROOT, SAME_RUN, kill_tree, launch, no_process_left, read_jsonl, side_by_side,
                     train_alone, train_command)

SHORT = ["data.workers=0", "data.copies=2", "data.unique_batch=8", "model.ghost_size=16", "optim.epochs=2",
         "optim.warmup_epochs=0.5", "run.max_steps_per_epoch=2", "run.log_every=1", "run.checkpoint_every=1",
         "run.threads=1", "data.manifest_dir=null"]


# The crash harness's scenarios, by the test that checks each: the harness runs those of the tests
# selected in one process (one reference per distinct settings: "every" and "resume" share one) and
# one pool, each run a fork of its warm parent (tests/crash_harness.py).
HARNESS_SCENARIOS = {
    "test_a_kill_at_every_file_operation_resumes_to_the_same_end": {"name": "every", "settings": SHORT},
    "test_a_kill_at_the_first_epoch_end_checkpoint_and_its_records_resumes": {
        "name": "epoch_end", "settings": [*SHORT, "run.checkpoint_every=null"], "span": "ckpt-,metrics.csv"},
    "test_a_kill_during_the_resume_of_a_crashed_run": {
        "name": "resume", "settings": SHORT, "resume_crashes": "metrics.jsonl,steps.jsonl#3"},
}
HARNESS_LIMIT = 1200  # s, the harness's run (each test's limit adds 120 s to it: the first one waits for it)


@pytest.fixture(scope="module")
def harness_reports(request, small_data, tmp_path_factory):
    """Each selected harness scenario's report by name (a missing one: the harness's error)."""
    selected = {item.originalname for item in request.session.items} & HARNESS_SCENARIOS.keys()
    plan = [scenario for test, scenario in HARNESS_SCENARIOS.items() if test in selected]
    work = tmp_path_factory.mktemp("crash")
    (work / "plan.json").write_text(json.dumps(plan))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_harness.py"), str(small_data), str(work / "runs"),
                        "--plan", str(work / "plan.json")], capture_output=True, text=True, timeout=HARNESS_LIMIT,
                       cwd=ROOT)
    lines = r.stdout.strip().splitlines()
    reports = json.loads(lines[-1]) if lines else {"error": f"the harness exited {r.returncode}: {r.stderr[-3000:]}"}
    return {scenario["name"]: reports.get(scenario["name"], reports) for scenario in plan}


@pytest.mark.crash
@pytest.mark.timeout(HARNESS_LIMIT + 120)
def test_a_kill_at_every_file_operation_resumes_to_the_same_end(harness_reports):
    """Every write, fsync, rename and unlink of a 4-step run (config, records, checkpoints,
    latest, model, rank and result files), each in turn: SIGKILL there (a write after half its
    bytes), resume with run.resume=auto, and end with the same per-step losses, epochs, result
    and parameters as the uninterrupted run."""
    report = harness_reports["every"]
    assert report.get("failures") == [], json.dumps(report.get("failures") or report)[:4000]
    ops = [c["op"].split()[0] for c in report["covered"]]
    print(f"crash points covered: {len(ops)} of {report['operations']} operations "
          f"({', '.join(f'{ops.count(k)} {k}' for k in ('write', 'fsync', 'rename', 'unlink'))})")
    assert len(ops) == report["operations"] >= 50
    assert {"write", "fsync", "rename", "unlink"} <= set(ops)
    files = {os.path.basename(c["op"].split()[1]) for c in report["covered"]}
    for name in ("steps.jsonl", "metrics.jsonl", "metrics.csv", "latest", "model.pt", "rank0.json", "result.json",
                 "config.yaml"):
        assert any(name in f for f in files), name


@pytest.mark.crash
@pytest.mark.timeout(HARNESS_LIMIT + 120)
def test_a_kill_at_the_first_epoch_end_checkpoint_and_its_records_resumes(harness_reports):
    """Checkpoints at epoch ends only (run.checkpoint_every=null, the presets' default): a kill at
    each operation of the run's first checkpoint (its write, fsyncs, renames, `latest`) and of the
    epoch's records after it, then run.resume=auto: the same end as the uninterrupted run.
    Measured before the fix (the epoch recorded before its checkpoint): a kill inside that first
    checkpoint left 1 epoch recorded and no checkpoint, and every resume was refused (found by a
    Slurm job whose rank 0 segfaulted there)."""
    report = harness_reports["epoch_end"]
    assert report.get("failures") == [], json.dumps(report.get("failures") or report)[:4000]
    ops = [c["op"] for c in report["covered"]]
    print(f"first epoch-end crash points covered: {len(ops)}")
    assert "ckpt-000000002.pt" in ops[0] and ops[0].startswith("write"), ops  # epoch 1 ends at step 2
    assert any(op.startswith("rename") and op.endswith("latest") for op in ops), ops
    assert ops[-2].startswith("write") and ops[-2].endswith("metrics.jsonl"), ops  # the record, after the checkpoint
    assert ops[-1].startswith("write") and ops[-1].endswith("metrics.csv"), ops


@pytest.mark.crash
@pytest.mark.timeout(HARNESS_LIMIT + 120)
def test_a_kill_during_the_resume_of_a_crashed_run(harness_reports):
    """Two crashed states, each resumed with the resume itself killed at each of its operations
    before its first step, then resumed again: the same end. Killed mid-append of epoch 1's
    metrics (after its checkpoint): the resume cuts the torn line, restores the epoch's record
    from the checkpoint, rebuilds metrics.csv, rewrites config.yaml. Killed mid-append of step
    3's record (after step 2's checkpoint): the resume cuts steps.jsonl back to step 2."""
    report = harness_reports["resume"]
    assert report.get("failures") == [], json.dumps(report.get("failures") or report)[:4000]
    metrics_first, steps_first = (c["point"] for c in report["first_crashes"])
    for first, names in ((metrics_first, ("metrics.jsonl", "metrics.csv", "config.yaml")),
                         (steps_first, ("steps.jsonl", "config.yaml"))):
        files = [os.path.basename(c["op"].split()[1]) for c in report["covered"] if c["first_crash"] == first]
        print(f"resume crash points covered: {len(files)} (after a crash at operation {first})")
        for name in names:
            assert any(name in f for f in files), (first, name, files)
    # the restore: an append to metrics.jsonl itself (a trim writes a temporary file and renames it)
    restored = [c["op"] for c in report["covered"] if c["first_crash"] == metrics_first]
    assert any(op.startswith("write") and op.endswith("/metrics.jsonl") for op in restored), restored


@pytest.mark.crash
def test_kills_at_the_checkpoint_writes_of_a_two_rank_run(small_data, tmp_path):
    settings = [*SHORT, "run.max_steps_per_epoch=3", "run.checkpoint_every=2", "run.threads=0"]
    reference = tmp_path / "reference"
    io_log = tmp_path / "io.log"
    r = subprocess.run(train_command("gloo", small_data, reference, settings=settings), capture_output=True,
                       text=True, timeout=300, cwd=ROOT,
                       env={**ENV, "HVD_BA_IO_LOG": str(io_log), "HVD_BA_CRASH_RANK": "0"})
    assert r.returncode == 0, r.stdout[-3000:]
    ops = io_log.read_text().splitlines()
    # the operations of the first checkpoint (mid-epoch, step 2) and of its `latest` pointer
    first = next(i for i, op in enumerate(ops) if "ckpt-000000002" in op)
    points = [i + 1 for i in range(first, first + 8)]
    assert [ops[p - 1].split()[1] for p in points] == ["write", "fsync", "rename", "fsync"] * 2
    expected_steps = read_jsonl(reference / "steps.jsonl")
    expected = torch.load(reference / "model.pt", weights_only=True)

    def crash_and_resume(k):
        out = tmp_path / f"crash-{k}"
        crashed = subprocess.run(train_command("gloo", small_data, out, settings=settings), capture_output=True,
                                 text=True, timeout=300, cwd=ROOT,
                                 env={**ENV, "HVD_BA_CRASH_AT": str(k), "HVD_BA_CRASH_RANK": "0"})
        return out, crashed, launch("gloo", small_data, out, settings=[*settings, "run.resume=auto"])

    # the points are independent (a folder each): two at a time
    for k, (out, crashed, r) in zip(points, side_by_side(*(lambda k=k: crash_and_resume(k) for k in points))):
        assert crashed.returncode != 0 and "Process 0 exit with status code" in crashed.stdout + crashed.stderr, \
            (k, crashed.stdout[-2000:])
        assert r.returncode == 0, (k, r.stdout[-3000:] + r.stderr[-2000:])
        got = read_jsonl(out / "steps.jsonl")
        assert [s["step"] for s in got] == [s["step"] for s in expected_steps], k
        for a, b in zip(expected_steps, got):
            assert a["loss"] == pytest.approx(b["loss"], abs=SAME_RUN) and a["lr"] == b["lr"], (k, a, b)
        final = torch.load(out / "model.pt", weights_only=True)
        assert all(torch.allclose(expected[n].float(), final[n].float(), atol=SAME_RUN) for n in expected), k
        shutil.rmtree(out)
    print(f"two-rank crash points covered: {len(points)} (rank 0 killed at each write/fsync/rename of a checkpoint)")


@pytest.mark.integration
def test_a_torn_last_record_is_cut_off_on_resume(small_data, tmp_path, caplog):
    out = tmp_path / "run"
    r = train_alone(small_data, out, [*SHORT, "run.checkpoint_every=null"])
    assert r.returncode == 0, r.stderr[-2000:]
    # what SIGKILL or a node crash leaves after an append: a partial last line in each log
    for name in ("steps.jsonl", "metrics.jsonl"):
        with open(out / name, "ab") as f:
            f.write(b'{"step": 5, "epoch": 2, "loss": 0.7, "l')
    assert len(read_records(out / "steps.jsonl")) == 4  # readers skip the torn line
    r = train_alone(small_data, out, [*SHORT, "run.checkpoint_every=null", "optim.epochs=3", "run.resume=auto"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert re.search(r"steps.jsonl: dropped a torn record of \d+ bytes", r.stdout + r.stderr)
    assert [s["step"] for s in read_jsonl(out / "steps.jsonl")] == list(range(1, 7))
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    for name in ("steps.jsonl", "metrics.jsonl"):
        for line in (out / name).read_text().splitlines():
            json.loads(line)  # every line whole again


@pytest.mark.unit
def test_trim_keeps_whole_records_and_rewrites_only_on_change(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    before = path.stat().st_mtime_ns
    time.sleep(0.01)
    trim_records(path, lambda r: r["step"] <= 2)
    assert path.stat().st_mtime_ns == before  # nothing to change: not rewritten
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    trim_records(path, lambda r: r["step"] <= 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


@pytest.mark.integration
def test_a_full_disk_stops_with_one_line_and_keeps_the_resume_point(small_data, tmp_path):
    out = tmp_path / "run"
    io_log = tmp_path / "io.log"
    r = train_alone(small_data, out, SHORT, env_extra={"HVD_BA_IO_LOG": str(io_log)})
    assert r.returncode == 0
    ops = io_log.read_text().splitlines()
    # ENOSPC at the write of the third checkpoint (step 3)
    k = next(int(op.split()[0]) for op in ops if "ckpt-000000003" in op and op.split()[1] == "write")
    shutil.rmtree(out)
    r = train_alone(small_data, out, SHORT, env_extra={"HVD_BA_FAIL_AT": f"{k}:ENOSPC"})
    assert r.returncode == 74, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stdout + r.stderr, r.stderr
    assert re.search(rf"run folder '{re.escape(str(out))}': no space left on device writing checkpoint "
                     r"'ckpt-000000003.pt' \(about \d+ bytes needed, \d+ free\)", lines[0]), lines[0]
    assert "ckpt-000000002.pt' stays the resume point" in lines[0] and "run.resume=auto" in lines[0]
    folder = checkpoint_dir(out)
    assert not list(folder.glob(".*.tmp"))  # the temporary file is gone
    assert (folder / "latest").read_text() == "ckpt-000000002.pt" and (folder / "ckpt-000000002.pt").is_file()
    # with space freed, the next start resumes and finishes
    r = train_alone(small_data, out, [*SHORT, "run.resume=auto"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert json.loads((out / "result.json").read_text())["steps"] == 4


@pytest.mark.unit
def test_a_checkpoint_that_will_not_fit_is_not_started(tmp_path, monkeypatch):
    import hvd_ba.train.checkpoint as ckpt

    save_checkpoint(tmp_path, {"step": 1, "run_id": "r", "model": {"w": torch.zeros(1000)}}, keep=3)
    monkeypatch.setattr(ckpt.fsio, "free_bytes", lambda path: 10 * 4096)  # 10 blocks free
    with pytest.raises(DiskFull, match=r"is full: a checkpoint needs about \d+ bytes, \d+ are free; .*ckpt-000000001"):
        save_checkpoint(tmp_path, {"step": 2, "run_id": "r", "model": {"w": torch.zeros(1000)}}, keep=3)
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["ckpt-000000001.pt", "latest"]


@pytest.mark.integration
def test_two_jobs_on_one_folder(small_data, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(train_command("gloo", small_data, out, settings=[*ONE_EPOCH, "optim.epochs=50"]),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not (out / "steps.jsonl").exists():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        lock = json.loads((out / ".lock").read_text())
        assert lock["host"] == socket.gethostname() and lock["pid"] > 0
        # a second job, fresh or resuming: stopped at once (the two side by side)
        for r in side_by_side(lambda: train_alone(small_data, out, ONE_EPOCH),
                              lambda: train_alone(small_data, out, [*ONE_EPOCH, "run.resume=auto"])):
            assert r.returncode == 2
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and f"run.out_dir '{out}' is in use by another job: host {lock['host']}, " \
                                       f"pid {lock['pid']}" in lines[0], r.stderr
        assert first.poll() is None  # the holder trains on
    finally:
        kill_tree(first)  # SIGKILL: the lock stays, its process gone
    deadline = time.time() + 20  # the killed ranks' loader workers are reaped by init
    while not no_process_left(out) and time.time() < deadline:
        time.sleep(0.2)
    assert (out / ".lock").exists() and no_process_left(out)
    r = launch("gloo", small_data, out, settings=[*ONE_EPOCH, "run.resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"breaking the lock of {out}: its process {lock['pid']} is gone" in r.stdout + r.stderr
    assert not (out / ".lock").exists()  # given up at the end


@pytest.mark.integration
def test_a_lock_from_another_host_is_honoured_until_stale(small_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 1234, "job": "777", "started": 0}))
    r = train_alone(small_data, out, ONE_EPOCH)
    assert r.returncode == 2 and "in use by another job: host node-elsewhere, pid 1234, Slurm job 777" in r.stderr
    old = time.time() - 1000
    os.utime(out / ".lock", (old, old))
    r = train_alone(small_data, out, [*ONE_EPOCH, "run.lock_stale_after=600"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"breaking the lock of .*: its heartbeat is 10\d\d s old", r.stdout + r.stderr)


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["empty class folder", "class mismatch"])
def test_data_layout_errors_are_one_line(damage, small_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    if damage == "empty class folder":
        (data / "train" / "n90000009").mkdir()
        expected = f"class folder '{data / 'train' / 'n90000009'}' has no images"
    else:
        shutil.copytree(data / "val" / "n90000003", data / "val" / "n90000007")
        expected = "train/ has 4 class folders, val/ has 5; only in val/: n90000007"
    r = launch("gloo", data, tmp_path / "run", settings=[*ONE_EPOCH, "data.manifest_dir=null"])
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "hvd_ba: error" in line]
    assert len(errors) == 1 and expected in errors[0], r.stdout[-2000:] + r.stderr[-2000:]
    assert not re.search(r"\[\d\]<std(out|err)>:Traceback", r.stdout + r.stderr)


@pytest.mark.integration
def test_two_concurrent_starts_on_one_folder(small_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hvd_ba", "train", "--config", "demo", "--set", f"data.path={small_data}",
           f"run.out_dir={out}", *ONE_EPOCH, "optim.epochs=3"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**ENV}) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(code for _, _, code in results)
    assert codes == [0, 2], [(code, err[-500:]) for _, err, code in results]
    loser = next(err for _, err, code in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and "is in use by another job: host" in loser, loser
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]  # one run, not two mixed


@pytest.mark.integration
def test_a_lock_left_by_an_earlier_attempt_of_the_same_slurm_job(small_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = {"host": "node-elsewhere", "pid": 4321, "job": "777", "restart": 0, "started": time.time()}
    (out / ".lock").write_text(json.dumps(lock))
    r = train_alone(small_data, out, ONE_EPOCH, env_extra={"SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "0"})
    assert r.returncode == 2 and "in use by another job" in r.stderr  # the same attempt: a live holder
    r = train_alone(small_data, out, ONE_EPOCH, env_extra={"SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "an earlier attempt (restart 0) of Slurm job 777 left it" in r.stdout + r.stderr


@pytest.fixture
def small_fs(tmp_path):
    """A real 12 MB file system (tmpfs), as root; skipped where mounting is not allowed."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.integration
def test_a_full_file_system_start_to_finish(small_data, small_fs):
    """On a real full tmpfs: the second checkpoint does not fit (one line, 74, the first stays);
    a restart on the still-full disk says so in one line (a dead writer's half file removed
    first); with space freed it resumes and finishes."""
    out = small_fs / "run"
    settings = [*SHORT, "run.keep_checkpoints=1"]
    r = train_alone(small_data, out, settings)
    assert r.returncode == 74, r.stdout[-2000:] + r.stderr[-2000:]
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "is full: a checkpoint needs about" in line[0] and "ckpt-000000001.pt' stays the " \
        "resume point" in line[0], r.stderr
    assert not list(checkpoint_dir(out).glob(".*.tmp"))
    planted = checkpoint_dir(out) / ".ckpt-000000002.pt.99999999.tmp"  # a dead writer's half checkpoint
    planted.write_bytes(b"\0" * (2 << 20))
    r = train_alone(small_data, out, [*settings, "run.resume=auto"])
    assert r.returncode == 74 and len(r.stderr.strip().splitlines()) == 1 and "is full" in r.stderr, r.stderr
    assert not planted.exists() and "Traceback" not in r.stdout + r.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    r = train_alone(small_data, out, [*settings, "run.resume=auto"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "result.json").read_text())["steps"] == 4
