"""The training and evaluation loops: free functions over one TrainState."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hvd_ba import dist
from hvd_ba.data.device_augment import unit_pixels
from hvd_ba.schedule import learning_rate

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
    step: int = 0  # optimizer steps taken so far (global step)
    epoch: int = 0
    forward_chunks: int = 1  # forward/backward passes per step (ghost_impl=accumulate: samples / ghost_size)
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: fp32
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    channels_last: bool = False
    last_loss: float = 0.0  # this rank's loss of the last step
    reads: dict = field(default_factory=dict)  # epoch -> file indices read by this rank (run.record_reads)
    bad_files: set = field(default_factory=set)  # paths this rank could not decode (logged once each)


def normalize(batch: dict, state: TrainState) -> torch.Tensor:
    """uint8 HWC [N, H, W, 3] (or canvases + crop boxes) + lighting offsets -> normalised float
    NCHW (channels_last if set).

    Done here, not in the loader workers, so that a GPU does the float work (and, with
    augment.where=device, the crops themselves).
    """
    x = unit_pixels(batch, state.device)
    x = x.add_(batch["lighting"].to(state.device, non_blocking=True).view(-1, 3, 1, 1))
    layout = torch.channels_last if state.channels_last else torch.contiguous_format
    return x.sub_(state.mean).div_(state.std).contiguous(memory_format=layout)


class Meter:
    """Sums of per-batch figures on this rank; `reduce` sums them over all ranks."""

    KEYS = ("loss_sum", "correct", "samples", "images", "files", "bytes", "bad", "correct5")

    def __init__(self):
        self.totals = torch.zeros(len(self.KEYS), dtype=torch.float64)

    def add(self, **values) -> None:
        for k, v in values.items():
            self.totals[self.KEYS.index(k)] += float(v)

    def reduce(self, name: str) -> dict:
        totals = dist.allreduce_sum(self.totals.clone(), name=name)
        return dict(zip(self.KEYS, totals.tolist()))


def lr_at(step: int, state: TrainState, o) -> float:
    return learning_rate(step, state.steps_per_epoch, state.peak_lr, o.warmup_epochs, o.milestones, o.decay,
                         o.schedule, o.epochs)


def train_step(state: TrainState, batch: dict, lr: float, cfg) -> tuple[float, int]:
    """One optimizer step on one batch; returns (mean loss over the rank's samples, correct).

    The loss is the plain mean cross-entropy over all M*B samples of this rank (the paper's BA
    loss); DistributedOptimizer averages the gradients over ranks. With
    model.ghost_impl=accumulate the batch goes through in `state.forward_chunks` forward/backward
    passes of ghost_size samples each (the authors' way, for memory), each loss scaled by
    1/chunks, and Horovod allreduces once after the last (backward_passes_per_step = chunks).
    """
    opt = state.optimizer
    for group in opt.param_groups:
        group["lr"] = lr
    x = normalize(batch, state)
    labels = batch["labels"].to(state.device, non_blocking=True)
    chunks = state.forward_chunks
    opt.zero_grad()
    loss_sum, correct = 0.0, 0
    for xc, yc in zip(x.chunk(chunks), labels.chunk(chunks)):
        with torch.autocast(state.device.type, dtype=state.amp_dtype, enabled=state.amp_dtype is not None):
            logits = state.model(xc)
        loss = F.cross_entropy(logits.float(), yc, label_smoothing=cfg.optim.label_smoothing)
        loss_to_backward = loss / chunks
        (state.scaler.scale(loss_to_backward) if state.scaler else loss_to_backward).backward()
        loss_sum += loss.item()
        correct += (logits.argmax(1) == yc).sum().item()
    dist.optimizer_step(opt, state.scaler)
    state.step += 1
    return loss_sum / chunks, correct


def train_one_epoch(state: TrainState, loader, cfg, step_log=None, on_step=None, start_step: int = 0) -> dict:
    """One epoch of BA training (from `start_step` when resumed mid-epoch); returns figures summed
    over all ranks. `on_step(step_in_epoch)` runs after every step on every rank; when it returns
    True, the epoch ends there (an agreed stop) and the result has stopped=True."""
    model, o = state.model, cfg.optim
    model.train()
    loader.batch_sampler.set_epoch(state.epoch)
    loader.batch_sampler.start = start_step
    stopped = False
    bad_this_epoch = set()
    meter, data_time, t0 = Meter(), 0.0, time.perf_counter()
    reads = state.reads.setdefault(state.epoch, []) if cfg.run.record_reads else None
    steps = len(loader)
    bar = None
    if dist.is_primary() and sys.stdout.isatty():  # a live bar on a terminal; log lines in files (Slurm logs)
        bar = tqdm(total=steps, desc=f"epoch {state.epoch + 1}", unit="step", dynamic_ncols=True, leave=False)
    t_wait = time.perf_counter()
    for i, batch in enumerate(loader):
        data_time += time.perf_counter() - t_wait
        lr = lr_at(state.step, state, o)
        loss_value, correct = train_step(state, batch, lr, cfg)
        state.last_loss = loss_value
        n = batch["labels"].numel()
        meter.add(loss_sum=loss_value * n, correct=correct, samples=n,
                  images=batch["indices"].numel(), files=batch["files"], bytes=batch["bytes"])
        for entry in batch["bad"]:  # a broken file can be tried more than once (as a replacement too)
            if entry not in bad_this_epoch:
                bad_this_epoch.add(entry)
                meter.add(bad=1)
            if entry not in state.bad_files:
                state.bad_files.add(entry)
                log.warning("rank %d: skipped unreadable image %s; a file of the same shard replaces it",
                            dist.rank(), entry)
        if reads is not None:
            reads.extend(batch["indices"].tolist())
        if bar is not None:
            bar.update(1)
        if dist.is_primary() and ((i + 1) % cfg.run.log_every == 0 or i + 1 == steps):
            elapsed = time.perf_counter() - t0
            images_per_s, samples_per_s = float(meter.totals[3]) / elapsed, float(meter.totals[2]) / elapsed
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.4f}", img_s=f"{images_per_s:.0f}",
                                samples_s=f"{samples_per_s:.0f}")
            else:
                log.info("epoch %d step %d/%d loss %.4f lr %.4f | %.1f unique img/s/rank, %.1f samples/s/rank, "
                         "data wait %.0f%%", state.epoch + 1, i + 1, steps, loss_value, lr, images_per_s,
                         samples_per_s, 100 * data_time / elapsed)
            if step_log is not None:
                step_log({"step": state.step, "epoch": state.epoch, "loss": loss_value, "lr": lr,
                          "unique_images_per_s_rank0": images_per_s, "samples_per_s_rank0": samples_per_s})
        if on_step is not None and on_step(start_step + i + 1):
            stopped = True
            break
        t_wait = time.perf_counter()
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    sums = meter.reduce("train_meter")
    # Per-rank I/O of this epoch: what proves that BA adds no reads (files and bytes per rank).
    io_per_rank = dist.allgather_object((int(meter.totals[4]), int(meter.totals[5])), name="io")
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
        "data_wait_fraction": data_time / elapsed,
        "lr": lr,
        "stopped": stopped,
    }


@torch.no_grad()
def average_bn_statistics(model: torch.nn.Module) -> None:
    """Average BN running statistics over ranks, so that every rank evaluates (and saves) one model.

    Ghost BN *training* statistics stay rank-local; only the running averages used at inference,
    which each rank accumulated from its own shard, are made equal here.
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.running_mean.copy_(dist.allreduce_mean(module.running_mean, name=f"bn.{name}.mean"))
            module.running_var.copy_(dist.allreduce_mean(module.running_var, name=f"bn.{name}.var"))


@torch.no_grad()
def evaluate(state: TrainState, loader) -> dict:
    """Exact top-1 over the whole split: every file is evaluated once by exactly one rank,
    all ranks with the same model (BN running statistics averaged first)."""
    average_bn_statistics(state.model)
    state.model.eval()
    meter = Meter()
    for batch in loader:
        labels = batch["labels"].to(state.device, non_blocking=True)
        x = normalize(batch, state)
        with torch.autocast(state.device.type, dtype=state.amp_dtype, enabled=state.amp_dtype is not None):
            logits = state.model(x)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        meter.add(loss_sum=loss.item(), correct=(top5[:, 0] == labels).sum().item(), samples=labels.numel(),
                  images=labels.numel(), files=batch["files"], bytes=batch["bytes"],
                  correct5=(top5 == labels[:, None]).any(1).sum().item())
    sums = meter.reduce("eval_meter")
    return {"val_loss": sums["loss_sum"] / sums["samples"], "val_top1": 100.0 * sums["correct"] / sums["samples"],
            "val_top5": 100.0 * sums["correct5"] / sums["samples"], "val_correct": int(sums["correct"]),
            "val_images": int(sums["samples"])}
