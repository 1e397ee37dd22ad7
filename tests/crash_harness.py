"""Crash harness: kill a short training run at each of its file operations, resume it, and check
that the resumed run ends exactly as an uninterrupted one.

The run's own I/O functions (hvd_ba/fsio.py) count every write, fsync, rename and unlink; with
HVD_BA_CRASH_AT=N the process SIGKILLs itself at its N-th (a write after half its bytes). Each
run is a fork of this process (torch imported once; the parent only loads and compares results
between forks, and the runs use run.threads=1), so one crash point costs two short runs; the
points (each in its own folder) run --jobs at a time, two per core by default. With
--resume-crashes K[,K2...], the run crashed at K is resumed and that resume is itself crashed at each of
its operations before its first step (trimming records, rebuilding metrics.csv, rewriting
config.yaml), then resumed again. Usage (the tests call it):

    python tests/crash_harness.py DATA WORKDIR [--points 1,5,9 | --span FIRST,LAST] --set SETTINGS...

Prints one JSON line: {"operations": N, "covered": [...], "failures": [...]}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (imported before any fork: each run only forks)

from hvd_ba.cluster import usable_cores  # noqa: E402
from hvd_ba.config import load_config  # noqa: E402
from hvd_ba.fsio import read_records  # noqa: E402


def run_child(data: str, out: Path, settings: list[str], env: dict, log: Path) -> int:
    """One `python -m hvd_ba train` run as a fork of this process; its exit status (negative: the
    signal that killed it)."""
    pid = os.fork()
    if pid == 0:  # the child: a rank of world 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(env)
            from hvd_ba.train.run import main_rank

            cfg = load_config("demo", [f"data.path={data}", f"run.out_dir={out}", *settings])
            code = main_rank(cfg)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def in_parallel(points, task, jobs: int) -> list[dict]:
    """task(k) -> dict for every k, up to `jobs` at a time, each in a fork of this process (the
    points are independent: each has its own run folder); results in the order of `points`."""
    results, running, pending = {}, {}, list(points)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    while pending or running:
        while pending and len(running) < jobs:
            k = pending.pop(0)
            target = tmp / f"hvd_ba-crash-{os.getpid()}-{k}.json"
            pid = os.fork()
            if pid == 0:
                try:
                    result = task(k)
                except BaseException as err:  # reported as a failure of this point, never lost
                    result = {"point": k, "op": "?", "why": f"the harness failed: {err!r}"}
                target.write_text(json.dumps(result))
                os._exit(0)
            running[pid] = (k, target)
        pid, _ = os.wait()
        if pid in running:
            k, target = running.pop(pid)
            results[k] = json.loads(target.read_text()) if target.exists() else {
                "point": k, "op": "?", "why": "the harness's worker died"}
            target.unlink(missing_ok=True)
    return [results[k] for k in points]


def outcome(out: Path) -> dict:
    result = json.loads((out / "result.json").read_text())
    params = torch.load(out / "model.pt", weights_only=True)
    return {"steps": [(s["step"], s["loss"], s["lr"]) for s in read_records(out / "steps.jsonl")],
            "epochs": [m["epoch"] for m in read_records(out / "metrics.jsonl")],
            "train_loss": [m["train_loss"] for m in read_records(out / "metrics.jsonl")],
            "run_id": result.get("run_id"), "val_top1": result["val_top1"], "params": params}


def compare(a: dict, b: dict) -> str | None:
    """None when b ends as a: the same per-step losses and LRs, epochs, result and parameters."""
    if [s[0] for s in a["steps"]] != [s[0] for s in b["steps"]]:
        return f"steps {[s[0] for s in b['steps']]}"
    for (step, loss_a, lr_a), (_, loss_b, lr_b) in zip(a["steps"], b["steps"]):
        if abs(loss_a - loss_b) > 1e-6 or lr_a != lr_b:
            return f"step {step}: loss {loss_b} vs {loss_a}, lr {lr_b} vs {lr_a}"
    if a["epochs"] != b["epochs"]:
        return f"epochs {b['epochs']}"
    if any(abs(x - y) > 1e-6 for x, y in zip(a["train_loss"], b["train_loss"])):
        return f"epoch train losses {b['train_loss']} vs {a['train_loss']}"
    if a["val_top1"] != b["val_top1"] or not b["run_id"]:
        return f"result {b['val_top1']} / {b['run_id']}"
    for name, tensor in a["params"].items():
        if not torch.allclose(tensor.float(), b["params"][name].float(), atol=1e-6):
            return f"parameter {name}"
    return None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("workdir")
    p.add_argument("--points", default=None, help="comma-separated crash points (default: every operation)")
    p.add_argument("--span", default=None, metavar="FIRST,LAST",
                   help="crash points: from the first operation on a path containing FIRST to the first one after "
                        "it on a path containing LAST (e.g. ckpt-,metrics.csv: a checkpoint and the records after it)")
    p.add_argument("--resume-crashes", default=None, metavar="K",
                   help="crash at operation K (or at the first write of the file named K), then crash the resume "
                        "at each of its operations before its first step")
    # A run is mostly start-up and shutdown latency (about 3.5 s, under 1 s of it computing): two
    # per core keep the cores busy (measured on 2 cores, 8 points: 60 s one at a time, 26 s four).
    p.add_argument("--jobs", type=int, default=2 * usable_cores(),
                   help="crash points run at once (default: two per core of this process; each run uses one thread)")
    p.add_argument("--set", dest="settings", nargs="*", default=[])
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    reference = work / "reference"
    io_log = work / "reference-io.log"
    code = run_child(args.data, reference, args.settings, {"HVD_BA_IO_LOG": str(io_log)}, work / "reference.log")
    if code != 0:
        print(json.dumps({"error": f"reference run exited {code}", "log": (work / "reference.log").read_text()[-3000:]}))
        return 1
    operations = io_log.read_text().splitlines()
    expected = outcome(reference)
    if args.resume_crashes is not None:
        return resume_crashes(args, work, operations, expected)
    points = [int(x) for x in args.points.split(",")] if args.points else range(1, len(operations) + 1)
    if args.span:
        first, last = args.span.split(",")
        paths = [op.split(" ", 2)[2] for op in operations]
        start = next(i for i, path in enumerate(paths) if first in path)
        end = next(i for i in range(start, len(paths)) if last in paths[i])
        points = range(start + 1, end + 2)

    def crash_and_resume(k: int) -> dict:
        out, log = work / f"crash-{k}", work / f"crash-{k}.log"
        code = run_child(args.data, out, args.settings, {"HVD_BA_CRASH_AT": str(k)}, log)
        op = operations[k - 1].split(" ", 1)[1]
        if code != -signal.SIGKILL:
            return {"point": k, "op": op, "why": f"the crash run exited {code}, not killed"}
        code = run_child(args.data, out, [*args.settings, "run.resume=auto"], {}, log)
        why = f"the resumed run exited {code}" if code != 0 else compare(expected, outcome(out))
        if why:
            return {"point": k, "op": op, "why": why, "log": log.read_text()[-1500:]}
        shutil.rmtree(out)
        return {"point": k, "op": op}

    results = in_parallel(list(points), crash_and_resume, args.jobs)
    covered = [r for r in results if "why" not in r]
    failures = [r for r in results if "why" in r]
    print(json.dumps({"operations": len(operations), "covered": covered, "failures": failures}))
    return 0 if not failures else 1


def resume_crashes(args, work: Path, operations: list[str], expected: dict) -> int:
    """For each first crash K (comma-separated: an operation number, the first write of the file
    so named, or NAME#N its N-th write): crash at K; then the resume of that state is itself crashed at each of its
    operations before its first step's record, and resumed again: it must still end as the
    reference. All the series' points run in one pool."""
    resume = [*args.settings, "run.resume=auto"]
    series = []  # (k, the crashed folder, the resume's operations)
    for name in args.resume_crashes.split(","):
        name, _, nth = name.partition("#")  # NAME#N: the N-th write of that file
        writes = [i + 1 for i, op in enumerate(operations)
                  if op.split()[1] == "write" and op.split()[2].endswith("/" + name)]
        k = int(name) if name.isdigit() else writes[int(nth or 1) - 1]
        crashed = work / f"crash-{k}"
        code = run_child(args.data, crashed, args.settings, {"HVD_BA_CRASH_AT": str(k)}, work / f"crash-{k}.log")
        if code != -signal.SIGKILL:
            print(json.dumps({"error": f"the crash run at {k} exited {code}"}))
            return 1
        probe, probe_log = work / f"probe-{k}", work / f"probe-{k}-io.log"
        shutil.copytree(crashed, probe)
        run_child(args.data, probe, resume, {"HVD_BA_IO_LOG": str(probe_log)}, work / f"probe-{k}.log")
        series.append((k, crashed, probe_log.read_text().splitlines()))

    def crash_resume_and_resume(index: int) -> dict:
        k, crashed, ops, j = points[index]
        out, log = work / f"double-{k}-{j}", work / f"double-{k}-{j}.log"
        shutil.copytree(crashed, out)
        code = run_child(args.data, out, resume, {"HVD_BA_CRASH_AT": str(j)}, log)
        op = ops[j - 1].split(" ", 1)[1]
        if code != -signal.SIGKILL:
            return {"first_crash": k, "point": j, "op": op, "why": f"the crashed resume exited {code}"}
        code = run_child(args.data, out, resume, {}, log)
        why = f"the second resume exited {code}" if code != 0 else compare(expected, outcome(out))
        if why:
            return {"first_crash": k, "point": j, "op": op, "why": why, "log": log.read_text()[-1500:]}
        shutil.rmtree(out)
        return {"first_crash": k, "point": j, "op": op}

    points = []
    for k, crashed, ops in series:
        first_step = next(i for i, op in enumerate(ops) if op.split()[2].endswith("steps.jsonl") and op.split()[1] == "write")
        points += [(k, crashed, ops, j) for j in range(1, first_step + 1)]
    results = in_parallel(range(len(points)), crash_resume_and_resume, args.jobs)
    covered = [r for r in results if "why" not in r]
    failures = [r for r in results if "why" in r]
    print(json.dumps({"first_crashes": [{"point": k, "op": operations[k - 1]} for k, _, _ in series],
                      "covered": covered, "failures": failures}))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
