"""A run directory belongs to one run: run ids, the refusal to start over an earlier run, and
the checks a resume makes against the checkpoint it continues.

Every run has an id (`<date>-<time>-<hex>`), written in config.yaml, in every checkpoint and in
result.json. A fresh start (no run.resume) in a folder that already holds a run stops before any
rank trains; run.overwrite moves the old run aside, it never deletes it. A resume compares what
the data order and the LR schedule depend on (the *plan*) with the checkpoint's and refuses any
difference but one: the world size, when the unique global batch stays the same (global shards),
which places every global step on the same files with the same LR.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from hvd_ba.cluster import pid_alive
from hvd_ba.config import Config, ConfigError, derive

# What a run leaves in its folder; a folder with any of them holds a run (logs/ alone does not:
# the sbatch scripts create it before the first start).
RUN_FILES = ("config.yaml", "steps.jsonl", "metrics.jsonl", "result.json", "model.pt")


class RunRefused(ConfigError):
    """A start that would mix, lose or corrupt a run; the message says what to do instead."""


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def holds_run(out: str | Path) -> bool:
    out = Path(out)
    if any((out / name).exists() for name in RUN_FILES):
        return True
    folder = out / "checkpoints"
    return folder.is_dir() and any(p.name.startswith("ckpt-") for p in folder.iterdir())


def read_run_id(out: str | Path) -> str | None:
    """The id of the run in `out` (config.yaml, else result.json), or None."""
    import yaml

    out = Path(out)
    try:
        raw = yaml.safe_load((out / "config.yaml").read_text())
        if isinstance(raw, dict) and raw.get("run_id"):
            return str(raw["run_id"])
    except (OSError, yaml.YAMLError):
        pass
    result = read_result(out)
    return result.get("run_id") if result else None


def read_result(out: str | Path) -> dict | None:
    """result.json when it parses as a record, else None (missing, torn, not a dict)."""
    try:
        result = json.loads((Path(out) / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def move_aside(out: Path) -> Path:
    """Rename the run folder to `<out>.old-<time>` (never deleted) and make `out` afresh. A
    symlinked folder: its target is moved and made afresh (the link keeps pointing there)."""
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise RunRefused(f"run.overwrite: run.out_dir '{out}' is the working directory or holds it; it cannot be "
                         "moved aside from here: choose another run.out_dir; nothing was started")
    if os.path.ismount(real):
        raise RunRefused(f"run.overwrite: run.out_dir '{out}' is a mount point and cannot be moved aside; choose a "
                         "folder inside it as run.out_dir; nothing was started")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = real.with_name(f"{real.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = real.with_name(f"{real.name}.old-{stamp}-{n}")
    try:
        os.rename(real, target)
        real.mkdir()
    except OSError as err:
        raise RunRefused(f"run.overwrite: cannot move '{out}' aside to '{target}' ({err.strerror}); move or remove it "
                         "yourself, or choose another run.out_dir; nothing was started") from None
    return target


def claim_fresh(cfg: Config, out: Path) -> tuple[str, Path | None]:
    """A fresh start (no run.resume) in `out`: its new run id, and where an earlier run was
    moved (run.overwrite), or RunRefused when `out` holds a run. Rank 0 only."""
    if holds_run(out):
        old_id = read_run_id(out)
        if not cfg.run.overwrite:
            raise RunRefused(
                f"run.out_dir '{out}' already holds a run{f' ({old_id})' if old_id else ''}: continue it with "
                f"--set run.resume=auto, choose another run.out_dir, or --set run.overwrite=true to move it aside "
                f"to '{out}.old-<time>'; nothing was started")
        return new_run_id(), move_aside(out)
    return new_run_id(), None


# ------------------------------------------------------------------------------ resume checks

def index_digest(index) -> str:
    """sha256 over the training index (relative paths and labels, in order)."""
    h = hashlib.sha256()
    for path, label in zip(index.paths, index.labels):
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()


# The order in which global shards read the files (ShardSampler.shard); format-1 checkpoints
# were written with order 1, which cut the epoch's permutation into one contiguous part per rank.
SHARD_ORDER = 2


def run_plan(cfg: Config, world: int, steps_per_epoch: int | None, train_files: int | None,
             train_digest: str | None, peak: float) -> dict:
    """What the data order and the LR of every step depend on; stored in every checkpoint."""
    d, o = cfg.data, cfg.optim
    return {
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
    "data": {"path", "unique_batch", "manifest_dir", "workers", "worker_start", "prefetch", "eval_batch", "local_path"},
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


# -------------------------------------------------------------------------------- the run lock

LOCK = ".lock"


class RunLocked(RunRefused):
    """Another job holds the run folder."""


def _lock_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0), "started": time.time()}


def _stale_reason(holder: dict, age: float, stale_after: float) -> str | None:
    """Why a lock may be broken, or None while its holder may be alive."""
    job = os.environ.get("SLURM_JOB_ID")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
    if job and holder.get("job") == job and int(holder.get("restart", -1)) < restart:
        return f"an earlier attempt (restart {holder.get('restart')}) of Slurm job {job} left it"
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            return f"it names this very process {pid} (left by an earlier run in another pid namespace)"
        if not pid_alive(pid):
            return f"its process {pid} is gone"
    if age > stale_after:
        return f"its heartbeat is {age:.0f} s old (run.lock_stale_after {stale_after:g} s)"
    return None


def _break_lock(path: Path, holder: dict | None) -> bool:
    """Move the judged lock out of the way atomically and check it was the one judged (another
    starter may have broken it and taken a fresh one meanwhile: that one is put back)."""
    aside = path.with_name(f"{LOCK}.broken-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        taken = json.loads(aside.read_text())
    except (OSError, ValueError):
        taken = None
    if holder is not None and taken != holder:
        try:
            os.link(aside, path)  # restore the other starter's lock (fails if yet another exists)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def take_lock(out: Path, stale_after: float) -> Path:
    """Hold `out` for this run: `.lock` created atomically (O_EXCL) with host, pid, Slurm job id,
    restart count and start time; its mtime is the holder's heartbeat (refresh_lock). A lock is
    broken, with a warning, when its process is gone (same host), when it names this very process
    (a new pid namespace), when an earlier attempt of the same Slurm job left it, or when its
    heartbeat is `stale_after` s old; else RunLocked names the holder. Rank 0 only."""
    import logging

    from hvd_ba.fsio import SPACE_ERRORS, DiskFull

    log = logging.getLogger("hvd_ba")
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    for _ in range(20):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            holder, age = read_lock(path)
            if holder is None:  # being written this instant, or torn by a crash
                if age is not None and age > 5:
                    _break_lock(path, None)
                time.sleep(0.1)
                continue
            reason = _stale_reason(holder, age, stale_after)
            if reason is None:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                raise RunLocked(
                    f"run.out_dir '{out}' is in use by another job: host {holder.get('host')}, pid {holder.get('pid')}"
                    + (f", Slurm job {holder['job']}" if holder.get("job") else "")
                    + f", since {started} (heartbeat {age:.0f} s ago); wait for it to end, or choose another "
                    "run.out_dir; nothing was started")
            if _break_lock(path, holder):
                log.warning("breaking the lock of %s: %s", out, reason)
            continue
        except OSError as err:
            if err.errno in SPACE_ERRORS:
                raise DiskFull(err.errno, f"run folder '{out}': {SPACE_ERRORS[err.errno]}: cannot create its lock; "
                                          "free space, then start again") from None
            raise RunRefused(f"run.out_dir '{out}': cannot create its lock {path} ({err.strerror})") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(_lock_record()))
                f.flush()
        except OSError as err:
            path.unlink(missing_ok=True)
            if err.errno in SPACE_ERRORS:
                raise DiskFull(err.errno, f"run folder '{out}': {SPACE_ERRORS[err.errno]} writing its lock; free "
                                          "space, then start again") from None
            raise
        return path
    raise RunLocked(f"run.out_dir '{out}': could not take {path} (several jobs starting at once?); nothing was started")


def read_lock(path: Path) -> tuple[dict | None, float | None]:
    """(holder record or None, seconds since its heartbeat or None)."""
    try:
        age = time.time() - path.stat().st_mtime
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, age if "age" in locals() else None
    return (holder if isinstance(holder, dict) else None), age


def refresh_lock(path: Path) -> None:
    """The holder's heartbeat: touch the lock (a failure is not fatal: the lock stays held)."""
    try:
        os.utime(path)
    except OSError:
        pass


def release_lock(path: Path | None) -> None:
    if path is None:
        return
    holder, _ = read_lock(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


_held: Path | None = None


def hold_lock(out: Path, stale_after: float) -> Path:
    """take_lock, then a heartbeat thread that touches the lock every minute until the process
    ends; release_held_lock() gives it up (every exit path of a rank calls it)."""
    global _held
    _held = take_lock(out, stale_after)
    path = _held

    def beat():
        while _held == path:
            time.sleep(min(60.0, stale_after / 4))
            if _held == path:
                refresh_lock(path)

    threading.Thread(target=beat, name="lock-heartbeat", daemon=True).start()
    return path


def release_held_lock() -> None:
    global _held
    path, _held = _held, None
    release_lock(path)


def is_complete(out: str | Path) -> bool:
    """A result.json that parses and names the run of config.yaml."""
    result = read_result(out)
    if result and "run_id" not in result:  # written before run ids: complete if it has its figure
        return result.get("val_top1") is not None
    run_id = read_run_id(out)
    return bool(result and run_id and result.get("run_id") == run_id)
