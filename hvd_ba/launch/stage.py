"""`python -m hvd_ba stage`: copy each rank's static shard to node-local disk, once per job.

Start it with the same launcher and task layout as the training (`srun ... python -m hvd_ba
stage`, or horovodrun/mpirun with the same -np), so that every rank copies exactly the files it
will read: its static training shard (ShardSampler.owned) and its evaluation files; from a packed
folder, its whole training shards (checked against the SHA-256 the pack's index records; the
validation shards are read from data.path, each opened once per loader worker). Ranks on
one node copy disjoint sets, each with a pool of threads. A copied file is hashed while it is
read from the shared file system and again as written, and the two must agree. Each rank leaves
a record (file names, sizes, SHA-256) in DEST/.hvd_ba-stage/; a file already present is trusted,
not copied again, only when it hashes as that record says (`--trust-size`: when its size is the
manifest's), so a requeued job on the same node re-reads its copy but copies nothing.

Node-local disks are shared with other users (/tmp), so DEST must be this user's private folder:
created with mode 0700, refused when it exists with another owner, with wider permissions, or as
a symlink (never followed); temporary files are opened with O_EXCL | O_NOFOLLOW. `--remove`
deletes it at the job's end under the same checks.

Under an MPI launcher (srun --mpi=pmix, mpirun) mpi4py coordinates: rank 0 lists the dataset
first and prints the job's totals. Training with data.local_path=DEST then opens images there
only, and each rank checks before its first step that its files are all present.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hvd_ba.cluster import launch_info, launch_rank
from hvd_ba.config import ConfigError, data_format, load_config
from hvd_ba.data.shards import load_split
from hvd_ba.data.staged import UnsafeFolder, private_dir, rank_files
from hvd_ba.fsio import file_sha256
from hvd_ba.train.stop import pause_point

RECORD_DIR = ".hvd_ba-stage"
CHUNK_BYTES = 1 << 20


def _create_excl(path: Path):
    """A new file opened for writing: O_EXCL (never an existing file) and O_NOFOLLOW (never
    through a symlink), mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    return os.fdopen(fd, "wb")


def copy_verified(src: Path, dst: Path, size: int) -> str:
    """Copy src to dst through a temporary name; returns the SHA-256. Raises OSError when the
    source's size is not the manifest's or the written file does not hash as what was read."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    h = hashlib.sha256()
    with open(src, "rb") as fin, _create_excl(tmp) as fout:
        while chunk := fin.read(CHUNK_BYTES):
            h.update(chunk)
            fout.write(chunk)
    digest = h.hexdigest()
    written = tmp.stat().st_size
    if written != size:
        tmp.unlink()
        raise OSError(f"'{src}' has {written} bytes, the dataset manifest says {size}: the dataset changed since it "
                      "was listed (a file rewritten in place keeps its folder's mtime, so a cached manifest stays: "
                      "delete it from data.manifest_dir)")
    if file_sha256(tmp) != digest:
        tmp.unlink()
        raise OSError(f"'{dst}': the copy does not hash as the bytes read from '{src}' (disk error?)")
    os.replace(tmp, dst)
    return digest


def stage_rank(source: Path, dest: Path, files: list[tuple[str, int]], threads: int, trust_size: bool,
               previous: dict, expected: bool = False) -> dict:
    """Copy the files missing from dest, and those present that do not hash as `previous` says
    (this rank's last record, or a pack's index) or, with trust_size, that have another size;
    `expected`: `previous` is the pack's index, and a copy that does not hash as it says is an
    error. Returns the rank's counts and its SHA-256 record."""
    def one(item):
        rel, size = item
        src, dst = source / rel, dest / rel
        try:
            st = os.lstat(dst)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == size:
            if trust_size:
                return rel, previous.get(rel), False
            if previous.get(rel) and file_sha256(dst) == previous[rel]:
                return rel, previous[rel], False
        digest = copy_verified(src, dst, size)
        if expected and digest != previous.get(rel):
            os.unlink(dst)
            raise OSError(f"shard '{src}' does not hash as the pack's index records: the packed folder is damaged or "
                          f"changed since it was packed (`python -m hvd_ba pack --verify {source}` checks it)")
        return rel, digest, True

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(one, files))
    sizes = dict(files)
    copied = [rel for rel, _, was_copied in results if was_copied]
    return {"files": len(files), "bytes": sum(sizes.values()), "copied": len(copied),
            "copied_bytes": sum(sizes[rel] for rel in copied), "seconds": time.perf_counter() - t0,
            "sha256": {rel: digest for rel, digest, _ in results if digest}}


def _mpi_comm():
    """COMM_WORLD when an MPI launcher started this process and mpi4py is installed, else None
    (no MPI initialised; each rank then lists the data itself: a set-up for run.backend=torch
    has no mpi4py, HVD_BA_BACKEND=torch bash cluster/setup.sh)."""
    if not launch_info().mpi:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def remove_private(dest: Path) -> bool:
    """Remove this user's private staging folder (the checks of private_dir first, and it must
    hold a stage record: a folder hvd_ba staged into, not any folder named by mistake); False
    when there is none (another task on this host removed it first)."""
    if not os.path.lexists(dest):
        return False
    try:
        private_dir(dest, create=False)
    except UnsafeFolder as err:
        if err.errno == errno.ENOENT:
            return False  # another task of this host removed it meanwhile
        raise
    if not os.path.isdir(os.path.join(dest, RECORD_DIR)):
        if not os.path.lexists(dest):
            return False
        raise UnsafeFolder(errno.EPERM, f"'{dest}' holds no {RECORD_DIR}/ record: not a folder `hvd_ba stage` "
                           "filled; not removed")

    # Renamed first, then removed: of two tasks of one host removing one folder (nodes sharing
    # /tmp), one renames it and the other finds nothing.
    doomed = Path(f"{dest}.removing-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(dest, doomed)
    except FileNotFoundError:
        return False
    shutil.rmtree(doomed)
    return True


def previous_hashes(record_path: Path) -> dict:
    """The file hashes of this rank's last staging (so that files already there are checked against
    them); a damaged or foreign record is said and ignored: every file is hashed again."""
    if not record_path.exists():
        return {}
    try:
        hashes = json.loads(record_path.read_text())["sha256"]
        if isinstance(hashes, dict):
            return hashes
    except (OSError, ValueError, KeyError, TypeError):
        pass
    print(f"stage: warning: {record_path} is damaged or not a staging record; every file is hashed again",
          file=sys.stderr, flush=True)
    return {}


def source_indexes(cfg, comm, rank: int, world: int, host: str) -> list:
    """The train and val indexes of data.path: under MPI rank 0 lists the folders (and writes the
    manifests) first, the others then read them."""
    source = Path(cfg.data.path)
    for split in () if data_format(cfg) == "shards" else ("train", "val"):  # a pack's index says what is missing
        if not (source / split).is_dir():
            raise FileNotFoundError(f"config key 'data.path': '{source / split}' does not exist on host {host} "
                                    f"(rank {rank} of {world})")
    if comm is not None and rank != 0:
        comm.Barrier()  # rank 0 lists the folders and writes the manifests first
    try:
        return [load_split(cfg, split, write=rank == 0) for split in ("train", "val")]
    finally:
        if comm is not None and rank == 0:
            comm.Barrier()


def run_stage(args) -> int:
    cfg = load_config(args.config, args.set)
    dest = args.dest or cfg.data.local_path
    if not dest:
        raise ConfigError("stage: give --dest DIR (or config key 'data.local_path'): the node-local folder")
    if args.remove:
        try:
            removed = remove_private(Path(dest))
        except OSError as err:
            raise FileNotFoundError(f"stage --remove: {err.strerror or err}") from None
        print(f"stage: {'removed' if removed else 'nothing to remove at'} {dest} on {socket.gethostname()}", flush=True)
        return 0
    if cfg.data.path is None:
        raise ConfigError("config key 'data.path': not set (the shared ImageNet-layout root)")
    comm = _mpi_comm()
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else launch_rank()
    host = socket.gethostname()
    source, dest = Path(cfg.data.path), Path(dest)
    packed = data_format(cfg) == "shards"
    indexes = source_indexes(cfg, comm, rank, world, host)
    files = rank_files(cfg, *indexes, rank, world)
    try:
        private_dir(dest)
    except OSError as err:
        raise FileNotFoundError(f"stage: rank {rank}: {err.strerror}") from None
    pause_point("stage")
    record_path = dest / RECORD_DIR / f"rank{rank}-of{world}.json"
    # a pack's shards are checked against its index, a folder's files against this rank's last record
    previous = (dict(zip(indexes[0].shards, indexes[0].header["shard_sha256"])) if packed
                else previous_hashes(record_path))
    try:
        done = stage_rank(source, dest, files, args.threads, args.trust_size, previous, expected=packed)
    except OSError as err:
        raise FileNotFoundError(f"stage: rank {rank} on host {host}: {err}") from None
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(f".{os.getpid()}.tmp")
    with _create_excl(tmp) as f:
        f.write(json.dumps({"source": str(source.resolve()), "rank": rank, "world": world, "seed": cfg.run.seed,
                            "host": host, **done}).encode())
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

