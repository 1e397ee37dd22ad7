"""The cached file index: built once, reused without listing, stale or foreign manifests detected."""
import json
import logging
import shutil

import numpy as np

import pytest

from hvd_ba.data import manifest
from hvd_ba.data.index import mapped
from hvd_ba.data.manifest import StaleManifest, load_index, manifest_path, read_manifest

pytestmark = pytest.mark.unit


@pytest.fixture
def data(small_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(small_data, root)
    return root


def test_built_once_then_read_without_listing(data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_index(data, "train", cache)
    path = manifest_path(data / "train", cache)
    assert path.is_file()
    monkeypatch.setattr(manifest, "scan_folder", lambda folder: pytest.fail("listed the folder again"))
    second = load_index(data, "train", cache)
    assert second == first and len(second) == 4 * 48


def test_added_file_makes_it_stale(data, tmp_path, caplog):
    cache = tmp_path / "cache"
    before = load_index(data, "train", cache)
    shutil.copy(data / "train" / "n90000002" / "n90000002_00000.JPEG", data / "train" / "n90000002" / "new.JPEG")
    with pytest.raises(StaleManifest, match="added, removed or renamed"):
        read_manifest(manifest_path(data / "train", cache), data / "train")
    with caplog.at_level(logging.WARNING, logger="hvd_ba"):
        after = load_index(data, "train", cache)
    assert "listing the folder again" in caplog.text
    assert len(after) == len(before) + 1 and "n90000002/new.JPEG" in after.paths
    assert load_index(data, "train", cache) == after  # the rebuilt manifest is fresh again


def test_manifest_of_another_folder_is_rejected(data, tmp_path):
    cache = tmp_path / "cache"
    load_index(data, "train", cache)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    foreign = manifest_path(data / "train", cache)
    with pytest.raises(StaleManifest, match="was made for"):
        read_manifest(foreign, other / "train")


def test_truncated_manifest_is_rejected(data, tmp_path):
    cache = tmp_path / "cache"
    load_index(data, "train", cache)
    path = manifest_path(data / "train", cache)
    rows = path.parent / json.loads(path.read_text())["rows"]
    np.save(rows, np.load(rows)[:50])
    with pytest.raises(StaleManifest, match="truncated"):
        read_manifest(path, data / "train")
    rows.unlink()
    with pytest.raises(StaleManifest, match="arrays are unreadable"):
        read_manifest(path, data / "train")
    path.write_bytes(b"garbage")
    with pytest.raises(StaleManifest, match="unreadable"):
        read_manifest(path, data / "train")


def test_a_manifest_is_memory_mapped_and_pickled_by_name(data, tmp_path):
    """A loader worker gets the index by file name: the pickle stays small whatever the index's size."""
    import pickle

    cache = tmp_path / "cache"
    load_index(data, "train", cache)
    index = load_index(data, "train", cache)
    assert isinstance(index.rows, np.memmap) and isinstance(index.names, np.memmap)
    blob = pickle.dumps(index)
    assert len(blob) < 2000 + len(index.root), len(blob)
    again = pickle.loads(blob)
    assert again == index and again.paths[-1] == index.paths[-1] and list(again.labels) == list(index.labels)
    listed = load_index(data, "train", None)  # not cached: arrays in memory, pickled whole
    assert listed == index and listed.digest == index.digest and pickle.loads(pickle.dumps(listed)) == listed
    assert len(pickle.dumps(listed)) > 4 * len(blob)
    private = mapped(listed)  # what training hands its workers: mapped from a private temporary folder
    assert isinstance(private.rows, np.memmap) and len(pickle.dumps(private)) < 2000 + len(private.root)
    assert private == listed and list(private.paths) == list(listed.paths)


def test_the_first_listing_is_handed_on_mapped(data, tmp_path):
    """The start that lists the folder (no manifest yet) returns the manifest it wrote, mapped."""
    first = load_index(data, "train", tmp_path / "cache")
    assert isinstance(first.rows, np.memmap) and first.files


def test_the_digest_is_the_checkpoints_definition(data):
    """A checkpoint records sha256 over `path<TAB>label<NEWLINE>` in order; the index keeps it."""
    import hashlib

    index = load_index(data, "train", None)
    h = hashlib.sha256()
    for path in sorted((data / "train").rglob("*.JPEG")):
        rel = path.relative_to(data / "train").as_posix()
        h.update(f"{rel}\t{index.classes.index(rel.split('/')[0])}\n".encode())
    assert index.digest == h.hexdigest()
