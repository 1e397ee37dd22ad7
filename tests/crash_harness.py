"""Crash harness: kill a short training run at each of its file operations, resume it, and check
that the resumed run ends exactly as an uninterrupted one.

The run's own I/O functions (hvd_ba/fsio.py) count every write, fsync, rename and unlink; with
HVD_BA_CRASH_AT=N the process SIGKILLs itself at its N-th (a write after half its bytes). Each
run is a fork of this process (torch imported once; the parent only loads and compares results
between forks, and the runs use run.threads=1), so one crash point costs two short runs; the
points (each in its own folder) run --jobs at a time, two per core by default. With
--resume-crashes K[,K2...], the run crashed at K is resumed and that resume is itself crashed at each of
its operations before its first step (trimming records, rebuilding metrics.csv, rewriting
config.yaml), then resumed again. Usage:

    python tests/crash_harness.py DATA WORKDIR [--points 1,5,9 | --span FIRST,LAST] --set SETTINGS...
    python tests/crash_harness.py DATA WORKDIR --plan SCENARIOS.json     (what tests/test_crash.py runs)

Prints one JSON line: {"operations": N, "covered": [...], "failures": [...]}.

With --plan FILE (a JSON list of scenarios, each {"name", "settings", and "points", "span" or
"resume_crashes" as above}) it runs several scenarios at once: one uninterrupted reference per
distinct settings, shared by the scenarios that have them, and every crash point of every
scenario in one pool; it prints one JSON line {NAME: the scenario's report, ...} (or {"error"}).

The parent imports everything a run imports (torch, torchvision through hvd_ba.train.run,
horovod.torch) before its first fork, and runs no torch operation before the references end:
a run's child then starts in well under a second instead of importing for 5 s of CPU. The crash
injection is unchanged by this: hvd_ba/fsio.py reads HVD_BA_CRASH_AT and HVD_BA_IO_LOG from the
environment at each operation (the child sets them after the fork), its operation count starts at
0 in every child (the parent performs no counted operation), and the run's own start (backend
init, run folder, model, loaders) all happens in the child, which is SIGKILLed as before.
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

from hvd_ba.train.run import main_rank  # noqa: E402,F401  (torchvision too: imported once, here)

try:  # the Horovod backend's module (its library loads here; hvd.init() runs in each child)
    import horovod.torch  # noqa: E402,F401
except ImportError:  # the child then reports it as a run would
    pass

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
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="a JSON list of scenarios ({name, settings, points|span|resume_crashes}) run in one pool")
    # A run is mostly start-up and shutdown latency (about 3.5 s, under 1 s of it computing): two
    # per core keep the cores busy (measured on 2 cores, 8 points: 60 s one at a time, 26 s four).
    p.add_argument("--jobs", type=int, default=2 * usable_cores(),
                   help="crash points run at once (default: two per core of this process; each run uses one thread)")
    p.add_argument("--set", dest="settings", nargs="*", default=[])
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if args.plan:
        scenarios = json.loads(Path(args.plan).read_text())
    else:
        scenarios = [{"name": "", "settings": args.settings, "points": args.points, "span": args.span,
                      "resume_crashes": args.resume_crashes}]
    reports = run_scenarios(args.data, work, scenarios, args.jobs)
    ok = "error" not in reports and all(not r.get("failures") and "error" not in r for r in reports.values())
    print(json.dumps(reports if args.plan else reports.get("", reports)))
    return 0 if ok else 1


def run_scenarios(data: str, work: Path, scenarios: list[dict], jobs: int) -> dict:
    """Every scenario's report by name ({"error": ...} when a reference or a first crash failed).
    One reference per distinct settings (the references side by side), then the first crashes of
    the resume scenarios side by side, then every crash point of every scenario in one pool."""
    # ---- the uninterrupted references
    distinct = []
    for sc in scenarios:
        if sc["settings"] not in distinct:
            distinct.append(sc["settings"])
    named = len(distinct) > 1

    def reference_dir(i: int) -> Path:
        return work / (f"reference-{i}" if named else "reference")

    def run_reference(i: int) -> dict:
        ref = reference_dir(i)
        io_log, log = ref.with_name(ref.name + "-io.log"), ref.with_name(ref.name + ".log")
        code = run_child(data, ref, distinct[i], {"HVD_BA_IO_LOG": str(io_log)}, log)
        if code != 0:
            return {"error": f"reference run exited {code}", "log": log.read_text()[-3000:]}
        return {}

    for failed in in_parallel(range(len(distinct)), run_reference, jobs):
        if failed:
            return failed
    operations = [reference_dir(i).with_name(reference_dir(i).name + "-io.log").read_text().splitlines()
                  for i in range(len(distinct))]
    expected = [outcome(reference_dir(i)) for i in range(len(distinct))]

    # ---- each scenario's folder, reference and points; the resume scenarios' first crashes
    plans = []  # (scenario, its folder, index of its reference)
    for sc in scenarios:
        base = work / sc["name"] if sc["name"] else work
        base.mkdir(parents=True, exist_ok=True)
        plans.append((sc, base, distinct.index(sc["settings"])))
    firsts = []  # (scenario index, K): a first crash of a resume scenario
    for s, (sc, base, ref) in enumerate(plans):
        for name in (sc.get("resume_crashes") or "").split(",") if sc.get("resume_crashes") else []:
            name, _, nth = name.partition("#")  # NAME#N: the N-th write of that file
            writes = [i + 1 for i, op in enumerate(operations[ref])
                      if op.split()[1] == "write" and op.split()[2].endswith("/" + name)]
            firsts.append((s, int(name) if name.isdigit() else writes[int(nth or 1) - 1]))

    def first_crash(index: int) -> dict:
        """Crash at K; then a copy of that state resumed with the operations logged (the probe)."""
        s, k = firsts[index]
        sc, base, _ = plans[s]
        crashed = base / f"crash-{k}"
        code = run_child(data, crashed, sc["settings"], {"HVD_BA_CRASH_AT": str(k)}, base / f"crash-{k}.log")
        if code != -signal.SIGKILL:
            return {"error": f"the crash run at {k} exited {code}"}
        probe, probe_log = base / f"probe-{k}", base / f"probe-{k}-io.log"
        shutil.copytree(crashed, probe)
        run_child(data, probe, [*sc["settings"], "run.resume=auto"], {"HVD_BA_IO_LOG": str(probe_log)},
                  base / f"probe-{k}.log")
        return {"ops": probe_log.read_text().splitlines()}

    series = in_parallel(range(len(firsts)), first_crash, jobs)
    for s, sc_series in enumerate(series):
        if "error" in sc_series:
            return {plans[firsts[s][0]][0]["name"]: {"error": sc_series["error"]}}

    # ---- every crash point of every scenario, in one pool
    tasks = []  # (scenario index, kind, K, J): "once" crash at K; "double" crash at K, its resume at J
    for s, (sc, base, ref) in enumerate(plans):
        if sc.get("resume_crashes"):
            for (fs, k), probe in zip(firsts, series):
                if fs != s:
                    continue
                ops = probe["ops"]
                first_step = next(i for i, op in enumerate(ops)
                                  if op.split()[2].endswith("steps.jsonl") and op.split()[1] == "write")
                tasks += [(s, "double", k, j) for j in range(1, first_step + 1)]
            continue
        ops = operations[ref]
        points = [int(x) for x in str(sc["points"]).split(",")] if sc.get("points") else range(1, len(ops) + 1)
        if sc.get("span"):
            first, last = sc["span"].split(",")
            paths = [op.split(" ", 2)[2] for op in ops]
            start = next(i for i, path in enumerate(paths) if first in path)
            end = next(i for i in range(start, len(paths)) if last in paths[i])
            points = range(start + 1, end + 2)
        tasks += [(s, "once", k, None) for k in points]
    probes = {(fs, k): probe["ops"] for (fs, k), probe in zip(firsts, series)}

    def crash_and_resume(index: int) -> dict:
        s, kind, k, j = tasks[index]
        sc, base, ref = plans[s]
        resume = [*sc["settings"], "run.resume=auto"]
        if kind == "once":
            out, log = base / f"crash-{k}", base / f"crash-{k}.log"
            code = run_child(data, out, sc["settings"], {"HVD_BA_CRASH_AT": str(k)}, log)
            op = operations[ref][k - 1].split(" ", 1)[1]
            if code != -signal.SIGKILL:
                return {"point": k, "op": op, "why": f"the crash run exited {code}, not killed"}
            code = run_child(data, out, resume, {}, log)
            why = f"the resumed run exited {code}" if code != 0 else compare(expected[ref], outcome(out))
            if why:
                return {"point": k, "op": op, "why": why, "log": log.read_text()[-1500:]}
            shutil.rmtree(out)
            return {"point": k, "op": op}
        # the resume of the state crashed at K, itself crashed at its operation J, then resumed again
        out, log = base / f"double-{k}-{j}", base / f"double-{k}-{j}.log"
        shutil.copytree(base / f"crash-{k}", out)
        code = run_child(data, out, resume, {"HVD_BA_CRASH_AT": str(j)}, log)
        op = probes[(s, k)][j - 1].split(" ", 1)[1]
        if code != -signal.SIGKILL:
            return {"first_crash": k, "point": j, "op": op, "why": f"the crashed resume exited {code}"}
        code = run_child(data, out, resume, {}, log)
        why = f"the second resume exited {code}" if code != 0 else compare(expected[ref], outcome(out))
        if why:
            return {"first_crash": k, "point": j, "op": op, "why": why, "log": log.read_text()[-1500:]}
        shutil.rmtree(out)
        return {"first_crash": k, "point": j, "op": op}

    results = in_parallel(range(len(tasks)), crash_and_resume, jobs)
    reports = {}
    for s, (sc, base, ref) in enumerate(plans):
        mine = [r for (ts, *_), r in zip(tasks, results) if ts == s]
        report = {"covered": [r for r in mine if "why" not in r], "failures": [r for r in mine if "why" in r]}
        if sc.get("resume_crashes"):
            report = {"first_crashes": [{"point": k, "op": operations[ref][k - 1]} for fs, k in firsts if fs == s],
                      **report}
        else:
            report = {"operations": len(operations[ref]), **report}
        reports[sc["name"]] = report
    return reports


if __name__ == "__main__":
    sys.exit(main())
