"""BA data pipeline: per-rank shards (ShardSampler) and the loaders that feed a rank; the M copies
of each image are made by data/copies.py.

Nothing here imports Horovod or mpi4py: loader workers (forkserver/spawn) import this module,
and MPI must not be initialised in them (README, "Choices, and why": loader workers). Rank and world size come in as
plain integers.

A training batch is a dict: images uint8 [M*B, H, W, 3] (HWC, as decoded; the training step
permutes, converts and normalises), labels [M*B], lighting [M*B, 3] (RGB offsets on [0, 1]),
indices [B] (file indices), files (files opened), bytes (bytes read), bad (paths that failed).
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
import time

import numpy as np
import torch

from hvd_ba.cluster import loader_split, pid_alive, usable_cores
from hvd_ba.config import ConfigError, steps_per_epoch
from hvd_ba.data.augment import TrainPreset, eval_image
from hvd_ba.data.copies import REPLACEMENT_TRIES, BACollate, BATrainSet, SampleReader, open_image
from hvd_ba.data.manifest import FileIndex
from hvd_ba.data.shards import index_parts

WATCHDOG_PERIOD_S = 2.0


class EvalSet(torch.utils.data.Dataset):
    def __init__(self, index: FileIndex, resize: int, crop: int):
        self.index, self.resize, self.crop, self.reader = index, resize, crop, SampleReader(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        data = self.reader.read(i)
        try:
            image = eval_image(open_image(data), self.resize, self.crop)
        except Exception as err:
            # Evaluation must be exact: a broken validation file is an error, not a skip.
            raise ValueError(f"cannot decode validation image '{self.index.where(i)}': {err}") from None
        return {"copies": [image], "lighting": np.zeros((1, 3), np.float32), "label": int(self.index.labels[i]),
                "index": i, "files": 1, "bytes": len(data), "bad": []}


def _generator(*words: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(words)).generate_state(1)[0]))


class ShardSampler(torch.utils.data.Sampler):
    """Which files rank r reads, in which order; yields batches of (file index, epoch, replacements).

    global: each epoch a permutation seeded by (seed, epoch) is read in global batches of
        world x unique_batch files, global step s taking positions [s*G, (s+1)*G) and rank r the
        r-th block of B of them; the files of a global step depend on (seed, epoch, G) only, not
        on how G is split, so a run resumed on another number of ranks with the same global batch
        reads the same files at every step. Over the run every rank sees the whole set.
    static: one permutation seeded by `seed` is cut once; rank r owns part r for the whole run
        (the part a node stages to local disk) and shuffles it each epoch by (seed, epoch, r).
        Over a packed folder `parts` gives each rank's part instead (whole shards, data/shards.py
        shard_parts); parts differ in size, so each epoch a rank reads the first `per_rank` files
        (the smallest part's size) of its shuffled part.
    Every rank must take the same number of steps or an allreduce would hang: the n % world files
    left over by the cut, and the per-rank remainder that does not fill a batch, are skipped. In
    global mode the permutation changes every epoch, so different files are skipped each time; in
    static mode the n % world leftover files are never read (at most world - 1 files).
    """

    def __init__(self, num_files: int, rank: int, world: int, unique_batch: int, seed: int,
                 mode: str = "global", max_steps: int | None = None, copies: int = 1, copies_on: str = "rank",
                 parts: list | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        if mode not in ("global", "static"):
            raise ValueError(f"config key 'data.shard': unknown mode {mode!r}")
        if copies_on not in ("rank", "ranks") or (copies_on == "ranks" and mode != "global"):
            raise ValueError(f"config key 'data.copies_on': {copies_on!r} with data.shard {mode!r}")
        self.num_files, self.rank, self.world, self.mode = num_files, rank, world, mode
        self.copies, self.copies_on = copies, copies_on
        self.unique_batch, self.seed = unique_batch, seed
        self.epoch = 0
        self.start = 0  # first step of the epoch to yield (a run resumed mid-epoch)
        if parts is not None and (mode != "static" or len(parts) != world):
            raise ValueError(f"parts: one per rank ({world}), static mode only")
        self.parts = parts
        self.per_rank = num_files // world if parts is None else min(len(part) for part in parts)
        self.steps = steps_per_epoch(num_files, world, unique_batch, max_steps, self.per_rank)
        if self.steps == 0:
            raise ConfigError(
                f"config key 'data.path': its {num_files} training files over {world} rank{'s' * (world != 1)} "
                f"give fewer than one batch of data.unique_batch {unique_batch} per rank (lower data.unique_batch, "
                "or use fewer ranks)"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, epoch: int, rank: int | None = None) -> list[int]:
        """This rank's (or `rank`'s) files for `epoch`, in reading order."""
        r, n, per = self.rank if rank is None else rank, self.num_files, self.per_rank
        if self.mode == "global":
            perm = torch.randperm(n, generator=_generator(self.seed, epoch))
            b, w, steps = self.unique_batch, self.world, self.per_rank // self.unique_batch
            full = perm[:steps * b * w].view(steps, w, b)[:, r].reshape(-1)  # rank r's block of each global batch
            tail = per - steps * b  # files that fill no global batch: split evenly, never read
            rest = perm[steps * b * w:w * per][r * tail:(r + 1) * tail]
            return torch.cat([full, rest]).tolist()
        owned = torch.tensor(self.owned(r))
        return owned[torch.randperm(len(owned), generator=_generator(self.seed, epoch, r))[:per]].tolist()

    def owned(self, rank: int | None = None) -> list[int]:
        """static mode: the files this rank (or `rank`) reads over the whole run (what `stage` copies)."""
        if self.mode != "static":
            raise ValueError("only static shards own a fixed set of files; set data.shard=static")
        r, per = self.rank if rank is None else rank, self.per_rank
        if self.parts is not None:
            return [int(i) for i in self.parts[r]]
        return torch.randperm(self.num_files, generator=_generator(self.seed))[r * per:(r + 1) * per].tolist()

    def __len__(self) -> int:
        return self.steps - self.start

    def repeated_batches(self):
        """data.copies_on=ranks (repeated augmentation): global step s reads the same W x B files
        as BA (image j of the step is the file BA's rank j // B reads at place j % B), but as
        M x G items of one copy each: item k = copy c x G + image j, rank r taking items
        [r*M*B, (r+1)*M*B), so the M copies of an image land on M different ranks (where
        M <= W) and every rank reads and decodes what it copies. Yields (file, epoch,
        replacements, copy); a broken file is replaced as under BA (by the next files of its BA
        owner's shard), so both placements make the same samples, broken files included."""
        b, w, m = self.unique_batch, self.world, self.copies
        g = w * b
        shards = [self.shard(self.epoch, owner) for owner in range(w)]  # BA's reading order of each rank
        for s in range(self.start, self.steps):
            items = []
            for k in range(self.rank * m * b, (self.rank + 1) * m * b):
                c, j = divmod(k, g)
                mine, p = shards[j // b], s * b + j % b
                items.append((mine[p], self.epoch, tuple(mine[(p + 1 + t) % len(mine)] for t in range(REPLACEMENT_TRIES)),
                              c))
            yield items

    def __iter__(self):
        if self.copies_on == "ranks":
            yield from self.repeated_batches()
            return
        mine = self.shard(self.epoch)
        b, per = self.unique_batch, len(mine)
        for s in range(self.start, self.steps):
            yield [(mine[p], self.epoch, tuple(mine[(p + 1 + k) % per] for k in range(REPLACEMENT_TRIES)))
                   for p in range(s * b, (s + 1) * b)]


def train_preset(cfg) -> TrainPreset:
    a = cfg.augment
    return TrainPreset(kind=a.kind, size=a.size, scale=tuple(a.scale), ratio=tuple(a.ratio), resize=a.resize,
                       hflip=a.hflip, lighting_std=a.lighting_std)


def make_train_loader(index: FileIndex, cfg, rank: int, world: int) -> torch.utils.data.DataLoader:
    d, a = cfg.data, cfg.augment
    dataset = BATrainSet(index, d.copies, train_preset(cfg), cfg.run.seed, a.canvas if a.where == "device" else None)
    sampler = train_sampler(index, cfg, rank, world)
    return _loader(dataset, sampler, BACollate(d.layout), d)


def train_sampler(index: FileIndex, cfg, rank: int, world: int) -> ShardSampler:
    """The training sampler of a split; static shards over a packed folder own whole shards."""
    d = cfg.data
    parts = index_parts(index, world) if d.shard == "static" and index.shards else None
    return ShardSampler(len(index), rank, world, d.unique_batch, cfg.run.seed, d.shard, cfg.run.max_steps_per_epoch,
                        d.copies, d.copies_on, parts)


def eval_files(num_files: int, rank: int, world: int) -> list[int]:
    """Rank r evaluates files r, r + world, ...: every file exactly once over all ranks."""
    return list(range(rank, num_files, world))


def make_eval_loader(index: FileIndex, cfg, rank: int, world: int) -> torch.utils.data.DataLoader:
    d, a = cfg.data, cfg.augment
    dataset = EvalSet(index, a.eval_resize, a.eval_crop)
    mine = eval_files(len(index), rank, world)
    batches = [mine[i:i + d.eval_batch] for i in range(0, len(mine), d.eval_batch)]
    return _loader(dataset, batches, BACollate(), d)


def _worker_init(rank_pid: int, worker_id: int) -> None:
    """Worker init: ignore the preemption signals, and exit when the rank process is gone.

    Slurm delivers SIGTERM/SIGUSR1 to every process of a task (srun forwards them to the whole
    process tree), workers included. Only the rank decides how to stop (checkpoint, then exit);
    a worker killed by the signal would fail the rank's next batch instead, so workers ignore
    both, and they end with the rank. SIGINT keeps its default. Under forkserver the
    worker's parent is the fork server, not the rank, so PyTorch's own parent check never fires;
    an orphaned worker would keep the launcher's output pipe open and hang horovodrun after a
    rank dies.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)  # discards one that is pending
    # a worker of the fork server was born with both blocked (worker_server.py says why)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGUSR1))
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    def loop():
        while True:
            time.sleep(WATCHDOG_PERIOD_S)
            if not pid_alive(rank_pid):
                os._exit(1)

    threading.Thread(target=loop, name="rank-watchdog", daemon=True).start()


def _kill_workers_at_exit() -> None:
    """Kill (SIGKILL) the loader workers still alive when the rank exits.

    Workers ignore SIGTERM (see _worker_init), and SIGTERM is all that PyTorch's worker shutdown
    and multiprocessing's exit hook send when a worker does not stop by itself, which happens
    when an epoch was left unfinished (a stop, a `break`, an exception) with batches still
    queued: the exit hook would then wait for that worker forever. Registered after
    multiprocessing's own hook, so it runs first (atexit is last in, first out).
    """
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and threading.current_thread() is threading.main_thread():
        # PyTorch's SIGCHLD handler would report each killed worker as an error; we are leaving
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        if child.daemon:  # DataLoader workers are daemonic; multiprocessing would terminate them too
            child.kill()
            child.join(timeout=5)


_exit_hook_registered = False

def release_loader_resources() -> None:
    """For a rank that ends with os._exit (an early exit: no interpreter shutdown): kill the loader
    workers, then run multiprocessing's own first exit phase (the finalizers of priority >= 0:
    queues closed, named semaphores unlinked and unregistered), so that the resource tracker does
    not warn of leaked semaphores after the rank's one line."""
    import multiprocessing.util

    _kill_workers_at_exit()
    multiprocessing.util._run_finalizers(0)


def worker_start_method(setting: str) -> str:
    """data.worker_start; `auto`: forkserver. The loader workers are created once Horovod's
    background thread, Gloo's or MPI's threads and torch's thread pool run in the rank, and a
    fork copies any lock another thread holds at that instant: a CI run had an evaluation worker,
    forked after two training steps, alive but never delivering (the stall watchdog ended the
    rank after 300 s). Fork after MPI/UCX and CUDA initialised is unsafe over some interconnects
    too (horovod #489, pytorch #13787). The fork server is started before any of those threads
    (start_worker_server) and has torch and the data modules imported, so its workers start in
    about as long as forked ones. `fork` is still there to name."""
    return "forkserver" if setting == "auto" else setting


# worker_server first: the server ignores the preemption signals before anything else
WORKER_SERVER_PRELOAD = ["hvd_ba.data.worker_server", "hvd_ba.data.copies", "hvd_ba.data.pipeline"]


def start_worker_server(setting: str) -> None:
    """Start the fork server of the loader workers now (call it before Horovod starts its
    threads, after the rank's CPU mask is set: the server and its workers inherit the mask). It
    imports torch and the data modules in the background while the rank starts up."""
    if worker_start_method(setting) != "forkserver":
        return
    multiprocessing.set_forkserver_preload(WORKER_SERVER_PRELOAD)
    multiprocessing.forkserver.ensure_running()


def _loader(dataset, batch_sampler, collate, d) -> torch.utils.data.DataLoader:
    global _exit_hook_registered
    workers = d.workers
    if workers is None:  # not resolved by the caller: from this process's cores
        workers = loader_split(usable_cores(), 0, None, torch.cuda.is_available())[1]
    if workers and worker_start_method(d.worker_start) == "forkserver":
        # where start_worker_server did not run first (a tool, a test): the same server
        multiprocessing.set_forkserver_preload(WORKER_SERVER_PRELOAD)
    if workers and not _exit_hook_registered:
        atexit.register(_kill_workers_at_exit)
        _exit_hook_registered = True
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=workers,
        worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers else None,
        multiprocessing_context=worker_start_method(d.worker_start) if workers else None,
        persistent_workers=workers > 0,
        prefetch_factor=d.prefetch if workers else None,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: creating an iterator draws the workers' base seed from it, not from
        # the global RNG, whose state a checkpoint restores (dropout draws from it).
        generator=torch.Generator().manual_seed(0),
    )
