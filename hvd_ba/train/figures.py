"""What a run derives from its config, as the lines that `plan` and every run's start print.
Torch-free: `plan` (slurm/job.sh's config check before every attempt) imports no torch."""
from __future__ import annotations

from hvd_ba.config import Config, derive
from hvd_ba.train.lr_schedule import describe_warmup


def derived_figures(cfg: Config, world: int, train_files: int, steps: int | None = None) -> list[str]:
    """What a run derives from its config (config.derive), printed by plan and at a run's start
    (`steps`: its sampler's steps per epoch, which static parts of whole packed shards lower)."""
    f, o = derive(cfg, world, train_files), cfg.optim
    ghost = (f"{f.ghost_groups} groups of {f.ghost_size} per rank ({cfg.model.ghost_impl})" if f.ghost_size
             else "off (plain BN over the rank's batch)")
    return [
        f"unique batch: {f.unique_batch} per rank, {f.unique_global} global; copies M = {f.copies}",
        f"samples per step: {f.samples_per_rank} per rank, {f.samples_global} global",
        f"ghost BN: {ghost}",
        f"peak LR: {f.peak_lr:.4g} = {o.base_lr:g} x {f.unique_global} / {o.reference_batch} (M does not change it), "
        f"{describe_warmup(f.peak_lr, o)}, then "
        + ("cosine" if o.schedule == "cosine" else
           f"x{o.decay:g} at epochs {', '.join(f'{e:g}' for e in o.milestones)}" if o.milestones else "constant")
        + f" of {o.epochs}",
        f"steps per epoch: {f.steps_per_epoch if steps is None else steps} (those of unique batch {f.unique_global})",
    ]
