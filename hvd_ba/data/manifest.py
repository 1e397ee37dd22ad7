"""The file index of a split, built once and cached, so that 1.28 M files are not listed by every
rank at every start.

A manifest is a gzip'd text file: one JSON header line (root, split, classes, and per class
folder its file count and mtime), then one `relative/path<TAB>label<TAB>bytes` line per file.
It is fresh when the header's root and split match and every class folder still has the mtime
it had: adding, removing or renaming a file changes its folder's mtime, so a stale manifest is
found with one stat per class (1,000 for ImageNet) instead of a listing of every file.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("hvd_ba")

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class FileIndex:
    """The files of one split: paths relative to the split folder, labels, sizes, class names."""

    root: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    sizes: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


class StaleManifest(Exception):
    """The cached manifest does not describe the folder any more (or not this folder)."""


def _class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise FileNotFoundError(f"data directory '{folder}' does not exist")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"data directory '{folder}' has no class folders")
    return classes


def _folder_state(folder: Path, classes: list[str]) -> dict:
    return {name: os.stat(folder / name).st_mtime_ns for name in classes}


def scan_folder(folder: Path) -> tuple[FileIndex, dict]:
    """List folder/<class>/<image> in sorted order (label = position of the class folder)."""
    classes = _class_folders(folder)
    state = _folder_state(folder, classes)  # before listing: a change during the scan makes it stale
    paths, labels, sizes = [], [], []
    for label, name in enumerate(classes):
        entries = sorted((e for e in os.scandir(folder / name)
                          if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)), key=lambda e: e.name)
        if not entries:
            raise FileNotFoundError(f"class folder '{folder / name}' has no images")
        for e in entries:
            paths.append(f"{name}/{e.name}")
            labels.append(label)
            sizes.append(e.stat().st_size)
    index = FileIndex(str(folder), tuple(paths), tuple(labels), tuple(sizes), tuple(classes))
    return index, state


def manifest_path(folder: Path, cache_dir: Path) -> Path:
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"{folder.parent.name}-{folder.name}-{key}.manifest.gz"


def write_manifest(path: Path, index: FileIndex, state: dict) -> None:
    header = {"version": MANIFEST_VERSION, "root": str(Path(index.root).resolve()), "classes": list(index.classes),
              "mtimes": state, "files": len(index)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with gzip.open(tmp, "wt", compresslevel=1) as f:
        f.write(json.dumps(header) + "\n")
        for p, label, size in zip(index.paths, index.labels, index.sizes):
            f.write(f"{p}\t{label}\t{size}\n")
    os.replace(tmp, path)  # readers see the old manifest or the new one, never half of one


def read_manifest(path: Path, folder: Path) -> FileIndex:
    """Load a manifest, raising StaleManifest unless it still describes `folder`."""
    try:
        with gzip.open(path, "rt") as f:
            header = json.loads(f.readline())
            rows = [line.rstrip("\n").split("\t") for line in f]
    except (OSError, EOFError, ValueError) as err:
        raise StaleManifest(f"manifest '{path}' is unreadable ({err})") from None
    if not isinstance(header, dict) or not isinstance(header.get("classes"), list) or any(len(r) != 3 for r in rows):
        raise StaleManifest(f"manifest '{path}' is not a manifest of this version")
    if header.get("version") != MANIFEST_VERSION or header.get("root") != str(folder.resolve()):
        raise StaleManifest(f"manifest '{path}' was made for '{header.get('root')}', not '{folder.resolve()}'")
    if len(rows) != header.get("files"):
        raise StaleManifest(f"manifest '{path}' is truncated ({len(rows)} of {header.get('files')} files)")
    classes = _class_folders(folder)
    if classes != header["classes"]:
        raise StaleManifest(f"manifest '{path}': the class folders of '{folder}' changed")
    if _folder_state(folder, classes) != header.get("mtimes"):
        raise StaleManifest(f"manifest '{path}': files in '{folder}' were added, removed or renamed since it was made")
    try:
        labels, sizes = tuple(int(r[1]) for r in rows), tuple(int(r[2]) for r in rows)
    except ValueError:
        raise StaleManifest(f"manifest '{path}' has a row that is not <file> <label> <size>") from None
    return FileIndex(str(folder), tuple(r[0] for r in rows), labels, sizes, tuple(classes))


def load_index(root: str | Path, split: str, cache_dir: str | Path | None, write: bool = True) -> FileIndex:
    """The index of root/split: from its cached manifest when fresh, else listed (and cached if
    `write`). cache_dir None disables caching."""
    folder = Path(root) / split
    if cache_dir is None:
        return scan_folder(folder)[0]
    path = manifest_path(folder, Path(cache_dir))
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        from hvd_ba.config import ConfigError

        raise ConfigError(f"config key 'data.manifest_dir': '{cache_dir}' is a file, not a folder (null: no cache)")
    if path.is_file():
        try:
            return read_manifest(path, folder)
        except StaleManifest as err:
            log.warning("%s; listing the folder again", err)
    index, state = scan_folder(folder)
    if write:
        try:
            write_manifest(path, index, state)
        except OSError as err:  # only a cache: the next start lists the folder again
            path.with_name(f"{path.name}.{os.getpid()}.tmp").unlink(missing_ok=True)
            log.warning("could not cache the file index in %s (%s); listing again at the next start", path,
                        err.strerror)
    return index
