"""Checkpoints: written atomically by rank 0, the last K kept, a `latest` pointer updated last;
write_checkpoint is the collective around it that every rank calls at the same step.

A checkpoint holds tensors and plain types only, so it loads with
`torch.load(weights_only=True)`: model (unwrapped, uncompiled), optimizer, GradScaler, global
step, epoch and step within it (the data order is a pure function of (seed, epoch), so these
place a resumed run exactly), each rank's torch RNG state, the resolved config and the version.
"""
from __future__ import annotations

import errno
import json
import logging
import pickle
import re
import warnings
from pathlib import Path

import torch

from hvd_ba import __version__, dist, fsio
from hvd_ba.config import Config, ConfigError
from hvd_ba.fsio import DiskFull
from hvd_ba.train.engine import TrainState, average_bn_statistics
from hvd_ba.train.records import RECORD_FILES
from hvd_ba.train.stop import pause_point

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


def write_checkpoint(cfg: Config, state: TrainState, model: torch.nn.Module, out: Path, step_in_epoch: int,
                     epoch: int | None = None, epoch_record: dict | None = None) -> None:
    """Collective: every rank calls it at the same step. BN running statistics are averaged
    first (so the saved model is the one all ranks would evaluate); each rank's RNG states and,
    mid-epoch, its partial epoch sums are gathered; rank 0 writes. `epoch_record`: at an epoch's
    end, the epoch's metrics, which the checkpoint carries (they are recorded after it)."""
    if state.watchdog is not None:
        state.watchdog.tick(f"the checkpoint of step {state.step}", peers=True)
    average_bn_statistics(model)
    rng = dist.allgather_object(rng_states(), name="rng")
    partial = dist.allgather_object(state.progress.to_record(), name="partial") if step_in_epoch else None
    failure = None
    if state.watchdog is not None:  # an fsync on a loaded file system may take minutes: not a stall
        what = (f"its write of the checkpoint of step {state.step} to {checkpoint_dir(out)}" if dist.is_primary()
                else f"rank 0 to write the checkpoint of step {state.step}")
        state.watchdog.tick(what, peers=not dist.is_primary(), timeout=cfg.run.checkpoint_timeout,
                            key="run.checkpoint_timeout")
    if dist.is_primary():
        pause_point("checkpoint_write")
        fsio.sync_files(out / name for name in RECORD_FILES)
        payload = {"model": model.state_dict(), "optimizer": state.optimizer.state_dict(),
                   "scaler": state.scaler.state_dict() if state.scaler else None, "step": state.step,
                   "epoch": state.epoch if epoch is None else epoch, "step_in_epoch": step_in_epoch,
                   "world": dist.size(), "rng": rng, "partial": partial, "config": cfg.to_dict(),
                   "run_id": state.run_id, "plan": state.plan,
                   # as metrics.jsonl holds it: plain types only, or torch.load(weights_only) refuses the file
                   "epoch_record": json.loads(json.dumps(epoch_record)) if epoch_record else None}
        try:
            path = save_checkpoint(out, payload, cfg.run.keep_checkpoints, prune_legacy=state.legacy_checkpoints)
            log.info("checkpoint %s (step %d)", path, state.step)
        except DiskFull as err:
            failure = err.strerror
        if state.watchdog is not None:  # written: a peer that does not come now is stuck
            state.watchdog.tick(f"the other ranks after the checkpoint of step {state.step}", peers=True)
    # Nobody leaves (or exits) before the file is on disk; a full disk stops every rank at once.
    failure = dist.broadcast_object(failure, name="checkpoint")
    if failure:
        err = DiskFull(errno.ENOSPC, failure)
        err.quiet = not dist.is_primary()  # one line, from rank 0
        raise err


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
    try:
        named = folder / pointer.read_text().strip() if pointer.is_file() else None
    except (OSError, UnicodeDecodeError):  # a damaged pointer: the newest step first, as without one
        named = None
    if named is not None:
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def newest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names (else the newest step), without loading it."""
    found = _candidates(checkpoint_dir(out_dir))
    return found[0] if found else None


class CheckpointError(ConfigError):
    """A file that is not a loadable hvd_ba checkpoint; the message is one line: the reason. A bad
    input like a bad config value (the commands exit 2)."""


def load_checkpoint(path: str | Path) -> dict:
    """The payload of the checkpoint at `path`, loaded with weights_only (a file carrying code is
    refused unexecuted). CheckpointError with one line for a missing file, a folder, a truncated
    or foreign file, one that would run code, or another format."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file")
    if path.is_dir():
        raise CheckpointError("a folder, not a checkpoint file")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise CheckpointError(f"cannot be read ({err.strerror or err})") from None
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # weights_only met a class or a call: refused, never executed
            raise CheckpointError("it holds Python objects other than tensors and plain types (refused unloaded, "
                                  "nothing in it was run); not an hvd_ba checkpoint") from None
        said = [line for line in str(err).splitlines() if "Unsupported" in line] or ["UnpicklingError"]
        raise CheckpointError(f"truncated, damaged or not a torch file ({said[0].strip()[:120]})") from None
    except Exception as err:  # RuntimeError, EOFError, KeyError, OSError (EINVAL)... for a damaged file
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:120]
        raise CheckpointError(f"truncated, damaged or not a torch file ({type(err).__name__}"
                              f"{': ' + first if first else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") not in (1, FORMAT):
        raise CheckpointError(f"not an hvd_ba checkpoint of format 1 or {FORMAT}")
    missing = [key for key in ("model", "step") if key not in payload]
    if missing:
        raise CheckpointError(f"an hvd_ba checkpoint without {', '.join(missing)} (damaged, or not written by "
                              "hvd_ba train)")
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
