"""Every file a run writes goes through here, so that a kill at any moment leaves a run that
resumes, and so that a crash test can stop the run at each of its writes.

- Whole files (checkpoints, `latest`, config.yaml, result.json, rank<r>.json, model.pt, a
  rebuilt metrics.csv or a trimmed record file): written to a temporary file in the same folder,
  fsynced, renamed over the target, and the folder fsynced. A crash leaves the old file or the
  new one, never half of one; a leftover temporary (`.<name>.<pid>.tmp`) is removed at the next
  start.
- Records (steps.jsonl, metrics.jsonl, lambda.jsonl, reads.jsonl, metrics.csv): appended one
  whole newline-terminated record per write and flushed. A crash can leave a torn last record;
  readers skip it, and a resume cuts it off with a warning naming the file and the bytes dropped.
- Errors: a full disk (ENOSPC, EDQUOT) or a read-only file system (EROFS) raise `DiskFull`, after
  the temporary file is removed; the caller keeps the last good checkpoint and says so.

Crash testing: with HVD_BA_IO_LOG=FILE each operation (write, fsync, rename, unlink) appends a
line "<n> <op> <path>" to FILE; with HVD_BA_CRASH_AT=N the process kills itself (SIGKILL, no
clean-up) at its N-th operation, a write after half its bytes; with HVD_BA_FAIL_AT=N:ENOSPC the
N-th operation raises that error instead. HVD_BA_CRASH_RANK limits both to one rank.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import shutil
import signal
from pathlib import Path

from hvd_ba.cluster import launch_info, pid_alive

log = logging.getLogger("hvd_ba")

SPACE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system"}


class DiskFull(OSError):
    """A write failed for lack of space or permission to write (ENOSPC, EDQUOT, EROFS)."""


def free_bytes(path: str | Path) -> int:
    """Bytes free for this user (not root's reserve) on the file system that holds `path`."""
    return shutil.disk_usage(path).free


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in pieces."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------- crash instrumentation

_count = 0


def _rank_matches() -> bool:
    wanted = os.environ.get("HVD_BA_CRASH_RANK")
    if wanted is None:
        return True
    return str(launch_info().rank) == wanted


def _op(kind: str, path, partial=None) -> None:
    """Count one file operation; die or fail there when a crash test asks for it. `partial`
    (for writes): a callable that writes the first half of the data before the process dies."""
    global _count
    if not any(k in os.environ for k in ("HVD_BA_IO_LOG", "HVD_BA_CRASH_AT", "HVD_BA_FAIL_AT")):
        return
    if not _rank_matches():
        return
    _count += 1
    if "HVD_BA_IO_LOG" in os.environ:
        with open(os.environ["HVD_BA_IO_LOG"], "a") as f:
            f.write(f"{_count} {kind} {path}\n")
    if os.environ.get("HVD_BA_CRASH_AT") == str(_count):
        if partial is not None:
            partial()
        os.kill(os.getpid(), signal.SIGKILL)
    fail = os.environ.get("HVD_BA_FAIL_AT", "")
    if fail.partition(":")[0] == str(_count):
        code = getattr(errno, fail.partition(":")[2] or "ENOSPC")
        raise OSError(code, os.strerror(code), str(path))


def _check_space(err: OSError, path) -> None:
    if err.errno in SPACE_ERRORS:
        raise DiskFull(err.errno, f"{SPACE_ERRORS[err.errno]} writing '{path}'", str(path)) from None


# ---------------------------------------------------------------------------------- whole files

def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _op("fsync", path)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace `path` by `data` atomically (temporary file, fsync, rename, folder fsync)."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            _op("write", tmp, partial=lambda: (f.write(data[:len(data) // 2]), f.flush()))
            f.write(data)
            f.flush()
            _op("fsync", tmp)
            os.fsync(f.fileno())
        _op("rename", path)
        os.replace(tmp, path)  # a crash leaves the old file or the new one, never half of one
        fsync_dir(path.parent)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only file system refuses this too; the write's error is the news
            pass
        _check_space(err, path)
        raise
    return path


def atomic_torch_save(path: str | Path, obj) -> Path:
    """torch.save through atomic_write (serialised in memory first: one write, one failure point)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, buffer.getvalue())


def atomic_json(path: str | Path, obj, indent=None) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent))


def remove(path: Path) -> None:
    """Remove a file that is no longer needed (an old checkpoint); a failure only warns."""
    try:
        _op("unlink", path)
        path.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not remove %s (%s); it stays", path, err.strerror)


def _pid_gone(name: str) -> bool:
    """Whether the writer of a temporary `.<name>.<pid>.tmp` is gone (False: alive, or unknown)."""
    try:
        pid = int(name.rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return False
    return not pid_alive(pid)


def remove_stale_temporaries(folder: Path, dead_only: bool = False) -> list[Path]:
    """Temporaries left by writers killed mid-write (`.<name>.<pid>.tmp`); only rank 0 writes.
    dead_only: only those whose writer's pid is gone on this host (safe before the lock is held,
    e.g. to free the space of a half-written checkpoint on a full disk)."""
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".*.tmp") if p.is_file() and (not dead_only or _pid_gone(p.name))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# -------------------------------------------------------------------------------------- records

def _append(path: str | Path, data: bytes) -> None:
    """One write of whole lines at the end of `path`, flushed (the crash hook may cut it in half)."""
    try:
        with open(path, "ab") as f:
            _op("write", path, partial=lambda: (f.write(data[:len(data) // 2]), f.flush()))
            f.write(data)
            f.flush()
    except OSError as err:
        _check_space(err, path)
        raise


def append_record(path: str | Path, record: dict) -> None:
    """One JSON record as one whole line, flushed."""
    _append(path, (json.dumps(record) + "\n").encode())


def read_records(path: str | Path) -> list[dict]:
    """The whole records of a JSONL file; a torn last line (a crash mid-append) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines) and not raw.endswith(b"\n"):
                continue  # torn by a crash mid-append: cut off at the next resume (trim_records)
            log.warning("%s: line %d is not a whole record; skipped", path, number)
    return records


def trim_records(path: str | Path, keep) -> None:
    """Keep the whole records for which keep(record) holds; a torn or unparsable line is
    dropped with a warning naming the file and its bytes. Rewritten atomically, and only when
    something changes."""
    path = Path(path)
    if not path.exists():
        return
    raw = path.read_bytes()
    kept, dropped_bytes, changed = [], 0, False
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) and not raw.endswith(b"\n"):
                dropped_bytes += len(line)
            else:
                log.warning("%s: line %d is not a whole record (%d bytes); dropped", path, number, len(line))
            changed = True
            continue
        if keep(record):
            kept.append(line)
        else:
            changed = True
    if not raw.endswith(b"\n") and raw:
        changed = True
    if dropped_bytes:
        log.warning("%s: dropped a torn record of %d bytes (a write cut short by a crash)", path, dropped_bytes)
    if changed:
        atomic_write(path, b"".join(line + b"\n" for line in kept))


def sync_files(paths) -> None:
    """fsync the record files that exist (before a checkpoint that covers them, and before
    result.json: a node crash must not keep the checkpoint, or the result, and lose the records
    it follows)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            _op("fsync", path)
            os.fsync(fd)
        finally:
            os.close(fd)


def write_csv(path: str | Path, rows: list[dict], columns) -> None:
    """A whole CSV file (header + rows), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


def append_csv(path: str | Path, record: dict, columns) -> None:
    """One CSV row (with the header first when the file is new), as one flushed write."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", extrasaction="ignore")
    if not path.exists():
        writer.writeheader()
    writer.writerow(record)
    _append(path, buffer.getvalue().encode())
