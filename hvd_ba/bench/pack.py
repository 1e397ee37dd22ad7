"""`python -m hvd_ba bench pack`: `pack`'s throughput against a plain sequential copy of the same
bytes, measured in the same run on the same file system.

The copy (the baseline) reads the source's files in the pack's order and writes them back to back
into files of the pack's shard sizes, each fsynced, as `cat` into a few big files would; the pack
does the same reads and writes plus its tar headers, the SHA-256 of every shard, the records and
the index. The source is read once first, so both read from the page cache; rounds alternate
(copy, pack, copy, pack, ...) and the best round of each is compared.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

from hvd_ba.bench.corpus import corpus


def plain_copy(src_split: Path, index, plan, dest: Path) -> int:
    """The baseline: the pack's bytes of image data, in its order, into files of its shard sizes."""
    written = 0
    for k in range(plan.shards):
        with open(dest / f"copy-{k:06d}.bin", "wb") as out:
            for i in plan.members(k):
                with open(src_split / index.name(i), "rb") as f:
                    written += out.write(f.read())
            out.flush()
            os.fsync(out.fileno())
    return written


def run_pack_bench(args) -> int:
    from hvd_ba.data.manifest import load_index
    from hvd_ba.data.shards import plan_shards
    from hvd_ba.launch.pack import human, pack

    root = corpus(args.corpus, args.images)
    index = load_index(root, "train", None)
    plan = plan_shards(index.sizes, 0, args.shard_size)
    total = int(index.sizes.sum())
    scratch = Path(tempfile.mkdtemp(prefix="bench-pack-", dir=os.path.expanduser(args.dest)))
    print(f"bench pack: {len(index)} photos ({human(total)}) from {root} into {plan.shards} shards of about "
          f"{human(args.shard_size)} in {scratch}, {args.rounds} rounds each")
    for i in range(len(index)):  # the page cache: both read from memory
        (root / "train" / index.name(i)).read_bytes()
    rates = {"copy": [], "pack": []}
    try:
        for r in range(args.rounds):
            target = scratch / f"copy-{r}"
            target.mkdir()
            start = time.perf_counter()
            plain_copy(root / "train", index, plan, target)
            rates["copy"].append(total / (time.perf_counter() - start))
            shutil.rmtree(target)
            target = scratch / f"pack-{r}"
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = pack(argparse.Namespace(src=str(root), dst=str(target), shard_size=args.shard_size, seed=0,
                                               check_images=False, train_only=True))
            rates["pack"].append(total / (time.perf_counter() - start))
            if code:
                raise RuntimeError(f"bench pack: the pack failed (exit {code})")
            shutil.rmtree(target)
            print(f"  round {r + 1}: copy {human(rates['copy'][-1])}/s, pack {human(rates['pack'][-1])}/s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best_copy, best_pack = max(rates["copy"]), max(rates["pack"])
    print(f"plain copy: {human(best_copy)}/s; pack: {human(best_pack)}/s (best of {args.rounds})")
    print(f"ratio (pack / plain copy): {best_pack / best_copy:.2f} (goal >= 0.8)")
    return 0
