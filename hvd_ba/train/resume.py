"""Where a run starts: rank 0 claims the run folder (one job per folder, a fresh start never over
another run) and, with run.resume, loads and checks the checkpoint; every rank then receives the
placement (epoch, step in it, the run id) and the state. Progress records written after the
checkpoint are cut back, so a resumed run continues exactly where the checkpoint was taken.

A resume compares what the data order and the LR schedule depend on (the *plan*, stored in every
checkpoint) with the checkpoint's and refuses any difference but one: the world size, when the
unique global batch stays the same (global shards), which places every global step on the same
files with the same LR. Of the config, only what operates the run may change (MAY_CHANGE).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from hvd_ba import dist, fsio
from hvd_ba.config import Config, derive
from hvd_ba.fsio import DiskFull, read_records, remove_stale_temporaries
from hvd_ba.train.checkpoint import (NAME, check_space, checkpoint_dir, find_checkpoint, newest_checkpoint, run_id_of,
                                     set_rng_states)
from hvd_ba.train.engine import EpochProgress, TrainState
from hvd_ba.train.records import restore_epoch_record, truncate_records
from hvd_ba.train.run_dir import (LOCK, RunRefused, claim_fresh, hold_lock, new_run_id, read_result, read_run_id,
                                  release_held_lock)
from hvd_ba.train.stop import pause_point

log = logging.getLogger("hvd_ba")


@dataclasses.dataclass
class Placement:
    """Where a run starts: epoch and step in it (0, 0 for a fresh run), the run's id, the
    epoch's partial sums of this rank when resumed mid-epoch, and whether it is already done."""

    epoch: int = 0
    step_in_epoch: int = 0
    run_id: str | None = None
    partial: dict | None = None
    complete: bool = False


def remove_stale_stop_file(cfg: Config, started: float) -> None:
    """A stop file older than this start asked an earlier attempt to stop: that is done. Only
    after rank 0 holds the run's lock (a second job on the same folder must not delete the
    first one's pending stop)."""
    stop_file = Path(cfg.run.stop_file) if cfg.run.stop_file else None
    try:
        if stop_file is not None and stop_file.stat().st_mtime < started:
            stop_file.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def claim_run_dir(cfg: Config, out: Path, started: float) -> str | None:
    """Rank 0 decides whether this start may use `out` (run_dir.claim_fresh), every rank learns it.
    Returns the run id of a fresh start (None when resuming: the checkpoint decides)."""
    decision = None
    if dist.is_primary():
        try:
            for folder in (out, checkpoint_dir(out)):  # a dead writer's half file may be what fills the disk
                remove_stale_temporaries(folder, dead_only=True)
            hold_lock(out, cfg.run.lock_stale_after)  # before anything else: one job per folder
            for folder in (out, checkpoint_dir(out)):  # left by a writer killed mid-write (only rank 0 writes)
                for stale in remove_stale_temporaries(folder):
                    log.warning("removed %s, left by a write that a crash cut short", stale)
            remove_stale_stop_file(cfg, started)
            previous = newest_checkpoint(out) if cfg.run.resume else None
            if previous is not None:  # a checkpoint that will not fit: say so now, not mid-run
                check_space(checkpoint_dir(out), previous)
            if cfg.run.resume:
                decision = {"run_id": None}
            else:
                run_id, moved = claim_fresh(cfg, out)
                decision = {"run_id": run_id, "moved": str(moved) if moved else None}
                if moved:  # the lock went with the old folder: hold the new one
                    release_held_lock()
                    (moved / LOCK).unlink(missing_ok=True)
                    hold_lock(out, cfg.run.lock_stale_after)
        except RunRefused as err:
            decision = {"error": str(err)}
        except DiskFull as err:
            decision = {"disk": err.strerror, "errno": err.errno}
    decision = dist.broadcast_object(decision, name="claim")
    if "error" not in decision and not dist.is_primary() and dist.local_rank() == 0:
        remove_stale_stop_file(cfg, started)  # each node's own, where the path names the node
    if "error" in decision:
        raise RunRefused(decision["error"])
    if "disk" in decision:
        err = DiskFull(decision["errno"], decision["disk"])
        err.quiet = not dist.is_primary()
        raise err
    if decision.get("moved"):
        log.warning("run.overwrite: the earlier run in %s was moved to %s", out, decision["moved"])
    return decision["run_id"]


# ------------------------------------------------------------- the plan a resume checks

def index_digest(index) -> str:
    """sha256 over the training index (relative paths and labels, in order; data/index.py)."""
    return index.digest


# The order in which global shards read the files (ShardSampler.shard); format-1 checkpoints
# were written with order 1, which cut the epoch's permutation into one contiguous part per rank.
SHARD_ORDER = 2


def run_plan(cfg: Config, world: int, steps_per_epoch: int | None, train_files: int | None,
             train_digest: str | None, peak: float, static_parts: str | None = None) -> dict:
    """What the data order and the LR of every step depend on; stored in every checkpoint.
    static_parts: what static shards cut (data/shards.py static_parts_id)."""
    d, o = cfg.data, cfg.optim
    return {
        "static_parts": static_parts if d.shard == "static" else None,
        "world": world, "unique_batch": d.unique_batch, "unique_global": derive(cfg, world).unique_global,
        "copies": d.copies, "ghost_size": cfg.model.ghost_size, "steps_per_epoch": steps_per_epoch,
        "train_files": train_files, "train_digest": train_digest, "seed": cfg.run.seed, "shard": d.shard,
        "shard_order": SHARD_ORDER if d.shard == "global" else None, "layout": d.layout, "peak_lr": peak,
        "warmup_epochs": o.warmup_epochs, "warmup_from": o.warmup_from,
        "warmup_start": o.base_lr if o.warmup_from == "base" else 0.0, "schedule": o.schedule,
        "milestones": list(o.milestones), "decay": o.decay,
        "epochs": o.epochs if o.schedule == "cosine" else None,  # a step schedule may be extended
    }


def legacy_plan(payload: dict) -> dict:
    """The plan of a format-1 checkpoint (written before plans were stored), from its config:
    its warmup rose from zero, and its global shards read in order 1 (which matters only in the
    middle of an epoch: each epoch draws its own permutation)."""
    cfg = payload["config"]
    d, o = cfg["data"], cfg["optim"]
    world = payload["world"]
    plan = {"world": world, "unique_batch": d["unique_batch"], "unique_global": d["unique_batch"] * world,
            "copies": d["copies"], "ghost_size": cfg["model"]["ghost_size"], "seed": cfg["run"]["seed"],
            "shard": d["shard"], "layout": d["layout"],
            # as format-1 checkpoints computed it (not config.peak_lr: another float order)
            "peak_lr": o["base_lr"] * d["unique_batch"] * world / o["reference_batch"],
            "warmup_epochs": o["warmup_epochs"], "warmup_from": "zero", "warmup_start": 0.0,
            "schedule": o["schedule"], "milestones": list(o["milestones"]), "decay": o["decay"],
            "epochs": o["epochs"] if o["schedule"] == "cosine" else None}
    if d["shard"] == "global":
        plan["shard_order"] = 1 if payload.get("step_in_epoch") else SHARD_ORDER
    return plan


LABELS = {
    "world": "ranks", "unique_batch": "data.unique_batch (per rank)", "unique_global": "unique global batch",
    "copies": "data.copies", "ghost_size": "model.ghost_size", "steps_per_epoch": "steps per epoch",
    "train_files": "training files", "train_digest": "training file index", "seed": "run.seed",
    "shard": "data.shard", "shard_order": "global shard order (hvd_ba version; a format-1 checkpoint mid-epoch)",
    "layout": "data.layout", "peak_lr": "peak LR", "warmup_epochs": "optim.warmup_epochs",
    "warmup_from": "optim.warmup_from", "warmup_start": "warmup start LR (optim.base_lr)",
    "schedule": "optim.schedule", "milestones": "optim.milestones",
    "decay": "optim.decay", "epochs": "optim.epochs (cosine)",
    "static_parts": "static parts (a folder's seeded cut, or a pack's whole shards)",
}


def _show(key: str, value) -> str:
    if key == "train_digest":
        return str(value)[:12]
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def plan_differences(saved: dict, current: dict) -> tuple[list[str], bool]:
    """(differences that forbid the resume, whether the world size changed in an allowed way).

    The world size (and with it the per-rank batch) may change when the unique global batch and
    everything else stay: with global shards every global step then reads the same files at the
    same LR. Keys missing from an older checkpoint are not compared."""
    keys = [k for k in LABELS if k in saved and k in current and saved[k] is not None and current[k] is not None]
    diffs = {k for k in keys if (saved[k] != current[k] if not isinstance(saved[k], float)
                                 else abs(saved[k] - current[k]) > 1e-12 * max(1.0, abs(saved[k])))}
    resized = bool(diffs) and diffs <= {"world", "unique_batch"} and saved.get("shard") == "global"
    if resized or not diffs:
        return [], resized
    return [f"{LABELS[k]} {_show(k, saved[k])} -> {_show(k, current[k])}" for k in keys if k in diffs], False


def refuse_resume(path, differences: list[str], saved: dict, current: dict) -> RunRefused:
    hint = ""
    if saved.get("world") != current.get("world") and saved.get("shard") == "global":
        per_rank, rest = divmod(saved["unique_global"], current["world"])
        samples, ghost = saved["copies"] * per_rank, saved.get("ghost_size")
        if rest or per_rank == 0:
            hint = f"; the unique global batch {saved['unique_global']} does not split over {current['world']} ranks"
        elif ghost and samples % ghost:
            hint = (f"; {current['world']} ranks would need data.unique_batch={per_rank}, whose {samples} samples per "
                    f"rank are not a multiple of model.ghost_size {ghost}")
        else:
            hint = (f"; on {current['world']} ranks, --set data.unique_batch={per_rank} keeps the unique global "
                    f"batch of {saved['unique_global']}")
    elif saved.get("world") != current.get("world"):
        hint = "; static shards are owned per rank: resume them on the same number of ranks"
    if saved.get("warmup_from") == "zero" and current.get("warmup_from") == "base" and "warmup_start" in saved:
        hint += "; a run started with the older warmup rule continues with --set optim.warmup_from=zero"
    return RunRefused(f"run.resume: checkpoint '{path}' was written with a different data order or LR schedule: "
                      + "; ".join(differences) + hint + "; nothing was trained")


# Config keys a resume may change: how the run is operated, not what it trains. Everything else
# (model, augmentation, optimiser, data) must match the checkpoint's config; the world size and
# data.unique_batch are judged by the plan.
MAY_CHANGE = {
    # data.path, data.format and data.val_labels may name other copies of the data (a packed folder, a flat val/):
    # the index digest in the plan decides whether they hold the same samples in the same order
    "data": {"path", "format", "val_labels", "unique_batch", "manifest_dir", "workers", "worker_start", "prefetch",
             "eval_batch", "local_path"},
    "augment": {"where", "canvas"},
    "optim": {"epochs"},  # a step schedule may be extended; a cosine one is judged by the plan
    "run": {"backend", "out_dir", "resume", "overwrite", "stall_timeout", "checkpoint_timeout", "log_every",
            "eval_every", "threads", "bind", "checkpoint_every", "keep_checkpoints", "sync_every", "stop_file", "track_lambda_every",
            "track_lambda_batches", "channels_last", "compile", "record_reads", "lock_stale_after"},
}


def config_differences(saved: dict, current: dict) -> list[str]:
    """'section.key old -> new' for each key a resume may not change (MAY_CHANGE)."""
    out = []
    for section, values in current.items():
        before = saved.get(section, {})
        for key, value in values.items():
            if key in MAY_CHANGE.get(section, set()) or key not in before:
                continue
            old = before[key]
            if isinstance(old, float) or isinstance(value, float):
                same = old is not None and value is not None and abs(float(old) - float(value)) <= 1e-12 * max(
                    1.0, abs(float(old)))
            else:
                same = old == value
            if not same:
                out.append(f"{section}.{key} {old} -> {value}")
    return out


def _check_checkpoint(cfg: Config, payload: dict, path, out: Path, plan: dict) -> tuple[str, bool]:
    """Rank 0: the run id the resumed run continues and whether the world size changes, or
    RunRefused when the checkpoint belongs to another run or another data order / LR schedule."""
    run_id = payload.get("run_id")
    here = read_run_id(out)
    if run_id and here and run_id != here:
        raise RunRefused(f"run.resume: checkpoint '{path}' belongs to run {run_id}, but run.out_dir '{out}' holds run "
                         f"{here}; resume into that run's own folder, or into an empty run.out_dir")
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("optimizer"), dict):
        raise RunRefused(f"run.resume: checkpoint '{path}' holds no config or optimizer state (damaged, or not "
                         "written by hvd_ba train); nothing was trained")
    saved_plan = payload.get("plan") or legacy_plan(payload)
    differences, resized = plan_differences(saved_plan, plan)
    differences += config_differences(payload["config"], cfg.to_dict())
    if differences:
        raise refuse_resume(path, differences, saved_plan, plan)
    return run_id or here or new_run_id(), resized


def _nothing_to_resume(cfg: Config, out: Path, fresh_id: str | None) -> dict:
    """Rank 0, run.resume without a checkpoint that loads: a complete run says so; a run with
    epochs recorded (so it had checkpoints) is refused, never trained again over its records;
    a run that died before its first checkpoint starts again from step 0."""
    here = read_run_id(out)
    result = read_result(out)
    if result and here and result.get("run_id") == here:
        return {"run_id": here, "complete": True}
    epochs = read_records(out / "metrics.jsonl")
    if epochs or result:
        raise RunRefused(
            f"run.resume: '{out}' holds run {here or '(no id)'} with {len(epochs)} epochs recorded but no checkpoint "
            f"that loads in {checkpoint_dir(out)}; nothing to resume from: --set run.overwrite=true (without "
            "run.resume) moves it aside and starts afresh, or run.resume=PATH names a checkpoint; nothing was trained")
    return {"run_id": fresh_id or here or new_run_id()}


def _set_aside_later_checkpoints(out: Path, step: int, run_id: str) -> None:
    """Rank 0, a resume from an earlier checkpoint than the run's newest (run.resume=PATH): the
    later ones of this run are an abandoned branch; moved to checkpoints/abandoned-<time>/ so
    that neither `auto` nor pruning mistakes them for the run's progress."""
    folder = checkpoint_dir(out)
    later = [p for p in folder.glob("ckpt-*.pt") if NAME.match(p.name) and int(NAME.match(p.name).group(1)) > step
             and run_id_of(p) == run_id]
    if not later:
        return
    aside = folder / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for p in later:
        os.replace(p, aside / p.name)
    fsio.atomic_write(folder / "latest", f"ckpt-{step:09d}.pt")  # never a moved file
    log.warning("resuming from step %d: %d later checkpoints of this run moved to %s", step, len(later), aside)


def _load_resume_point(cfg: Config, state: TrainState, model: torch.nn.Module, out: Path,
                       fresh_id: str | None) -> dict:
    """Rank 0: the checkpoint run.resume names, checked against this run and loaded into the
    model, optimizer and scaler; returns what the other ranks need (or {"error": line})."""
    try:
        found = find_checkpoint(cfg.run.resume, out) if cfg.run.resume else None
        if found is None:
            return _nothing_to_resume(cfg, out, fresh_id) if cfg.run.resume else {"run_id": fresh_id}
        path, payload = found
        try:
            run_id, resized = _check_checkpoint(cfg, payload, path, out, state.plan)
        except (KeyError, TypeError, AttributeError) as err:  # a config or plan without what a resume reads
            raise RunRefused(f"run.resume: checkpoint '{path}' lacks {err} in its config or plan (damaged, or not "
                             "written by hvd_ba train); nothing was trained") from None
        try:
            model.load_state_dict(payload["model"])
            state.optimizer.load_state_dict(payload["optimizer"])
            if state.scaler is not None and payload.get("scaler") is not None:
                state.scaler.load_state_dict(payload["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise RunRefused(f"run.resume: checkpoint '{path}' does not fit this model and optimizer "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); nothing was "
                             "trained") from None
        if cfg.run.resume != "auto":
            _set_aside_later_checkpoints(out, payload["step"], run_id)
        meta = {key: payload.get(key) for key in ("step", "epoch", "step_in_epoch", "world", "rng", "partial",
                                                  "epoch_record")}
        return meta | {"path": str(path), "run_id": run_id, "resized": resized, "legacy": not payload.get("run_id")}
    except RunRefused as err:
        return {"error": str(err)}
    except (OSError, ValueError) as err:  # run.resume=PATH that is missing or not a checkpoint
        return {"error": f"run.resume: cannot load '{cfg.run.resume}' ({err}); nothing was trained"}


def resume(cfg: Config, state: TrainState, model: torch.nn.Module, out: Path, fresh_id: str | None) -> Placement:
    """Place a run at its checkpoint: rank 0 loads and checks it, every rank receives it.
    Progress records after the checkpoint go. A fresh run (or run.resume with no checkpoint
    yet) starts at (0, 0)."""
    meta = _load_resume_point(cfg, state, model, out, fresh_id) if dist.is_primary() else None
    pause_point("resume")
    meta = dist.broadcast_object(meta, name="resume")
    if "error" in meta:
        raise RunRefused(meta["error"])
    placement = Placement(run_id=meta["run_id"])
    if meta.get("complete"):  # complete, its checkpoints removed: nothing to load
        placement.complete = True
        return placement
    if "step" not in meta:
        if dist.is_primary() and cfg.run.resume:
            truncate_records(out, step=0, epoch=0)
        return placement
    state.legacy_checkpoints = bool(meta.get("legacy"))
    placement.epoch, placement.step_in_epoch = meta["epoch"], meta["step_in_epoch"]
    placement.complete = meta["epoch"] >= cfg.optim.epochs
    dist.broadcast_state(model, state.optimizer, optimizer_state=True)
    if state.scaler is not None:  # fp16: every rank must scale its gradients alike (rank 0 loaded it)
        scaler_state = dist.broadcast_object(state.scaler.state_dict() if dist.is_primary() else None, name="scaler")
        if scaler_state:
            state.scaler.load_state_dict(scaler_state)
    state.step = meta["step"]
    # An epoch-end checkpoint of this folder carries its epoch's record (one from elsewhere,
    # run.resume=PATH, continues a run whose records are not here)
    ours = Path(meta["path"]).resolve().parent == checkpoint_dir(out).resolve()
    record = meta.get("epoch_record") if ours else None
    if placement.complete:
        if dist.is_primary() and record:
            restore_epoch_record(out, record)
        return placement  # no step left: its records stay as they are
    if dist.is_primary():
        truncate_records(out, step=meta["step"], epoch=meta["epoch"])
        if record:
            restore_epoch_record(out, record)
    partial = meta["partial"]
    if meta["world"] == dist.size():
        set_rng_states(meta["rng"][dist.rank()])
        placement.partial = partial[dist.rank()] if partial else None
    else:
        log.warning("resuming a run of %d ranks on %d with the same unique global batch: every step reads the same "
                    "files with the same LR; ghost-BN groups are rank-local, so losses differ from an uninterrupted "
                    "run; RNG states not restored", meta["world"], dist.size())
        if partial and dist.is_primary():  # the epoch's sums so far, all on rank 0
            placement.partial = EpochProgress.merge(partial)
    log.info("resumed from %s: step %d, epoch %d, step %d of it", meta["path"], meta["step"],
             meta["epoch"] + 1, meta["step_in_epoch"])
    return placement
