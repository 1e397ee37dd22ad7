"""`python -m hvd_ba pack SRC DST`: an ImageNet-layout folder into tar shards with a flat index
(the format: hvd_ba/data/shards.py); `pack --verify DST` re-reads a packed folder.

Parallel without a collective: every rank lists (or reads the cached manifest of) the source and
computes the same plan; rank r writes shards r, r + world, ... Each shard is written to a
temporary file, fsynced and renamed, then recorded (size and SHA-256) under DST/.pack-state/.
A killed pack started again skips every recorded shard whose file still hashes as recorded,
on any number of ranks. Rank 0 writes the indexes once every shard is recorded.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvd_ba.cluster import launch_rank
from hvd_ba.config import ConfigError, DataConfig
from hvd_ba.data.imagenet import LabelsError, archive_index, flat_val_index
from hvd_ba.data.index import FileIndex, header_path, write_index
from hvd_ba.data.manifest import _class_folders, _folder_state, load_index
from hvd_ba.data.shards import (BLOCK, PACK_FORMAT, PACK_VERSION, SPLITS, load_packed, member_header, packed_index,
                                plan_shards, shard_name)
from hvd_ba.flags import byte_size, positive_float
from hvd_ba.fsio import SPACE_ERRORS, atomic_write, file_sha256, free_bytes
from hvd_ba.train.stop import pause_point

STATE_DIR = ".pack-state"
ZEROS = bytes(BLOCK)  # a member's padding is a slice of it; two of it end an archive


class PackError(Exception):
    """Why a pack stopped: one line; finished shards are kept."""


def parser_pack() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd_ba pack",
        description="Pack an ImageNet-layout folder (SRC/{train,val}/<class>/<image>) into uncompressed tar shards "
                    "with a flat index in DST, then train with --set data.path=DST. Start it once, or once per rank "
                    "under srun, mpirun or horovodrun (each rank writes its own shards). A killed pack started again "
                    "continues; `pack --verify DST` checks a packed folder.")
    p.add_argument("src", nargs="?", help="the ImageNet-layout folder (not with --verify or --from-tar)")
    p.add_argument("dst", help="the packed folder to write (or to check, with --verify)")
    p.add_argument("--shard-size", type=byte_size, default=1 << 30, metavar="SIZE",
                   help="about this many bytes per shard, e.g. 1G, 256M (default: 1G)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled order within the shards (default: 0)")
    p.add_argument("--from-tar", default=None, metavar="TRAIN_TAR",
                   help="pack ImageNet's training archive as distributed (ILSVRC2012_img_train.tar: one tar per class) "
                        "without extracting it; give DST alone")
    p.add_argument("--val-tar", default=None, metavar="VAL_TAR",
                   help="with --from-tar: the validation archive (ILSVRC2012_img_val.tar, flat), with --val-labels")
    p.add_argument("--val-labels", default=None, metavar="FILE",
                   help="SRC/val is flat (as ImageNet's validation tar extracts): its labels from the devkit "
                        "(ILSVRC2012_devkit_t12.tar.gz), Kaggle's LOC_val_solution.csv or '<file> <wnid>' lines")
    p.add_argument("--check-images", action="store_true",
                   help="also decode every image and list those that do not decode (they are packed as they are; "
                        "training counts and replaces them)")
    p.add_argument("--patience", type=positive_float, default=1800, metavar="SECONDS",
                   help="rank 0 stops when the other ranks finish no shard for this long (default: 1800)")
    p.add_argument("--verify", action="store_true", help="re-read DST: every shard's size and SHA-256, every member's "
                                                         "name and size against the index")
    return p


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return ""


@dataclass
class SplitSource:
    """What a split is packed from: its index (in the order of the extracted folder), what tells
    a changed source (class-folder mtimes, or the archive's size and mtime), where it lies, and
    for an archive each sample's data offset in it."""

    index: FileIndex
    state: dict
    location: str
    offsets: np.ndarray | None = None

    def read(self, i: int, path: str, size: int) -> bytes:
        """Sample i's bytes; `path`: its where()."""
        if self.offsets is None:
            with open(path, "rb") as f:
                return f.read()
        if getattr(self, "_fd", None) is None:
            self._fd = os.open(self.location, os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(self._fd, size, int(self.offsets[i]))

    def where(self, name: str) -> str:
        return os.path.join(self.location, name) if self.offsets is None else f"{self.location}:{name}"


def folder_sources(src: Path, val_labels: str | None = None) -> dict[str, SplitSource]:
    """The splits SRC has (train required), one line if SRC is not an ImageNet layout."""
    layout = f"'{src}' is not an ImageNet layout (SRC/train/<class>/<image>, SRC/val/<class>/<image>)"
    if not (src / "train").is_dir():
        raise PackError(f"{layout}: it has no train/ folder")
    out = {}
    for split in SPLITS:
        folder = src / split
        if not folder.is_dir():
            continue
        try:
            if split == "val" and val_labels:
                state, index = {}, flat_val_index(folder, val_labels, out["train"].index.classes)
            else:
                state = _folder_state(folder, _class_folders(folder))
                index = load_index(src, split, os.path.expanduser(DataConfig.manifest_dir), write=launch_rank()[0] == 0)
        except LabelsError as err:
            raise PackError(str(err)) from None
        except (OSError, ValueError) as err:
            raise PackError(f"{layout}: {err}") from None
        out[split] = SplitSource(index, state, str(folder.resolve()))
    return out


def archive_sources(train_tar: str, val_tar: str | None, val_labels: str | None) -> dict[str, SplitSource]:
    """The splits from ImageNet's archives, indexed by their headers, not extracted."""
    out = {}
    for split, path in (("train", train_tar), ("val", val_tar)):
        if path is None:
            continue
        path = Path(path).resolve()
        if not path.is_file():
            raise PackError(f"archive '{path}' does not exist")
        try:
            if split == "val" and not val_labels:
                raise LabelsError(f"--val-tar '{path}' needs its labels: --val-labels (the devkit, "
                                  "LOC_val_solution.csv or '<file> <wnid>' lines)")
            index, offsets = archive_index(path, out["train"].index.classes if split == "val" else None,
                                           val_labels if split == "val" else None)
        except (LabelsError, OSError) as err:
            raise PackError(str(err)) from None
        st = path.stat()
        out[split] = SplitSource(index, {"archive": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
                                 str(path), np.asarray(offsets, np.int64))
    return out


def check_names(source: SplitSource) -> None:
    """Every name a ustar member name can hold (UTF-8, 100 bytes or a split of 155 + 100), before
    anything is written: one line naming the first that cannot."""
    index = source.index
    names, ends = index.names_buffer(), np.asarray(index.rows["name_end"])
    lengths = np.diff(ends, prepend=0)
    for i in np.flatnonzero(lengths > 100):
        name = index.name(int(i))
        try:
            member_header(name, 0)
        except ValueError:
            raise PackError(f"'{source.where(name)}': a name of {len(name.encode('utf-8', 'surrogateescape'))} bytes "
                            "that a ustar tar header cannot hold (at most 100, or a folder of 155 and a file of "
                            "100); rename it") from None
    try:
        names.decode("utf-8")
    except UnicodeDecodeError as err:
        start = int(np.searchsorted(ends, err.start, side="right"))
        raise PackError(f"'{source.where(index.name(start))}': a file name that is not UTF-8, which a tar member "
                        "name must be; rename it") from None


def check_plan(dst: Path, plan_record: dict) -> None:
    """DST holds this pack (the same sources, seed and shard size) or none: recorded once."""
    path = dst / STATE_DIR / "plan.json"
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        if before != plan_record:
            raise PackError(f"'{dst}' holds a pack of another source, seed or shard size ({path}); pack into another "
                            "folder, or delete it first")
        return
    atomic_write(path, json.dumps(plan_record, indent=1) + "\n")


def shard_done(dst: Path, name: str, size: int) -> bool:
    """Whether shard `name` was finished: its record exists and the file hashes as recorded."""
    record, shard = dst / STATE_DIR / f"{name}.json", dst / name
    try:
        done = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    if not shard.is_file() or shard.stat().st_size != size or done.get("bytes") != size:
        return False
    return file_sha256(shard) == done.get("sha256")


class BackgroundHash:
    """SHA-256 of what is written, computed in a thread (hashlib releases the GIL), so that hashing
    overlaps the reads and writes instead of adding to them (the hash runs at ~400 MB/s a core)."""

    def __init__(self):
        import queue
        import threading

        self._h, self._queue = hashlib.sha256(), queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="pack-sha256", daemon=True)
        self._thread.start()

        self._pieces, self._held = [], 0

    def _run(self):
        while (pieces := self._queue.get()) is not None:
            for piece in pieces:
                self._h.update(piece)

    def update(self, piece: bytes) -> None:
        self._pieces.append(piece)  # handed over in batches of about 4 MB: a queue operation costs ~15 us
        self._held += len(piece)
        if self._held >= 4 << 20:
            self._queue.put(self._pieces)
            self._pieces, self._held = [], 0

    def hexdigest(self) -> str:
        self._queue.put(self._pieces)
        self.close()
        return self._h.hexdigest()

    def close(self) -> None:
        """End the thread (what was queued is hashed first; hexdigest calls it)."""
        self._queue.put(None)
        self._thread.join()


def write_all(fd: int, pieces) -> None:
    """Write the pieces at fd's position with one writev, and the rest of a short write after it."""
    done = os.writev(fd, pieces)
    if done < sum(len(piece) for piece in pieces):
        rest = memoryview(b"".join(pieces))[done:]
        while rest:
            rest = rest[os.write(fd, rest):]


def read_member(source: SplitSource, i: int, names: bytes, ends: np.ndarray, sizes: np.ndarray,
                check_images: bool) -> tuple[str, bytes, str | None]:
    """Sample i's member name, its bytes (their size checked against the index) and, with
    check_images, why it does not decode (None: it does)."""
    rel = names[int(ends[i - 1]) if i else 0:int(ends[i])].decode()
    want, path = int(sizes[i]), source.where(rel)
    data = source.read(i, path, want)
    if len(data) != want:
        raise PackError(f"'{path}' is {len(data)} bytes, its index says {want}: the source changed while packing; "
                        "pack again")
    broken = None
    if check_images:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as err:  # PIL raises many types for broken files
            broken = f"{path} ({type(err).__name__}: {err})"
    return rel, data, broken


def record_shard(dst: Path, name: str, size: int, digest: str) -> None:
    """The record that says shard `name` is finished. Not fsynced: a record lost in a crash only
    costs writing its shard again."""
    record = dst / STATE_DIR / f"{name}.json"
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"bytes": size, "sha256": digest}) + "\n")
    os.replace(tmp, record)


def write_shard(source: SplitSource, dst: Path, name: str, members, size: int, check_images: bool,
                shard_number: int = 0, bar=None) -> tuple[list[str], Callable[[], None]]:
    """Write one shard's members to its temporary file; returns the members that do not decode
    (check_images) and the shard's finish (fsync, hash, rename, then its record), which
    write_shards runs in a thread while the next shard is written (finish(keep=False): drop
    it). shard_number: the how-manieth of this rank's (a test hook's name)."""
    for stale in (dst / STATE_DIR).glob(f"{name}.*.partial"):  # of a killed pack: this rank writes `name` now
        stale.unlink(missing_ok=True)
    tmp = dst / STATE_DIR / f"{name}.{socket.gethostname()}.{os.getpid()}.partial"
    h = BackgroundHash()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise _space_error(err, dst, name) from None
    try:
        broken, written = write_members(fd, h, source, members, check_images, shard_number, bar)
    except BaseException as err:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        h.close()
        if isinstance(err, OSError):
            raise _space_error(err, dst, name) from None
        raise

    def finish(keep: bool = True) -> None:  # keep=False: only close and remove the temporary file
        try:
            try:
                if keep:
                    os.fsync(fd)
            except OSError:
                h.close()
                raise
            finally:
                os.close(fd)
            if not keep:
                h.close()
                return
            digest = h.hexdigest()
            if written != size:
                raise PackError(f"shard {name}: wrote {written} bytes, the plan says {size}")
            os.replace(tmp, dst / name)
            record_shard(dst, name, size, digest)
        except OSError as err:
            raise _space_error(err, dst, name) from None
        finally:
            tmp.unlink(missing_ok=True)

    return broken, finish


def write_members(fd: int, h: BackgroundHash, source: SplitSource, members, check_images: bool, shard_number: int,
                  bar) -> tuple[list[str], int]:
    """A shard's members and its end, written at fd and handed to h; returns the members that do
    not decode (check_images) and the bytes written. Unbuffered: one writev per member (header,
    data, padding), no copy into a buffer."""
    index, broken, written = source.index, [], 0
    names, ends, sizes = index.names_buffer(), np.asarray(index.rows["name_end"]), np.asarray(index.sizes)
    for n, i in enumerate(members):
        if n == 1:
            pause_point(f"pack-shard-{shard_number}")  # test hook: a kill in the middle of a shard
        rel, data, bad = read_member(source, i, names, ends, sizes, check_images)
        broken += [bad] if bad else []
        pieces = (member_header(rel, len(data)), data, ZEROS[:-len(data) % BLOCK])
        write_all(fd, pieces)
        for piece in pieces:
            h.update(piece)
        member = BLOCK + len(data) + len(pieces[2])
        written += member
        if bar is not None:
            bar.update(member)
    write_all(fd, (ZEROS, ZEROS))  # the end of the archive: two zero blocks
    h.update(ZEROS)
    h.update(ZEROS)
    return broken, written + 2 * BLOCK


def _space_error(err: OSError, dst: Path, name: str) -> Exception:
    """A full disk or quota as one line that keeps the finished shards; any other error as it is."""
    if err.errno in SPACE_ERRORS:
        return PackError(f"{SPACE_ERRORS[err.errno]} writing '{dst / name}'; the finished shards are kept: free "
                         "space and run the same pack again to continue")
    return err


def run_pack(args) -> int:
    if args.verify and args.src is not None:
        raise ConfigError(f"--verify takes DST alone (got '{args.src}' and '{args.dst}')")
    try:
        return verify(Path(args.dst)) if args.verify else pack(args)
    except PackError as err:
        rank, world = launch_rank()
        who = f" (rank {rank} of {world})" if world > 1 else ""
        print(f"hvd_ba pack: error{who}: {err}", file=sys.stderr)
        return 1


def pack(args) -> int:
    """The command: sources, plan, this rank's shards, then (rank 0) the indexes."""
    dst = Path(args.dst)
    rank, world = launch_rank()
    sources = pack_sources(args, dst)
    plans = {split: plan_shards(source.index.sizes, args.seed + k, args.shard_size)
             for k, (split, source) in enumerate(sources.items())}
    try:
        (dst / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PackError(f"cannot write to '{dst}' ({err.strerror})") from None
    check_plan(dst, {"source": {split: source.location for split, source in sources.items()}, "seed": args.seed,
                     "shard_size": args.shard_size,
                     "digests": {split: source.index.digest for split, source in sources.items()}})
    work = [(split, k) for split, plan in plans.items() for k in range(plan.shards)]
    mine = [(split, k) for n, (split, k) in enumerate(work) if n % world == rank]
    todo = [(split, k) for split, k in mine
            if not shard_done(dst, shard_name(split, k), int(plans[split].shard_bytes[k]))]
    need = sum(int(plans[s].shard_bytes[k]) for s, k in todo)
    check_space(dst, rank, work, todo, need, plans, sources)
    print(f"hvd_ba pack: rank {rank} of {world}: {len(mine) - len(todo)} of its {len(mine)} shards done, "
          f"{len(todo)} to write ({human(need)})", flush=True)
    write_shards(dst, rank, todo, need, plans, sources, args.check_images)
    if rank == 0:
        wait_for_shards(dst, work, getattr(args, "patience", 1800))
        write_indexes(dst, plans, sources, args)
        total = sum(len(source.index) for source in sources.values())
        print(f"hvd_ba pack: {dst}: {total} samples in {len(work)} shards "
              f"({', '.join(f'{s} {len(source.index)}' for s, source in sources.items())}); train with "
              f"--set data.path={dst}", flush=True)
    return 0


def pack_sources(args, dst: Path) -> dict[str, SplitSource]:
    """The splits to pack, from SRC or the archives, refused in one line before anything is written."""
    from_tar = getattr(args, "from_tar", None)
    if from_tar:
        if args.src is not None:
            raise ConfigError(f"--from-tar packs the archives into DST: give DST alone (got '{args.src}' and "
                              f"'{args.dst}')")
        sources = archive_sources(from_tar, args.val_tar, args.val_labels)
    else:
        if args.src is None:
            raise ConfigError("pack needs SRC and DST (or --from-tar TRAIN_TAR DST, or --verify DST)")
        if getattr(args, "val_tar", None):
            raise ConfigError("--val-tar goes with --from-tar")
        src = Path(args.src)
        if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
            raise PackError(f"DST '{dst}' lies inside SRC '{src}'; pack into another folder")
        sources = folder_sources(src, getattr(args, "val_labels", None))
    if "val" not in sources and not getattr(args, "train_only", False):
        raise PackError("training needs a validation split too: SRC has no val/ (or give --val-tar with --from-tar)")
    for source in sources.values():
        check_names(source)
    return sources


def check_space(dst: Path, rank: int, work: list, todo: list, need: int, plans: dict, sources: dict) -> None:
    """DST's free space against this rank's unfinished shards; rank 0 also against every rank's
    (one file system) and the indexes."""
    free = free_bytes(dst)
    if rank == 0:
        left = [(s, k) for s, k in work if not (dst / STATE_DIR / f"{shard_name(s, k)}.json").is_file()]
        total = sum(int(plans[s].shard_bytes[k]) for s, k in left) + sum(
            len(src.index) * src.index.rows.itemsize + len(src.index.names) for src in sources.values())
        if total > free:
            raise PackError(f"'{dst}' has {human(free)} free; the {len(left)} unfinished shards and the indexes need "
                            f"{human(total)}; free space (finished shards are kept) and pack again")
    if need > free:
        raise PackError(f"'{dst}' has {human(free)} free; this rank's {len(todo)} unfinished shards need {human(need)}; "
                        "free space (finished shards are kept) and pack again")


def write_shards(dst: Path, rank: int, todo: list, need: int, plans: dict, sources: dict, check_images: bool) -> None:
    """This rank's unfinished shards (`need` bytes), with a bar on a terminal or a line per shard in a log."""
    started, written, broken = time.monotonic(), 0, []
    bar = progress_bar(need, rank)

    def finished(pending) -> None:  # a shard's finish has ended: its error raised, or its line in a log
        nonlocal written
        future, n, name, size = pending
        future.result()
        written += size
        rate = written / max(time.monotonic() - started, 1e-6)
        if bar is None:
            print(f"hvd_ba pack: rank {rank}: {name} {human(size)} ({n}/{len(todo)}), {human(rate)}/s, "
                  f"about {(need - written) / rate:.0f} s left", flush=True)

    # A shard's fsync and the end of its hash overlap the writing of the next; one shard at most
    # waits to be finished.
    with ThreadPoolExecutor(1, thread_name_prefix="pack-finish") as finisher:
        pending = None
        for n, (split, k) in enumerate(todo, 1):
            plan = plans[split]
            name, size = shard_name(split, k), int(plan.shard_bytes[k])
            bad, finish = write_shard(sources[split], dst, name, plan.members(k), size, check_images, n, bar)
            broken += bad
            if pending is not None:
                try:
                    finished(pending)
                except BaseException:
                    finish(keep=False)  # the shard just written is not finished: no partial file left
                    raise
            pending = (finisher.submit(finish), n, name, size)
        if pending is not None:
            finished(pending)
    if bar is not None:
        bar.close()
    for line in broken:
        print(f"hvd_ba pack: does not decode (packed as it is): {line}", flush=True)


def write_indexes(dst: Path, plans: dict, sources: dict, args) -> None:
    """Rank 0, every shard recorded: each split's index, unless DST holds it already."""
    for split, source in sources.items():
        plan = plans[split]
        names = [shard_name(split, k) for k in range(plan.shards)]
        sums = [json.loads((dst / STATE_DIR / f"{n}.json").read_text())["sha256"] for n in names]
        header = {"format": PACK_FORMAT, "pack_version": PACK_VERSION, "source": source.location,
                  "source_digest": source.index.digest, "source_mtimes": source.state, "seed": args.seed,
                  "shard_size": args.shard_size, "shard_bytes": [int(b) for b in plan.shard_bytes],
                  "shard_sha256": sums}
        if same_index(dst, split, header):
            continue  # a pack run again after it finished: running jobs keep mapping these arrays
        try:
            write_index(dst, split, packed_index(source.index, plan, split, str(dst)), header)
        except OSError as err:
            if err.errno in SPACE_ERRORS:
                raise PackError(f"{SPACE_ERRORS[err.errno]} writing the {split} index in '{dst}'; the shards are "
                                "kept: free space and run the same pack again to finish") from None
            raise


def same_index(dst: Path, split: str, header: dict) -> bool:
    """Whether DST already holds this split's index as `header` would write it (arrays intact)."""
    try:
        index = load_packed(dst, split)
    except FileNotFoundError:
        return False
    return all(index.header.get(key) == value for key, value in header.items())


def progress_bar(total: int, rank: int):
    """A tqdm bar (bytes, MB/s, time left) where stdout is a terminal; None in a log (plain lines)."""
    if not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"pack rank {rank}", dynamic_ncols=True)


def wait_for_shards(dst: Path, work: list, patience_s: float) -> None:
    """Rank 0: until every shard is recorded (the other ranks write theirs). A stop, in one line,
    when no shard was finished for `patience_s` (a rank died and its launcher did not end the
    others): the finished shards are kept, and the same pack run again writes the rest."""
    said = progress = time.monotonic()
    before = None
    while True:
        missing = [shard_name(s, k) for s, k in work if not (dst / STATE_DIR / f"{shard_name(s, k)}.json").is_file()]
        if not missing:
            return
        if len(missing) != before:
            before, progress = len(missing), time.monotonic()
        if time.monotonic() - progress > patience_s:
            raise PackError(f"rank 0 waited {patience_s:.0f} s without another shard finished by the other ranks "
                            f"({len(missing)} missing, first {missing[0]}): did a rank die? the finished shards are "
                            "kept; run the same pack again to write the rest")
        if time.monotonic() - said > 60:
            print(f"hvd_ba pack: rank 0 waits for {len(missing)} shards of the other ranks (first {missing[0]})",
                  flush=True)
            said = time.monotonic()
        time.sleep(0.5)


def verify(dst: Path) -> int:
    """Every shard's size and SHA-256 against the index header, every member's tar header against
    the index row; one line per problem, exit 1 if any."""
    import tarfile

    problems, counts = [], []
    splits = [s for s in SPLITS if header_path(dst, s).is_file()]
    if not splits:
        raise PackError(f"'{dst}' is not a packed folder (no train.json or val.json)")
    for split in splits:
        try:
            index = load_packed(dst, split)
        except FileNotFoundError as err:
            problems.append(str(err))
            continue
        for name, want in zip(index.shards, index.header["shard_sha256"]):
            if file_sha256(dst / name) != want:
                problems.append(f"shard '{dst / name}' does not hash as its index records")
        fds = {}
        for i in range(len(index)):
            shard, offset, size = int(index.rows["shard"][i]), int(index.rows["offset"][i]), int(index.sizes[i])
            if shard not in fds:
                fds[shard] = os.open(dst / index.shards[shard], os.O_RDONLY)
            fd = fds[shard]
            try:
                info = tarfile.TarInfo.frombuf(os.pread(fd, BLOCK, offset - BLOCK), "utf-8", "strict")
            except (tarfile.HeaderError, ValueError) as err:
                problems.append(f"{index.where(i)}: no tar header before its data ({err})")
                continue
            if info.name != index.name(i) or info.size != size:
                problems.append(f"{index.where(i)}: the shard holds '{info.name}' ({info.size} bytes) there")
        for fd in fds.values():
            os.close(fd)
        counts.append(f"{split}: {len(index)} samples in {len(index.shards)} shards")
    for line in problems[:20]:
        print(f"hvd_ba pack --verify: {line}", file=sys.stderr)
    if problems:
        print(f"hvd_ba pack --verify: {dst}: {len(problems)} problems", file=sys.stderr)
        return 1
    print(f"hvd_ba pack --verify: {dst}: every shard and member as indexed ({'; '.join(counts)})")
    return 0
