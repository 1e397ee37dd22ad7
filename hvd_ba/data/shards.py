"""Packed folders: a split's images in uncompressed POSIX (ustar) tar shards, with a flat index.

A packed folder (written by `python -m hvd_ba pack`, hvd_ba/launch/pack.py) holds per split
`<split>-000000.tar`, `<split>-000001.tar`, ... and the split's file index (data/index.py) as
`<split>.json` with its two arrays. Member names are `<class>/<file>`, 512-byte ustar headers (no
PAX records), so `tar -tf`, WebDataset and DALI read the shards too.

The index lists the samples in the source folder's order (sorted classes, sorted files), so its
digest is the folder's and sample i is the same image in both: a run from the shards draws the
same files and crops at every step as a run from the folder (and may resume from the other's
checkpoints). Only the shards' contents are in a seeded shuffled order, so each shard mixes all
classes; each index row gives the sample's shard and the offset of its data there, and a sample is
one pread. The member layout is fixed by the sizes alone (header, data padded to 512 bytes), so the
whole index is known before a byte is written and each rank can write its shards alone.
"""
from __future__ import annotations

import heapq
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvd_ba.config import ConfigError
from hvd_ba.data.index import FileIndex, IndexUnreadable, header_path, mapped, read_header, read_index

log = logging.getLogger("hvd_ba")

BLOCK = 512
PACK_FORMAT = "hvd_ba-pack"
PACK_VERSION = 1
SPLITS = ("train", "val")


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of one member: a regular file, mode 0644, mtime 0, owner 0/0, no
    user or group name (the same bytes on every pack). Byte for byte what tarfile writes for such a
    TarInfo (a test compares them); built here because tarfile takes ~0.1 ms per header, a quarter
    of a pack's time at ImageNet's sizes. Names longer than ustar's 100-byte field go to tarfile
    (its prefix split)."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or size >= 8 ** 11:
        return _tarfile_header(name, size)
    head = (encoded.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" + b"0000000\0" + b"%011o\0" % size
            + b"00000000000\0")
    checksum = sum(head) + _TAIL_SUM  # the checksum field counts as eight spaces
    return head + b"%06o\0 " % checksum + _TAIL


# A header's fields after its checksum: type 0, no link name, ustar 00, no names, no device numbers,
# no prefix, padded to the block; the same in every header.
_TAIL = (b"0" + bytes(100) + b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155)).ljust(BLOCK - 148 - 8, b"\0")
_TAIL_SUM = 8 * 32 + sum(_TAIL)


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    try:
        block = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    except ValueError as err:  # a name that does not fit ustar's 100 + 155 bytes
        raise ValueError(f"'{name}' cannot be a ustar member name ({err})") from None
    if len(block) != BLOCK:
        raise ValueError(f"'{name}': its tar header is {len(block)} bytes, not one block")
    return block


def padded(size) -> np.ndarray | int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


@dataclass
class ShardPlan:
    """Where every sample of a split goes: `order` (the samples in writing order), per sample its
    shard and data offset, and per shard its first position in `order` and its size in bytes."""

    order: np.ndarray
    shard: np.ndarray
    offset: np.ndarray
    starts: np.ndarray
    shard_bytes: np.ndarray

    @property
    def shards(self) -> int:
        return len(self.shard_bytes)

    def members(self, k: int) -> np.ndarray:
        """The samples of shard k, in writing order."""
        return self.order[self.starts[k]:self.starts[k + 1]]


def plan_shards(sizes: np.ndarray, seed: int, target_bytes: int) -> ShardPlan:
    """The seeded shuffled order cut into shards of about `target_bytes`: a member goes to shard
    floor(its start in the whole stream / target_bytes), so shards differ from the target by at
    most one member."""
    n = len(sizes)
    if n == 0:
        raise ValueError("no samples to pack")
    order = np.random.default_rng(seed).permutation(n)
    member = BLOCK + padded(np.asarray(sizes, np.int64)[order])
    start = np.concatenate([[0], np.cumsum(member)[:-1]])
    # shard numbers without gaps (a member larger than the target would skip numbers)
    _, shard_in_order = np.unique(start // max(int(target_bytes), 1), return_inverse=True)
    starts = np.searchsorted(shard_in_order, np.arange(shard_in_order[-1] + 2))
    first, last = starts[:-1], starts[1:] - 1
    shard, offset = np.empty(n, np.int32), np.empty(n, np.int64)
    shard[order] = shard_in_order
    offset[order] = start - start[first][shard_in_order] + BLOCK
    shard_bytes = start[last] + member[last] - start[first] + 2 * BLOCK  # two zero blocks end the archive
    return ShardPlan(order, shard, offset, starts, shard_bytes)


def packed_index(source: FileIndex, plan: ShardPlan, split: str, root: str) -> FileIndex:
    """The packed folder's index of a split: the source's rows with each sample's shard and offset."""
    rows = np.array(source.rows)
    rows["shard"], rows["offset"] = plan.shard, plan.offset
    shards = [shard_name(split, k) for k in range(plan.shards)]
    return FileIndex(root, source.classes, rows, np.asarray(source.names), source.digest, shards)


def shard_parts(shard_of_sample: np.ndarray, shards: int, world: int) -> list[np.ndarray]:
    """data.shard=static over a packed folder: each rank's part is a set of whole shards (what
    `stage` copies), balanced by sample counts (the largest shard first to the rank holding the
    fewest samples, ties to the lower shard and rank number). Returns each rank's samples, sorted.
    A rank without a shard is refused: pack with a smaller --shard-size, or use data.shard=global."""
    if world > shards:
        raise ConfigError(f"config key 'data.shard': static shards over a packed folder give each rank whole "
                          f"shards, and its {shards} training shard{'s' * (shards != 1)} cannot feed {world} ranks "
                          "(pack again with a smaller --shard-size, or set data.shard=global)")
    counts = np.bincount(shard_of_sample, minlength=shards)
    load, owner = [(0, r) for r in range(world)], np.empty(shards, np.int64)
    for k in sorted(range(shards), key=lambda k: (-counts[k], k)):
        samples, r = heapq.heappop(load)
        owner[k] = r
        heapq.heappush(load, (samples + int(counts[k]), r))
    of_sample = owner[shard_of_sample]
    order = np.argsort(of_sample, kind="stable")  # by rank, samples ascending within each
    return np.split(order, np.cumsum(np.bincount(of_sample, minlength=world))[:-1])


def index_parts(index: FileIndex, world: int) -> list[np.ndarray]:
    """shard_parts of a packed index over `world` ranks, computed once per index (a run's start
    asks for them several times: its sampler, its staged files, its printed figures)."""
    cached = index.__dict__.setdefault("_parts", {})
    if world not in cached:
        cached[world] = shard_parts(index.rows["shard"], len(index.shards), world)
    return cached[world]


def static_parts_line(index: FileIndex, shard_mode: str, world: int) -> str | None:
    """With static shards over a packed folder, how many files the parts let the ranks read per
    epoch (each as many as the smallest part holds), said by plan and at a run's start, with
    advice when that is under 90 %; None otherwise."""
    if shard_mode != "static" or not index.shards:
        return None
    sizes = [len(part) for part in index_parts(index, world)]
    read = min(sizes) * world
    line = (f"static parts: whole packed shards ({len(index.shards)} over {world} ranks), {min(sizes)}-{max(sizes)} "
            f"files per rank; each epoch reads {read} of {len(index)} training files ({100 * read / len(index):.0f} %)")
    if read < 0.9 * len(index):
        line += ("; low: pack with a smaller --shard-size (more, smaller shards per rank) or set data.shard=global")
    return line


def static_parts_id(index: FileIndex) -> str:
    """What static shards are cut from, for a checkpoint's plan: a folder's seeded permutation, or a
    pack's shards (which sample lies in which shard: another pack of the same folder, with another
    seed or shard size, gives the ranks other parts)."""
    if not index.shards:
        return "seeded cut"
    import hashlib

    where = np.ascontiguousarray(index.rows["shard"], dtype="<i4")
    return f"{len(index.shards)} packed shards {hashlib.sha1(where.tobytes()).hexdigest()[:16]}"


def files_per_rank(index: FileIndex, shard_mode: str, world: int) -> int:
    """The training files each rank reads per epoch: len // world, or with static shards over a
    packed folder the smallest part's (shard_parts)."""
    if shard_mode == "static" and index.shards:
        return min(len(part) for part in index_parts(index, world))
    return len(index) // world


def load_packed(folder: str | Path, split: str) -> FileIndex:
    """A split of a packed folder, memory-mapped; FileNotFoundError naming what is wrong."""
    folder = Path(folder)
    path = header_path(folder, split)
    if not path.is_file():
        raise FileNotFoundError(f"packed folder '{folder}' has no {split} index ({path.name}); an unfinished pack? "
                                "run `python -m hvd_ba pack` again to finish it")
    try:
        header = read_header(path)
        if header.get("format") != PACK_FORMAT:
            raise IndexUnreadable(f"index '{path}' is not a pack's index")
        index = read_index(path, str(folder), header)
    except IndexUnreadable as err:
        raise FileNotFoundError(f"packed folder '{folder}': {err}") from None
    if not index.shards or len(index.shards) != len(header.get("shard_bytes", ())):
        raise FileNotFoundError(f"packed folder '{folder}': index '{path}' names no shards")
    for name, size in zip(index.shards, header["shard_bytes"]):
        shard = folder / name
        if not shard.is_file() or shard.stat().st_size != size:
            raise FileNotFoundError(f"packed folder '{folder}': shard '{name}' is missing or not of the {size} bytes "
                                    "its index records (`python -m hvd_ba pack --verify` checks every shard)")
    index.header = header
    return index


def stale_source(header: dict) -> str | None:
    """Why a pack's source folder has changed since it was packed (one stat per class folder),
    or None (unchanged, or no longer there to compare)."""
    source = Path(header.get("source") or "")
    mtimes = header.get("source_mtimes") or {}
    if "archive" in mtimes:  # packed from ImageNet's archive: its size and mtime
        try:
            st = os.stat(mtimes["archive"])
        except OSError:
            return None
        if (st.st_size, st.st_mtime_ns) != (mtimes.get("bytes"), mtimes.get("mtime_ns")):
            return f"the archive '{mtimes['archive']}' changed since the pack"
        return None
    if not source.is_dir() or not mtimes:
        return None
    from hvd_ba.data.manifest import _class_folders, _folder_state  # the manifest's own freshness test

    try:
        classes = _class_folders(source)
        if classes != sorted(mtimes):
            return f"the class folders of '{source}' changed"
        now = _folder_state(source, classes)
    except OSError:
        return f"class folders of '{source}' were removed or renamed"
    if now != mtimes:
        changed = sorted(name for name in mtimes if now[name] != mtimes[name])
        return f"files in '{source}' were added, removed or renamed since the pack ({len(changed)} class folders, " \
               f"first {changed[0]})"
    return None


def load_split(cfg, split: str, write: bool) -> FileIndex:
    """One split of data.path: a packed folder's index (memory-mapped; rank 0, `write`, says
    when its source changed since the pack), or a folder's, from its manifest (cached if `write`)."""
    from hvd_ba.config import data_format, manifest_cache
    from hvd_ba.data.manifest import load_index

    if data_format(cfg) == "shards":
        index = load_packed(cfg.data.path, split)
        why = stale_source(index.header) if write and split == "train" else None
        if why:
            log.warning("data.path '%s' is a stale pack: %s; training reads what was packed (pack again to take "
                        "the changes)", cfg.data.path, why)
        return index
    if split == "val" and cfg.data.val_labels:
        from hvd_ba.data.manifest import _class_folders, load_flat_val

        root = Path(cfg.data.path)
        return mapped(load_flat_val(root / "val", cfg.data.val_labels, _class_folders(root / "train"),
                                    manifest_cache(cfg), write=write))
    # mapped: loader workers map the pages instead of each unpickling a copy
    return mapped(load_index(cfg.data.path, split, manifest_cache(cfg), write=write))
