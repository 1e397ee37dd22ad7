"""Learning rate as a pure function of the global step (so resume needs no scheduler state)."""
from __future__ import annotations

import bisect


def peak_lr(base_lr: float, unique_global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling by the *unique* global batch (Goyal et al. 2017); M does not change it."""
    return base_lr * unique_global_batch / reference_batch


def learning_rate(step: int, steps_per_epoch: int, peak: float, warmup_epochs: float,
                  milestones: list[float], decay: float) -> float:
    """LR for optimizer step `step` (0-based).

    Per-iteration linear warmup reaching `peak` at the end of `warmup_epochs`, then a factor of
    `decay` at each milestone epoch passed (the paper: /10 at 30, 60, 80 of 90).
    """
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    epoch = step / steps_per_epoch
    return peak * decay ** bisect.bisect_right(milestones, epoch)
