"""The file index of a split folder, built once and cached, so that 1.28 M files are not listed by
every rank at every start.

A manifest is a file index (data/index.py: flat arrays, memory-mapped) whose header also records
the folder it lists and, per class folder, its mtime. It is fresh when the header's root matches
and every class folder still has the mtime it had: adding, removing or renaming a file changes
its folder's mtime, so a stale manifest is found with one stat per class (1,000 for ImageNet)
instead of a listing of every file.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from hvd_ba.data.index import FileIndex, IndexUnreadable, read_header, read_index, write_index

log = logging.getLogger("hvd_ba")

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class StaleManifest(Exception):
    """The cached manifest does not describe the folder any more (or not this folder)."""


def _class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise FileNotFoundError(f"data directory '{folder}' does not exist")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        flat = any(e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES) for e in os.scandir(folder))
        raise FileNotFoundError(f"data directory '{folder}' has no class folders" + (
            " but images: a flat validation folder takes its labels from data.val_labels (pack: --val-labels)"
            if flat else ""))
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
    return FileIndex.from_lists(str(folder), paths, labels, sizes, classes), state


def manifest_path(folder: Path, cache_dir: Path) -> Path:
    """The manifest's header; its arrays lie beside it."""
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"{folder.parent.name}-{folder.name}-{key}.manifest.json"


def write_manifest(path: Path, index: FileIndex, state: dict) -> Path:
    # readers see the old manifest or the new one, never half of one (index.write_index)
    return write_index(path.parent, path.name[:-len(".json")], index, {"root": str(Path(index.root).resolve()),
                                                                        "mtimes": state})


def read_manifest(path: Path, folder: Path) -> FileIndex:
    """Load a manifest, raising StaleManifest unless it still describes `folder`."""
    try:
        header = read_header(path)
        if header.get("root") != str(folder.resolve()):
            raise StaleManifest(f"manifest '{path}' was made for '{header.get('root')}', not '{folder.resolve()}'")
        index = read_index(path, str(folder), header)
    except IndexUnreadable as err:
        raise StaleManifest(str(err).replace("index '", "manifest '", 1)) from None
    classes = _class_folders(folder)
    if classes != list(index.classes):
        raise StaleManifest(f"manifest '{path}': the class folders of '{folder}' changed")
    if _folder_state(folder, classes) != header.get("mtimes"):
        raise StaleManifest(f"manifest '{path}': files in '{folder}' were added, removed or renamed since it was made")
    return index


def load_index(root: str | Path, split: str, cache_dir: str | Path | None, write: bool = True) -> FileIndex:
    """The index of root/split: from its cached manifest when fresh, else listed (and cached if
    `write`). cache_dir None disables caching. Memory-mapped where it comes from a manifest; a
    listed index that was not cached is in memory (index.mapped maps it)."""
    folder = Path(root) / split
    if cache_dir is None:
        return scan_folder(folder)[0]
    path = manifest_path(folder, _cache_folder(cache_dir))
    if path.is_file():
        try:
            return read_manifest(path, folder)
        except StaleManifest as err:
            log.warning("%s; listing the folder again", err)
    index, state = scan_folder(folder)
    return _cached(path, index, state) if write else index


def _cache_folder(cache_dir: str | Path) -> Path:
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        from hvd_ba.config import ConfigError

        raise ConfigError(f"config key 'data.manifest_dir': '{cache_dir}' is a file, not a folder (null: no cache)")
    return Path(cache_dir)


def _cached(path: Path, index: FileIndex, state: dict) -> FileIndex:
    """The index written as the manifest at `path` and read back mapped (as a cached one is); the
    index as it is when the cache cannot be written (the next start lists again)."""
    try:
        return read_index(write_manifest(path, index, state), index.root)
    except OSError as err:
        log.warning("could not cache the file index in %s (%s); listing again at the next start", path, err.strerror)
        return index


def flat_state(folder: Path, labels_path: str | Path, classes) -> dict:
    """What a flat validation folder's manifest depends on: the folder's mtime (a file added,
    removed or renamed changes it), the labels (read and hashed: a devkit, CSV or text file, or a
    devkit folder; a relabelled image keeps the file's size, and a file system may keep mtimes in
    whole seconds) and the training classes."""
    from hvd_ba.data.imagenet import read_val_labels

    labels = hashlib.sha1(repr(sorted(read_val_labels(labels_path).items())).encode()).hexdigest()
    return {"folder": os.stat(folder).st_mtime_ns, "labels": labels,
            "classes": hashlib.sha1("\n".join(classes).encode()).hexdigest()}


def load_flat_val(folder: Path, labels_path: str | Path, classes, cache_dir: str | Path | None,
                  write: bool = True) -> FileIndex:
    """A flat validation folder's index (data.val_labels): from its cached manifest while
    flat_state is unchanged, else listed with its labels (and cached if `write`), as load_index
    does for a folder of class folders."""
    from hvd_ba.data.imagenet import flat_val_index

    if cache_dir is None:
        return flat_val_index(folder, labels_path, classes)
    path = manifest_path(folder, _cache_folder(cache_dir))
    path = path.with_name(path.name.replace(".manifest.json", ".flat-manifest.json"))
    state = flat_state(folder, labels_path, classes)  # before listing: a change during it makes it stale
    if path.is_file():
        try:
            header = read_header(path)
            if header.get("root") == str(folder.resolve()) and header.get("mtimes") == state:
                return read_index(path, str(folder), header)
            log.warning("manifest '%s': the flat folder '%s', its labels file or the training classes changed; "
                        "listing the folder again", path, folder)
        except IndexUnreadable as err:
            log.warning("%s; listing the folder again", str(err).replace("index '", "manifest '", 1))
    index = flat_val_index(folder, labels_path, classes)
    return _cached(path, index, state) if write else index
