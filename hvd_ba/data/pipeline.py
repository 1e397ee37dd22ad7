"""BA data pipeline: per-rank shards, decode each image once, M augmented copies made locally.

Nothing here imports Horovod or mpi4py: loader workers (forkserver/spawn) import this module,
and MPI must not be initialised in them (horovod-pitfalls.md). Rank and world size come in as
plain integers.

Copies leave the workers as uint8 tensors; conversion to float and normalisation happen in the
training step (hvd_ba.engine), where a GPU can do them.
"""
from __future__ import annotations

import functools
import io
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
WATCHDOG_PERIOD_S = 2.0


@dataclass(frozen=True)
class FileIndex:
    """The files of one split: paths relative to the split folder, labels, class names."""

    root: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def scan_split(root: str | Path, split: str) -> FileIndex:
    """Index root/split/<class>/<image> in sorted order (class index = position of the folder)."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"data directory '{folder}' does not exist")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"data directory '{folder}' has no class folders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        names = sorted(e.name for e in os.scandir(folder / name)
                       if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        paths.extend(f"{name}/{n}" for n in names)
        labels.extend([label] * len(names))
    if not paths:
        raise FileNotFoundError(f"data directory '{folder}' has no images")
    return FileIndex(str(folder), tuple(paths), tuple(labels), tuple(classes))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one image in one epoch: independent of ranks, workers and order."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


def decode(path: str, draft_side: int | None) -> tuple[Image.Image, int]:
    """Read and decode one image once; returns (RGB image, bytes read).

    With `draft_side`, JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) whose sides stay
    >= draft_side, which is several times cheaper than a full decode of a large photo.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        img = Image.open(io.BytesIO(data))
        if draft_side is not None and img.format == "JPEG":
            img.draft("RGB", (draft_side, draft_side))
        img = img.convert("RGB")
    except Exception as err:  # PIL raises several types for broken files
        raise ValueError(f"cannot decode image '{path}': {err}") from None
    return img, len(data)


def train_transform(size: int, scale, ratio, hflip: float) -> T.Compose:
    """One copy's augmentation (ResNet-50 preset: RandomResizedCrop 224, 8-100%, 3/4-4/3, flip)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
        T.RandomHorizontalFlip(hflip),
        T.PILToTensor(),
    ])


def eval_transform(resize: int, crop: int) -> T.Compose:
    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(crop), T.PILToTensor()])


class BATrainSet(torch.utils.data.Dataset):
    """Item (file index, epoch) -> (M augmented uint8 copies [M, 3, H, W], label, bytes read, index).

    The image is read and decoded once; the M copies are M independent draws of the transform
    from a generator seeded by (seed, epoch, index), so any worker count gives the same samples.
    """

    def __init__(self, index: FileIndex, copies: int, transform, seed: int, draft_side: int | None = None):
        self.index, self.copies, self.transform = index, copies, transform
        self.seed, self.draft_side = seed, draft_side

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]):
        i, epoch = key
        img, nbytes = decode(os.path.join(self.index.root, self.index.paths[i]), self.draft_side)
        # torchvision's transforms draw from the global torch RNG; seed it per image, restore after.
        state = torch.random.get_rng_state()
        torch.manual_seed(sample_seed(self.seed, epoch, i))
        try:
            copies = torch.stack([self.transform(img) for _ in range(self.copies)])
        finally:
            torch.random.set_rng_state(state)
        return copies, self.index.labels[i], nbytes, i


class EvalSet(torch.utils.data.Dataset):
    def __init__(self, index: FileIndex, transform, draft_side: int | None = None):
        self.index, self.transform, self.draft_side = index, transform, draft_side

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        img, nbytes = decode(os.path.join(self.index.root, self.index.paths[i]), self.draft_side)
        return self.transform(img), self.index.labels[i], nbytes, i


class BACollate:
    """Stack B items of M copies into one batch of M*B samples in the chosen layout.

    copy-major: sample k*B + b is copy k of image b (each group of B holds B distinct images, the
    layout of the paper's ghost-BN runs); sample-major: the M copies of an image are adjacent.
    """

    def __init__(self, layout: str):
        if layout not in ("copy-major", "sample-major"):
            raise ValueError(f"config key 'data.layout': unknown layout {layout!r}")
        self.layout = layout

    def __call__(self, items):
        copies = torch.stack([it[0] for it in items])  # [B, M, 3, H, W]
        labels = torch.tensor([it[1] for it in items], dtype=torch.long)
        b, m = copies.shape[:2]
        if self.layout == "copy-major":
            images = copies.transpose(0, 1).reshape(m * b, *copies.shape[2:])
            labels = labels.repeat(m)
        else:
            images = copies.reshape(b * m, *copies.shape[2:])
            labels = labels.repeat_interleave(m)
        return {
            "images": images,
            "labels": labels,
            "bytes": sum(it[2] for it in items),
            "indices": torch.tensor([it[3] for it in items], dtype=torch.long),
        }


def eval_collate(items):
    return {
        "images": torch.stack([it[0] for it in items]),
        "labels": torch.tensor([it[1] for it in items], dtype=torch.long),
        "bytes": sum(it[2] for it in items),
        "indices": torch.tensor([it[3] for it in items], dtype=torch.long),
    }


class GlobalShardSampler(torch.utils.data.Sampler):
    """Each epoch, a permutation seeded by (seed, epoch) is cut into `world` equal parts.

    Rank r reads only part r. Every rank must take the same number of steps or an allreduce
    would hang, so the n % world files left over by the cut, and the per-rank remainder that
    does not fill a batch, are skipped this epoch; the permutation changes every epoch, so
    different files are skipped each time. Yields batches of (file index, epoch).
    """

    def __init__(self, num_files: int, rank: int, world: int, unique_batch: int, seed: int,
                 max_steps: int | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.num_files, self.rank, self.world = num_files, rank, world
        self.unique_batch, self.seed, self.max_steps = unique_batch, seed, max_steps
        self.epoch = 0
        per_rank = num_files // world
        self.steps = per_rank // unique_batch
        if max_steps is not None:
            self.steps = min(self.steps, max_steps)
        if self.steps == 0:
            raise ValueError(
                f"{num_files} training files over {world} ranks give fewer than one batch of "
                f"data.unique_batch {unique_batch} per rank"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        perm = torch.randperm(self.num_files, generator=g)
        per_rank = self.num_files // self.world
        return perm[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        mine = self.shard(self.epoch)
        b = self.unique_batch
        for s in range(self.steps):
            yield [(i, self.epoch) for i in mine[s * b:(s + 1) * b]]


def make_train_loader(index: FileIndex, cfg, rank: int, world: int) -> torch.utils.data.DataLoader:
    d, a = cfg.data, cfg.augment
    dataset = BATrainSet(index, d.copies, train_transform(a.size, a.scale, a.ratio, a.hflip),
                         cfg.run.seed, a.decode_short_side)
    sampler = GlobalShardSampler(len(index), rank, world, d.unique_batch, cfg.run.seed, cfg.run.max_steps_per_epoch)
    return _loader(dataset, sampler, BACollate(d.layout), d)


def make_eval_loader(index: FileIndex, cfg, rank: int, world: int) -> torch.utils.data.DataLoader:
    """Rank r evaluates files r, r + world, ...: every file exactly once over all ranks."""
    d, a = cfg.data, cfg.augment
    draft = a.eval_resize if a.decode_short_side is not None else None
    dataset = EvalSet(index, eval_transform(a.eval_resize, a.eval_crop), draft)
    mine = list(range(rank, len(index), world))
    batches = [mine[i:i + d.eval_batch] for i in range(0, len(mine), d.eval_batch)]
    return _loader(dataset, batches, eval_collate, d)


def _watch_rank(rank_pid: int, worker_id: int) -> None:
    """Worker init: exit when the rank process is gone.

    Under forkserver the worker's parent is the fork server, not the rank, so PyTorch's own
    parent check never fires; an orphaned worker would keep the launcher's output pipe open and
    hang horovodrun after a rank dies.
    """
    def loop():
        while True:
            time.sleep(WATCHDOG_PERIOD_S)
            try:
                os.kill(rank_pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=loop, name="rank-watchdog", daemon=True).start()


def _loader(dataset, batch_sampler, collate, d) -> torch.utils.data.DataLoader:
    workers = d.workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=workers,
        worker_init_fn=functools.partial(_watch_rank, os.getpid()) if workers else None,
        multiprocessing_context=d.worker_start if workers else None,
        persistent_workers=workers > 0,
        prefetch_factor=d.prefetch if workers else None,
        pin_memory=torch.cuda.is_available(),
    )
