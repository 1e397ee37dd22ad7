"""Checkpoints: written atomically by rank 0, the last K kept, a `latest` pointer updated last
(the collective that every rank calls at the same step is train/agreement.py: write_checkpoint).

A checkpoint holds tensors and plain types only, so it loads with
`torch.load(weights_only=True)`: model (unwrapped, uncompiled), optimizer, GradScaler, global
step, epoch and step within it (the data order is a pure function of (seed, epoch), so these
place a resumed run exactly), each rank's torch RNG state, the resolved config and the version.
"""
from __future__ import annotations

import errno
import logging
import re
from pathlib import Path

import torch

from hvd_ba import __version__, fsio
from hvd_ba.fsio import DiskFull

log = logging.getLogger("hvd_ba")

FORMAT = 2  # 2: run id, plan, partial epoch sums, CUDA RNG states; 1 (older) is still read
NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
LATEST = "latest"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


SPACE_MARGIN = 1.05  # free space wanted before a checkpoint: the last one's size x this + 16 MB


def check_space(folder: Path, newest: Path | None) -> None:
    """Raise DiskFull before writing a checkpoint that will not fit (the last one's size plus a
    margin), so that the write never starts; the last good checkpoint stays the resume point."""
    if newest is None or not newest.is_file():
        return
    free = fsio.free_bytes(folder)
    needed = int(newest.stat().st_size * SPACE_MARGIN) + (16 << 20)
    if free < needed:
        raise DiskFull(errno.ENOSPC, f"run folder '{folder.parent}' is full: a checkpoint needs about {needed} bytes, "
                       f"{free} are free; '{newest}' stays the resume point: free space, then resume with "
                       "--set run.resume=auto", str(folder))


def save_checkpoint(out_dir: str | Path, payload: dict, keep: int, prune_legacy: bool = False) -> Path:
    """Write ckpt-<step>.pt, then point `latest` at it, then prune to the newest `keep` of this
    run. A full disk raises DiskFull (with the temporary file removed) naming the checkpoint that
    stays the resume point."""
    folder = checkpoint_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fsio.remove_stale_temporaries(folder)  # left by a writer killed mid-write; only rank 0 writes
    path = folder / f"ckpt-{payload['step']:09d}.pt"
    previous = _candidates(folder)
    check_space(folder, previous[0] if previous else None)
    try:
        fsio.atomic_torch_save(path, {"format": FORMAT, "version": __version__, **payload})
        fsio.atomic_write(folder / LATEST, path.name)
    except DiskFull as err:
        resume_point = previous[0] if previous else None
        needed = resume_point.stat().st_size if resume_point else 0
        raise DiskFull(err.errno, f"run folder '{Path(out_dir)}': {fsio.SPACE_ERRORS[err.errno]} writing checkpoint "
                       f"'{path.name}' (about {needed} bytes needed, {fsio.free_bytes(folder)} free); "
                       + (f"'{resume_point}' stays the resume point" if resume_point else "no earlier checkpoint")
                       + ": free space, then resume with --set run.resume=auto", str(path)) from None
    prune(folder, {payload.get("run_id"), None} if prune_legacy else {payload.get("run_id")}, keep, path)
    return path


def _ours(path: Path, run_ids: set) -> bool:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged file: not known to be ours
        return False
    return isinstance(payload, dict) and payload.get("run_id") in run_ids


def run_id_of(path: Path) -> str | None:
    """The run id stored in a checkpoint, read without loading its tensors; None if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("run_id")
    except Exception:  # a damaged file: not known to be ours, so never pruned
        return None


def prune(folder: Path, run_ids: set, keep: int, newest: Path) -> None:
    """Remove this run's oldest checkpoints (by step) beyond `keep`. Only checkpoints whose run id
    is in `run_ids` are candidates (None: format-1 checkpoints, which a run resumed from one
    adopts), never an unreadable file, and never `newest` (the one `latest` now names)."""
    ours = sorted(p for p in folder.iterdir() if NAME.match(p.name) and p != newest and _ours(p, run_ids))
    for old in ours[:max(0, len(ours) - (keep - 1))]:
        fsio.remove(old)


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


def newest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names (else the newest step), without loading it."""
    found = _candidates(checkpoint_dir(out_dir))
    return found[0] if found else None


def load_checkpoint(path: str | Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") not in (1, FORMAT):
        raise ValueError(f"not an hvd_ba checkpoint of format 1 or {FORMAT}")
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


def rng_states() -> dict:
    """This rank's global RNG states: torch's CPU generator and, on a GPU, the CUDA one."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states) -> None:
    if isinstance(states, torch.Tensor):  # a checkpoint of format 1 held the CPU state only
        states = {"cpu": states}
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
