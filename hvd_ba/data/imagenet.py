"""ImageNet as it is distributed: the validation labels of a flat validation folder.

The validation tar extracts to 50,000 files in one folder (`ILSVRC2012_val_00000001.JPEG`, ...)
with no class folders; their labels come from one of:
- the devkit (`ILSVRC2012_devkit_t12.tar.gz`, or its extracted folder):
  `data/ILSVRC2012_validation_ground_truth.txt` gives, line k, the ILSVRC2012_ID of image k, and
  `data/meta.mat` maps each ID to its WNID. The IDs are not in sorted-WNID order, and meta.mat also
  lists internal synsets (num_children > 0), which are no class;
- Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`, the WNID first in the string);
- a text file of `<file> <wnid>` lines.
A label is then the position of its WNID among the training split's sorted class folders, as in
the folder layout.
"""
from __future__ import annotations

import csv
import io
import os
import tarfile
from pathlib import Path

from hvd_ba.data.index import FileIndex

GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"


class LabelsError(ValueError):
    """A labels file that cannot be read or does not fit the data: the message names it."""


def val_file_name(k: int) -> str:
    """The k-th (1-based) validation image's file name."""
    return f"ILSVRC2012_val_{k:08d}.JPEG"


def _devkit_members(path: Path) -> tuple[bytes, bytes]:
    """(ground truth, meta.mat) from the devkit's tar.gz or its extracted folder."""
    if path.is_dir():
        found = {}
        for name in (GROUND_TRUTH, META):
            hits = [p for p in (path / name, *path.glob(f"*/{name}")) if p.is_file()]
            if not hits:
                raise LabelsError(f"devkit '{path}' has no {name}")
            found[name] = hits[0].read_bytes()
        return found[GROUND_TRUTH], found[META]
    try:
        with tarfile.open(path) as tar:
            members = {}
            for m in tar:
                for name in (GROUND_TRUTH, META):
                    if m.isfile() and (m.name == name or m.name.endswith("/" + name)):
                        members[name] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise LabelsError(f"devkit '{path}' is not a readable tar ({err})") from None
    for name in (GROUND_TRUTH, META):
        if name not in members:
            raise LabelsError(f"devkit '{path}' has no {name}")
    return members[GROUND_TRUTH], members[META]


def devkit_labels(path: Path) -> dict[str, str]:
    """{validation file name: WNID} from the devkit."""
    import scipy.io

    truth, meta = _devkit_members(path)
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise LabelsError(f"devkit '{path}': {META} is not the devkit's synset table ({err})") from None
    labels = {}
    for k, line in enumerate(truth.decode().split(), 1):
        try:
            labels[val_file_name(k)] = wnid_of[int(line)]
        except (ValueError, KeyError):
            raise LabelsError(f"devkit '{path}': line {k} of {GROUND_TRUTH} ({line!r}) is no leaf synset's "
                              "ILSVRC2012_ID") from None
    return labels


def csv_labels(path: Path) -> dict[str, str]:
    """{file name: WNID} from Kaggle's LOC_val_solution.csv."""
    labels = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise LabelsError(f"labels file '{path}': not Kaggle's LOC_val_solution.csv (header "
                              f"ImageId,PredictionString; got {header})")
        for n, row in enumerate(reader, 2):
            if len(row) < 2 or not row[1].split():
                raise LabelsError(f"labels file '{path}': line {n} has no WNID")
            labels[f"{row[0].strip()}.JPEG"] = row[1].split()[0]
    return labels


def text_labels(path: Path) -> dict[str, str]:
    """{file name: WNID} from `<file> <wnid>` lines."""
    labels = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if len(words) != 2:
            raise LabelsError(f"labels file '{path}': line {n} is not '<file> <wnid>': {line[:80]!r}")
        labels[os.path.basename(words[0])] = words[1]
    return labels


def read_val_labels(path: str | Path) -> dict[str, str]:
    """{validation file name: WNID} from a devkit (tar.gz or folder), a Kaggle CSV or a text file."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise LabelsError(f"labels file '{path}' does not exist")
    try:
        if path.is_dir() or path.name.endswith((".tar.gz", ".tgz", ".tar")):
            labels = devkit_labels(path)
        elif path.suffix.lower() == ".csv":
            labels = csv_labels(path)
        else:
            labels = text_labels(path)
    except (OSError, UnicodeDecodeError) as err:
        raise LabelsError(f"labels file '{path}' is unreadable ({getattr(err, 'strerror', None) or err})") from None
    if not labels:
        raise LabelsError(f"labels file '{path}' holds no labels")
    return labels


def flat_val_index(folder: Path, labels_path: str | Path, classes: tuple[str, ...] | list[str]) -> FileIndex:
    """The index of a flat validation folder: every image of `folder` with its label from the
    labels file, labels numbered by the training split's `classes`."""
    from hvd_ba.data.manifest import IMAGE_SUFFIXES

    labels = read_val_labels(labels_path)
    files = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"validation folder '{folder}' has no images (data.val_labels expects a flat folder)")
    numbers = label_numbers(files, labels, classes, f"data.val_labels '{labels_path}'", f"'{folder}'", "train/")
    sizes = [os.stat(os.path.join(folder, f)).st_size for f in files]
    return FileIndex.from_lists(str(folder), files, numbers, sizes, classes)


def label_numbers(files: list[str], wnids: dict[str, str], classes, labels_name: str, images_name: str,
                  classes_name: str) -> list[int]:
    """Each file's label: its WNID's position among the training `classes`; one line where a
    file has no label or a WNID is no training class."""
    unlabelled = [f for f in files if f not in wnids]
    if unlabelled:
        raise LabelsError(f"{labels_name} has no label for {len(unlabelled)} of the {len(files)} images of "
                          f"{images_name} (first: {unlabelled[0]})")
    number = {wnid: k for k, wnid in enumerate(classes)}
    foreign = sorted({wnids[f] for f in files} - number.keys())
    if foreign:
        raise LabelsError(f"{labels_name} names {len(foreign)} classes that {classes_name} lacks (first: {foreign[0]})")
    return [number[wnids[f]] for f in files]


# ------------------------------------------------------------------- the archives, not extracted

class _Window(io.RawIOBase):
    """Bytes [start, start + size) of an open binary file, as a seekable file (an inner tar)."""

    def __init__(self, f, start: int, size: int):
        super().__init__()
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        data = os.pread(self._f.fileno(), n, self._start + self._pos) if n else b""
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def archive_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, data offset in `path`) of every image in an uncompressed tar, read by its
    headers only (tarfile seeks past the data): ImageNet's training tar holds one tar per class
    (`n01440764.tar` of `n01440764_10026.JPEG`, ...), named here `<class>/<file>`; a member
    `<class>/<file>` is taken as it is, a flat member (the validation tar's) by its file name."""
    from hvd_ba.data.manifest import IMAGE_SUFFIXES

    out, end = [], 0
    try:
        with open(path, "rb") as raw, open(path, "rb") as inner_raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            length = os.fstat(raw.fileno()).st_size
            for m in tar:
                end = m.offset_data + (m.size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE
                if m.offset_data + m.size > length:
                    raise tarfile.ReadError("unexpected end of data")
                if not m.isfile():
                    continue
                if m.name.endswith(".tar"):
                    cls = Path(m.name).stem
                    window = io.BufferedReader(_Window(inner_raw, m.offset_data, m.size), 1 << 16)
                    with tarfile.open(fileobj=window, mode="r:") as inner:
                        out += [(f"{cls}/{os.path.basename(im.name)}", im.size, m.offset_data + im.offset_data)
                                for im in inner if im.isfile() and im.name.lower().endswith(IMAGE_SUFFIXES)]
                elif m.name.lower().endswith(IMAGE_SUFFIXES):
                    parts = m.name.strip("/").split("/")
                    out.append(("/".join(parts[-2:]), m.size, m.offset_data))
            if tar.offset < end:
                raise tarfile.ReadError("unexpected end of data")
    except tarfile.ReadError as err:
        if "unexpected end of data" in str(err) or "truncated" in str(err):
            raise LabelsError(f"'{path}' is truncated or damaged ({err}); download it again") from None
        raise LabelsError(f"'{path}' is not an uncompressed tar ({err})") from None
    # tarfile ends quietly at the end of the file: an archive cut between two members would pass
    # as a smaller one. A whole archive ends with its end-of-archive blocks after the last member.
    with open(path, "rb") as f:
        tail = os.pread(f.fileno(), 2 * tarfile.BLOCKSIZE, end)
    if len(tail) < 2 * tarfile.BLOCKSIZE or any(tail):
        raise LabelsError(f"'{path}' is truncated: no end-of-archive blocks after its last member (at byte {end} of "
                          f"{os.path.getsize(path)}); download it again")
    return out


def archive_index(path: Path, classes: tuple[str, ...] | None = None,
                  val_labels: str | Path | None = None) -> tuple[FileIndex, list[int]]:
    """A split's index from its archive, in the order of the folder it would extract to (sorted
    classes, sorted files: the same digest as that folder), and each sample's offset in the
    archive. Training tar: classes from its members. Validation tar (flat): `classes` (the
    training split's) and `val_labels`."""
    members = sorted(archive_members(path))
    if not members:
        raise LabelsError(f"'{path}' holds no images")
    names = [m[0] for m in members]
    if len(set(names)) != len(names):
        twice = next(a for a, b in zip(names, names[1:]) if a == b)
        raise LabelsError(f"'{path}' holds '{twice}' twice")
    if val_labels is None:
        if any("/" not in n for n in names):
            raise LabelsError(f"'{path}' holds images outside class tars or folders (a validation tar? give its "
                              "labels: --val-labels)")
        classes = tuple(sorted({n.split("/")[0] for n in names}))
        number = {c: k for k, c in enumerate(classes)}
        labels = [number[n.split("/")[0]] for n in names]
    else:
        names = [n.rsplit("/", 1)[-1] for n in names]
        labels = label_numbers(names, read_val_labels(val_labels), classes, f"--val-labels '{val_labels}'",
                               f"'{path}'", "the training tar")
    index = FileIndex.from_lists(str(path), names, labels, [m[1] for m in members], classes)
    return index, [m[2] for m in members]
