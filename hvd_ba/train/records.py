"""A run's records: steps.jsonl (progress), metrics.jsonl and metrics.csv (one record per epoch),
lambda.jsonl (lambda tracking), reads.jsonl (run.record_reads), TensorBoard scalars; appended by
rank 0, synced before each checkpoint and before result.json, and cut back to the checkpoint's
step on a resume. An epoch's record follows its epoch-end checkpoint, which carries it: a resume
restores it when the stop came between the two.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from hvd_ba import dist, fsio

log = logging.getLogger("hvd_ba")

EPOCH_CSV_COLUMNS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
                     "unique_images", "samples", "unique_images_per_s", "samples_per_s", "files_read",
                     "bytes_read", "bad_files", "data_wait_fraction", "epoch_time_s")


RECORD_FILES = ("steps.jsonl", "metrics.jsonl", "metrics.csv", "lambda.jsonl", "reads.jsonl")


def append_jsonl(path: Path, record: dict) -> None:
    fsio.append_record(path, record)


def append_csv(path: Path, record: dict) -> None:
    fsio.append_csv(path, record, EPOCH_CSV_COLUMNS)


def tensorboard_writer(out: Path):
    """A SummaryWriter in out/tensorboard when TensorBoard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("TensorBoard is not installed; metrics go to metrics.jsonl and metrics.csv only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def state_digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_jsonl(path: Path, needs: tuple = ()) -> list[dict]:
    """The whole records of a JSONL file (a torn last line, left by a crash, is skipped). `needs`:
    the keys every record must hold; a record that is not an object or lacks one is a ConfigError
    naming the file and the line (a file not written by hvd_ba, or by another version)."""
    from hvd_ba.config import ConfigError

    records = fsio.read_records(path)
    for line, record in enumerate(records, 1):
        missing = [key for key in needs if not isinstance(record, dict) or key not in record]
        if missing:
            raise ConfigError(f"'{path}' record {line}: not a record of hvd_ba's (no {', '.join(missing)})")
    return records


def truncate_records(out: Path, step: int, epoch: int) -> None:
    """Drop progress records written after the resume point (a run killed after its last
    checkpoint wrote some); metrics.csv is rebuilt from metrics.jsonl."""
    for name, field, keep in (("steps.jsonl", "step", step), ("lambda.jsonl", "step", step),
                              ("reads.jsonl", "step", step), ("metrics.jsonl", "epoch", epoch)):
        fsio.trim_records(out / name, lambda record, f=field, k=keep: record[f] <= k)
    if (out / "metrics.csv").exists() or (out / "metrics.jsonl").exists():
        rebuild_metrics_csv(out)


def rebuild_metrics_csv(out: Path) -> None:
    """metrics.csv written anew from metrics.jsonl (after the records were cut or restored)."""
    fsio.write_csv(out / "metrics.csv", read_jsonl(out / "metrics.jsonl"), EPOCH_CSV_COLUMNS)


def restore_epoch_record(out: Path, record: dict) -> bool:
    """Rank 0, resuming from an epoch's end: the epoch's record, which its checkpoint carries,
    when metrics.jsonl lacks it (the run stopped after the checkpoint, before the record);
    metrics.csv is rebuilt. True when it was missing."""
    epoch = record["epoch"]
    if any(r.get("epoch") == epoch for r in read_jsonl(out / "metrics.jsonl")):
        return False
    fsio.trim_records(out / "metrics.jsonl", lambda r: r["epoch"] < epoch)  # a torn last line goes first
    append_jsonl(out / "metrics.jsonl", record)
    rebuild_metrics_csv(out)
    log.warning("epoch %d's record restored from its checkpoint (the run stopped before it was recorded)", epoch)
    return True


def record_epoch(out: Path, metrics: dict, board) -> None:
    """Rank 0: the epoch's record in metrics.jsonl, metrics.csv and TensorBoard, and its log line."""
    epoch = metrics["epoch"]
    append_jsonl(out / "metrics.jsonl", metrics)
    append_csv(out / "metrics.csv", metrics)
    if board is not None:
        for key in EPOCH_CSV_COLUMNS[1:]:
            if key in metrics:
                board.add_scalar(f"epoch/{key}", metrics[key], epoch)
    log.info("epoch %d done: train loss %.4f top1 %.1f%% | val top1 %s | %.1f unique img/s, %.1f samples/s, %.1f MB read",
             epoch, metrics["train_loss"], metrics["train_top1"],
             f"{metrics['val_top1']:.2f}%" if "val_top1" in metrics else "-",
             metrics["unique_images_per_s"], metrics["samples_per_s"], metrics["bytes_read"] / 1e6)
    if metrics["bad_files"]:
        log.warning("epoch %d: %d unreadable training images skipped and replaced (listed above)", epoch,
                    metrics["bad_files"])


class StepRecords:
    """The per-step records: steps.jsonl and TensorBoard's step scalars (the engine calls `step`
    on rank 0 only), reads.jsonl (run.record_reads; `reads` is called on every rank, rank 0 writes)."""

    def __init__(self, out: Path, board):
        self.out, self.board = out, board

    def step(self, record: dict) -> None:
        append_jsonl(self.out / "steps.jsonl", record)
        if self.board is not None:
            for key in ("loss", "lr", "unique_images_per_s_rank0", "samples_per_s_rank0"):
                self.board.add_scalar(f"step/{key}", record[key], record["step"])

    def reads(self, record: dict) -> None:
        if dist.is_primary():
            append_jsonl(self.out / "reads.jsonl", record)
