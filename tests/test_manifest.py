"""The cached file index: built once, reused without listing, stale or foreign manifests detected."""
import gzip
import logging
import shutil

import pytest

from hvd_ba.data import manifest
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
    with gzip.open(path, "rt") as f:
        lines = f.readlines()
    with gzip.open(path, "wt") as f:
        f.writelines(lines[:50])
    with pytest.raises(StaleManifest, match="truncated"):
        read_manifest(path, data / "train")
    path.write_bytes(b"garbage")
    with pytest.raises(StaleManifest, match="unreadable"):
        read_manifest(path, data / "train")
