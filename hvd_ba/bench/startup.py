"""`python -m hvd_ba bench startup --entries N`: what an index of N files costs a run at start-up,
folder and packed folder side by side, against the demo's 2,600 files measured in the same run.

It builds (once, in --dir) an ImageNet-layout tree of N training entries over 1,000 class folders,
hard links to the demo's images, and its packed twin, index only: its index gives each entry the
shard and offset of its linked image in one real shard of the demo's images (a pack of N real
images would take N x 110 KB of disk; the index, which is what start-up reads, is the same size).
Then, for each of demo, folder (warm manifest) and shards:
- index load time and the RSS it adds, in a fresh process (the imports done before);
- one loader worker's PSS after its first batch (shared pages counted once);
- a 2-rank horovodrun run's time from launch to its first step (the second of two starts, so the
  manifest cache is warm).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = 1000

PROBE = r"""
import json, sys, time
import psutil, torch
from hvd_ba.config import load_config
from hvd_ba.data.pipeline import make_train_loader
from hvd_ba.data.shards import load_split

settings = json.loads(sys.argv[1])
cfg = load_config("demo", settings)
me = psutil.Process()
before = me.memory_info().rss
start = time.perf_counter()
train, val = load_split(cfg, "train", True), load_split(cfg, "val", True)
load_s = time.perf_counter() - start
added = me.memory_info().rss - before
loader = make_train_loader(train, cfg, 0, 2)
batches = iter(loader)
next(batches)
worker = psutil.Process(batches._workers[0].pid)
print(json.dumps({"entries": len(train), "load_s": load_s, "rss_added_mb": added / 2**20,
                  "rank_rss_mb": me.memory_info().rss / 2**20, "worker_pss_mb": worker.memory_full_info().pss / 2**20}))
"""


def link_tree(dest: Path, entries: int, images: list[Path]) -> Path:
    """dest/train/<class>/: `entries` hard links to `images` over CLASSES class folders, and
    dest/val/<class>/ one each; made once (dest/tree.json says for what)."""
    marker = dest / "tree.json"
    want = {"entries": entries, "images": len(images), "first": str(images[0])}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    print(f"bench startup: linking {entries} entries in {dest} ...", flush=True)
    names = [f"n{k:08d}" for k in range(CLASSES)]
    for split in ("train", "val"):
        for name in names:
            (dest / split / name).mkdir(parents=True)
    for i in range(entries):
        cls = names[i % CLASSES]
        os.link(images[i % len(images)], dest / "train" / cls / f"{cls}_{i:08d}.JPEG")
    for k, cls in enumerate(names):
        os.link(images[k % len(images)], dest / "val" / cls / f"{cls}_val_{k:08d}.JPEG")
    marker.write_text(json.dumps(want))
    return dest


def index_only_pack(tree: Path, images: list[Path], dst: Path) -> Path:
    """The tree's packed twin: its index (the tree's names, labels and digest) pointing every
    entry at its linked image in one real shard of `images`."""
    from hvd_ba.data.index import FileIndex, write_index
    from hvd_ba.data.manifest import load_index
    from hvd_ba.data.shards import BLOCK, PACK_FORMAT, PACK_VERSION, member_header

    marker = dst / "bench.json"
    want = json.loads((tree / "tree.json").read_text())
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    offsets, sizes = [], []
    import hashlib

    h = hashlib.sha256()
    with open(dst / "images.tar", "wb") as out:
        position = 0
        for k, image in enumerate(images):
            data = image.read_bytes()
            block = member_header(f"bench/{k:08d}.JPEG", len(data)) + data + bytes(-len(data) % BLOCK)
            out.write(block)
            h.update(block)
            offsets.append(position + BLOCK)
            sizes.append(len(data))
            position += len(block)
        out.write(bytes(2 * BLOCK))
        h.update(bytes(2 * BLOCK))
        position += 2 * BLOCK
    for split in ("train", "val"):
        source = load_index(tree, split, None)
        rows = np.array(source.rows)
        target = np.array([int(n.rsplit("_", 1)[1][:-5]) for n in source.paths]) % len(images)
        rows["shard"], rows["offset"] = 0, np.asarray(offsets)[target]
        assert (rows["size"] == np.asarray(sizes)[target]).all()
        index = FileIndex(str(dst), source.classes, rows, np.asarray(source.names), source.digest, ["images.tar"])
        write_index(dst, split, index, {"format": PACK_FORMAT, "pack_version": PACK_VERSION, "source": str(tree / split),
                                         "source_digest": source.digest, "source_mtimes": {}, "seed": 0,
                                         "shard_size": position, "shard_bytes": [position],
                                         "shard_sha256": [h.hexdigest()], "bench_index_only": True})
    marker.write_text(json.dumps(want))
    return dst


def probe(settings: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(settings)], capture_output=True, text=True, env=env,
                       timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"bench startup: the probe failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def first_step_s(settings: list[str], out: Path) -> float:
    """Seconds from starting `horovodrun -np 2` to the first record of steps.jsonl."""
    from hvd_ba.launchers import horovodrun_command

    shutil.rmtree(out, ignore_errors=True)
    command = horovodrun_command(2, "gloo", ["--config", "demo", "--set", *settings, f"run.out_dir={out}"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        while not ((out / "steps.jsonl").is_file() and (out / "steps.jsonl").stat().st_size):
            if proc.poll() is not None:
                raise RuntimeError(f"bench startup: the run ended before its first step: {proc.stderr.read()[-2000:]}")
            if time.monotonic() - start > 900:
                raise RuntimeError("bench startup: no first step within 900 s")
            time.sleep(0.05)
        return time.monotonic() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_startup_bench(args) -> int:
    from hvd_ba.data.synthetic import make_dataset

    base = Path(os.path.expanduser(args.dir))
    demo = base / "demo-data"
    if not (demo / "train").is_dir():
        with contextlib.redirect_stdout(io.StringIO()):
            make_dataset(demo, 10, 260, 50, 0, 2)
    images = sorted((demo / "train").rglob("*.JPEG"))
    tree = link_tree(base / f"tree-{args.entries}", args.entries, images)
    packed = index_only_pack(tree, images, base / f"tree-{args.entries}-packed")
    cache = base / "manifests"
    common = ["data.workers=1", "optim.epochs=1", "run.max_steps_per_epoch=3", "run.log_every=1",
              f"data.manifest_dir={cache}", "run.checkpoint_every=null"]
    modes = {"demo (2,600 files)": [f"data.path={demo}"], f"folder ({args.entries} files)": [f"data.path={tree}"],
             f"shards ({args.entries} entries)": [f"data.path={packed}"]}
    rows = {}
    for name, settings in modes.items():
        print(f"bench startup: {name} ...", flush=True)
        probe([*common, *settings])  # warms the manifest cache and the page cache
        figures = probe([*common, *settings])
        if not args.no_runs:
            first_step_s([*common, *settings], base / "run")  # a warm start follows
            figures["first_step_s"] = first_step_s([*common, *settings], base / "run")
        rows[name] = figures
    demo_row = rows["demo (2,600 files)"]
    print(f"\n{'':<26} {'index load s':>12} {'rank RSS added MB':>18} {'worker PSS MB':>14} {'first step s':>13}")
    for name, r in rows.items():
        step = f"{r['first_step_s']:>13.1f}" if "first_step_s" in r else f"{'-':>13}"
        print(f"{name:<26} {r['load_s']:>12.2f} {r['rss_added_mb']:>18.1f} {r['worker_pss_mb']:>14.1f} {step}")
    for name, r in rows.items():
        if name.startswith("demo"):
            continue
        extra = (f", first step {r['first_step_s'] - demo_row['first_step_s']:+.1f} s"
                 if "first_step_s" in r else "")
        print(f"{name} against the demo: RSS {r['rss_added_mb'] - demo_row['rss_added_mb']:+.1f} MB, worker PSS "
              f"{r['worker_pss_mb'] - demo_row['worker_pss_mb']:+.1f} MB{extra} (goals: <= 60 MB, <= 5 s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("startup", help="index load time, RSS per rank and per loader worker, and a 2-rank run's time "
                                       "to its first step at N files, folder and shards, against the demo's files")
    from hvd_ba.flags import positive_int

    p.add_argument("--entries", type=positive_int, default=1281167, help="training entries (default: 1281167, "
                                                                          "ImageNet-1k's)")
    p.add_argument("--dir", default="~/.cache/hvd_ba/bench-startup", help="where the tree and its pack are built "
                                                                         "(hard links: one file system)")
    p.add_argument("--no-runs", action="store_true", help="skip the 2-rank runs (index and memory figures only)")
    p.add_argument("--json", default=None, help="also write the figures here")
