"""data.copies_on: rank (BA: the M copies of an image on the rank that read it, one read and one
decode) against ranks (repeated augmentation: each copy on another rank, which reads and
decodes the image itself). The same samples, other places, M times the reads."""
from collections import Counter

import pytest

from hvd_ba.config import ConfigError, load_config
from hvd_ba.data.manifest import load_index
from hvd_ba.data.pipeline import make_train_loader
from helpers import short_run


def step_batches(data, copies_on, copies, world=2, steps=2):
    """The first `steps` batches of every rank, built in this process (ranks simulated)."""
    cfg = load_config("demo", [f"data.path={data}", "data.manifest_dir=null", "data.workers=0", f"data.copies={copies}",
                               "data.unique_batch=8", f"model.ghost_size={8 * copies}", f"data.copies_on={copies_on}"])
    index = load_index(data, "train", None)
    return [[b for _, b in zip(range(steps), make_train_loader(index, cfg, rank, world))] for rank in range(world)]


def samples_of(batches):
    """(file, copy) -> image bytes, over all ranks' batches of one step."""
    out = {}
    for batch in batches:
        for (f, c), image in zip(batch["samples"].tolist(), batch["images"]):
            assert (f, c) not in out, (f, c)  # every (file, copy) made once in the whole job
            out[f, c] = image.numpy().tobytes()
    return out


@pytest.mark.unit
@pytest.mark.parametrize("copies", [2, 4])
def test_both_placements_make_the_very_same_samples(copies, small_data):
    ba, ra = step_batches(small_data, "rank", copies), step_batches(small_data, "ranks", copies)
    for step in range(2):
        here, there = samples_of([r[step] for r in ba]), samples_of([r[step] for r in ra])
        assert set(here) == set(there) and len(here) == 2 * 8 * copies  # W x B images x M copies
        assert all(here[k] == there[k] for k in here)  # bit for bit: same draws, same decode scale
        for rank in range(2):
            ba_files = Counter(f for f, _ in ba[rank][step]["samples"].tolist())
            ra_files = Counter(f for f, _ in ra[rank][step]["samples"].tolist())
            assert set(ba_files.values()) == {copies} and len(ba_files) == 8  # BA: B images, M copies each
            # RA: the M copies of an image on M different ranks where M <= W; beyond, M / W on each
            assert set(ra_files.values()) == {max(1, copies // 2)} and len(ra_files) == 8 * copies // max(1, copies // 2)
            assert ra[rank][step]["unique"] == ba[rank][step]["unique"] == 8  # the rank's share of 16 unique
            assert ra[rank][step]["files"] == 8 * copies and ba[rank][step]["files"] == 8  # one read per copy
        # the labels follow the samples
        for batches in (ba, ra):
            for b in (r[step] for r in batches):
                assert len(b["labels"]) == len(b["samples"]) == 8 * copies


@pytest.mark.unit
def test_a_broken_file_is_replaced_alike_under_both_placements(small_data, tmp_path):
    """The replacement of an unreadable file is BA's (the next file of its BA owner's shard), so
    the two placements still make the same samples; the broken file is counted once."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    index = load_index(data, "train", None)
    victim = step_batches(data, "rank", 2)[1][0]["samples"][3, 0].item()  # a file of rank 1's first step
    (data / "train" / index.paths[victim]).write_bytes(b"not a JPEG")
    ba, ra = step_batches(data, "rank", 2), step_batches(data, "ranks", 2)
    def made(batches):  # (file, copy, pixels), with repeats: the replacement may be in the step already
        return Counter((f, c, image.numpy().tobytes()) for b in batches
                       for (f, c), image in zip(b["samples"].tolist(), b["images"]))

    here, there = made([r[0] for r in ba]), made([r[0] for r in ra])
    assert victim not in {f for f, _, _ in here} and here == there and sum(here.values()) == 2 * 8 * 2
    assert sum(len(r[0]["bad"]) for r in ra) == sum(len(r[0]["bad"]) for r in ba) == 1


@pytest.mark.unit
def test_copies_on_ranks_is_refused_with_static_shards_or_device_crops():
    with pytest.raises(ConfigError, match=r"data.copies_on.*static shards.*data.shard=global"):
        load_config("demo", ["data.copies_on=ranks", "data.shard=static"])
    with pytest.raises(ConfigError, match=r"data.copies_on.*augment.where=device"):
        load_config("demo", ["data.copies_on=ranks", "augment.where=device"])
    with pytest.raises(ConfigError, match=r"data.copies_on.*must be one of"):
        load_config("demo", ["data.copies_on=nodes"])


@pytest.mark.integration
def test_reads_grow_m_fold_under_repeated_augmentation_and_not_under_ba(small_data, tmp_path):
    """horovodrun -np 2, 6 steps of 8 unique images per rank: BA reads 48 files per rank at any
    M; RA at M = 4 reads each copy's file: 4 x 48, the same samples seen."""
    ba, _ = short_run(small_data, tmp_path / "ba", "data.copies=4", "model.ghost_size=32")
    ra, _ = short_run(small_data, tmp_path / "ra", "data.copies=4", "model.ghost_size=32", "data.copies_on=ranks")
    assert ba[0]["files_read_per_rank"] == [48, 48]
    assert ra[0]["files_read_per_rank"] == [4 * 48, 4 * 48]
    assert 3.9 < sum(ra[0]["bytes_read_per_rank"]) / sum(ba[0]["bytes_read_per_rank"]) < 4.1
    assert ra[0]["samples"] == ba[0]["samples"] == 2 * 6 * 8 * 4
    assert ra[0]["unique_images"] == ba[0]["unique_images"] == 2 * 6 * 8
    assert 0 < ra[0]["train_loss"] < 10 and 0 <= ra[0]["val_top1"] <= 100
