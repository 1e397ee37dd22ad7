"""The synthetic data set and the BA pipeline: shards, decode once, M copies, layouts, determinism."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from hvd_ba.config import ConfigError, load_config
from hvd_ba.data import augment, copies
from hvd_ba.data.manifest import load_index
from hvd_ba.data.copies import BACollate
from hvd_ba.data.pipeline import ShardSampler, _loader, make_train_loader, start_worker_server, worker_start_method
from hvd_ba.data.shards import shard_parts
from hvd_ba.data.synthetic import make_dataset


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.JPEG")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.unit
def test_make_dataset_is_deterministic_by_seed(tmp_path):
    a = make_dataset(tmp_path / "a", num_classes=3, train_per_class=5, val_per_class=2, seed=7)
    make_dataset(tmp_path / "b", num_classes=3, train_per_class=5, val_per_class=2, seed=7)
    make_dataset(tmp_path / "c", num_classes=3, train_per_class=5, val_per_class=2, seed=8)
    assert a["files"] == 21
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


@pytest.mark.unit
def test_images_vary_like_imagenet(small_data):
    sizes = [Image.open(p).size for p in (small_data / "train").rglob("*.JPEG")]
    sides = np.array(sizes)
    assert sides.min() >= 160 and sides.max() <= 500
    assert sides.std() > 50  # sizes spread over the range, not one size
    assert len(set(sizes)) > len(sizes) // 2
    with Image.open(next((small_data / "val").rglob("*.JPEG"))) as img:
        assert img.format == "JPEG" and img.mode == "RGB"


@pytest.mark.unit
def test_index_labels_follow_sorted_class_folders(small_data):
    index = load_index(small_data, "train", cache_dir=None)
    assert index.classes == ("n90000000", "n90000001", "n90000002", "n90000003")
    assert len(index) == 4 * 48
    for path, label, size in zip(index.paths, index.labels, index.sizes):
        assert path.startswith(index.classes[label] + "/")
        assert size == (small_data / "train" / path).stat().st_size


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["global", "static"])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_disjoint_and_equal(mode, world):
    n, b = 1003, 10
    samplers = [ShardSampler(n, r, world, b, seed=5, mode=mode) for r in range(world)]
    for epoch in (0, 1):
        shards = [s.shard(epoch) for s in samplers]
        assert {len(s) for s in shards} == {n // world}
        union = set().union(*map(set, shards))
        assert len(union) == sum(map(len, shards)) == world * (n // world)  # disjoint, no repeats
        assert union <= set(range(n))
        for s in samplers:
            s.set_epoch(epoch)
        batches = [list(s) for s in samplers]
        assert {len(bs) for bs in batches} == {(n // world) // b}  # every rank takes the same steps
        assert all(len(batch) == b and all(e == epoch for _, e, _ in batch) for bs in batches for batch in bs)
    first, second = samplers[0].shard(0), samplers[0].shard(1)
    assert first != second  # a new order every epoch
    if mode == "static":  # ... over the same files: each rank owns its part for the whole run
        assert all(set(s.shard(0)) == set(s.shard(5)) for s in samplers)
    elif world > 1:
        assert set(first) != set(second)


@pytest.mark.unit
def test_static_parts_of_a_packed_folder_are_whole_shards_balanced_by_samples():
    rng = np.random.default_rng(0)
    counts = [40, 31, 30, 12, 12, 9, 8, 3]  # samples per packed shard, 145 in all
    shard_of = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    parts = shard_parts(shard_of, len(counts), 3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(shard_of)))  # every sample, once
    owned = [set(shard_of[p].tolist()) for p in parts]
    for r, part in enumerate(parts):
        assert sorted(part.tolist()) == part.tolist()
        assert np.isin(shard_of, list(owned[r])).sum() == len(part)  # whole shards: all their samples
    # largest first to the rank holding the fewest: 40 + 9, 31 + 12 + 3, 30 + 12 + 8
    assert [sorted(o) for o in owned] == [[0, 5], [1, 4, 7], [2, 3, 6]] and [len(p) for p in parts] == [49, 46, 50]
    assert shard_parts(shard_of, len(counts), 3)[1].tolist() == parts[1].tolist()  # the same on every rank

    b = 8
    samplers = [ShardSampler(len(shard_of), r, 3, b, seed=5, mode="static", parts=parts) for r in range(3)]
    assert {s.per_rank for s in samplers} == {46} and {len(s) for s in samplers} == {5}  # same steps on every rank
    for s in samplers:
        e0, e1 = s.shard(0), s.shard(1)
        assert len(e0) == len(e1) == 46 and set(e0) | set(e1) <= set(s.owned())
        assert e0 != e1 and [i for batch in s for i, _, _ in batch] == e0[:40]
    assert set(samplers[2].shard(0)) != set(samplers[2].shard(1))  # not always the same 4 of its 50 left out
    with pytest.raises(ConfigError, match=r"data.shard': static shards over a packed folder.*its 8 training "
                                          r"shards cannot feed 9 ranks.*--shard-size"):
        shard_parts(shard_of, len(counts), 9)


@pytest.mark.unit
def test_replacements_come_from_the_same_shard():
    s = ShardSampler(100, 1, 2, 10, seed=3)
    mine = set(s.shard(0))
    for batch in s:
        for i, _, replacements in batch:
            assert set(replacements) <= mine and i not in replacements


def _item(value, label, m=3):
    copies = [np.full((4, 4, 3), value * 10 + k, np.uint8) for k in range(m)]
    return {"copies": copies, "lighting": np.full((m, 3), value, np.float32), "label": label, "index": value,
            "files": 1, "bytes": 100, "bad": []}


@pytest.mark.unit
def test_copy_major_and_sample_major_layouts():
    items = [_item(b, label=b + 1) for b in range(4)]  # image b, copy k has value 10b + k
    cm = BACollate("copy-major")(items)
    sm = BACollate("sample-major")(items)
    assert cm["images"].shape == sm["images"].shape == (12, 4, 4, 3)
    # copy-major: sample k*B + b is copy k of image b
    assert [int(x[0, 0, 0]) for x in cm["images"]] == [10 * b + k for k in range(3) for b in range(4)]
    assert cm["labels"].tolist() == [b + 1 for _ in range(3) for b in range(4)]
    assert cm["lighting"][:, 0].tolist() == [b for _ in range(3) for b in range(4)]
    # sample-major: the copies of one image are adjacent
    assert [int(x[0, 0, 0]) for x in sm["images"]] == [10 * b + k for b in range(4) for k in range(3)]
    assert sm["labels"].tolist() == [b + 1 for b in range(4) for _ in range(3)]
    assert cm["bytes"] == 400 and cm["files"] == 4 and cm["indices"].tolist() == [0, 1, 2, 3]


def first_batches(data, preset="demo", overrides=(), steps=2, epoch=1):
    cfg = load_config(preset, [f"data.path={data}", "data.manifest_dir=null", *overrides])
    loader = make_train_loader(load_index(data, "train", None), cfg, rank=0, world=1)
    loader.batch_sampler.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == steps:
            break
    return out


def count_reads(monkeypatch) -> list:
    opened = []
    real = copies.read_file
    monkeypatch.setattr(copies, "read_file", lambda path: opened.append(path) or real(path))
    return opened


@pytest.mark.unit
@pytest.mark.parametrize("preset", ["resnet50", "mobilenet", "alexnet", "demo"])
def test_every_preset_honours_m(preset, small_data, monkeypatch):
    """One decode per image, M distinct copies, for every preset (a peer ignores M for some)."""
    opened = count_reads(monkeypatch)
    overrides = ["data.copies=3", "data.unique_batch=4", "data.workers=0", "model.ghost_size=null"]
    (batch,) = first_batches(small_data, preset, overrides, steps=1)
    cfg = load_config(preset)
    side = cfg.augment.size
    assert len(opened) == 4  # each image of the step read once
    assert batch["images"].shape == (12, side, side, 3) and batch["images"].dtype == torch.uint8
    copies = batch["images"].view(3, 4, side, side, 3)  # copy-major
    for b in range(4):
        assert len({copies[k, b].float().sum().item() for k in range(3)}) == 3  # 3 different augmentations
    lighting = batch["lighting"]
    if cfg.augment.lighting_std > 0:
        assert lighting.abs().sum() > 0 and len({tuple(row.tolist()) for row in lighting}) == 12
    else:
        assert lighting.abs().sum() == 0


@pytest.mark.unit
def test_augmentation_is_independent_of_worker_count(small_data):
    a = first_batches(small_data, overrides=["data.workers=0", "data.unique_batch=8"])
    b = first_batches(small_data, overrides=["data.workers=2", "data.unique_batch=8"])
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"])
    c = first_batches(small_data, overrides=["data.workers=0", "data.unique_batch=8"], epoch=2)
    assert not torch.equal(a[0]["images"], c[0]["images"])


@pytest.mark.unit
def test_bytes_read_do_not_grow_with_copies(small_data, monkeypatch):
    opened = count_reads(monkeypatch)
    m1 = first_batches(small_data, overrides=["data.copies=1", "data.unique_batch=8", "data.workers=0", "model.ghost_size=null"])
    reads_m1 = list(opened)
    m8 = first_batches(small_data, overrides=["data.copies=8", "data.unique_batch=8", "data.workers=0"])
    assert opened[len(reads_m1):] == reads_m1 and len(reads_m1) == 16
    assert [b["bytes"] for b in m1] == [b["bytes"] for b in m8]
    assert [b["files"] for b in m1] == [b["files"] for b in m8] == [8, 8]
    assert m1[0]["bytes"] > 8 * 1000
    assert m8[0]["images"].shape[0] == 8 * m1[0]["images"].shape[0]


@pytest.mark.unit
def test_draft_decoding_matches_a_full_decode(small_data):
    """The fast path (crop boxes before decode, DCT-scaled decode, one resize) gives the same
    pixels, up to resampling noise, as torchvision's full decode + resized_crop + flip."""
    import torchvision.transforms.functional as TF

    from hvd_ba.data.augment import TrainPreset, draft_scale, image_rng

    from hvd_ba.data.copies import make_copies

    preset = TrainPreset(size=64, scale=(0.25, 1.0))
    diffs, drafted = [], 0
    for i, path in enumerate(sorted((small_data / "train").rglob("*.JPEG"))[:12]):
        copies, _ = make_copies(Image.open(path), preset, 4, image_rng(0, 0, i))
        full = Image.open(path).convert("RGB")
        rng = image_rng(0, 0, i)
        draws = [preset.draw(*full.size, rng) for _ in range(4)]
        for ((l, t, r, b), flip, _), copy in zip(draws, copies):
            ref = TF.resized_crop(full, round(t), round(l), round(b - t), round(r - l), [64, 64], antialias=True)
            ref = np.asarray(TF.hflip(ref) if flip else ref).astype(float)
            diffs.append(np.abs(ref - copy).mean())
        drafted += draft_scale(full.size, [d[0] for d in draws], (64, 64)) > 1
    assert np.mean(diffs) < 6.0 and max(diffs) < 20.0, diffs
    assert drafted >= 6  # most of these were decoded at a reduced DCT scale


@pytest.mark.unit
def test_crop_statistics_match_torchvision():
    """Our numpy re-implementation of RandomResizedCrop.get_params draws the same distribution."""
    import torchvision.transforms as T

    from hvd_ba.data.augment import random_resized_crop_params

    rng, n = np.random.default_rng(0), 4000
    torch.manual_seed(0)
    for width, height in ((500, 375), (160, 480)):
        ours = np.array([random_resized_crop_params(rng, width, height, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
        ref = np.array([T.RandomResizedCrop.get_params(torch.empty(1, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)])
        for stats in (lambda p: p[:, 2] * p[:, 3] / (width * height),  # area fraction
                      lambda p: np.log(p[:, 3] / p[:, 2]),  # log aspect
                      lambda p: (p[:, 1] + p[:, 3] / 2) / width,  # centre x
                      lambda p: (p[:, 0] + p[:, 2] / 2) / height):  # centre y
            a, b = stats(ours), stats(ref)
            assert abs(a.mean() - b.mean()) < 4 * np.sqrt(a.var() / n + b.var() / n) + 1e-9
            assert abs(a.std() - b.std()) < 0.05 * b.std() + 1e-9
            # the whole distribution, not only two moments: quantiles agree
            assert np.abs(np.quantile(a, [0.1, 0.5, 0.9]) - np.quantile(b, [0.1, 0.5, 0.9])).max() < 0.1 * (b.std() + 1e-9) + 0.02


@pytest.mark.unit
def test_broken_files_are_replaced_from_the_shard(small_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    cls = data / "train" / "n90000001"
    (cls / "zero.JPEG").write_bytes(b"")
    (cls / "text.JPEG").write_text("not an image")
    good = next(cls.glob("*_00000.JPEG")).read_bytes()
    (cls / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    # 195 files in 3 steps of 65: the whole set is read in epoch 0
    overrides = ["data.unique_batch=65", "data.workers=0", "data.copies=1", "model.ghost_size=null"]
    batches = first_batches(data, overrides=overrides, steps=3, epoch=0)
    bad = [p for b in batches for p in b["bad"]]
    names = sorted(p.split(" (")[0].rsplit("/", 1)[1] for p in bad)
    assert names == ["text.JPEG", "truncated.JPEG", "zero.JPEG"]
    assert all(b["images"].shape[0] == 65 for b in batches)  # the batch stays full
    assert sum(b["files"] for b in batches) == 195 + 3  # the failed tries are counted as reads
    again = first_batches(data, overrides=overrides, steps=3, epoch=0)
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(batches, again))  # deterministic


@pytest.mark.unit
def test_empty_class_folder_and_empty_dataset_are_errors(tmp_path):
    (tmp_path / "a" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="class folder '.*/a/train/cls' has no images"):
        load_index(tmp_path / "a", "train", None)
    (tmp_path / "b" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="data directory '.*/b/train' has no class folders"):
        load_index(tmp_path / "b", "train", None)


@pytest.mark.unit
def test_loader_workers_survive_the_preemption_signals(small_data):
    """srun delivers SIGUSR1/SIGTERM to every process of a task, loader workers included: they
    must leave the stop to the rank (found on the local Slurm: a killed worker failed the rank)."""
    import os
    import signal
    import time

    cfg = load_config("demo", [f"data.path={small_data}", "data.workers=2", "data.unique_batch=8"])
    loader = make_train_loader(load_index(small_data, "train", None), cfg, rank=0, world=1)
    batches = iter(loader)
    workers = [w.pid for w in batches._workers]
    assert len(workers) == 2
    # at once, while the workers start (before their worker_init could run; a loaded node makes
    # that window seconds long), and again once they deliver
    for when in ("starting", "running"):
        for pid in workers:
            os.kill(pid, signal.SIGUSR1)
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(w.is_alive() for w in batches._workers), (when, [w.exitcode for w in batches._workers])
        assert next(batches)["images"].shape[0] == 8 * cfg.data.copies, when


@pytest.mark.integration
def test_a_rank_that_leaves_an_epoch_unfinished_still_exits(small_data):
    """Workers ignore SIGTERM, which is all PyTorch's and multiprocessing's exit paths send to a
    worker that does not stop by itself (one with batches still queued after a `break`, a stop or
    an exception): the rank must still exit promptly, with its own exit status."""
    import subprocess
    import sys
    import time

    from helpers import ROOT

    script = (
        "import sys\n"
        "from hvd_ba.config import load_config\n"
        "from hvd_ba.data.manifest import load_index\n"
        "from hvd_ba.data.pipeline import make_train_loader\n"
        f"cfg = load_config('demo', ['data.path={small_data}', 'data.workers=2', 'data.unique_batch=8'])\n"
        f"loader = make_train_loader(load_index('{small_data}', 'train', None), cfg, rank=0, world=1)\n"
        "for batch in loader:\n"
        "    break\n"
        "if sys.argv[1] == 'raise':\n"
        "    raise KeyError('left mid-epoch')\n"
        "print('left mid-epoch')\n"
    )
    for mode, code in (("break", 0), ("raise", 1)):
        start = time.monotonic()
        r = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120,
                           cwd=ROOT)
        assert r.returncode == code, r.stderr[-2000:]
        assert time.monotonic() - start < 60
        assert "killed by signal" not in r.stderr  # no spurious worker-failure report on the way out


@pytest.mark.unit
def test_alexnet_crops_match_torchvisions_transforms(small_data):
    """The alexnet preset's copies are torchvision's Resize(256) -> CenterCrop(256) -> a random
    224 crop -> flip of the one decoded image: the aspect ratio is kept (not 256 x 256)."""
    import torchvision.transforms.functional as TF

    from hvd_ba.data.pipeline import train_preset
    from hvd_ba.data.augment import image_rng
    from hvd_ba.data.copies import make_copies

    preset = train_preset(load_config("alexnet"))
    assert (preset.kind, preset.resize, preset.size, preset.lighting_std) == ("short-side-random-crop", 256, 224, 0.1)
    diffs, shapes = [], set()
    for i, path in enumerate(sorted((small_data / "train").rglob("*.JPEG"))[::16][:12]):
        copies, lighting = make_copies(Image.open(path), preset, 3, image_rng(0, 0, i))
        full = Image.open(path).convert("RGB")
        shapes.add(full.size[0] > full.size[1])
        patch = TF.center_crop(TF.resize(full, 256), 256)
        rng = image_rng(0, 0, i)  # the draws of each copy, in make_copies' order
        for k, copy in enumerate(copies):
            top, left = (int(v) for v in rng.integers(0, 256 - 224 + 1, 2))
            flip = rng.random() < 0.5
            alpha = rng.normal(0.0, 0.1, 3)
            ref = TF.crop(patch, top, left, 224, 224)
            ref = np.asarray(TF.hflip(ref) if flip else ref).astype(float)
            assert copy.shape == (224, 224, 3)
            diffs.append(np.abs(ref - copy).mean())
            assert np.allclose(lighting[k], np.array(augment.IMAGENET_EIGVEC) @ (alpha * np.array(
                augment.IMAGENET_EIGVAL)), atol=1e-6)
    assert shapes == {True, False}  # landscape and portrait images both tried
    assert max(diffs) < 1.0, diffs  # the same pixels up to rounding in the resampler


@pytest.mark.integration
def test_loader_workers_never_fork_from_a_rank_whose_threads_hold_locks():
    """A worker forked while another thread holds a lock inherits the lock held and waits on it
    forever (a CI run: an evaluation worker forked mid-run never delivered). `auto` starts the
    workers from a fork server started before those threads: the same dataset gets its lock."""
    import threading
    import types

    import held_lock

    assert worker_start_method("auto") == "forkserver" and worker_start_method("fork") == "fork"
    start_worker_server("auto")  # as run_training does, before Horovod's threads
    taken, done = threading.Event(), threading.Event()

    def holder():
        with held_lock.LOCK:
            taken.set()
            done.wait(60)

    threading.Thread(target=holder, daemon=True).start()
    taken.wait(10)
    try:
        got = {}
        for method in ("fork", "auto"):
            d = types.SimpleNamespace(workers=1, worker_start=method, prefetch=1)
            loader = _loader(held_lock.NeedsLock(), [[0]], held_lock.first, d)
            got[method] = next(iter(loader))
            del loader
    finally:
        done.set()
    assert got == {"fork": False, "auto": True}


@pytest.mark.unit
def test_a_static_run_resumes_only_over_the_same_parts(small_data, tmp_path):
    """A folder and its pack hold the same samples (one digest), but static shards cut them
    differently (a seeded cut, or whole shards), and two packs with other shard sizes differently
    again: a checkpoint's plan tells them apart; global shards read the same files from either."""
    from hvd_ba.__main__ import main
    from hvd_ba.data.shards import load_packed, static_parts_id
    from hvd_ba.train.resume import plan_differences, run_plan

    for size in ("256K", "128K"):
        assert main(["pack", str(small_data), str(tmp_path / size), "--shard-size", size]) == 0
    folder = load_index(small_data, "train", None)
    packs = [load_packed(tmp_path / size, "train") for size in ("256K", "128K")]
    assert {folder.digest} == {p.digest for p in packs}
    static, glob = (load_config("demo", [f"data.shard={mode}"]) for mode in ("static", "global"))

    def plan(cfg, index):
        return run_plan(cfg, 2, 6, len(index), index.digest, 0.1, static_parts_id(index))

    assert plan_differences(plan(static, folder), plan(static, folder)) == ([], False)
    for a, b in ((folder, packs[0]), (packs[0], packs[1])):
        refused, _ = plan_differences(plan(static, a), plan(static, b))
        assert len(refused) == 1 and refused[0].startswith("static parts (a folder's seeded cut, or a pack's whole "
                                                           f"shards) {static_parts_id(a)} -> {static_parts_id(b)}")
        assert plan_differences(plan(glob, a), plan(glob, b)) == ([], False)
    assert static_parts_id(folder) == "seeded cut" and static_parts_id(packs[0]).startswith("14 packed shards ")
