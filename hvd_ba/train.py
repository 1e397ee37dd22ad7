"""`python -m hvd_ba train`: one Horovod rank of a BA training run.

Launched once per rank by horovodrun / srun / mpirun. Writes into cfg.run.out_dir:
config.yaml (resolved config), metrics.jsonl (one record per epoch), steps.jsonl (progress),
result.json (final figures), rank<r>.json (per-rank digest of the final parameters and, with
run.record_reads, the file indices the rank read).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from hvd_ba import dist
from hvd_ba.config import Config, save_config
from hvd_ba.data.manifest import load_index
from hvd_ba.data.pipeline import make_eval_loader, make_train_loader
from hvd_ba.checkpoint import find_checkpoint, save_checkpoint
from hvd_ba.engine import TrainState, average_bn_statistics, evaluate, lr_at, train_one_epoch
from hvd_ba.models import build_model, parameter_groups
from hvd_ba.schedule import peak_lr

log = logging.getLogger("hvd_ba")


def derived_figures(cfg: Config, world: int, steps_per_epoch: int) -> list[str]:
    """What a run derives from its config, printed at its start."""
    d, m, o = cfg.data, cfg.model, cfg.optim
    unique_global = d.unique_batch * world
    samples = d.copies * d.unique_batch
    peak = peak_lr(o.base_lr, unique_global, o.reference_batch)
    ghost = (f"{samples // m.ghost_size} groups of {m.ghost_size} per rank ({m.ghost_impl})" if m.ghost_size
             else "off (plain BN over the rank's batch)")
    return [
        f"unique batch: {d.unique_batch} per rank, {unique_global} global; copies M = {d.copies}",
        f"samples per step: {samples} per rank, {samples * world} global",
        f"ghost BN: {ghost}",
        f"peak LR: {peak:.4g} = {o.base_lr:g} x {unique_global} / {o.reference_batch} (M does not change it), "
        f"linear warmup over {o.warmup_epochs:g} epochs, then "
        + ("cosine" if o.schedule == "cosine" else
           f"x{o.decay:g} at epochs {', '.join(f'{e:g}' for e in o.milestones)}" if o.milestones else "constant")
        + f" of {o.epochs}",
        f"steps per epoch: {steps_per_epoch} (those of unique batch {unique_global})",
    ]


def setup_logging() -> None:
    """Rank 0 logs at INFO; other ranks only warnings and errors, each line tagged with its rank."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {dist.rank()}] %(message)s", "%H:%M:%S"))
    root = logging.getLogger("hvd_ba")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if dist.is_primary() else logging.WARNING)
    root.propagate = False


EPOCH_CSV_COLUMNS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
                     "unique_images", "samples", "unique_images_per_s", "samples_per_s", "files_read",
                     "bytes_read", "bad_files", "data_wait_fraction", "epoch_time_s")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def append_csv(path: Path, record: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, EPOCH_CSV_COLUMNS, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(record)


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


def select_device() -> torch.device:
    """CUDA GPU local_rank, or GPU 0 when the launcher gave each task one GPU (Slurm sets
    CUDA_VISIBLE_DEVICES to one entry); the CPU when there is no GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = dist.local_rank() if torch.cuda.device_count() > 1 else 0
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"rank {dist.rank()}: local rank {index} but only {torch.cuda.device_count()} GPUs visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def load_indexes(cfg: Config):
    """Rank 0 lists the splits (or finds their cached manifests fresh) and writes the manifests;
    the other ranks then read them instead of listing the folders themselves."""
    cache = os.path.expanduser(cfg.data.manifest_dir) if cfg.data.manifest_dir else None
    if dist.is_primary():
        indexes = [load_index(cfg.data.path, split, cache) for split in ("train", "val")]
    dist.barrier("manifests")
    if not dist.is_primary():
        indexes = [load_index(cfg.data.path, split, cache, write=False) for split in ("train", "val")]
    return indexes


def build_state(cfg: Config, num_classes: int, device: torch.device, world: int, steps_per_epoch: int) -> TrainState:
    """Model, optimizer and step settings of a fresh run, the same on every rank (rank 0's
    parameters are broadcast; without Horovod initialised, as in tests, no collective runs)."""
    m, o, r = cfg.model, cfg.optim, cfg.run
    torch.manual_seed(r.seed)
    model = build_model(m.arch, num_classes, m.ghost_size, m.zero_init_residual, m.width).to(device)
    if r.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(parameter_groups(model, o.weight_decay, o.decay_biases), lr=o.base_lr,
                                momentum=o.momentum, nesterov=o.nesterov)
    # A fresh run has no optimizer state to share; parameters come from rank 0.
    dist.broadcast_state(model, optimizer, optimizer_state=False)
    samples_per_rank = cfg.data.copies * cfg.data.unique_batch
    chunks = samples_per_rank // m.ghost_size if m.ghost_impl == "accumulate" else 1
    optimizer = dist.distributed_optimizer(optimizer, model, fp16_allreduce=o.fp16_allreduce, adasum=o.adasum,
                                           backward_passes_per_step=chunks,
                                           gradient_predivide_factor=o.gradient_predivide_factor)
    return TrainState(
        model=torch.compile(model) if r.compile else model, optimizer=optimizer, device=device,
        mean=torch.tensor(cfg.augment.mean, device=device).view(1, 3, 1, 1),
        std=torch.tensor(cfg.augment.std, device=device).view(1, 3, 1, 1),
        peak_lr=peak_lr(o.base_lr, cfg.data.unique_batch * world, o.reference_batch), steps_per_epoch=steps_per_epoch,
        forward_chunks=chunks, amp_dtype={"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[r.amp],
        channels_last=r.channels_last, scaler=torch.amp.GradScaler(device.type) if r.amp == "fp16" else None,
    )


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; requeue and resume


class StopRequest:
    """Set by SIGTERM / SIGUSR1 (Slurm's --signal) in this rank's main process."""

    def __init__(self):
        self.requested, self.signal_name = False, None

    def __call__(self, signum, frame):
        self.requested, self.signal_name = True, signal.Signals(signum).name


def install_stop_handlers() -> StopRequest:
    stop = StopRequest()
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, stop)
    return stop


def checkpoint(cfg: Config, state: TrainState, model: torch.nn.Module, out: Path, step_in_epoch: int,
               epoch: int | None = None) -> None:
    """Collective: every rank calls it at the same step. BN running statistics are averaged
    first (so the saved model is the one all ranks would evaluate) and each rank's RNG state is
    gathered; rank 0 writes."""
    average_bn_statistics(model)
    rng = dist.allgather_object(torch.get_rng_state(), name="rng")
    if dist.is_primary():
        payload = {"model": model.state_dict(), "optimizer": state.optimizer.state_dict(),
                   "scaler": state.scaler.state_dict() if state.scaler else None, "step": state.step,
                   "epoch": state.epoch if epoch is None else epoch, "step_in_epoch": step_in_epoch,
                   "world": dist.size(), "rng": rng, "config": cfg.to_dict()}
        path = save_checkpoint(out, payload, cfg.run.keep_checkpoints)
        log.info("checkpoint %s (step %d)", path, state.step)
    dist.barrier("checkpoint")  # nobody leaves (or exits) before the file is on disk


def resume(cfg: Config, state: TrainState, model: torch.nn.Module, out: Path) -> tuple[int, int]:
    """Place a run at its checkpoint: rank 0 loads, every rank receives. Returns (epoch, step in
    epoch) to start from; (0, 0) for a fresh run. Progress records after the checkpoint go."""
    found = None
    if cfg.run.resume and dist.is_primary():
        found = find_checkpoint(cfg.run.resume, out)
    meta = None
    if found is not None:
        path, payload = found
        model.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
        if state.scaler is not None and payload["scaler"] is not None:
            state.scaler.load_state_dict(payload["scaler"])
        meta = {key: payload[key] for key in ("step", "epoch", "step_in_epoch", "world", "rng")} | {"path": str(path)}
    meta = dist.broadcast_object(meta, name="resume")
    if dist.is_primary():
        for name, field in (("steps.jsonl", "step"), ("lambda.jsonl", "step"), ("metrics.jsonl", "epoch")):
            keep = meta[field] if meta else 0
            truncate_jsonl(out / name, lambda record, f=field, k=keep: record[f] <= k)
        rows = read_jsonl(out / "metrics.jsonl")
        (out / "metrics.csv").unlink(missing_ok=True)
        for row in rows:
            append_csv(out / "metrics.csv", row)
    if meta is None:
        return 0, 0
    dist.broadcast_state(model, state.optimizer, optimizer_state=True)
    state.step = meta["step"]
    if meta["world"] == dist.size():
        torch.set_rng_state(meta["rng"][dist.rank()])
    else:
        log.warning("checkpoint was written by %d ranks, this run has %d: RNG states not restored",
                    meta["world"], dist.size())
    log.info("resumed from %s: step %d, epoch %d, step %d of it", meta["path"], meta["step"],
             meta["epoch"] + 1, meta["step_in_epoch"])
    return meta["epoch"], meta["step_in_epoch"]


def track_lambda(cfg: Config, state: TrainState, model: torch.nn.Module, train_index, out: Path) -> None:
    """Collective: lambda_max of plain B, BA B x M and plain M*B batches at the current weights
    (one part per rank, as in training), appended to lambda.jsonl. Leaves the training exactly as
    it was: BN running statistics restored, no draw from the global RNG."""
    from hvd_ba.analyze import Batches, measure_lambda, standard_kinds

    world = dist.size()
    kinds = standard_kinds(cfg.data.unique_batch * world, cfg.data.copies)
    t0 = time.perf_counter()
    results = measure_lambda(model, Batches(cfg, train_index, state.epoch, state.device), kinds,
                             cfg.run.track_lambda_batches, world, cfg.optim.label_smoothing, tol=1e-2, max_iter=100,
                             first=state.step)
    lr = lr_at(state.step, state, cfg.optim)
    if dist.is_primary():
        record = {"step": state.step, "epoch": state.epoch + 1, "epochs_done": state.step / state.steps_per_epoch,
                  "unique": cfg.data.unique_batch * world, "copies": cfg.data.copies, "lr": lr,
                  "two_over_lr": 2 / lr if lr else None,
                  "kinds": {name: {k: r[k] for k in ("unique", "copies", "samples", "lambda_max", "lambda_mean")}
                            for name, r in results.items()}, "seconds": time.perf_counter() - t0}
        append_jsonl(out / "lambda.jsonl", record)
        log.info("step %d lambda_max: %s | 2/lr %.4g", state.step,
                 ", ".join(f"{name} {r['lambda_max']:.4g}" for name, r in results.items()), 2 / lr if lr else math.inf)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def truncate_jsonl(path: Path, keep) -> None:
    if not path.exists():
        return
    records = [r for r in read_jsonl(path) if keep(r)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def run_training(cfg: Config) -> dict:
    t_start = time.time()
    dist.init()
    setup_logging()
    rank, world = dist.rank(), dist.size()
    threads = cfg.run.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or max(
        1, (os.cpu_count() or 1) // dist.local_size())
    torch.set_num_threads(threads)
    device = select_device()
    out = Path(cfg.run.out_dir)

    train_index, val_index = load_indexes(cfg)
    if train_index.classes != val_index.classes:
        raise ValueError(f"data.path '{cfg.data.path}': train/ and val/ have different class folders")
    if cfg.data.local_path:
        from hvd_ba.stage import check_staged, rank_files

        check_staged(cfg.data.local_path, rank_files(cfg, train_index, val_index, rank, world), rank, world)
        local = Path(cfg.data.local_path)
        train_index = dataclasses.replace(train_index, root=str(local / "train"))
        val_index = dataclasses.replace(val_index, root=str(local / "val"))
    num_classes = cfg.model.num_classes or len(train_index.classes)
    train_loader = make_train_loader(train_index, cfg, rank, world)
    val_loader = make_eval_loader(val_index, cfg, rank, world)

    state = build_state(cfg, num_classes, device, world, len(train_loader))
    model = state.model._orig_mod if cfg.run.compile else state.model  # what is saved: uncompiled
    o = cfg.optim
    if dist.is_primary():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log.info("resolved config (saved as %s):\n%s", out / "config.yaml", (out / "config.yaml").read_text().rstrip())
        log.info("hvd_ba: %d ranks on %s, %d threads/rank; %s, %d classes; %d train / %d val images",
                 world, device, threads, cfg.model.arch, num_classes, len(train_index), len(val_index))
        for line in derived_figures(cfg, world, state.steps_per_epoch):
            log.info("%s", line)

    start_epoch, start_step = resume(cfg, state, model, out)
    stop = install_stop_handlers()

    first_bad_step, stop_at_epoch_end = None, False

    def on_step(step_in_epoch: int) -> bool:
        """Every rank, every step. Every run.sync_every steps, at checkpoints and at the epoch's
        end, the ranks agree (one small allreduce) on a stop and on finite losses."""
        nonlocal first_bad_step, stop_at_epoch_end
        if first_bad_step is None and not math.isfinite(state.last_loss):
            first_bad_step = state.step
        if cfg.run.track_lambda_every and state.step % cfg.run.track_lambda_every == 0:
            track_lambda(cfg, state, model, train_index, out)
        due = state.step % cfg.run.sync_every == 0 or step_in_epoch == state.steps_per_epoch
        periodic = (cfg.run.checkpoint_every and state.step % cfg.run.checkpoint_every == 0
                    and step_in_epoch < state.steps_per_epoch)  # the epoch's end writes its own
        if not (due or periodic):
            return False
        if (dist.is_primary() and cfg.run.stop_file and not stop.requested
                and os.path.exists(cfg.run.stop_file)):
            stop.requested, stop.signal_name = True, f"stop file {cfg.run.stop_file}"
        flags = dist.allreduce_sum(torch.tensor([float(stop.requested), float(first_bad_step is not None)]),
                                   name="flags")
        if flags[1] > 0:
            where = f"step {first_bad_step}" if first_bad_step is not None else f"a step before {state.step}"
            raise FloatingPointError(f"non-finite loss at {where} (epoch {state.epoch + 1}) on {int(flags[1])} "
                                     "rank(s); stopping, no checkpoint after it: the last good one stays")
        if flags[0] > 0:
            log.warning("stop requested (%s); checkpointing at step %d", stop.signal_name or "another rank",
                        state.step)
            if step_in_epoch == state.steps_per_epoch:
                # The epoch's last step: let it end as usual (evaluation, metrics, its checkpoint)
                # and stop after it, so a resumed run never starts with an empty epoch.
                stop_at_epoch_end = True
                return False
            checkpoint(cfg, state, model, out, step_in_epoch)
            return True
        if periodic:
            checkpoint(cfg, state, model, out, step_in_epoch)
        return False

    board = tensorboard_writer(out) if dist.is_primary() else None

    def step_log(record):
        append_jsonl(out / "steps.jsonl", record)
        if board is not None:
            for key in ("loss", "lr", "unique_images_per_s_rank0", "samples_per_s_rank0"):
                board.add_scalar(f"step/{key}", record[key], record["step"])

    metrics = {}
    for epoch in range(start_epoch, o.epochs):
        state.epoch = epoch
        metrics = {"epoch": epoch + 1, **train_one_epoch(state, train_loader, cfg, step_log, on_step,
                                                         start_step if epoch == start_epoch else 0)}
        if metrics["stopped"]:
            if board is not None:
                board.close()
            log.warning("stopped at step %d; resume with --set run.resume=auto", state.step)
            return {"preempted": True, "steps": state.step}
        if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == o.epochs:
            metrics.update(evaluate(state, val_loader))
        if dist.is_primary():
            append_jsonl(out / "metrics.jsonl", metrics)
            append_csv(out / "metrics.csv", metrics)
            if board is not None:
                for key in EPOCH_CSV_COLUMNS[1:]:
                    if key in metrics:
                        board.add_scalar(f"epoch/{key}", metrics[key], epoch + 1)
            log.info("epoch %d done: train loss %.4f top1 %.1f%% | val top1 %s | %.1f unique img/s, %.1f samples/s, %.1f MB read",
                     epoch + 1, metrics["train_loss"], metrics["train_top1"],
                     f"{metrics['val_top1']:.2f}%" if "val_top1" in metrics else "-",
                     metrics["unique_images_per_s"], metrics["samples_per_s"], metrics["bytes_read"] / 1e6)
            if metrics["bad_files"]:
                log.warning("epoch %d: %d unreadable training images skipped and replaced (listed above)",
                            epoch + 1, metrics["bad_files"])
        checkpoint(cfg, state, model, out, step_in_epoch=0, epoch=epoch + 1)
        if stop_at_epoch_end:
            if board is not None:
                board.close()
            log.warning("stopped at step %d; resume with --set run.resume=auto", state.step)
            return {"preempted": True, "steps": state.step}

    if board is not None:
        board.close()
    if dist.is_primary():  # plain state dict: loads into the torchvision model (strict)
        tmp = out / "model.pt.tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, out / "model.pt")
    # Trainable parameters must agree bit for bit (allreduce); the full state agrees because the
    # last evaluation averaged the rank-local BN running statistics.
    rank_record = {"rank": rank, "world": world, "steps": state.step,
                   "param_sha256": state_digest(dict(model.named_parameters())),
                   "state_sha256": state_digest(model.state_dict())}
    if cfg.run.record_reads:
        rank_record["reads"] = {str(e): v for e, v in state.reads.items()}
    (out / f"rank{rank}.json").write_text(json.dumps(rank_record))
    result = {"val_top1": metrics.get("val_top1"), "val_loss": metrics.get("val_loss"),
              "chance_top1": 100.0 / num_classes, "epochs": o.epochs, "steps": state.step,
              "world": world, "wall_time_s": time.time() - t_start}
    if dist.is_primary():
        (out / "result.json").write_text(json.dumps(result, indent=1))
        log.info("final val top-1 %.2f%% (chance %.1f%%) after %d epochs, %.0f s", result["val_top1"],
                 result["chance_top1"], o.epochs, result["wall_time_s"])
    return result


def main_rank(cfg: Config) -> int:
    """Entry for one rank. Any exception ends this process hard, so that the other ranks'
    launcher tears the job down instead of leaving them hung in a collective (horovod #642)."""
    try:
        result = run_training(cfg)
    except BaseException:
        sys.stdout.flush()
        print(f"hvd_ba: rank {dist.rank()} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.shutdown()
    return PREEMPTED_EXIT_CODE if result.get("preempted") else 0
