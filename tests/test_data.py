"""The synthetic data set and the BA pipeline: shards, decode once, M copies, layouts, determinism."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from hvd_ba.config import load_config
from hvd_ba.data import pipeline
from hvd_ba.data.pipeline import BACollate, GlobalShardSampler, make_train_loader, scan_split
from hvd_ba.data.synthetic import make_dataset


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.JPEG")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_make_dataset_is_deterministic_by_seed(tmp_path):
    a = make_dataset(tmp_path / "a", num_classes=3, train_per_class=5, val_per_class=2, seed=7)
    make_dataset(tmp_path / "b", num_classes=3, train_per_class=5, val_per_class=2, seed=7)
    make_dataset(tmp_path / "c", num_classes=3, train_per_class=5, val_per_class=2, seed=8)
    assert a["files"] == 21
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_images_vary_like_imagenet(small_data):
    sizes = [Image.open(p).size for p in (small_data / "train").rglob("*.JPEG")]
    sides = np.array(sizes)
    assert sides.min() >= 160 and sides.max() <= 500
    assert sides.std() > 50  # sizes spread over the range, not one size
    assert len(set(sizes)) > len(sizes) // 2
    with Image.open(next((small_data / "val").rglob("*.JPEG"))) as img:
        assert img.format == "JPEG" and img.mode == "RGB"


def test_scan_split_labels_follow_sorted_class_folders(small_data):
    index = scan_split(small_data, "train")
    assert index.classes == ("n90000000", "n90000001", "n90000002", "n90000003")
    assert len(index) == 4 * 48
    for path, label in zip(index.paths, index.labels):
        assert path.startswith(index.classes[label] + "/")


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_global_shards_are_disjoint_equal_and_change_per_epoch(world):
    n, b = 1003, 10
    samplers = [GlobalShardSampler(n, r, world, b, seed=5) for r in range(world)]
    for epoch in (0, 1):
        shards = [s.shard(epoch) for s in samplers]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == n // world
        union = set().union(*map(set, shards))
        assert len(union) == sum(map(len, shards))  # disjoint
        assert union <= set(range(n))
        for s in samplers:
            s.set_epoch(epoch)
        batches = [list(s) for s in samplers]
        assert {len(bs) for bs in batches} == {(n // world) // b}  # every rank takes the same steps
        assert all(len(batch) == b and all(e == epoch for _, e in batch) for bs in batches for batch in bs)
    assert samplers[0].shard(0) != samplers[0].shard(1)


def _item(copies_value, label, m=3):
    copies = torch.stack([torch.full((3, 4, 4), copies_value * 10 + k, dtype=torch.uint8) for k in range(m)])
    return copies, label, 100, copies_value


def test_copy_major_and_sample_major_layouts():
    items = [_item(b, label=b + 1) for b in range(4)]  # image b, copy k has value 10b + k
    cm = BACollate("copy-major")(items)
    sm = BACollate("sample-major")(items)
    assert cm["images"].shape == sm["images"].shape == (12, 3, 4, 4)
    # copy-major: sample k*B + b is copy k of image b
    assert [int(x[0, 0, 0]) for x in cm["images"]] == [10 * b + k for k in range(3) for b in range(4)]
    assert cm["labels"].tolist() == [b + 1 for _ in range(3) for b in range(4)]
    # sample-major: the copies of one image are adjacent
    assert [int(x[0, 0, 0]) for x in sm["images"]] == [10 * b + k for b in range(4) for k in range(3)]
    assert sm["labels"].tolist() == [b + 1 for b in range(4) for _ in range(3)]
    assert cm["bytes"] == 400 and cm["indices"].tolist() == [0, 1, 2, 3]


def _first_batches(data, overrides, steps=2):
    cfg = load_config("demo", [f"data.path={data}", *overrides])
    loader = make_train_loader(scan_split(data, "train"), cfg, rank=0, world=1)
    loader.batch_sampler.set_epoch(1)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == steps:
            break
    return out


def test_m_copies_are_distinct_augmentations_of_one_decode(small_data, monkeypatch):
    opened = []
    real_decode = pipeline.decode
    monkeypatch.setattr(pipeline, "decode", lambda path, draft: opened.append(path) or real_decode(path, draft))
    (batch,) = _first_batches(small_data, ["data.copies=4", "data.unique_batch=8", "data.workers=0"], steps=1)
    assert len(opened) == 8  # each image of the step decoded exactly once
    assert batch["images"].shape == (32, 3, 64, 64) and batch["images"].dtype == torch.uint8
    copies = batch["images"].view(4, 8, 3, 64, 64)  # copy-major
    for b in range(8):
        assert len({copies[k, b].float().sum().item() for k in range(4)}) == 4  # 4 different crops


def test_augmentation_is_independent_of_worker_count(small_data):
    a = _first_batches(small_data, ["data.workers=0", "data.unique_batch=8"])
    b = _first_batches(small_data, ["data.workers=2", "data.unique_batch=8"])
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"])


def test_bytes_read_do_not_grow_with_copies(small_data):
    m1 = _first_batches(small_data, ["data.copies=1", "data.unique_batch=8", "data.workers=0", "model.ghost_size=null"])
    m8 = _first_batches(small_data, ["data.copies=8", "data.unique_batch=8", "data.workers=0"])
    assert [b["bytes"] for b in m1] == [b["bytes"] for b in m8]
    assert m1[0]["bytes"] > 8 * 1000
    assert m8[0]["images"].shape[0] == 8 * m1[0]["images"].shape[0]
