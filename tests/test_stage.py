"""Node-local staging: each rank copies exactly the files it reads, once, verified; training with
data.local_path reads only the copy and refuses to start when a rank's files are missing."""
import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from hvd_ba.config import load_config
from hvd_ba.data.manifest import load_index
from hvd_ba.data.shards import load_packed
from hvd_ba.data.staged import rank_files
from hvd_ba.launch.stage import RECORD_DIR
from helpers import ENV, ROOT, run_cli, train_command

pytestmark = pytest.mark.integration

STATIC = ["data.shard=static", "data.unique_batch=8"]


@pytest.fixture
def shared(small_data, tmp_path):
    """A private copy of the small set: the tests write into it."""
    root = tmp_path / "shared"
    shutil.copytree(small_data, root)
    return root


def stage(shared, dest, rank, world=2, *extra, manifests="null"):
    return run_cli("stage", "--config", "demo", "--dest", str(dest), *extra, "--set", f"data.path={shared}",
                   f"data.manifest_dir={manifests}", *STATIC,
                   env_extra={"HOROVOD_RANK": str(rank), "HOROVOD_SIZE": str(world)})


def expected_files(shared, rank, world=2):
    cfg = load_config("demo", [f"data.path={shared}", *STATIC])
    return rank_files(cfg, load_index(shared, "train", None), load_index(shared, "val", None), rank, world)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_rank_stages_its_own_files_once_and_verified(shared, tmp_path):
    dest = tmp_path / "local"
    files = {r: expected_files(shared, r) for r in (0, 1)}
    train = [{rel for rel, _ in files[r] if rel.startswith("train/")} for r in (0, 1)]
    assert not train[0] & train[1] and len(train[0]) == len(train[1]) == 96  # 192 files over 2 ranks
    for r in (0, 1):
        out = stage(shared, dest, r)
        assert out.returncode == 0, out.stderr
        assert f"rank {r} of 2" in out.stdout and f"{len(files[r])} copied" in out.stdout
    staged = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and RECORD_DIR not in p.parts}
    assert staged == {rel for r in (0, 1) for rel, _ in files[r]}
    for r in (0, 1):
        record = json.loads((dest / RECORD_DIR / f"rank{r}-of2.json").read_text())
        assert record["files"] == len(files[r]) and record["world"] == 2
        for rel, size in files[r]:
            assert (dest / rel).stat().st_size == size
            assert record["sha256"][rel] == sha256(shared / rel)

    again = stage(shared, dest, 0)  # a requeued job: nothing to copy
    assert again.returncode == 0 and " 0 copied" in again.stdout, again.stdout

    # A same-size corruption passes --trust-size but not the default hash check; a truncated file
    # is recopied either way.
    rel0, rel1 = files[0][0][0], files[0][1][0]
    data = bytearray((dest / rel0).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dest / rel0).write_bytes(bytes(data))
    (dest / rel1).write_bytes((dest / rel1).read_bytes()[:100])
    trusted = stage(shared, dest, 0, 2, "--trust-size")
    assert " 1 copied" in trusted.stdout and sha256(dest / rel1) == sha256(shared / rel1)
    assert sha256(dest / rel0) != sha256(shared / rel0)
    hashed = stage(shared, dest, 0)
    assert " 1 copied" in hashed.stdout and sha256(dest / rel0) == sha256(shared / rel0)


def test_the_node_local_folder_is_private(shared, tmp_path):
    dest = tmp_path / "local"
    assert stage(shared, dest, 0).returncode == 0
    assert (dest.stat().st_mode & 0o777) == 0o700 and dest.stat().st_uid == os.geteuid()
    temporaries = [p for p in dest.rglob("*.tmp")]
    assert not temporaries  # every temporary became its file


def test_a_planted_file_of_the_right_size_is_replaced(shared, tmp_path):
    """Files already in the folder, with no record of this rank that vouches for them (another
    job's leftovers, or planted), are hashed against nothing and so recopied."""
    dest = tmp_path / "local"
    dest.mkdir(mode=0o700)
    files = expected_files(shared, 0)
    for rel, size in files[:5]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(b"\xff" * size)
    r = stage(shared, dest, 0)
    assert r.returncode == 0 and f"{len(files)} copied" in r.stdout, r.stdout + r.stderr
    for rel, _ in files[:5]:
        assert sha256(dest / rel) == sha256(shared / rel)


def _other_user():
    import pwd

    for name in ("nobody", "daemon", "munge"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("no second user account on this machine")


@pytest.mark.skipif(os.geteuid() != 0, reason="planting a folder owned by another user needs root")
def test_a_folder_another_user_owns_is_refused_and_not_read(shared, tmp_path):
    other = _other_user()
    dest = tmp_path / "local"
    dest.mkdir(mode=0o700)
    files = expected_files(shared, 0)
    rel, size = files[0]
    (dest / rel).parent.mkdir(parents=True)
    (dest / rel).write_bytes(b"\0" * size)  # a poisoned image, the right size
    for path in [dest, *dest.rglob("*")]:
        os.chown(path, other.pw_uid, other.pw_gid)
    r = stage(shared, dest, 0)
    assert r.returncode == 2, r.stdout
    assert f"node-local folder '{dest}'" in r.stderr and f"owned by user {other.pw_name} (uid {other.pw_uid})" in r.stderr
    assert (dest / rel).read_bytes() == b"\0" * size and not (dest / RECORD_DIR).exists()  # nothing written
    # Training pointed at it directly is refused as well, before any step.
    out = tmp_path / "run"
    cmd = train_command("gloo", shared, out, settings=[*RUN, f"data.local_path={dest}"])
    t = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert t.returncode != 0 and f"owned by user {other.pw_name}" in t.stdout + t.stderr
    assert not (out / "steps.jsonl").exists()


def test_a_folder_open_to_others_and_a_symlink_are_refused(shared, tmp_path):
    dest = tmp_path / "local"
    dest.mkdir(mode=0o755)
    dest.chmod(0o755)
    r = stage(shared, dest, 0)
    assert r.returncode == 2 and "has mode 0755: other users could plant files in it" in r.stderr
    assert not any(dest.iterdir())

    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    r = stage(shared, link, 0)
    assert r.returncode == 2 and f"node-local folder '{link}'" in r.stderr and "is a symlink" in r.stderr
    assert not any(target.iterdir())  # not followed

    removed = run_cli("stage", "--config", "demo", "--dest", str(link), "--remove", "--set", f"data.path={shared}",
                      *STATIC)
    assert removed.returncode == 2 and "is a symlink" in removed.stderr and target.is_dir() and link.is_symlink()


def test_remove_deletes_only_a_staging_folder(shared, tmp_path):
    """A private folder that hvd_ba did not stage into (LOCAL_DATA=$HOME by mistake) is kept."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "thesis.tex").write_text("years of work")
    r = run_cli("stage", "--config", "demo", "--dest", str(home), "--remove", "--set", f"data.path={shared}", *STATIC)
    assert r.returncode == 2 and "holds no .hvd_ba-stage/ record" in r.stderr and (home / "thesis.tex").exists()


def test_training_reads_a_folder_nobody_else_can_write(shared, tmp_path):
    """Training only reads data.local_path: a 0755 folder of one's own is fine, a group-writable
    one is refused before any step."""
    dest = tmp_path / "local"
    for r in (0, 1):
        assert stage(shared, dest, r).returncode == 0
    dest.chmod(0o775)
    out = tmp_path / "run"
    cmd = train_command("gloo", shared, out, settings=[*RUN, f"data.local_path={dest}"])
    t = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert t.returncode != 0 and "has mode 0775: other users could plant files" in t.stdout + t.stderr
    assert not (out / "steps.jsonl").exists()
    dest.chmod(0o755)
    t = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert t.returncode == 0, t.stdout[-2000:] + t.stderr[-2000:]


def test_remove_deletes_only_a_private_folder(shared, tmp_path):
    dest = tmp_path / "local"
    assert stage(shared, dest, 0).returncode == 0
    r = run_cli("stage", "--config", "demo", "--dest", str(dest), "--remove", "--set", f"data.path={shared}", *STATIC)
    assert r.returncode == 0 and "removed" in r.stdout and not dest.exists()
    again = run_cli("stage", "--config", "demo", "--dest", str(dest), "--remove", "--set", f"data.path={shared}",
                    *STATIC)
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_staging_needs_static_shards_and_a_destination(shared, tmp_path):
    r = run_cli("stage", "--config", "demo", "--dest", str(tmp_path / "x"), "--set", f"data.path={shared}")
    assert r.returncode == 2 and "config key 'data.shard': staging needs static shards" in r.stderr
    r = run_cli("stage", "--config", "demo", "--set", f"data.path={shared}", *STATIC)
    assert r.returncode == 2 and "give --dest DIR" in r.stderr
    r = run_cli("stage", "--config", "demo", "--dest", str(tmp_path / "x"), "--set", f"data.path={tmp_path}/nope",
                *STATIC, env_extra={"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"})
    assert r.returncode == 2 and "does not exist on host" in r.stderr and "(rank 1 of 2)" in r.stderr


def test_a_source_that_changed_since_its_listing_is_an_error(shared, tmp_path):
    manifests = tmp_path / "manifests"
    for split in ("train", "val"):
        load_index(shared, split, manifests)  # listed (as a job's first step would), then changed:
    rel = expected_files(shared, 0)[0][0]
    (shared / rel).write_bytes((shared / rel).read_bytes() + b"extra")  # rewritten in place, new size
    r = stage(shared, tmp_path / "local", 0, manifests=manifests)
    assert r.returncode == 2 and "the dataset manifest says" in r.stderr and "rank 0" in r.stderr


RUN = ["data.workers=0", "data.copies=2", "model.ghost_size=16", "optim.epochs=1", "optim.warmup_epochs=0",
       "run.max_steps_per_epoch=4", "data.manifest_dir=null", *STATIC]


def test_training_reads_only_the_staged_copy(shared, tmp_path):
    dest = tmp_path / "local"
    for r in (0, 1):
        assert stage(shared, dest, r).returncode == 0
    # Spoil every image on the shared file system, same sizes and names (the listing stays valid):
    # a rank that read from it would count bad files or fail evaluation.
    for path in shared.rglob("*.JPEG"):
        path.write_bytes(b"\0" * path.stat().st_size)
    train_from_the_copy(shared, dest, tmp_path / "run")


def train_from_the_copy(data, dest, out):
    """A 2-rank run with data.local_path=dest: it completes, reads no bad file, and evaluates."""
    cmd = train_command("gloo", data, out, settings=[*RUN, f"data.local_path={dest}"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["bad_files"] == 0 and metrics[-1]["files_read"] > 0
    assert json.loads((out / "result.json").read_text())["val_top1"] is not None


def test_training_stops_before_its_first_step_when_a_ranks_files_are_missing(shared, tmp_path):
    dest = tmp_path / "local"
    for r in (0, 1):
        assert stage(shared, dest, r).returncode == 0
    (dest / expected_files(shared, 1)[5][0]).unlink()
    out = tmp_path / "run"
    cmd = train_command("gloo", shared, out, settings=[*RUN, f"data.local_path={dest}"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode != 0
    assert "rank 1 of 2 on host" in r.stdout + r.stderr and "1 of its 120 files are missing" in r.stdout + r.stderr
    assert not (out / "steps.jsonl").exists()


def test_a_packed_folder_is_staged_as_whole_shards_checked_against_its_index(shared, tmp_path):
    """Static shards over a packed folder: each rank owns whole shards, stage copies them and
    checks each against the SHA-256 the pack's index records, and training reads its shards from
    the copy only (validation from data.path)."""
    packed = tmp_path / "packed"
    assert run_cli("pack", str(shared), str(packed), "--shard-size", "256K").returncode == 0
    index = load_packed(packed, "train")
    cfg = load_config("demo", [f"data.path={packed}", *STATIC])
    files = [rank_files(cfg, index, load_packed(packed, "val"), r, 2) for r in (0, 1)]
    names = [{rel for rel, _ in f} for f in files]
    assert not names[0] & names[1] and names[0] | names[1] == set(index.shards)  # whole shards, each to one rank
    counts = [int(np.isin(index.rows["shard"], [index.shards.index(n) for n in ns]).sum()) for ns in names]
    assert sum(counts) == 192 and abs(counts[0] - counts[1]) <= max(np.bincount(index.rows["shard"]))
    # plan (which job.sh runs before launching) counts the steps the ranks will take, and refuses
    # more ranks than shards
    plan = run_cli("plan", "--ranks", "2", "--config", "demo", "--set", f"data.path={packed}", *STATIC)
    assert plan.returncode == 0 and f"steps per epoch: {min(counts) // 8} (" in plan.stdout, plan.stdout + plan.stderr
    assert (f"static parts: whole packed shards ({len(index.shards)} over 2 ranks), {min(counts)}-{max(counts)} files "
            f"per rank; each epoch reads {2 * min(counts)} of 192") in plan.stdout and "low:" not in plan.stdout
    crowded = run_cli("plan", "--ranks", str(len(index.shards)), "--config", "demo", "--set", f"data.path={packed}",
                      *STATIC)
    assert crowded.returncode == 0 and "; low: pack with a smaller --shard-size" in crowded.stdout, crowded.stdout
    starved = run_cli("plan", "--ranks", str(len(index.shards)), "--config", "demo", "--set", f"data.path={packed}",
                      *STATIC, "data.unique_batch=32")  # the smallest shard holds fewer than 32 samples
    assert starved.returncode == 2 and "fewer than one batch of 32 (lower data.unique_batch" in starved.stderr, starved.stderr
    too_many = run_cli("plan", "--ranks", str(len(index.shards) + 1), "--config", "demo", "--set",
                       f"data.path={packed}", *STATIC)
    assert too_many.returncode == 2 and f"its {len(index.shards)} training shards cannot feed" in too_many.stderr

    dest = tmp_path / "local"
    for r in (0, 1):
        out = stage(packed, dest, r)
        assert out.returncode == 0, out.stderr
        assert f"{len(files[r])} files" in out.stdout and f"{len(files[r])} copied" in out.stdout
    assert {p.name for p in dest.iterdir() if p.name != RECORD_DIR} == set(index.shards)
    for name, want in zip(index.shards, index.header["shard_sha256"]):
        assert sha256(dest / name) == want

    # Training reads its shards from the copy only: the shared training shards spoiled (same
    # sizes) would count bad files; validation reads data.path's (intact) val shards.
    originals = {name: (packed / name).read_bytes() for name in index.shards}
    for name in index.shards:
        (packed / name).write_bytes(b"\0" * len(originals[name]))
    out = tmp_path / "run"
    train_from_the_copy(packed, dest, out)
    # run.max_steps_per_epoch: each rank owns 80-100 files, over 4 batches of 8
    assert json.loads((out / "steps.jsonl").read_text().splitlines()[-1])["step"] == 4

    # A copy damaged in place (same size) is copied again; a source shard that does not hash as
    # the index says is an error naming it, and no copy of it is left.
    for name, data in originals.items():
        (packed / name).write_bytes(data)
    mine = sorted(names[0])
    spoil(dest / mine[0])
    again = stage(packed, dest, 0)
    assert again.returncode == 0 and " 1 copied" in again.stdout, again.stdout + again.stderr
    assert sha256(dest / mine[0]) == index.header["shard_sha256"][index.shards.index(mine[0])]
    (dest / mine[1]).unlink()
    spoil(packed / mine[1])
    bad = stage(packed, dest, 0)
    assert bad.returncode == 2 and f"shard '{packed / mine[1]}' does not hash as the pack's index records" in bad.stderr
    assert "rank 0" in bad.stderr and not (dest / mine[1]).exists()


def spoil(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flat_validation_folder_is_staged_with_its_labels(shared, tmp_path):
    """data.val_labels: the flat val/ that ImageNet's validation tar extracts to is staged like a
    folder of class folders (each rank its evaluation files)."""
    from hvd_ba.data.imagenet import val_file_name
    from hvd_ba.data.shards import load_split

    flat = tmp_path / "flat"
    shutil.copytree(shared / "train", flat / "train")
    (flat / "val").mkdir()
    lines = []
    for k, image in enumerate(sorted((shared / "val").rglob("*.JPEG")), 1):
        shutil.copy(image, flat / "val" / val_file_name(k))
        lines.append(f"{val_file_name(k)} {image.parent.name}\n")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(lines))
    cfg = load_config("demo", [f"data.path={flat}", f"data.val_labels={labels}", "data.manifest_dir=null", *STATIC])
    dest = tmp_path / "local"
    for r in (0, 1):
        out = stage(flat, dest, r, 2, "--set", f"data.val_labels={labels}")
        assert out.returncode == 0, out.stderr
        files = rank_files(cfg, load_split(cfg, "train", False), load_split(cfg, "val", False), r, 2)
        val = [rel for rel, _ in files if rel.startswith("val/")]
        assert len(val) == 24 and all((dest / rel).read_bytes() == (flat / rel).read_bytes() for rel in val)
