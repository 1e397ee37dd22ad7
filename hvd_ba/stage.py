"""`python -m hvd_ba stage`: copy each rank's static shard to node-local disk, once per job.

Start it with the same launcher and task layout as the training (`srun ... python -m hvd_ba
stage`, or horovodrun/mpirun with the same -np), so that every rank copies exactly the files it
will read: its static training shard (ShardSampler.owned) and its evaluation files. Ranks on
one node copy disjoint sets, each with a pool of threads. A file already present with the size
the manifest records is skipped (a requeued job stages nothing again); a copied file is hashed
while it is read from the shared file system and again as written, and the two must agree.
Each rank leaves a record (file names, sizes, SHA-256) in DEST/.hvd_ba-stage/; `--verify`
re-hashes present files against it instead of trusting their size.

Under an MPI launcher (srun --mpi=pmix, mpirun) mpi4py coordinates: rank 0 lists the dataset
first and prints the job's totals. Training with data.local_path=DEST then opens images there
only, and each rank checks before its first step that its files are all present.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hvd_ba.cluster import launch_rank
from hvd_ba.config import ConfigError, load_config
from hvd_ba.data.manifest import FileIndex, load_index
from hvd_ba.data.pipeline import eval_files, train_sampler

RECORD_DIR = ".hvd_ba-stage"
CHUNK_BYTES = 1 << 20


def rank_files(cfg, train_index: FileIndex, val_index: FileIndex, rank: int, world: int) -> list[tuple[str, int]]:
    """(path relative to the dataset root, size in bytes) of every file rank `rank` reads."""
    if cfg.data.shard != "static":
        raise ConfigError("config key 'data.shard': staging needs static shards (global shards read different "
                          f"files every epoch); set data.shard=static (it is {cfg.data.shard!r})")
    train = train_sampler(len(train_index), cfg, rank, world).owned()
    files = [(f"train/{train_index.paths[i]}", train_index.sizes[i]) for i in sorted(train)]
    files += [(f"val/{val_index.paths[i]}", val_index.sizes[i]) for i in eval_files(len(val_index), rank, world)]
    return files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def copy_verified(src: Path, dst: Path, size: int) -> str:
    """Copy src to dst through a temporary name; returns the SHA-256. Raises OSError when the
    source's size is not the manifest's or the written file does not hash as what was read."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            h.update(chunk)
            fout.write(chunk)
    digest = h.hexdigest()
    written = tmp.stat().st_size
    if written != size:
        tmp.unlink()
        raise OSError(f"'{src}' has {written} bytes, the dataset manifest says {size}: "
                      "the dataset changed since it was listed")
    if file_sha256(tmp) != digest:
        tmp.unlink()
        raise OSError(f"'{dst}': the copy does not hash as the bytes read from '{src}' (disk error?)")
    os.replace(tmp, dst)
    return digest


def stage_rank(source: Path, dest: Path, files: list[tuple[str, int]], threads: int, verify: bool,
               previous: dict) -> dict:
    """Copy the files missing from dest; returns the rank's counts and its SHA-256 record."""
    def one(item):
        rel, size = item
        src, dst = source / rel, dest / rel
        if dst.is_file() and dst.stat().st_size == size:
            if not verify:
                return rel, previous.get(rel), False
            if previous.get(rel) and file_sha256(dst) == previous[rel]:
                return rel, previous[rel], False
        return rel, copy_verified(src, dst, size), True

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(one, files))
    sizes = dict(files)
    copied = [rel for rel, _, was_copied in results if was_copied]
    return {"files": len(files), "bytes": sum(sizes.values()), "copied": len(copied),
            "copied_bytes": sum(sizes[rel] for rel in copied), "seconds": time.perf_counter() - t0,
            "sha256": {rel: digest for rel, digest, _ in results if digest}}


def check_staged(local: str | Path, files: list[tuple[str, int]], rank: int, world: int) -> None:
    """Training's check before its first step: every file of this rank is in the local copy
    with the size the manifest records."""
    local = Path(local)
    missing = [rel for rel, size in files if not ((local / rel).is_file() and (local / rel).stat().st_size == size)]
    if missing:
        raise FileNotFoundError(
            f"rank {rank} of {world} on host {socket.gethostname()}: {len(missing)} of its {len(files)} files are "
            f"missing or of the wrong size under data.local_path '{local}' (first: {missing[0]}); stage them with "
            "`python -m hvd_ba stage` started like the training (same ranks, same data.* settings)")


def _mpi_comm():
    """COMM_WORLD when an MPI launcher started this process, else None (no MPI initialised)."""
    if not any(key in os.environ for key in ("PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def run_stage(args) -> int:
    cfg = load_config(args.config, args.set)
    dest = args.dest or cfg.data.local_path
    if not dest:
        raise ConfigError("stage: give --dest DIR (or config key 'data.local_path'): the node-local folder")
    if cfg.data.path is None:
        raise ConfigError("config key 'data.path': not set (the shared ImageNet-layout root)")
    comm = _mpi_comm()
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else launch_rank()
    host = socket.gethostname()
    source, dest = Path(cfg.data.path), Path(dest)
    for split in ("train", "val"):
        if not (source / split).is_dir():
            raise FileNotFoundError(f"config key 'data.path': '{source / split}' does not exist on host {host} "
                                    f"(rank {rank} of {world})")
    cache = os.path.expanduser(cfg.data.manifest_dir) if cfg.data.manifest_dir else None
    if comm is not None and rank != 0:
        comm.Barrier()  # rank 0 lists the folders and writes the manifests first
    indexes = [load_index(source, split, cache, write=rank == 0) for split in ("train", "val")]
    if comm is not None and rank == 0:
        comm.Barrier()
    files = rank_files(cfg, *indexes, rank, world)
    record_path = dest / RECORD_DIR / f"rank{rank}-of{world}.json"
    previous = json.loads(record_path.read_text())["sha256"] if record_path.is_file() else {}
    try:
        done = stage_rank(source, dest, files, args.threads, args.verify, previous)
    except OSError as err:
        raise FileNotFoundError(f"stage: rank {rank} on host {host}: {err}") from None
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"source": str(source.resolve()), "rank": rank, "world": world, "seed": cfg.run.seed,
                               "host": host, **done}))
    os.replace(tmp, record_path)
    mb_s = done["copied_bytes"] / 1e6 / max(done["seconds"], 1e-9)
    print(f"stage: rank {rank} of {world} on {host}: {done['files']} files ({done['bytes'] / 1e6:.1f} MB), "
          f"{done['copied']} copied ({mb_s:.1f} MB/s), {done['files'] - done['copied']} already present, "
          f"{done['seconds']:.1f} s -> {dest}", flush=True)
    if comm is not None:
        counts = comm.gather((done["files"], done["copied"], done["copied_bytes"]), root=0)
        if rank == 0:
            files_all, copied_all, bytes_all = (sum(column) for column in zip(*counts))
            print(f"stage: all {world} ranks: {files_all} files, {copied_all} copied ({bytes_all / 1e6:.1f} MB)",
                  flush=True)
    return 0

