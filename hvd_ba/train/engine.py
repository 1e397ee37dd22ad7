"""The training and evaluation loops: free functions over one TrainState."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
try:
    from tqdm import tqdm
except ImportError:  # a GPU machine with only torch (cluster/gpu_check.sh): plain log lines
    tqdm = None

from hvd_ba import dist
from hvd_ba.data import model_input
from hvd_ba.models import ghost_chunks
from hvd_ba.train.lr_schedule import config_lr

log = logging.getLogger("hvd_ba")


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    mean: torch.Tensor  # [1, 3, 1, 1], on device
    std: torch.Tensor
    peak_lr: float
    steps_per_epoch: int
    epochs: int = 0  # optim.epochs: what the progress lines' time left counts to (0: not said)
    step: int = 0  # optimizer steps taken so far (global step)
    epoch: int = 0
    forward_chunks: int = 1  # forward/backward passes per step (ghost_impl=accumulate: samples / ghost_size)
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: fp32
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    channels_last: bool = False
    # The first step whose loss was not finite on this rank (-1: none), kept on the device and
    # read only when the ranks agree (StepHooks): no host synchronisation per step.
    bad_step: torch.Tensor | None = None
    reads: dict = field(default_factory=dict)  # epoch -> file indices read by this rank (run.record_reads)
    bad_files: set = field(default_factory=set)  # paths this rank could not decode (logged once each)
    progress: "EpochProgress | None" = None  # the running epoch's sums (carried by mid-epoch checkpoints)
    watchdog: object = None  # hvd_ba.train.stop.Watchdog: told of every step's progress
    run_id: str | None = None
    plan: dict | None = None  # train/resume.py: run_plan: what the data order and LR depend on
    legacy_checkpoints: bool = False  # resumed from a checkpoint without run id: prune those too


def normalize(batch: dict, state: TrainState) -> torch.Tensor:
    """The batch as the model's input on the training device (data/model_input.py)."""
    return model_input.normalize(batch, state.device, state.mean, state.std, state.channels_last)


class Meter:
    """Sums of per-batch figures on this rank; `reduce` sums them over all ranks.

    Counts the host knows (samples, files, bytes) are added on the host; losses and correct
    counts stay on the training device (`add_device`) and are read at the epoch's end or a
    checkpoint only, so that a step never waits for the GPU to report them."""

    KEYS = ("loss_sum", "correct", "samples", "images", "files", "bytes", "bad", "correct5")
    DEVICE_KEYS = ("loss_sum", "correct", "correct5")

    def __init__(self, device: torch.device | None = None):
        self.host = torch.zeros(len(self.KEYS), dtype=torch.float64)
        self.on_device = torch.zeros(len(self.DEVICE_KEYS), dtype=torch.float64, device=device or "cpu")

    def add(self, **values) -> None:
        for k, v in values.items():
            self.host[self.KEYS.index(k)] += float(v)

    def add_device(self, *values: torch.Tensor) -> None:
        """loss_sum, correct (and correct5) of a batch, as device tensors."""
        self.on_device[:len(values)] += torch.stack([v.to(torch.float64) for v in values])

    @property
    def totals(self) -> torch.Tensor:
        """Every sum on the host (reads the device sums: a synchronisation)."""
        totals = self.host.clone()
        on_host = self.on_device.cpu()  # one transfer for all device sums
        for i, k in enumerate(self.DEVICE_KEYS):
            totals[self.KEYS.index(k)] += on_host[i]
        return totals

    @totals.setter
    def totals(self, values: torch.Tensor) -> None:
        self.host = values.clone().to(torch.float64)
        self.on_device.zero_()

    def reduce(self, name: str) -> dict:
        totals = dist.allreduce_sum(self.totals, name=name)
        return dict(zip(self.KEYS, totals.tolist()))


class EpochProgress:
    """The running epoch's sums on this rank (Meter), its data-wait and wall seconds; a
    checkpoint in the middle of an epoch carries them, so a resumed epoch's metrics cover the
    whole epoch, not only the steps after the resume."""

    def __init__(self, record: dict | None = None, device: torch.device | None = None):
        self.meter, self.data_time, self.before_s = Meter(device), 0.0, 0.0
        if record:
            self.meter.totals = torch.tensor(record["totals"], dtype=torch.float64)
            self.data_time, self.before_s = record["data_time"], record["elapsed"]
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.before_s + time.perf_counter() - self.t0

    def to_record(self) -> dict:
        return {"totals": self.meter.totals.tolist(), "data_time": self.data_time, "elapsed": self.elapsed()}

    @staticmethod
    def merge(records: list[dict]) -> dict:
        """Several ranks' records as one (a resume on another number of ranks: all on rank 0)."""
        return {"totals": [sum(column) for column in zip(*(r["totals"] for r in records))],
                "data_time": max(r["data_time"] for r in records), "elapsed": max(r["elapsed"] for r in records)}


def lr_at(step: int, state: TrainState, o) -> float:
    return config_lr(step, state.steps_per_epoch, state.peak_lr, o)


def train_step(state: TrainState, batch: dict, lr: float, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch; returns (mean loss over the rank's samples, correct) as
    0-d tensors on the training device (reading them is the caller's choice: a synchronisation).

    The loss is the plain mean cross-entropy over all M*B samples of this rank (the paper's BA
    loss); the backend averages the gradients over ranks (Horovod's DistributedOptimizer, or DDP
    in the backward). With model.ghost_impl=accumulate the batch goes through in
    `state.forward_chunks` forward/backward passes of ghost_size samples each (the authors' way,
    for memory), each loss scaled by 1/chunks, and one allreduce follows the last (Horovod's
    backward_passes_per_step = chunks; DDP's no_sync for the others: dist.accumulating).
    """
    opt = state.optimizer
    for group in opt.param_groups:
        group["lr"] = lr
    x = normalize(batch, state)
    labels = batch["labels"].to(state.device, non_blocking=True)
    chunks = state.forward_chunks
    opt.zero_grad()
    loss_sum = torch.zeros((), device=state.device)
    correct = torch.zeros((), dtype=torch.long, device=state.device)
    for i, (xc, yc) in enumerate(ghost_chunks(x, labels, chunks)):
        with dist.accumulating(state.model, last=i == chunks - 1):
            with torch.autocast(state.device.type, dtype=state.amp_dtype, enabled=state.amp_dtype is not None):
                logits = state.model(xc)
            loss = F.cross_entropy(logits.float(), yc, label_smoothing=cfg.optim.label_smoothing)
            loss_to_backward = loss / chunks
            (state.scaler.scale(loss_to_backward) if state.scaler else loss_to_backward).backward()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(1) == yc).sum()
    dist.optimizer_step(opt, state.scaler)
    state.step += 1
    return loss_sum / chunks, correct


def _waiting_for(loader, state: TrainState, step_in_epoch: int):
    """What the rank waits for while its loader makes the batch of `step_in_epoch` (for the
    watchdog's message; computed only when it fires)."""
    def describe() -> str:
        sampler, b = loader.batch_sampler, loader.batch_sampler.unique_batch
        files = sampler.shard(state.epoch)[step_in_epoch * b:(step_in_epoch + 1) * b]
        dataset = loader.dataset
        names = [dataset.index.where(i) for i in files[:3]]
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        return (f"its data loader (the batch of step {step_in_epoch + 1} of epoch {state.epoch + 1}: "
                f"{', '.join(names)}{more})")
    return describe


def train_one_epoch(state: TrainState, loader, cfg, step_log=None, on_step=None, start_step: int = 0,
                    partial: dict | None = None, reads_log=None) -> dict:
    """One epoch of BA training (from `start_step` when resumed mid-epoch, with that epoch's
    `partial` sums so far); returns figures summed over all ranks. `on_step(step_in_epoch)` runs
    after every step on every rank; when it returns True, the epoch ends there (an agreed stop)
    and the result has stopped=True. `reads_log(record)` (run.record_reads) gets each step's
    files of every rank (an allgather per step: for tests)."""
    loop = _EpochLoop(state, loader, cfg, start_step, partial)
    lr, stopped = lr_at(state.step, state, cfg.optim), False
    for step_in_epoch, batch in loop.fetch():
        lr = lr_at(state.step, state, cfg.optim)
        loss = loop.step(batch, lr)
        loop.hooks(step_in_epoch, batch, loss, lr, step_log, reads_log)
        if on_step is not None and on_step(step_in_epoch):
            stopped = True
            break
    loop.close()
    return {**_epoch_figures(loop.progress), "lr": lr, "stopped": stopped}


class _EpochLoop:
    """The parts of one epoch's loop: fetch (the loader's batches, each wait timed as data wait and
    told to the watchdog), step (the optimizer step and its sums), hooks (the record of reads, the
    bar, the log line); close tells the watchdog of the epoch's end."""

    def __init__(self, state: TrainState, loader, cfg, start_step: int, partial: dict | None):
        self.state, self.loader, self.cfg, self.start_step = state, loader, cfg, start_step
        state.model.train()
        loader.batch_sampler.set_epoch(state.epoch)
        loader.batch_sampler.start = start_step
        self.bad_this_epoch = set()
        state.progress = self.progress = EpochProgress(partial, state.device)
        if state.bad_step is None:
            state.bad_step = torch.full((), -1, dtype=torch.long, device=state.device)
        self.reads = state.reads.setdefault(state.epoch, []) if cfg.run.record_reads else None
        self.steps = loader.batch_sampler.steps
        self.bar = _progress_bar(state, self.steps, start_step)
        self.watchdog = state.watchdog

    def fetch(self):
        """(step in epoch, batch) of each step; the waits for them are data time, watched."""
        t_wait = time.perf_counter()
        self._tick(_waiting_for(self.loader, self.state, self.start_step))
        for i, batch in enumerate(self.loader):
            step_in_epoch = self.start_step + i + 1
            self.progress.data_time += time.perf_counter() - t_wait
            yield step_in_epoch, batch
            if step_in_epoch < self.steps:
                self._tick(_waiting_for(self.loader, self.state, step_in_epoch))
            t_wait = time.perf_counter()

    def step(self, batch: dict, lr: float) -> torch.Tensor:
        """The step on `batch` (forward, backward, allreduce), its sums counted; its loss."""
        state = self.state
        self._tick(f"step {state.step + 1} to finish (forward, backward, allreduce with the other ranks)", peers=True)
        loss, correct = train_step(state, batch, lr, self.cfg)
        state.bad_step = torch.where((state.bad_step < 0) & ~torch.isfinite(loss), state.step, state.bad_step)
        _count_batch(state, batch, loss, correct, self.bad_this_epoch)
        return loss

    def hooks(self, step_in_epoch: int, batch: dict, loss, lr: float, step_log, reads_log) -> None:
        """After a step: the record of each rank's reads (run.record_reads), the bar, rank 0's log line."""
        state = self.state
        if self.reads is not None:
            self.reads.extend(batch["indices"].tolist())
            every = dist.allgather_object(batch["indices"].tolist(), name="reads")
            if reads_log is not None:
                reads_log({"step": state.step, "epoch": state.epoch, "world": dist.size(), "files": every})
        if self.bar is not None:
            self.bar.update(1)
        if dist.is_primary() and (step_in_epoch % self.cfg.run.log_every == 0 or step_in_epoch == self.steps):
            _log_progress(state, step_in_epoch, self.steps, loss, lr, self.bar, step_log)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._tick(f"the end of epoch {self.state.epoch + 1} (sums over the ranks)", peers=True)

    def _tick(self, waiting_for, peers: bool = False) -> None:
        if self.watchdog is not None:
            self.watchdog.tick(waiting_for, peers=peers)


def _progress_bar(state: TrainState, steps: int, start_step: int):
    """Rank 0's tqdm bar when its output is a terminal; None in files (Slurm logs get log lines)."""
    if dist.is_primary() and sys.stdout.isatty() and tqdm is not None:
        return tqdm(total=steps, initial=start_step, desc=f"epoch {state.epoch + 1}", unit="step", dynamic_ncols=True,
                    leave=False)
    return None


def _count_batch(state: TrainState, batch: dict, loss, correct, bad_this_epoch: set) -> None:
    """The step's sums (on the device: no synchronisation) and its unreadable files, each counted
    once per epoch and logged once per run."""
    meter = state.progress.meter
    n = batch["labels"].numel()
    meter.add_device(loss * n, correct)
    meter.add(samples=n, images=batch["unique"], files=batch["files"], bytes=batch["bytes"])
    for entry in batch["bad"]:  # a broken file can be tried more than once (as a replacement too)
        if entry not in bad_this_epoch:
            bad_this_epoch.add(entry)
            meter.add(bad=1)
        if entry not in state.bad_files:
            state.bad_files.add(entry)
            log.warning("rank %d: skipped unreadable image %s; a file of the same shard replaces it",
                        dist.rank(), entry)


def _log_progress(state: TrainState, step_in_epoch: int, steps: int, loss, lr: float, bar, step_log) -> None:
    """Rank 0: the bar's figures or a log line, and the record of steps.jsonl."""
    progress, meter = state.progress, state.progress.meter
    loss_value = float(loss)  # the one read of the device per log line
    elapsed = progress.elapsed()
    images_per_s, samples_per_s = float(meter.host[3]) / elapsed, float(meter.host[2]) / elapsed
    if bar is not None:
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.4f}", img_s=f"{images_per_s:.0f}",
                        samples_s=f"{samples_per_s:.0f}")
    else:
        log.info("epoch %d step %d/%d loss %.4f lr %.4f | %.1f unique img/s/rank, %.1f samples/s/rank, "
                 "data wait %.0f%%%s", state.epoch + 1, step_in_epoch, steps, loss_value, lr, images_per_s,
                 samples_per_s, 100 * progress.data_time / elapsed, _time_left(state, step_in_epoch, steps, elapsed))
    if step_log is not None:
        step_log({"step": state.step, "epoch": state.epoch, "loss": loss_value, "lr": lr,
                  "unique_images_per_s_rank0": images_per_s, "samples_per_s_rank0": samples_per_s})


def _time_left(state: TrainState, step_in_epoch: int, steps: int, elapsed: float) -> str:
    """', about 4 min left': the run's remaining training steps at this epoch's mean step time
    (evaluations not counted); empty where the epochs are not known."""
    if not state.epochs or step_in_epoch <= 0:
        return ""
    left = (steps - step_in_epoch + (state.epochs - state.epoch - 1) * steps) * elapsed / step_in_epoch
    if left < 90:
        return f", about {left:.0f} s left"
    return f", about {left / 60:.0f} min left" if left < 5400 else f", about {left / 3600:.1f} h left"


def _epoch_figures(progress: EpochProgress) -> dict:
    """Collective: the epoch's sums over all ranks, and each rank's reads."""
    elapsed = progress.elapsed()
    meter = progress.meter
    sums = meter.reduce("train_meter")
    # Per-rank I/O of this epoch: what proves that BA adds no reads (files and bytes per rank).
    io_per_rank = dist.allgather_object((int(meter.host[4]), int(meter.host[5])), name="io")
    return {
        "train_loss": sums["loss_sum"] / sums["samples"],
        "train_top1": 100.0 * sums["correct"] / sums["samples"],
        "unique_images": int(sums["images"]),
        "samples": int(sums["samples"]),
        "files_read": int(sums["files"]),
        "bytes_read": int(sums["bytes"]),
        "files_read_per_rank": [f for f, _ in io_per_rank],
        "bytes_read_per_rank": [b for _, b in io_per_rank],
        "bad_files": int(sums["bad"]),
        "epoch_time_s": elapsed,
        "unique_images_per_s": sums["images"] / elapsed,
        "samples_per_s": sums["samples"] / elapsed,
        "data_wait_fraction": progress.data_time / elapsed,
    }


@torch.no_grad()
def average_bn_statistics(model: torch.nn.Module) -> None:
    """Average BN running statistics over ranks, so that every rank evaluates (and saves) one model.

    Ghost BN *training* statistics stay rank-local; only the running averages used at inference,
    which each rank accumulated from its own shard, are made equal here.
    """
    buffers = [b for module in model.modules()
               if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
               for b in (module.running_mean, module.running_var)]
    if not buffers:
        return
    # One grouped (fused) allreduce of all of them, not two blocking ones per BN layer (106 for
    # ResNet-50 at every evaluation and checkpoint).
    for buffer, mean in zip(buffers, dist.grouped_allreduce_average(buffers, name="bn_stats")):
        buffer.copy_(mean)


@torch.no_grad()
def evaluate(state: TrainState, loader) -> dict:
    """Exact top-1 over the whole split: every file is evaluated once by exactly one rank,
    all ranks with the same model (BN running statistics averaged first)."""
    average_bn_statistics(state.model)
    state.model.eval()
    meter = Meter(state.device)
    if state.watchdog is not None:
        state.watchdog.tick(f"evaluation batch 1 of {len(loader)} (its data loader)")
    for i, batch in enumerate(loader):
        if state.watchdog is not None:
            state.watchdog.tick(f"evaluation batch {i + 2} of {len(loader)} (its data loader or the forward pass)")
        labels = batch["labels"].to(state.device, non_blocking=True)
        x = normalize(batch, state)
        with torch.autocast(state.device.type, dtype=state.amp_dtype, enabled=state.amp_dtype is not None):
            logits = state.model(x)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        meter.add_device(loss, (top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(1).sum())
        meter.add(samples=labels.numel(), images=labels.numel(), files=batch["files"], bytes=batch["bytes"])
    sums = meter.reduce("eval_meter")
    return {"val_loss": sums["loss_sum"] / sums["samples"], "val_top1": 100.0 * sums["correct"] / sums["samples"],
            "val_top5": 100.0 * sums["correct5"] / sums["samples"], "val_correct": int(sums["correct"]),
            "val_images": int(sums["samples"])}
