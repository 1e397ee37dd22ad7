"""A run directory belongs to one run: run ids, the refusal to start over an earlier run, and
the lock that holds the folder for one job.

Every run has an id (`<date>-<time>-<hex>`), written in config.yaml, in every checkpoint and in
result.json. A fresh start (no run.resume) in a folder that already holds a run stops before any
rank trains; run.overwrite moves the old run aside, it never deletes it. What a resume checks
against the checkpoint it continues (the plan) is train/resume.py's.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from hvd_ba.cluster import pid_alive
from hvd_ba.config import Config, ConfigError

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
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # missing, unreadable, not text, not YAML
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
