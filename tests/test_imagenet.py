"""ImageNet as it is distributed, in miniature: a flat validation folder whose labels come from
the devkit (ground truth + meta.mat, IDs not in WNID order, internal synsets among them), Kaggle's
CSV or a text file; training and pack take it."""
import io
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from helpers import cli
from hvd_ba.config import load_config
from hvd_ba.data.imagenet import LabelsError, flat_val_index, read_val_labels, val_file_name
from hvd_ba.data import imagenet
from hvd_ba.data.manifest import load_flat_val, load_index
from hvd_ba.data.pipeline import make_eval_loader
from hvd_ba.data.shards import load_packed, load_split

pytestmark = pytest.mark.unit

# ILSVRC2012_IDs in an order that is not the sorted-WNID order, and an internal synset among them
IDS = {"n90000002": 1, "n90000000": 2, "n90000003": 3, "n90000001": 4}
INTERNAL = ("n99999999", 5)


def write_devkit(path, truth_ids):
    """A devkit tar.gz: data/ILSVRC2012_validation_ground_truth.txt and data/meta.mat."""
    import scipy.io

    rows = [(i, w, 0) for w, i in IDS.items()] + [(INTERNAL[1], INTERNAL[0], 2)]
    synsets = np.zeros((len(rows), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for k, row in enumerate(rows):
        synsets[k, 0] = row
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{i}\n" for i in truth_ids).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("data/ILSVRC2012_validation_ground_truth.txt", truth), ("data/meta.mat", meta.getvalue())):
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def distributed(small_data, tmp_path_factory):
    """small_data with val/ flattened as the validation tar extracts (shuffled, renamed
    ILSVRC2012_val_<k>.JPEG), and its labels in the three forms. Returns (root, {name: wnid}, files)."""
    root = tmp_path_factory.mktemp("imagenet") / "flat"
    shutil.copytree(small_data / "train", root / "train")
    (root / "val").mkdir()
    images = sorted((small_data / "val").rglob("*.JPEG"))
    order = np.random.default_rng(3).permutation(len(images))
    truth = {}
    for k, j in enumerate(order, 1):
        shutil.copy(images[j], root / "val" / val_file_name(k))
        truth[val_file_name(k)] = images[j].parent.name
    files = {"devkit": write_devkit(root.parent / "ILSVRC2012_devkit_t12.tar.gz",
                                    [IDS[truth[val_file_name(k)]] for k in range(1, len(images) + 1)])}
    files["csv"] = root.parent / "LOC_val_solution.csv"
    files["csv"].write_text("ImageId,PredictionString\n" + "".join(
        f"{name[:-5]},{wnid} 10 20 200 220 {wnid} 1 2 30 40\n" for name, wnid in reversed(truth.items())))
    files["csv-bom"] = root.parent / "LOC_val_solution-bom.csv"  # as Excel saves it
    files["csv-bom"].write_bytes(b"\xef\xbb\xbf" + files["csv"].read_bytes().replace(b"\n", b"\r\n"))
    files["text"] = root.parent / "val_labels.txt"
    files["text"].write_text("".join(f"val/{name} {wnid}\n" for name, wnid in truth.items()))
    return root, truth, files


@pytest.mark.parametrize("form", ["devkit", "csv", "csv-bom", "text"])
def test_each_labels_form_gives_every_flat_image_its_class(distributed, small_data, form):
    root, truth, files = distributed
    assert read_val_labels(files[form]) == truth
    classes = load_index(small_data, "train", None).classes
    index = flat_val_index(root / "val", files[form], classes)
    assert len(index) == len(truth) == 48
    assert [classes[label] for label in index.labels] == [truth[name] for name in index.paths]


def test_the_flat_folder_evaluates_the_images_of_the_class_folders(distributed, small_data):
    """data.val_labels: the same (image, label) pairs as small_data's val/ with class folders."""
    root, _, files = distributed
    seen = {}
    for data, extra in ((small_data, []), (root, [f"data.val_labels={files['devkit']}"])):
        cfg = load_config("demo", ["data.workers=0", f"data.path={data}", *extra])
        val = load_split(cfg, "val", False)
        pairs = []
        for batch in make_eval_loader(val, cfg, 0, 1):
            pairs += [(img.numpy().tobytes(), int(label)) for img, label in zip(batch["images"], batch["labels"])]
        seen[str(data)] = sorted(pairs)
    assert seen[str(small_data)] == seen[str(root)] and len(seen[str(root)]) == 48


def test_a_flat_folders_index_is_cached_until_the_folder_or_its_labels_change(distributed, small_data, tmp_path,
                                                                             monkeypatch):
    """Rank 0 lists the 50,000 files of a flat val/ once; later starts, and the other ranks, read
    the cached manifest, until a file is added or removed or the labels file changes."""
    root, truth, files = distributed
    val = tmp_path / "val"
    shutil.copytree(root / "val", val)
    labels = tmp_path / "labels.txt"
    shutil.copy(files["text"], labels)
    classes = load_index(small_data, "train", None).classes
    cache = tmp_path / "cache"
    assert load_flat_val(val, labels, classes, cache, write=False) is not None and not cache.exists()
    first = load_flat_val(val, labels, classes, cache)
    assert first.files is not None and len(first) == 48  # mapped from the cache it wrote
    listings = []
    real = imagenet.flat_val_index
    monkeypatch.setattr(imagenet, "flat_val_index", lambda *a: listings.append(a) or real(*a))
    again = load_flat_val(val, labels, classes, cache, write=False)
    assert listings == [] and again == first and again.labels.tolist() == first.labels.tolist()

    gone = sorted(truth)[0]
    (val / gone).unlink()
    fewer = load_flat_val(val, labels, classes, cache)
    assert len(listings) == 1 and len(fewer) == 47 and gone not in fewer.paths
    name = sorted(truth)[1]
    other = next(w for w in classes if w != truth[name])
    st = labels.stat()
    labels.write_text(labels.read_text().replace(f"val/{name} {truth[name]}", f"val/{name} {other}"))
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime (one-second file systems)
    assert (labels.stat().st_size, labels.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    relabelled = load_flat_val(val, labels, classes, cache)
    assert len(listings) == 2 and classes[relabelled.labels[relabelled.paths.index(name)]] == other
    assert load_flat_val(val, labels, classes, cache) == relabelled and len(listings) == 2  # fresh again
    more_classes = load_flat_val(val, labels, [*classes, "n99999990"], cache)
    assert len(listings) == 3 and more_classes.classes[-1] == "n99999990"
    # a devkit folder (as the devkit tar extracts) is a labels source too, cached alike
    with tarfile.open(files["devkit"]) as tar:
        tar.extractall(tmp_path / "devkit", filter="data")
    devkit = next(p for p in (tmp_path / "devkit").rglob("data") if p.is_dir()).parent
    from_folder = load_flat_val(val, devkit, classes, cache)
    assert len(listings) == 4 and len(from_folder) == 47
    assert load_flat_val(val, devkit, classes, cache, write=False) == from_folder and len(listings) == 4
    with pytest.raises(imagenet.LabelsError, match="labels file '.*missing.txt' does not exist"):
        load_flat_val(val, tmp_path / "missing.txt", classes, cache)


def test_labels_that_do_not_fit_are_one_line_naming_the_file(distributed, tmp_path, small_data):
    root, truth, files = distributed
    classes = load_index(small_data, "train", None).classes
    short = tmp_path / "short.txt"
    short.write_text("".join(f"{n} {w}\n" for n, w in list(truth.items())[:-1]))
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("".join(f"{n} {'n12345678' if k == 5 else w}\n" for k, (n, w) in enumerate(truth.items())))
    broken_csv = tmp_path / "bad.csv"
    broken_csv.write_text("id,label\n")
    wrong_devkit = write_devkit(tmp_path / "devkit.tar.gz", [INTERNAL[1]] * len(truth))
    for path, says in ((short, "has no label for 1 of the 48 images"), (foreign, "names 1 classes that train/ lacks "
                       "(first: n12345678)"), (broken_csv, "not Kaggle's LOC_val_solution.csv"),
                       (wrong_devkit, "line 1 of data/ILSVRC2012_validation_ground_truth.txt ('5') is no leaf"),
                       (tmp_path / "nope.csv", "does not exist")):
        with pytest.raises(LabelsError) as err:
            flat_val_index(root / "val", path, classes)
        assert says in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_pack_takes_a_flat_validation_folder_and_training_reads_it(distributed, tmp_path):
    root, truth, files = distributed
    r = cli("pack", root, tmp_path / "packed", "--shard-size", "256K", "--val-labels", files["csv"])
    assert r.returncode == 0, r.stdout + r.stderr
    val = load_packed(tmp_path / "packed", "val")
    assert [val.classes[label] for label in val.labels] == [truth[name] for name in val.paths]
    cfg = load_config("demo", ["data.workers=0", f"data.path={tmp_path / 'packed'}"])
    flat = load_config("demo", ["data.workers=0", f"data.path={root}", f"data.val_labels={files['csv']}"])
    for a, b in zip(make_eval_loader(load_split(cfg, "val", False), cfg, 0, 1),
                    make_eval_loader(load_split(flat, "val", False), flat, 0, 1)):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    r = cli("pack", root, tmp_path / "unlabelled", "--shard-size", "256K")
    assert r.returncode == 1 and "is not an ImageNet layout" in r.stderr, r.stderr
    assert "has no class folders but images: a flat validation folder takes its labels from" in r.stderr


def write_archives(root, out):
    """ILSVRC2012_img_train.tar (one uncompressed tar per class, flat members) and
    ILSVRC2012_img_val.tar (flat) made from an extracted `root`, as ImageNet distributes them."""
    train_tar, val_tar = out / "ILSVRC2012_img_train.tar", out / "ILSVRC2012_img_val.tar"
    with tarfile.open(train_tar, "w", format=tarfile.GNU_FORMAT) as outer:
        for cls in sorted((root / "train").iterdir(), reverse=True):  # not in sorted order inside the archive
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for image in sorted(cls.iterdir()):
                    tar.add(image, arcname=image.name)
            info = tarfile.TarInfo(f"{cls.name}.tar")
            info.size = len(inner.getvalue())
            outer.addfile(info, io.BytesIO(inner.getvalue()))
    with tarfile.open(val_tar, "w") as tar:
        for image in sorted((root / "val").iterdir(), reverse=True):
            tar.add(image, arcname=image.name)
    return train_tar, val_tar


@pytest.mark.parametrize("labels", ["devkit", "csv"])
def test_pack_from_the_archives_equals_the_pack_of_the_extracted_folder(distributed, tmp_path, labels):
    """Indexed by their headers and read by offset, the archives give the extracted folder's index
    (same digest) and, with the same seed and shard size, byte-identical shards; the validation
    labels from the devkit (IDs not in WNID order) or Kaggle's CSV."""
    root, truth, files = distributed
    train_tar, val_tar = write_archives(root, tmp_path)
    r = cli("pack", "--from-tar", train_tar, "--val-tar", val_tar, "--val-labels", files[labels],
            tmp_path / "from-tar", "--shard-size", "256K")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("pack", root, tmp_path / "from-folder", "--shard-size", "256K", "--val-labels", files["text"])
    assert r.returncode == 0, r.stdout + r.stderr
    for split in ("train", "val"):
        a, b = load_packed(tmp_path / "from-tar", split), load_packed(tmp_path / "from-folder", split)
        assert a.digest == b.digest and len(a) == len(b) > 0
        assert a.header["shard_sha256"] == b.header["shard_sha256"]
        assert a.header["source"] == str((train_tar if split == "train" else val_tar).resolve())
    assert cli("pack", "--verify", tmp_path / "from-tar").returncode == 0


def test_archives_that_do_not_fit_are_refused_in_one_line(distributed, tmp_path):
    root, _, files = distributed
    train_tar, val_tar = write_archives(root, tmp_path)
    whole = train_tar.read_bytes()
    with tarfile.open(train_tar) as tar:
        last = tar.getmembers()[-1]
    cut_between, cut_inside = tmp_path / "cut-between.tar", tmp_path / "cut-inside.tar"
    cut_between.write_bytes(whole[:last.offset])  # the last class tar lost at a member boundary
    cut_inside.write_bytes(whole[:last.offset_data + 700])
    gz = tmp_path / "train.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(root / "train", arcname="train")
    for args, says in ((["--from-tar", train_tar, "--val-tar", val_tar], "needs its labels: --val-labels"),
                       (["--from-tar", gz], "is not an uncompressed tar"),
                       (["--from-tar", val_tar], "holds images outside class tars or folders"),
                       (["--from-tar", tmp_path / "nope.tar"], "does not exist"),
                       (["--from-tar", cut_between], "is truncated: no end-of-archive blocks after its last member"),
                       (["--from-tar", cut_inside], "is truncated or damaged")):
        r = cli("pack", *args, tmp_path / "out")
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and says in r.stderr, (args, r.stderr)
    assert not (tmp_path / "out").exists()
