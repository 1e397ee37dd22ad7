"""Packed folders (python -m hvd_ba pack): tar shards with a flat index, read back by tar and
WebDataset, the same samples as the folder they were packed from, a killed or full-disk pack
continued, a stale pack said, and training from shards under horovodrun and torchrun."""
import errno
import json
import os
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (ONE_EPOCH, RUN, SAME_RUN, assert_same_epochs, assert_same_run, cli, launch, read_jsonl, run_cli,
                     torchrun, train_alone)
from hvd_ba.config import load_config
from hvd_ba.data.copies import SampleReader
from hvd_ba.data.manifest import load_index
from hvd_ba.data.pipeline import make_eval_loader, make_train_loader
from hvd_ba.data.shards import load_packed, load_split

SMALL_SHARD = "256K"  # small_data's 240 JPEGs (about 20 KB each) in 19 shards


@pytest.fixture(scope="module")
def packed(small_data, tmp_path_factory) -> Path:
    """small_data packed in-process (shards of about 40 KB)."""
    dst = tmp_path_factory.mktemp("packed") / "small"
    r = cli("pack", small_data, dst, "--shard-size", SMALL_SHARD)
    assert r.returncode == 0, r.stdout + r.stderr
    return dst


def members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return [m.name for m in tar.getmembers()]


@pytest.mark.unit
def test_pack_writes_tar_shards_holding_every_image_once_in_a_mixed_order(small_data, packed):
    for split, per_class in (("train", 48), ("val", 12)):
        index = load_packed(packed, split)
        source = load_index(small_data, split, None)
        assert len(index.shards) >= 2 and all((packed / s).is_file() for s in index.shards)
        names = [n for s in index.shards for n in members(packed / s)]
        assert sorted(names) == sorted(source.paths) and len(names) == 4 * per_class  # every image once
        assert index.digest == source.digest and list(index.paths) == list(source.paths)  # the folder's order
        first = members(packed / index.shards[0])
        assert len({n.split("/")[0] for n in first}) >= 3, first  # a shard mixes the classes
        assert names != sorted(names)
        reader = SampleReader(index)
        for i in range(0, len(index), 7):  # one pread at its offset gives the file's bytes
            assert reader.read(i) == (small_data / split / index.paths[i]).read_bytes()
    r = cli("pack", "--verify", packed)
    assert r.returncode == 0 and "every shard and member as indexed (train: 192 samples" in r.stdout, r.stdout + r.stderr


@pytest.mark.unit
def test_verify_finds_a_damaged_shard(packed, tmp_path):
    copy = shutil.copytree(packed, tmp_path / "copy")
    index = load_packed(copy, "train")
    victim = copy / index.shards[1]
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF  # inside the first member's data
    victim.write_bytes(bytes(data))
    r = cli("pack", "--verify", copy)
    assert r.returncode == 1 and f"shard '{victim}' does not hash as its index records" in r.stderr, r.stderr
    offset = int(index.rows["offset"][index.rows["shard"] == 1].min())
    data[offset - 512:offset - 412] = b"x" * 100  # the member's name in its tar header
    victim.write_bytes(bytes(data))
    r = cli("pack", "--verify", copy)
    assert r.returncode == 1 and "no tar header before its data" in r.stderr, r.stderr


def two_loaders(data, rank, world, extra=()):
    cfg = load_config("demo", ["data.workers=0", "data.copies=2", "data.unique_batch=8", "model.ghost_size=16", f"data.path={data}",
                               "augment.size=32", *extra])
    train, val = load_split(cfg, "train", False), load_split(cfg, "val", False)
    return make_train_loader(train, cfg, rank, world), make_eval_loader(val, cfg, rank, world)


@pytest.mark.unit
@pytest.mark.parametrize("extra", [(), ("augment.where=device",), ("data.copies_on=ranks",)])
def test_shards_give_the_same_samples_as_the_folder(small_data, packed, extra):
    """Same seed: each rank reads the same files with the same crops at every step (2 ranks)."""
    for rank in range(2):
        folder, shards = two_loaders(small_data, rank, 2, extra), two_loaders(packed, rank, 2, extra)
        for a_loader, b_loader in zip(folder, shards):
            batches = 0
            for a, b in zip(a_loader, b_loader):
                assert a.keys() == b.keys()
                for key in a:
                    if isinstance(a[key], torch.Tensor):
                        assert torch.equal(a[key], b[key]), key
                    elif key != "bad":
                        assert a[key] == b[key], key
                batches += 1
            assert batches == len(a_loader) > 0


@pytest.mark.unit
def test_a_broken_member_is_counted_and_replaced_as_in_a_folder(small_data, tmp_path):
    src = shutil.copytree(small_data, tmp_path / "src")
    victim = src / "train" / "n90000001" / "n90000001_00003.JPEG"
    victim.write_bytes(b"not a JPEG, but packed as it is" * 10)
    r = cli("pack", src, tmp_path / "packed", "--shard-size", SMALL_SHARD, "--check-images")
    assert r.returncode == 0 and f"does not decode (packed as it is): {victim} (" in r.stdout, r.stdout + r.stderr
    (folder_train, _), (shard_train, _) = two_loaders(src, 0, 1), two_loaders(tmp_path / "packed", 0, 1)
    bad = {"folder": [], "shards": []}
    for a, b in zip(folder_train, shard_train):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["indices"], b["indices"])
        bad["folder"] += a["bad"]
        bad["shards"] += b["bad"]
    assert len(bad["folder"]) == len(bad["shards"]) == 1
    assert bad["shards"][0].startswith(f"{tmp_path / 'packed'}/train-") and ":n90000001/n90000001_00003.JPEG (" in \
        bad["shards"][0], bad


@pytest.mark.unit
def test_a_source_that_is_not_an_imagenet_layout_is_refused_in_one_line(small_data, tmp_path):
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    shutil.copy(next((small_data / "train").rglob("*.JPEG")), flat / "a.JPEG")
    for src, why in ((tmp_path / "flat", "has no class folders"), (small_data / "train", "it has no train/ folder")):
        r = cli("pack", src, tmp_path / "out")
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert f"'{src}' is not an ImageNet layout" in r.stderr and why in r.stderr, r.stderr
    assert not (tmp_path / "out" / "train.json").exists()


@pytest.mark.unit
def test_a_pack_refuses_a_folder_holding_another_pack(small_data, packed, tmp_path):
    dst = shutil.copytree(packed, tmp_path / "copy")
    r = cli("pack", small_data, dst, "--shard-size", "30K")
    assert r.returncode == 1 and "holds a pack of another source, seed or shard size" in r.stderr, r.stderr
    import pickle

    sent = pickle.dumps(load_packed(dst, "train"))  # as a running job's rank hands it to a new loader worker
    header = (dst / "train.json").read_bytes()
    r = cli("pack", small_data, dst, "--shard-size", SMALL_SHARD)  # the same pack: all done, nothing written
    assert r.returncode == 0 and "0 to write" in r.stdout, r.stdout + r.stderr
    assert (dst / "train.json").read_bytes() == header  # the index is not written again
    assert len(pickle.loads(sent)) == 192  # its arrays are still there


@pytest.mark.unit
def test_plan_counts_a_packed_folders_images(packed):
    r = cli("plan", "--ranks", "2", "--set", f"data.path={packed}")
    assert r.returncode == 0 and "192 training images" in r.stdout, r.stdout + r.stderr


@pytest.mark.unit
def test_names_a_tar_cannot_hold_are_refused_before_anything_is_written(small_data, tmp_path):
    for name, says in (("n90000001/" + "x" * 120 + ".JPEG", "a name of 135 bytes that a ustar tar header cannot hold"),
                       (os.fsdecode(b"n90000001/caf\xe9.JPEG"), "a file name that is not UTF-8")):
        src = shutil.copytree(small_data, tmp_path / "src", dirs_exist_ok=True)
        victim = src / "train" / name
        shutil.copy(src / "train" / "n90000001" / "n90000001_00000.JPEG", victim)
        r = cli("pack", src, tmp_path / "out")
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and says in r.stderr, r.stderr
        assert f"'{victim}'" in r.stderr and not (tmp_path / "out").exists(), r.stderr
        if "UTF-8" in says:  # training from the folder reads it all the same
            index = load_index(src, "train", None)
            i = list(index.paths).index(name)
            assert SampleReader(index).read(i) == victim.read_bytes()
            assert len(index.digest) == 64
        victim.unlink()


@pytest.mark.unit
def test_a_source_without_validation_images_is_refused(small_data, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_data / "train", src / "train")
    r = cli("pack", src, tmp_path / "out")
    assert r.returncode == 1 and "training needs a validation split too: SRC has no val/" in r.stderr, r.stderr


@pytest.mark.unit
def test_rank_0_stops_in_one_line_when_the_other_ranks_finish_no_shard(small_data, tmp_path, monkeypatch):
    """Rank 0 of 2 alone (rank 1 died, and its launcher did not end rank 0): it writes its shards,
    waits --patience seconds for rank 1's, then stops; its shards are kept."""
    monkeypatch.setenv("HOROVOD_RANK", "0")
    monkeypatch.setenv("HOROVOD_SIZE", "2")
    r = cli("pack", small_data, tmp_path / "out", "--shard-size", SMALL_SHARD, "--patience", "1")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "(rank 0 of 2): rank 0 waited 1 s without another shard finished by the other ranks (9 missing" in r.stderr
    assert len(list((tmp_path / "out").glob("*.tar"))) == 9 and not (tmp_path / "out" / "train.json").exists()


@pytest.mark.unit
def test_a_full_disk_at_the_index_is_one_line(small_data, tmp_path, monkeypatch):
    from hvd_ba.launch import pack

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pack, "write_index", full)
    r = cli("pack", small_data, tmp_path / "out", "--shard-size", SMALL_SHARD)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "no space left on device writing the train index in" in r.stderr and "the shards are kept" in r.stderr
    monkeypatch.undo()
    r = cli("pack", small_data, tmp_path / "out", "--shard-size", SMALL_SHARD)
    assert r.returncode == 0 and "18 of its 18 shards done" in r.stdout, r.stdout + r.stderr


@pytest.mark.unit
def test_a_full_disk_stops_the_pack_in_one_line_and_the_same_pack_continues(small_data, tmp_path, monkeypatch):
    from hvd_ba.launch import pack

    dst = tmp_path / "packed"
    monkeypatch.setattr(pack, "free_bytes", lambda path: 1000)
    r = cli("pack", small_data, dst, "--shard-size", SMALL_SHARD)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "has 1.00 KB free; the 18 unfinished shards and the indexes need" in r.stderr
    monkeypatch.undo()
    real, calls = pack.member_header, []

    def full_after_60_members(name, size):
        calls.append(name)
        if len(calls) > 60:  # a few shards in (about 13 members each)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(name, size)

    monkeypatch.setattr(pack, "member_header", full_after_60_members)
    r = cli("pack", small_data, dst, "--shard-size", SMALL_SHARD)
    assert r.returncode == 1 and "no space left on device writing" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "finished shards are kept" in r.stderr
    kept = sorted(p.name for p in dst.glob("train-*.tar"))
    assert kept and not list((dst / ".pack-state").glob("*.partial")) and not (dst / "train.json").exists()
    mtimes = {n: (dst / n).stat().st_mtime_ns for n in kept}
    monkeypatch.undo()
    r = cli("pack", small_data, dst, "--shard-size", SMALL_SHARD)
    assert r.returncode == 0 and f"{len(kept)} of its" in r.stdout, r.stdout + r.stderr
    assert {n: (dst / n).stat().st_mtime_ns for n in kept} == mtimes  # finished shards not written again
    assert cli("pack", "--verify", dst).returncode == 0


@pytest.mark.unit
def test_a_full_disk_at_a_shards_fsync_is_one_line_and_the_shards_before_it_are_kept(small_data, tmp_path,
                                                                                     monkeypatch):
    """A file system that reports a full disk or quota only when the data is flushed (NFS, Lustre):
    the fsync of shard 4, which runs while shard 5 is written, ends the pack in one line."""
    from hvd_ba.launch import pack

    dst, real = tmp_path / "packed", os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("train-000003.tar."):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real(fd)

    monkeypatch.setattr(pack.os, "fsync", fsync)
    r = cli("pack", small_data, dst, "--shard-size", SMALL_SHARD)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "disk quota exceeded writing" in r.stderr and "train-000003.tar" in r.stderr, r.stderr
    assert sorted(p.name for p in dst.glob("train-*.tar")) == [f"train-{k:06d}.tar" for k in range(3)]
    assert not list((dst / ".pack-state").glob("*.partial"))
    monkeypatch.undo()
    r = cli("pack", small_data, dst, "--shard-size", SMALL_SHARD)
    assert r.returncode == 0 and "3 of its 18 shards done" in r.stdout, r.stdout + r.stderr


@pytest.mark.unit
def test_a_stale_pack_is_said_in_one_line(small_data, tmp_path, caplog):
    src = shutil.copytree(small_data, tmp_path / "src")
    dst = tmp_path / "packed"
    assert cli("pack", src, dst, "--shard-size", SMALL_SHARD).returncode == 0
    cfg = load_config("demo", [f"data.path={dst}"])
    caplog.clear()
    load_split(cfg, "train", True)
    assert "stale pack" not in caplog.text
    shutil.copy(src / "train" / "n90000002" / "n90000002_00000.JPEG", src / "train" / "n90000002" / "new.JPEG")
    load_split(cfg, "train", True)
    lines = [r.getMessage() for r in caplog.records if "stale pack" in r.getMessage()]
    assert len(lines) == 1 and "files in" in lines[0] and "first n90000002" in lines[0], caplog.text


@pytest.mark.unit
def test_the_packed_index_stays_mapped_and_small_when_sent_to_a_worker(packed):
    import pickle

    index = load_packed(packed, "train")
    assert isinstance(index.rows, np.memmap)
    assert len(pickle.dumps(SampleReader(index))) < 4000  # by file name, not the arrays


@pytest.mark.unit
def test_webdataset_reads_the_shards(packed):
    import webdataset as wds

    index = load_packed(packed, "train")
    got = {}
    for sample in wds.WebDataset([str(packed / s) for s in index.shards], shardshuffle=False):
        got[sample["__key__"]] = sample["jpeg"]
    assert len(got) == len(index)
    i = len(index) // 2
    assert got[index.paths[i].rsplit(".", 1)[0]] == SampleReader(index).read(i)


@pytest.mark.integration
def test_pack_under_horovodrun_each_rank_writes_its_shards_and_a_killed_pack_continues(small_data, tmp_path):
    dst = tmp_path / "packed"
    command = ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "python", "-m", "hvd_ba", "pack",
               str(small_data), str(dst), "--shard-size", SMALL_SHARD]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    paused = {**env, "HVD_BA_PAUSE_AT": "pack-shard-3", "HVD_BA_PAUSE_SECONDS": "120"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=paused,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:  # each rank: two shards written, the third begun
        lines.append(line)
        if sum("paused at pack-shard-3" in seen for seen in lines) == 2:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any("rank 1 paused at pack-shard-3" in seen for seen in lines), "".join(lines)
    done = sorted(p.name[:-5] for p in (dst / ".pack-state").glob("*.tar.json"))
    assert len(done) == 4 and not (dst / "train.json").exists(), done
    assert len(list((dst / ".pack-state").glob("*.partial"))) == 2  # each rank's third shard, half written
    mtimes = {n: (dst / n).stat().st_mtime_ns for n in done}
    r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    said = sorted(line.split("hvd_ba pack: ")[1] for line in r.stdout.splitlines() if "shards done" in line)
    assert len(said) == 2 and said[0].startswith("rank 0 of 2: 2 of its 9 shards done") and \
        said[1].startswith("rank 1 of 2: 2 of its 9 shards done"), said
    assert {n: (dst / n).stat().st_mtime_ns for n in done} == mtimes  # not written again
    assert not list((dst / ".pack-state").glob("*.partial"))
    index = load_packed(dst, "train")
    listed = subprocess.run(["tar", "-tf", str(dst / index.shards[0])], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == members(dst / index.shards[0]) and len(listed.stdout.split()) >= 2
    r = run_cli("pack", "--verify", str(dst))
    assert r.returncode == 0, r.stderr


@pytest.mark.integration
def test_training_from_shards_is_the_folders_run_under_horovodrun_torchrun_and_on_another_rank_count(
        small_data, two_rank_run, packed, tmp_path):
    """A 2-rank horovodrun run from the shards takes the steps of the same run from the folder;
    a torchrun run from the shards too; a run from the folder resumes from the shards on 1 rank."""
    out = tmp_path / "horovod"
    r = launch("gloo", packed, out, settings=ONE_EPOCH)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_run(out, two_rank_run, steps=6, atol=SAME_RUN)
    assert_same_epochs(out, two_rank_run)  # files and bytes read, losses, top-1
    out = tmp_path / "torch"
    r = torchrun(packed, out, [*ONE_EPOCH, "run.backend=torch"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["steps"] == 6
    resumed = shutil.copytree(two_rank_run, tmp_path / "resumed")
    r = train_alone(packed, resumed, [*RUN, "data.unique_batch=16", "data.format=shards", "run.resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming a run of 2 ranks on 1" in r.stdout + r.stderr
    assert [s["step"] for s in read_jsonl(resumed / "steps.jsonl")] == list(range(1, 13))
