"""`python -m hvd_ba demo`: the embedded default run (synthetic JPEGs, horovodrun -np 2, CPU)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from hvd_ba.config import check_paths, load_config
from hvd_ba.launchers import horovodrun_command
from hvd_ba.train.run_dir import claim_fresh, holds_run

DEFAULT_DEMO_RUN = "runs/demo"


def choose_out_dir(args) -> str:
    """--out as given; by default runs/demo, or the first runs/demo-<n> that holds no run when
    the user asked neither to resume nor to overwrite (so the demo can be run again)."""
    if args.out is not None:
        return args.out
    cfg = load_config(args.config, [f"run.out_dir={DEFAULT_DEMO_RUN}", *args.set])
    continuing = bool(cfg.run.resume or cfg.run.overwrite)
    if continuing or not holds_run(DEFAULT_DEMO_RUN):
        return DEFAULT_DEMO_RUN
    n = 2
    while holds_run(f"{DEFAULT_DEMO_RUN}-{n}"):
        n += 1
    out = f"{DEFAULT_DEMO_RUN}-{n}"
    print(f"demo: {DEFAULT_DEMO_RUN} holds an earlier run; this one goes to {out} (to continue an interrupted run "
          f"instead: python -m hvd_ba demo --out DIR --set run.resume=auto)", flush=True)
    return out


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C


def resume_command(args, out: str) -> str:
    """The demo command that continues the run in `out`: this one's own arguments, --out, and
    run.resume=auto (the user's --set values too: a resume refuses a changed schedule or batch)."""
    import shlex

    from hvd_ba.__main__ import DEFAULT_DEMO_DATA

    words = ["python", "-m", "hvd_ba", "demo", "--out", out]
    if args.data != DEFAULT_DEMO_DATA:
        words += ["--data", args.data]
    if args.np != 2:
        words += ["--np", str(args.np)]
    if args.controller != "gloo":
        words += ["--controller", args.controller]
    if args.config != "demo":
        words += ["--config", args.config]
    kept = [s for s in args.set if not s.startswith(("run.resume=", "run.overwrite=", "run.out_dir="))]
    words += ["--set", *kept, "run.resume=auto"]
    return " ".join(shlex.quote(w) for w in words)


def interrupted(args, launcher: subprocess.Popen, out: str) -> int:
    """Ctrl-C during training: wait for horovodrun (its ranks checkpoint and exit within its 5 s
    grace; a second Ctrl-C does not cut that short), then one line: where the run stopped and the
    command that resumes it."""
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGINT)  # the same request, for a Ctrl-C that reached this process alone
    while True:
        try:
            launcher.wait()
            break
        except KeyboardInterrupt:
            continue
    from hvd_ba.train.checkpoint import find_checkpoint

    try:
        saved = find_checkpoint("auto", Path(out))
    except Exception:  # a damaged folder: the line must come out whatever
        saved = None
    where = f"at step {saved[1]['step']}" if saved else "before its first checkpoint"
    print(f"demo: interrupted; the run stopped {where} (run folder {out}); resume it with: "
          f"{resume_command(args, out)}", file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT_CODE


def run_demo(args) -> int:
    t0 = time.time()
    data = Path(args.data)
    out = choose_out_dir(args)
    overrides = [f"data.path={data}", f"run.out_dir={out}", *args.set]
    cfg = load_config(args.config, overrides)  # fail here, once, before any data is written or rank started
    if holds_run(out) and not (cfg.run.resume or cfg.run.overwrite):
        claim_fresh(cfg, Path(out))  # raises the one-line refusal naming the choices
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        from hvd_ba.data.synthetic import make_dataset

        print(f"demo: writing the demo dataset to {data} ...", flush=True)
        summary = make_dataset(data)
        print(f"demo: {summary['files']} JPEGs, {summary['bytes'] / 1e6:.1f} MB, in {time.time() - t0:.0f} s", flush=True)
    check_paths(cfg)
    cmd = horovodrun_command(args.np, args.controller, ["--config", args.config, "--set", *overrides])
    print("demo: " + " ".join(cmd), flush=True)
    launcher = subprocess.Popen(cmd)
    try:
        rc = launcher.wait()
    except KeyboardInterrupt:  # Ctrl-C: horovodrun had it too; its ranks checkpoint and exit 75
        return interrupted(args, launcher, cfg.run.out_dir)
    wall = time.time() - t0
    result_path = Path(cfg.run.out_dir) / "result.json"
    if rc != 0 or not result_path.is_file():
        print(f"demo: training failed (horovodrun exit status {rc}) after {wall:.0f} s", file=sys.stderr)
        return rc or 1
    result = json.loads(result_path.read_text())
    print(f"demo: val top-1 {result['val_top1']:.2f}% (chance {result['chance_top1']:.1f}%), "
          f"wall time {wall:.0f} s; run directory {cfg.run.out_dir}")
    return 0
