"""`python -m hvd_ba demo`: the embedded default run (synthetic JPEGs, horovodrun -np 2, CPU)."""
from __future__ import annotations

import json
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


def run_demo(args) -> int:
    t0 = time.time()
    data = Path(args.data)
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        from hvd_ba.data.synthetic import make_dataset

        print(f"demo: writing the demo dataset to {data} ...", flush=True)
        summary = make_dataset(data)
        print(f"demo: {summary['files']} JPEGs, {summary['bytes'] / 1e6:.1f} MB, in {time.time() - t0:.0f} s", flush=True)
    out = choose_out_dir(args)
    overrides = [f"data.path={data}", f"run.out_dir={out}", *args.set]
    cfg = load_config(args.config, overrides)  # fail here, once, before any rank starts
    if holds_run(out) and not (cfg.run.resume or cfg.run.overwrite):
        claim_fresh(cfg, Path(out))  # raises the one-line refusal naming the choices
    check_paths(cfg)
    cmd = horovodrun_command(args.np, args.controller, ["--config", args.config, "--set", *overrides])
    print("demo: " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    wall = time.time() - t0
    result_path = Path(cfg.run.out_dir) / "result.json"
    if rc != 0 or not result_path.is_file():
        print(f"demo: training failed (horovodrun exit status {rc}) after {wall:.0f} s", file=sys.stderr)
        return rc or 1
    result = json.loads(result_path.read_text())
    print(f"demo: val top-1 {result['val_top1']:.2f}% (chance {result['chance_top1']:.1f}%), "
          f"wall time {wall:.0f} s; run directory {cfg.run.out_dir}")
    return 0
