"""`python -m hvd_ba train`: one rank of a BA training run, on either backend (run.backend:
Horovod or torch.distributed; hvd_ba/dist.py holds both).

Launched once per rank by horovodrun, torchrun, srun or mpirun. Writes into cfg.run.out_dir:
config.yaml (resolved config), metrics.jsonl (one record per epoch), steps.jsonl (progress),
result.json (final figures), rank<r>.json (per-rank digest of the final parameters and, with
run.record_reads, the file indices the rank read).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

from hvd_ba import dist, fsio
from hvd_ba.cluster import (RendezvousError, bind_rank, compact, cores_per_task, cpu_mask, launch_rank,
                            loader_split, oversubscribed, rank_cores)
from hvd_ba.config import Config, ConfigError, derive, save_config
from hvd_ba.data.shards import load_split, static_parts_id, static_parts_line
from hvd_ba.data.model_input import channel_stats
from hvd_ba.data.pipeline import make_eval_loader, make_train_loader, release_loader_resources, start_worker_server
from hvd_ba.data.staged import check_staged, rank_files
from hvd_ba.fsio import DiskFull
from hvd_ba.models import build_model, parameter_groups
from hvd_ba.train.agreement import StepHooks
from hvd_ba.train.checkpoint import newest_checkpoint, write_checkpoint
from hvd_ba.train.devices import select_device
from hvd_ba.train.engine import TrainState, evaluate, train_one_epoch
from hvd_ba.train.figures import derived_figures
from hvd_ba.train.records import (RECORD_FILES, StepRecords, read_jsonl, record_epoch, state_digest,
                                  tensorboard_writer)
from hvd_ba.train.resume import Placement, claim_run_dir, index_digest, resume, run_plan
from hvd_ba.train.run_dir import RunRefused, read_result, release_held_lock
from hvd_ba.train.stop import (DISK_FULL_EXIT_CODE, PREEMPTED_EXIT_CODE, STALL_ENDING, Preempted, StopRequest,
                               Watchdog, ignore_stop_signals, install_stop_handlers, pause_point)

log = logging.getLogger("hvd_ba")


def setup_logging() -> None:
    """Rank 0 logs at INFO; other ranks only warnings and errors, each line tagged with its rank."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {dist.rank()}] %(message)s", "%H:%M:%S"))
    root = logging.getLogger("hvd_ba")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if dist.is_primary() else logging.WARNING)
    root.propagate = False


def load_indexes(cfg: Config):
    """Rank 0 lists the splits (or finds their cached manifests fresh, or reads a packed folder's
    indexes) and writes the manifests; the other ranks then read them instead of listing the
    folders themselves. Then the ranks agree: a rank whose index differs from rank 0's (a folder
    changed between listings, a stale manifest on one node) stops every rank with a message
    naming it, before any step (a different number of steps would hang a collective)."""
    pause_point("indexes")
    error = None
    if dist.is_primary():
        try:
            indexes = [load_split(cfg, split, True) for split in ("train", "val")]
        except (OSError, ValueError) as err:  # an empty class folder, no class folders, unreadable
            error = str(err)
    error = dist.broadcast_object(error, name="manifests")  # the others wait for rank 0's listing
    if error is not None:
        raise DataMismatch(f"data.path '{cfg.data.path}': {error}; no rank trained")
    mine = None
    if not dist.is_primary():
        try:
            indexes = [load_split(cfg, split, False) for split in ("train", "val")]
        except (OSError, ValueError) as err:
            mine = f"rank {dist.rank()} on host {socket.gethostname()}: {err}"
    train, val = indexes if mine is None else (None, None)
    if mine is None:
        mine = (len(train), index_digest(train), len(val), index_digest(val), socket.gethostname())
    every = dist.allgather_object(mine, name="indexes")
    for other in every:
        if isinstance(other, str):
            raise DataMismatch(f"data.path '{cfg.data.path}': {other}; no rank trained")
    ref = every[0]
    for r, other in enumerate(every):
        if other[:4] != ref[:4]:
            raise DataMismatch(
                f"data.path '{cfg.data.path}': rank {r} on host {other[4]} sees {other[0]} training and {other[2]} "
                f"validation files, rank 0 on host {ref[4]} sees {ref[0]} and {ref[2]}"
                + (" (same counts, other files)" if other[0] == ref[0] and other[2] == ref[2] else "")
                + "; a folder changed between listings, or a node has a stale manifest in data.manifest_dir "
                "(delete it there); no rank trained")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataMismatch(
            f"data.path '{cfg.data.path}': train/ has {len(train.classes)} class folders, val/ has {len(val.classes)}"
            + (f"; only in train/: {', '.join(only_train[:5])}" if only_train else "")
            + (f"; only in val/: {', '.join(only_val[:5])}" if only_val else ""))
    return train, val


class DataMismatch(RunRefused):
    """The ranks, or the splits, do not see the same data."""


def build_state(cfg: Config, num_classes: int, device: torch.device, world: int, steps_per_epoch: int) -> TrainState:
    """Model, optimizer and step settings of a fresh run, the same on every rank (rank 0's
    parameters are broadcast; without a backend initialised, as in tests, no collective runs)."""
    m, o, r = cfg.model, cfg.optim, cfg.run
    torch.manual_seed(r.seed)
    # Parameters stay in the default (contiguous) layout even with run.channels_last: Horovod
    # refuses non-contiguous tensors (its broadcasts, gradient hooks and optimizer-state
    # broadcast). The inputs are made channels_last (data/model_input.py), and the convolutions then
    # run in NHWC (PyTorch takes the layout of the input as well as of the weight).
    model = build_model(m.arch, num_classes, m.ghost_size, m.zero_init_residual, m.width, m.dropout).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: let cuDNN pick its kernels once
    optimizer = torch.optim.SGD(parameter_groups(model, o.weight_decay, o.decay_biases), lr=o.base_lr,
                                momentum=o.momentum, nesterov=o.nesterov)
    # A fresh run has no optimizer state to share; parameters come from rank 0.
    dist.broadcast_state(model, optimizer, optimizer_state=False)
    figures = derive(cfg, world)
    chunks = figures.forward_passes
    optimizer = dist.distributed_optimizer(optimizer, model, fp16_allreduce=o.fp16_allreduce, adasum=o.adasum,
                                           backward_passes_per_step=chunks,
                                           gradient_predivide_factor=o.gradient_predivide_factor)
    trained = dist.distributed_model(model, fp16_allreduce=o.fp16_allreduce)  # DDP under the torch backend
    mean, std = channel_stats(cfg.augment, device)
    return TrainState(
        model=torch.compile(trained) if r.compile else trained, optimizer=optimizer, device=device, mean=mean, std=std,
        peak_lr=figures.peak_lr, steps_per_epoch=steps_per_epoch, epochs=o.epochs,
        forward_chunks=chunks, amp_dtype={"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[r.amp],
        channels_last=r.channels_last, scaler=torch.amp.GradScaler(device.type) if r.amp == "fp16" else None,
    )


@dataclasses.dataclass
class Run:
    """What a rank builds before its first step."""

    state: TrainState
    model: torch.nn.Module  # what is saved: the uncompiled module
    train_index: object
    val_index: object
    train_loader: object
    val_loader: object
    threads: int
    num_classes: int
    workers: int
    cores: list[int]


def cpu_budget(cfg: Config, device: torch.device) -> tuple[int, int, list[int]]:
    """(threads, loader workers, cores) of this rank, from the cores its CPU mask holds (after
    run.bind); each rank whose threads + workers exceed them, or that has fewer cores than Slurm
    allocated per task, says so once; rank 0 lists every rank's cores."""
    mask = cpu_mask()
    cores = rank_cores(mask, dist.local_size(), cores_per_task())
    threads, workers = loader_split(cores, cfg.run.threads, cfg.data.workers, device.type == "cuda")
    host = socket.gethostname()
    warning = oversubscribed(dist.rank(), host, mask, threads, workers, cores_per_task())
    if warning:
        print(warning, file=sys.stderr, flush=True)
    everyone = dist.allgather_object((host, compact(mask), threads, workers), name="cores")
    log.info("hvd_ba: cores per rank: %s", "; ".join(
        f"rank {r} {h} cores {c} ({t} threads, {w} workers)" for r, (h, c, t, w) in enumerate(everyone)))
    return threads, workers, mask


def build_run(cfg: Config) -> Run:
    rank, world = dist.rank(), dist.size()
    device = select_device()
    threads, workers, cores = cpu_budget(cfg, device)
    torch.set_num_threads(threads)
    loaders_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=workers))
    train_index, val_index = load_indexes(cfg)
    digest = index_digest(train_index)
    if cfg.data.local_path:
        try:
            files = rank_files(cfg, train_index, val_index, rank, world)
        except ConfigError as err:  # more ranks than packed shards: every rank holds the same index and says it
            raise RunRefused(str(err)) from None
        try:
            check_staged(cfg.data.local_path, files, rank, world)
            problem = None
        except (OSError, ValueError, RuntimeError) as err:
            problem = f"rank {rank} on host {socket.gethostname()}: {str(err).splitlines()[0]}"
        problems = [p for p in dist.allgather_object(problem, name="staged") if p]
        if problems:
            raise DataMismatch(f"data.local_path '{cfg.data.local_path}': {problems[0]}"
                               + (f" (and {len(problems) - 1} more ranks)" if len(problems) > 1 else "")
                               + "; run `python -m hvd_ba stage` again; no rank trained")
        local = Path(cfg.data.local_path)
        if train_index.shards:  # a packed folder: training shards from the copy, validation from data.path
            train_index = train_index.moved(str(local))
        else:
            train_index, val_index = train_index.moved(str(local / "train")), val_index.moved(str(local / "val"))
    num_classes = cfg.model.num_classes or len(train_index.classes)
    try:
        train_loader = make_train_loader(train_index, loaders_cfg, rank, world)
    except ConfigError as err:  # too few files for one batch: every rank holds the same index and says it
        raise RunRefused(str(err)) from None
    val_loader = make_eval_loader(val_index, loaders_cfg, rank, world)
    state = build_state(cfg, num_classes, device, world, len(train_loader))
    state.plan = run_plan(cfg, world, state.steps_per_epoch, len(train_index), digest, state.peak_lr,
                          static_parts_id(train_index) if cfg.data.shard == "static" else None)
    model = dist.unwrap(state.model)  # the plain module (not torch.compile's or DDP's wrapper): what is saved
    return Run(state, model, train_index, val_index, train_loader, val_loader, threads, num_classes, workers, cores)


def announce(cfg: Config, run: Run, out: Path) -> None:
    """Rank 0: config.yaml (with the run id) and what the run derives from its config."""
    if not dist.is_primary():
        return
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml", run.state.run_id)
    log.info("run %s; resolved config (saved as %s):\n%s", run.state.run_id, out / "config.yaml",
             (out / "config.yaml").read_text().rstrip())
    log.info("hvd_ba: %d ranks on %s (%s, %s), %d threads/rank; %s, %d classes; %d train / %d val images",
             dist.size(), run.state.device, dist.backend(), dist.controller(), run.threads, cfg.model.arch, run.num_classes, len(run.train_index), len(run.val_index))
    for line in derived_figures(cfg, dist.size(), len(run.train_index), run.state.steps_per_epoch):
        log.info("%s", line)
    parts = static_parts_line(run.train_index, cfg.data.shard, dist.size())
    if parts:
        (log.warning if "; low:" in parts else log.info)("%s", parts)


def train_epochs(cfg: Config, run: Run, out: Path, placement: Placement, stop: StopRequest,
                 track_lambda=None) -> tuple[dict, bool]:
    """The epochs from the placement on; returns (the last epoch's metrics, stopped early)."""
    state, o = run.state, cfg.optim
    hooks = StepHooks(cfg, state, run.model, out, run.train_index, stop, track_lambda)
    board = tensorboard_writer(out) if dist.is_primary() else None
    records = StepRecords(out, board)
    metrics, stopped = {}, False
    try:
        for epoch in range(placement.epoch, o.epochs):
            state.epoch = epoch
            first = epoch == placement.epoch
            metrics = {"epoch": epoch + 1, **train_one_epoch(
                state, run.train_loader, cfg, records.step, hooks, placement.step_in_epoch if first else 0,
                placement.partial if first else None, records.reads)}
            if metrics["stopped"]:
                stopped = True
                break
            if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == o.epochs:
                metrics.update(evaluate(state, run.val_loader))
            # The checkpoint first, carrying the epoch's record: a run stopped between the two
            # gets its record back on resume; one stopped inside the run's first checkpoint has no
            # epoch recorded and starts again (the other order refused it: epochs, no checkpoint).
            write_checkpoint(cfg, state, run.model, out, step_in_epoch=0, epoch=epoch + 1, epoch_record=metrics)
            if dist.is_primary():
                record_epoch(out, metrics, board)
            if hooks.stop_at_epoch_end and epoch + 1 < o.epochs:  # at the last epoch: finish the run
                stopped = True
                break
    finally:
        if board is not None:
            board.close()
    if stopped:
        log.warning("stopped at step %d; resume with --set run.resume=auto", state.step)
    return metrics, stopped


def loader_worker_cores() -> list[list[int]]:
    """The CPU mask of each live loader worker of this rank (they inherit the rank's)."""
    import multiprocessing

    masks = []
    for child in multiprocessing.active_children():
        try:
            masks.append(cpu_mask(child.pid))
        except OSError:
            pass
    return masks


def finish(cfg: Config, run: Run, out: Path, metrics: dict, t_start: float) -> dict:
    """model.pt (rank 0), rank<r>.json (every rank) and result.json (rank 0, last)."""
    state, model, rank, world = run.state, run.model, dist.rank(), dist.size()
    if dist.is_primary():  # plain state dict on the CPU: loads into the torchvision model (strict)
        fsio.atomic_torch_save(out / "model.pt", {k: v.cpu() for k, v in model.state_dict().items()})
    # Trainable parameters must agree bit for bit (allreduce); the full state agrees because the
    # last evaluation averaged the rank-local BN running statistics.
    rank_record = {"rank": rank, "world": world, "steps": state.step, "run_id": state.run_id,
                   "param_sha256": state_digest(dict(model.named_parameters())),
                   "state_sha256": state_digest(model.state_dict()),
                   "grad_scale": float(state.scaler.get_scale()) if state.scaler is not None else None,
                   "host": socket.gethostname(), "cores": run.cores, "threads": run.threads, "workers": run.workers,
                   "worker_cores": loader_worker_cores()}
    if cfg.run.record_reads:
        rank_record["reads"] = {str(e): v for e, v in state.reads.items()}
    fsio.atomic_json(out / f"rank{rank}.json", rank_record)
    result = {"run_id": state.run_id, "val_top1": metrics.get("val_top1"), "val_loss": metrics.get("val_loss"),
              "chance_top1": 100.0 / run.num_classes, "epochs": cfg.optim.epochs, "steps": state.step,
              "world": world, "wall_time_s": time.time() - t_start}
    if dist.is_primary():
        dist.barrier("outputs")  # result.json, the mark of a complete run, is written last
        fsio.sync_files(out / name for name in RECORD_FILES)  # the last epoch's record came after its checkpoint
        fsio.atomic_json(out / "result.json", result, indent=1)
    else:
        dist.barrier("outputs")
        top1 = result["val_top1"]
        log.info("final val top-1 %s (chance %.1f%%) after %d epochs, %.0f s",
                 f"{top1:.2f}%" if top1 is not None else "-", result["chance_top1"], cfg.optim.epochs,
                 result["wall_time_s"])
    return result


def finish_complete(cfg: Config, run: Run, out: Path, placement: Placement, t_start: float) -> dict:
    """A resume of a run whose checkpoint is at its last epoch's end: when result.json parses and
    names this run, nothing is rewritten; when the run was stopped between its last checkpoint
    and result.json, the outputs are written from the checkpoint and metrics.jsonl."""
    result = read_result(out) if dist.is_primary() else None
    done = dist.broadcast_object(bool(result and result.get("run_id") == placement.run_id), name="complete")
    if done:
        if dist.is_primary():
            log.info("run %s in %s is complete (val top-1 %s after %s epochs); nothing to do", placement.run_id, out,
                     result.get("val_top1"), result.get("epochs"))
        return {**(result or {}), "complete": True}
    records = read_jsonl(out / "metrics.jsonl") if dist.is_primary() else []
    last = dist.broadcast_object(records[-1] if records else {}, name="last_metrics")
    log.info("run %s ended after its last checkpoint; writing its final outputs", placement.run_id)
    return finish(cfg, run, out, last, t_start)


def run_training(cfg: Config, track_lambda=None) -> dict:
    """build -> resume -> train -> finish, on every rank. `track_lambda`: the lambda tracker
    (theory/tracking.py) that run.track_lambda_every needs."""
    stop = install_stop_handlers()
    t_start = time.time()
    bind_rank(cfg.run.bind)  # before any thread starts: the backend's, torch's and the loaders' inherit it
    if cfg.data.workers != 0:  # before the backend's threads: workers never fork from them
        start_worker_server(cfg.data.worker_start)
    dist.init(stall_timeout=cfg.run.stall_timeout, backend=cfg.run.backend, longest_wait=cfg.run.checkpoint_timeout)
    setup_logging()
    pause_point("init")
    out = Path(cfg.run.out_dir)
    fresh_id = claim_run_dir(cfg, out, t_start)
    run = build_run(cfg)
    placement = resume(cfg, run.state, run.model, out, fresh_id)
    run.state.run_id = placement.run_id
    if placement.complete:
        return finish_complete(cfg, run, out, placement, t_start)
    announce(cfg, run, out)
    stop.training_started()
    run.state.watchdog = Watchdog(cfg.run.stall_timeout, dist.rank())
    metrics, stopped = train_epochs(cfg, run, out, placement, stop, track_lambda)
    run.state.watchdog.pause()
    if stopped:
        return {"preempted": True, "steps": run.state.step}
    return finish(cfg, run, out, metrics, t_start)


def main_rank(cfg: Config, track_lambda=None) -> int:
    """Entry for one rank. Any exception ends this process hard, so that the other ranks'
    launcher tears the job down instead of leaving them hung in a collective (horovod #642).
    A refusal (the run folder, the checkpoint, the data) is one line from rank 0, exit 2; a stop
    signal during start-up, one line and exit 75. Every way out gives up the run folder's lock."""
    stop = install_stop_handlers()
    if cfg.run.track_lambda_every and track_lambda is None:
        print("hvd_ba: error: config key 'run.track_lambda_every': this entry point hands the run no lambda tracker "
              "(theory/tracking.py); train with `python -m hvd_ba train`", file=sys.stderr)
        return 2
    try:
        try:
            result = run_training(cfg, track_lambda)
            ignore_stop_signals()
        finally:
            stop.in_startup = False  # from here a signal only sets the flag, whatever happened
    except Preempted as err:
        _leave(f"hvd_ba: rank {dist.rank()} stopped ({err}): nothing was trained since the last checkpoint, which "
               "stays the resume point", PREEMPTED_EXIT_CODE)
    except (dist.BackendError, RendezvousError) as err:  # before any collective: every rank knows it
        if launch_rank()[0] != 0:
            # Rank 0 says it: wait for it (the launcher's SIGTERM once rank 0 has left, at most 10 s),
            # so that an early exit here does not get rank 0 stopped by the launcher before its line
            deadline = time.time() + 10
            while time.time() < deadline and not stop.requested:
                time.sleep(0.05)
        _leave(f"hvd_ba: error: {err}" if launch_rank()[0] == 0 else None, 2)
    except RunRefused as err:  # every rank raises it after the same broadcast
        _leave(f"hvd_ba: error: {err}" if dist.is_primary() else None, 2)
    except DiskFull as err:
        _leave(None if getattr(err, "quiet", False) else f"hvd_ba: rank {dist.rank()}: {disk_full_line(cfg, err)}",
               DISK_FULL_EXIT_CODE)
    except BaseException as err:
        if STALL_ENDING.is_set():  # the watchdog is ending this rank (exit 70) and has said why
            time.sleep(60)
        if dist.another_rank_left(err):
            # A symptom, not a cause: another rank left first (or Horovod stopped a stall) and said why.
            if stop.requested:  # this rank was signalled too (srun signals every task): a preemption
                _leave(f"hvd_ba: rank {dist.rank()} stopped ({stop.signal_name}): the job was stopping; the last "
                       "checkpoint stays the resume point", PREEMPTED_EXIT_CODE)
            _leave(f"hvd_ba: rank {dist.rank()} stopped: another rank left the job first, or the backend's stall "
                   f"check ended it ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]}); the first "
                   "rank's message tells why", 1)
        sys.stdout.flush()
        print(f"hvd_ba: rank {dist.rank()} failed:", file=sys.stderr)
        traceback.print_exc()
        _leave(None, 1)
    release_held_lock()
    dist.shutdown()
    return PREEMPTED_EXIT_CODE if result.get("preempted") else 0


def disk_full_line(cfg: Config, err: DiskFull) -> str:
    """One line for a full (or read-only) run folder: what failed, the bytes free, the resume point."""
    text = err.strerror
    if "stays the resume point" in text or "start again" in text:
        return text  # a checkpoint's or the lock's own line says it all
    out = Path(cfg.run.out_dir)
    try:
        free = f"{fsio.free_bytes(out)} bytes free"
    except OSError:
        free = "free space unknown"
    try:
        found = newest_checkpoint(out)
    except OSError:
        found = None
    point = f"'{found}' stays the resume point" if found else "no checkpoint yet"
    return f"run folder '{out}': {text} ({free}); {point}: free space, then resume with --set run.resume=auto"


def _leave(message: str | None, status: int):
    """Print `message` (one line), give up the lock and end the process at once (no backend
    shutdown: another rank may be gone or stuck in a collective)."""
    sys.stdout.flush()
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.stderr.flush()
    release_held_lock()
    release_loader_resources()
    os._exit(status)
