"""Checkpoints: written atomically by rank 0, the last K kept, a `latest` pointer updated last.

A checkpoint holds tensors and plain types only, so it loads with
`torch.load(weights_only=True)`: model (unwrapped, uncompiled), optimizer, GradScaler, global
step, epoch and step within it (the data order is a pure function of (seed, epoch), so these
place a resumed run exactly), each rank's torch RNG state, the resolved config and the version.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from hvd_ba import __version__

log = logging.getLogger("hvd_ba")

FORMAT = 1
NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
LATEST = "latest"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a crash leaves the old file or the new one, never half of one
    _fsync_dir(path.parent)


def save_checkpoint(out_dir: str | Path, payload: dict, keep: int) -> Path:
    """Write ckpt-<step>.pt, then point `latest` at it, then prune to the newest `keep`."""
    folder = checkpoint_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".ckpt-*.tmp"):  # left by a writer killed mid-write; only rank 0 writes
        stale.unlink(missing_ok=True)
    path = folder / f"ckpt-{payload['step']:09d}.pt"
    _atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": __version__, **payload}, f))
    _atomic_write(folder / LATEST, lambda f: f.write(path.name.encode()))
    prune(folder, payload.get("run_id"), keep, path)
    return path


def run_id_of(path: Path) -> str | None:
    """The run id stored in a checkpoint, read without loading its tensors; None if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("run_id")
    except Exception:  # a damaged file: not known to be ours, so never pruned
        return None


def prune(folder: Path, run_id: str | None, keep: int, newest: Path) -> None:
    """Remove this run's oldest checkpoints (by step) beyond `keep`. Only checkpoints that name
    `run_id` are candidates, and never `newest` (the one `latest` now names)."""
    ours = sorted(p for p in folder.iterdir() if NAME.match(p.name) and p != newest and run_id_of(p) == run_id)
    for old in ours[:max(0, len(ours) - (keep - 1))]:
        old.unlink(missing_ok=True)


def _candidates(folder: Path) -> list[Path]:
    """The checkpoint `latest` names first, then every other one, newest step first."""
    found = sorted((p for p in folder.iterdir() if NAME.match(p.name)), reverse=True) if folder.is_dir() else []
    pointer = folder / LATEST
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def load_checkpoint(path: str | Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"not an hvd_ba checkpoint of format {FORMAT}")
    return payload


def find_checkpoint(resume: str, out_dir: str | Path) -> tuple[Path, dict] | None:
    """resume 'auto': the newest checkpoint of the run directory that loads (a truncated or
    corrupt one is skipped with a warning naming it), or None; else the given file."""
    if resume != "auto":
        return Path(resume), load_checkpoint(resume)
    for path in _candidates(checkpoint_dir(out_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as err:  # torch raises several types for a damaged file
            log.warning("skipping checkpoint %s: it does not load (%s)", path, str(err).splitlines()[0])
    return None
