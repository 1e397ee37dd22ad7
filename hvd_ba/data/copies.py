"""Batch Augmentation's core: each image read and decoded once, its M augmented copies made from
that one decode, and B images x M copies stacked into one batch of M*B samples.

- `make_copies`: one decoded image -> M uint8 crops (crop + resize, flip), on the loader's CPU;
  augment.where=device sends the decoded image with its M boxes instead, and the training device
  crops (data/copies_on_device.py). Both draw and decode through `augment.decode_once`.
- `BATrainSet`: a file index -> its M copies (a broken file replaced by the next of its shard).
- `BACollate`: B items -> M*B samples in data.layout's order, the order ghost BN groups them in.
The copies of file i in epoch e are fixed by (seed, e, i, copy): the same on any rank, worker or
rank count (data/augment.py).
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from hvd_ba.data.augment import TrainPreset, decode_once, image_rng
from hvd_ba.data.copies_on_device import canvas_copies, collate_canvases
from hvd_ba.data.manifest import FileIndex

REPLACEMENT_TRIES = 8  # files of the shard tried in turn when a file cannot be decoded


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class SampleReader:
    """Sample i's bytes: its file (a folder), or one pread at its offset in its shard (a packed
    folder, data/shards.py), each shard opened once per process and kept open."""

    def __init__(self, index: FileIndex):
        self.index, self._open = index, {}

    def position(self, i: int) -> tuple[int, int]:
        """Where sample i lies: (shard, offset) in a packed folder; reads sorted by it are sequential."""
        row = self.index.rows[i]
        return int(row["shard"]), int(row["offset"])

    def read(self, i: int) -> bytes:
        index = self.index
        if not index.packed:
            return read_file(os.path.join(index.root, index.name(i)))
        row = index.rows[i]
        shard, size = int(row["shard"]), int(row["size"])
        fd = self._open.get(shard)
        if fd is None:
            fd = self._open[shard] = os.open(os.path.join(index.root, index.shards[shard]), os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, size, int(row["offset"]))
        if len(data) != size:
            raise OSError(f"shard {index.shards[shard]} ends inside this sample ({len(data)} of {size} bytes)")
        return data

    def __getstate__(self):
        return {"index": self.index, "_open": {}}  # descriptors stay with the process that opened them


def open_image(data: bytes) -> Image.Image:
    """Parse the header only; decoding (and its errors) come later, at draft/convert/resize."""
    return Image.open(io.BytesIO(data))


def make_copies(img: Image.Image, preset: TrainPreset, copies: int, rng: np.random.Generator,
                only: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode `img` once and make `copies` uint8 HWC arrays; returns (copies, lighting [M, 3]).
    only=c: copy c alone (data.copies_on=ranks), from the same draws and the same decode scale
    as all M (decode_once draws all of them), so its pixels are those of BA's copy c."""
    img, fx, fy, draws = decode_once(img, preset, copies, rng)
    if only is not None:
        draws = draws[only:only + 1]
    out = (preset.size, preset.size)
    copies = []
    for (l, t, r, b), flip, _ in draws:
        crop = img.resize(out, Image.BILINEAR, box=(l * fx, t * fy, r * fx, b * fy))
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        copies.append(np.asarray(crop))
    return copies, np.stack([d[2] for d in draws])


class BATrainSet(torch.utils.data.Dataset):
    """Item (file index, epoch, replacements) -> one decoded image's M copies.

    A file that cannot be read or decoded is replaced by the next of `replacements` (files of the
    same shard, fixed by the sampler, so the replacement is deterministic); the failed path is
    returned for the main process to log once and count.
    With `canvas` (augment.where: device) an item is the one decoded image (long side <= canvas
    px) with its M crop boxes instead of M crops; the training step crops on the device.
    """

    def __init__(self, index: FileIndex, copies: int, preset: TrainPreset, seed: int, canvas: int | None = None):
        self.index, self.copies, self.preset, self.seed = index, copies, preset, seed
        self.canvas, self.reader = canvas, SampleReader(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, keys: list) -> list[dict]:
        """A batch's items: the files read first, in the order they lie in (sequential reads in
        a packed folder's shards), then decoded in the batch's order."""
        first = {}
        for k in sorted(range(len(keys)), key=lambda k: self.reader.position(keys[k][0])):
            try:
                first[k] = self.reader.read(keys[k][0])
            except OSError as err:
                first[k] = err
        return [self.item(key, first[k]) for k, key in enumerate(keys)]

    def __getitem__(self, key):
        return self.item(key)

    def item(self, key, first: bytes | OSError | None = None) -> dict:
        """key: (file, epoch, replacements) -> its M copies; (file, epoch, replacements, copy) ->
        that one copy (data.copies_on=ranks). first: the file's bytes (or the error reading it),
        where read already."""
        i, epoch, replacements = key[:3]
        only = key[3] if len(key) > 3 else None
        bad, files, nbytes = [], 0, 0
        for j in (i, *replacements):
            files += 1
            try:
                data = self.reader.read(j) if j != i or first is None else first
                if isinstance(data, OSError):
                    raise data
                nbytes += len(data)
                img = open_image(data)
                rng = image_rng(self.seed, epoch, j)
                if self.canvas:
                    item = canvas_copies(img, self.preset, self.copies, rng, self.canvas)
                else:
                    copies, lighting = make_copies(img, self.preset, self.copies, rng, only)
                    item = {"copies": copies, "lighting": lighting, "of": self.copies,
                            "copy_ids": [only] if only is not None else list(range(self.copies))}
            except Exception as err:  # PIL raises many types for broken files
                bad.append(f"{self.index.where(j)} ({type(err).__name__}: {err})")
                continue
            # a broken file is counted (and logged) once, by the item that carries its copy 0
            bad = bad if only in (None, 0) else []
            return {**item, "label": int(self.index.labels[j]), "index": j, "files": files, "bytes": nbytes, "bad": bad}
        raise RuntimeError(f"{len(bad)} files in a row could not be decoded: " + "; ".join(bad))


class BACollate:
    """Stack B items of M copies into one batch of M*B samples in the chosen layout.

    copy-major: sample k*B + b is copy k of image b (each group of B holds B distinct images, the
    layout of the paper's ghost-BN runs); sample-major: the M copies of an image are adjacent.
    Items made for device augmentation (a "canvas" each) give "canvas", "boxes", "owner" and
    "flips" (data/copies_on_device.py) in place of "images".
    """

    def __init__(self, layout: str = "copy-major"):
        if layout not in ("copy-major", "sample-major"):
            raise ValueError(f"config key 'data.layout': unknown layout {layout!r}")
        self.copy_major = layout == "copy-major"

    def __call__(self, items):
        b, m = len(items), len(items[0]["lighting"])
        lighting = torch.from_numpy(np.stack([it["lighting"] for it in items]))  # [B, M, 3]
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        if "canvas" in items[0]:
            side = (max(it["canvas"].shape[0] for it in items), max(it["canvas"].shape[1] for it in items))
            pixels = collate_canvases(items, self.copy_major, _batch_tensor((b, *side, 3), torch.uint8, zero=True))
        else:
            # Each copy is written once, straight into the batch tensor (in shared memory when in a
            # worker, as torch's default_collate does), instead of stacking and permuting copies.
            images = _batch_tensor((m * b, *items[0]["copies"][0].shape), torch.uint8)
            for i, it in enumerate(items):
                for k, array in enumerate(it["copies"]):
                    images[k * b + i if self.copy_major else i * m + k].numpy()[:] = array
            pixels = {"images": images}
        if self.copy_major:
            lighting = lighting.transpose(0, 1).reshape(m * b, 3)
            labels = labels.repeat(m)
        else:
            lighting = lighting.reshape(b * m, 3)
            labels = labels.repeat_interleave(m)
        # which (file, copy) each sample is, in the batch's order; its share of the unique images
        # (a one-copy item of M is 1/M: data.copies_on=ranks spreads an image over M items)
        ids = [[(it["index"], c) for c in it.get("copy_ids", range(m))] for it in items]
        order = [ids[i][k] for k in range(m) for i in range(b)] if self.copy_major else [p for one in ids for p in one]
        unique = round(sum(len(one) / it.get("of", len(one)) for one, it in zip(ids, items)))
        return {
            **pixels,
            "labels": labels,
            "lighting": lighting,
            "samples": torch.tensor(order, dtype=torch.long),  # [M*B, 2]: file, copy
            "unique": unique,
            "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "files": sum(it["files"] for it in items),
            "bytes": sum(it["bytes"] for it in items),
            "bad": [p for it in items for p in it["bad"]],
        }


def _batch_tensor(shape: tuple, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
    if torch.utils.data.get_worker_info() is None:
        return (torch.zeros if zero else torch.empty)(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    out = torch.empty(0, dtype=dtype).new(storage).view(shape)
    return out.zero_() if zero else out
