"""A split's file index as flat arrays: what training reads of 1.28 M images without holding
1.28 M Python strings.

An index is two arrays and a few scalars:
- `rows`: one record per sample (ROW: end of its name in `names`, size in bytes, data offset and
  shard number in a packed folder (0 and -1 in a folder), label);
- `names`: the samples' relative paths (`<class>/<file>`), UTF-8, back to back in one uint8 buffer;
- the class list, the root, and the digest of (path, label) in order (what a checkpoint records).

On disk (the cached manifest of a folder, the index of a packed folder) it is a JSON header
`<name>.json` naming two `.npy` files of one generation, `<name>.<generation>.rows.npy` and
`<name>.<generation>.names.npy`. The arrays are written first and the header replaced last, so a
reader sees one whole generation or the one before. Loaded memory-mapped: a rank touches only
the pages it reads, and a loader worker gets the index by file name, not by a pickled copy, so the
pages are shared by the rank and all its workers (page cache) instead of copied into each.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

KEEP_OLD_GENERATION_S = 86400
ROW = np.dtype([("name_end", "<i8"), ("size", "<i8"), ("offset", "<i8"), ("shard", "<i4"), ("label", "<i4")])
INDEX_VERSION = 2


class IndexUnreadable(Exception):
    """An index file that is missing, damaged, or of another version: the message names it."""


def names_digest(paths, labels) -> str:
    """sha256 over `path<TAB>label<NEWLINE>` in order: the training data's identity in a checkpoint
    (two indexes with one digest name the same files with the same labels in the same order)."""
    h = hashlib.sha256()
    for path, label in zip(paths, labels):
        h.update(f"{path}\t{int(label)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class Names(Sequence):
    """The relative paths of an index as a read-only sequence of str, decoded on access."""

    def __init__(self, index: FileIndex):
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._index.name(j) for j in range(*i.indices(len(self)))]
        return self._index.name(i)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None


class FileIndex:
    """The samples of one split (see the module's docstring). `root`: the split folder (folder
    mode) or the packed folder (`shards`: the shard files' names, relative to it)."""

    def __init__(self, root: str, classes: Sequence[str], rows: np.ndarray, names: np.ndarray,
                 digest: str | None = None, shards: Sequence[str] = (), files: tuple[str, str] | None = None):
        self.root, self.classes, self.rows, self.names = str(root), tuple(classes), rows, names
        self.shards, self.files, self._digest = tuple(shards), files, digest
        self.header: dict = {}  # a packed folder's index header (shards' sizes and SHA-256), set by load_packed

    @classmethod
    def from_lists(cls, root, paths: Sequence[str], labels: Sequence[int], sizes: Sequence[int],
                   classes: Sequence[str]) -> FileIndex:
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]  # a file name need not be UTF-8
        rows = np.zeros(len(encoded), ROW)
        rows["name_end"] = np.cumsum([len(e) for e in encoded], dtype=np.int64) if encoded else []
        rows["size"], rows["label"], rows["shard"] = sizes, labels, -1
        names = np.frombuffer(b"".join(encoded), np.uint8).copy()
        return cls(root, classes, rows, names)

    def __len__(self) -> int:
        return len(self.rows)

    def __eq__(self, other) -> bool:
        return (isinstance(other, FileIndex) and (self.root, self.classes, self.shards, len(self), self.digest)
                == (other.root, other.classes, other.shards, len(other), other.digest))

    __hash__ = None

    def moved(self, root: str) -> FileIndex:
        """The same samples read from another folder (a node-local copy)."""
        moved = FileIndex(root, self.classes, self.rows, self.names, self.digest, self.shards, self.files)
        moved.header = self.header
        if "_parts" in self.__dict__:  # data/shards.py index_parts: the same rows, the same parts
            moved._parts = self._parts
        return moved

    def name(self, i: int) -> str:
        """Sample i's path relative to the split folder: `<class>/<file>`."""
        i = int(i)
        if i < 0:
            i += len(self)
        start = int(self.rows["name_end"][i - 1]) if i > 0 else 0
        return self.names[start:int(self.rows["name_end"][i])].tobytes().decode("utf-8", "surrogateescape")

    def names_buffer(self) -> bytes:
        """Every name back to back (UTF-8), as bytes, made once: for loops over many samples (pack)."""
        if getattr(self, "_names_bytes", None) is None:
            self._names_bytes = self.names.tobytes()
        return self._names_bytes

    @property
    def paths(self) -> Names:
        return Names(self)

    @property
    def labels(self) -> np.ndarray:
        return self.rows["label"]

    @property
    def sizes(self) -> np.ndarray:
        return self.rows["size"]

    @property
    def packed(self) -> bool:
        return bool(self.shards)

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = names_digest(self.paths, self.labels)
        return self._digest

    def where(self, i: int) -> str:
        """Sample i for a message: its file, or its shard and member."""
        if self.packed:
            return f"{os.path.join(self.root, self.shards[int(self.rows['shard'][i])])}:{self.name(i)}"
        return os.path.join(self.root, self.name(i))

    def __getstate__(self):
        # memory-mapped: pickled by file name, mapped again where unpickled (a loader worker)
        state = dict(self.__dict__)
        state.pop("_names_bytes", None)
        state.pop("_parts", None)  # static parts (data/shards.py index_parts): the rank's, not its workers'
        if self.files:
            state["rows"] = state["names"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.files:
            self.rows, self.names = (np.load(f, mmap_mode="r") for f in self.files)


_private_dirs: list[str] = []


def mapped(index: FileIndex) -> FileIndex:
    """`index` memory-mapped: as it is when it was read from disk, else written once to a private
    temporary folder (removed at exit) and mapped from there, so that loader workers map its pages
    instead of each unpickling a copy (about 60 bytes per sample)."""
    if index.files:
        return index
    import atexit
    import shutil

    folder = tempfile.mkdtemp(prefix="hvd_ba-index-")
    if not _private_dirs:
        atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _private_dirs])
    _private_dirs.append(folder)
    return read_index(write_index(Path(folder), "index", index, {}), index.root)


def header_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.json"


def write_index(folder: Path, name: str, index: FileIndex, extra: dict) -> Path:
    """Write `index` as `folder/<name>.json` and its arrays (see the module's docstring); returns
    the header's path. Other generations of `name` are removed once the header names this one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generation = secrets.token_hex(4)
    arrays = (f"{name}.{generation}.rows.npy", f"{name}.{generation}.names.npy")
    for file, array in zip(arrays, (np.asarray(index.rows), np.asarray(index.names))):
        with open(folder / file, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
    header = {"version": INDEX_VERSION, **extra, "samples": len(index), "names_bytes": int(len(index.names)),
              "classes": list(index.classes), "digest": index.digest, "shards": list(index.shards),
              "rows": arrays[0], "names": arrays[1]}
    path = header_path(folder, name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(header, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for file in arrays:
            (folder / file).unlink(missing_ok=True)
        raise
    # An earlier generation stays a day: a running job's loader workers started later (the first
    # evaluation's) map the generation their rank read, by name.
    now = time.time()
    for old in folder.glob(f"{name}.*.*.npy"):
        if old.name not in arrays and old.name.split(".")[-2] in ("rows", "names"):
            try:
                if now - old.stat().st_mtime > KEEP_OLD_GENERATION_S:
                    old.unlink()
            except FileNotFoundError:
                pass
    return path


def read_header(path: Path) -> dict:
    try:
        header = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise IndexUnreadable(f"index '{path}' is unreadable ({getattr(err, 'strerror', None) or err})") from None
    if not isinstance(header, dict) or header.get("version") != INDEX_VERSION:
        raise IndexUnreadable(f"index '{path}' is not an index of version {INDEX_VERSION}")
    return header


def read_index(path: Path, root: str, header: dict | None = None) -> FileIndex:
    """The index whose header is `path` (read_header's dict, if read already), memory-mapped."""
    path = Path(path)
    header = read_header(path) if header is None else header
    try:
        files = tuple(str(path.parent / header[key]) for key in ("rows", "names"))
        classes, shards, samples, digest = header["classes"], header["shards"], header["samples"], header["digest"]
        if any("/" in f for f in (header["rows"], header["names"])):
            raise TypeError("array names with a folder")
        rows, names = (np.load(f, mmap_mode="r") for f in files)
    except (KeyError, TypeError) as err:
        raise IndexUnreadable(f"index '{path}' lacks or mangles a field ({err})") from None
    except (OSError, ValueError) as err:
        raise IndexUnreadable(f"index '{path}': its arrays are unreadable ({getattr(err, 'strerror', None) or err})"
                              ) from None
    if rows.dtype != ROW or names.dtype != np.uint8 or rows.ndim != 1 or names.ndim != 1:
        raise IndexUnreadable(f"index '{path}': its arrays are not of this version's types")
    if len(rows) != samples or len(names) != header.get("names_bytes") or (
            samples and int(rows["name_end"][-1]) != len(names)):
        raise IndexUnreadable(f"index '{path}' is truncated ({len(rows)} of {samples} samples)")
    return FileIndex(root, classes, rows, names, digest, shards, files)
