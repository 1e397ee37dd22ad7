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
import time
from pathlib import Path

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
    """Rename the run folder to `<out>.old-<time>` (never deleted) and make `out` afresh."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.old-{stamp}-{n}")
    os.rename(out, target)
    out.mkdir(parents=True)
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


def run_plan(cfg: Config, world: int, steps_per_epoch: int, train_files: int, train_digest: str,
             peak: float) -> dict:
    """What the data order and the LR of every step depend on; stored in every checkpoint."""
    d, o = cfg.data, cfg.optim
    return {
        "world": world, "unique_batch": d.unique_batch, "unique_global": d.unique_batch * world,
        "copies": d.copies, "ghost_size": cfg.model.ghost_size, "steps_per_epoch": steps_per_epoch,
        "train_files": train_files, "train_digest": train_digest, "seed": cfg.run.seed, "shard": d.shard,
        "layout": d.layout, "peak_lr": peak, "warmup_epochs": o.warmup_epochs,
        "warmup_from": o.warmup_from, "schedule": o.schedule,
        "milestones": list(o.milestones), "decay": o.decay,
        "epochs": o.epochs if o.schedule == "cosine" else None,  # a step schedule may be extended
    }


LABELS = {
    "world": "ranks", "unique_batch": "data.unique_batch (per rank)", "unique_global": "unique global batch",
    "copies": "data.copies", "ghost_size": "model.ghost_size", "steps_per_epoch": "steps per epoch",
    "train_files": "training files", "train_digest": "training file index", "seed": "run.seed",
    "shard": "data.shard", "layout": "data.layout", "peak_lr": "peak LR", "warmup_epochs": "optim.warmup_epochs",
    "warmup_from": "optim.warmup_from", "schedule": "optim.schedule", "milestones": "optim.milestones",
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
    keys = [k for k in LABELS if k in saved and k in current]
    diffs = {k for k in keys if (saved[k] != current[k] if not isinstance(saved[k], float)
                                 else abs(saved[k] - current[k]) > 1e-12 * max(1.0, abs(saved[k])))}
    resized = bool(diffs) and diffs <= {"world", "unique_batch"} and saved.get("shard") == "global"
    if resized or not diffs:
        return [], resized
    return [f"{LABELS[k]} {_show(k, saved[k])} -> {_show(k, current[k])}" for k in keys if k in diffs], False


def refuse_resume(path, differences: list[str], saved: dict, current: dict) -> RunRefused:
    hint = ""
    if saved.get("world") != current.get("world") and saved.get("shard") == "global":
        whole = saved["unique_global"] % current["world"] == 0
        hint = (f"; on {current['world']} ranks, --set data.unique_batch={saved['unique_global'] // current['world']} "
                f"keeps the unique global batch of {saved['unique_global']}" if whole else
                f"; the unique global batch {saved['unique_global']} does not split over {current['world']} ranks")
    elif saved.get("world") != current.get("world"):
        hint = "; static shards are owned per rank: resume them on the same number of ranks"
    return RunRefused(f"run.resume: checkpoint '{path}' was written with a different data order or LR schedule: "
                      + "; ".join(differences) + hint + "; nothing was trained")
