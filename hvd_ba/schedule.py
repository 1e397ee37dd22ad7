"""Learning rate as a pure function of the global step (so resume needs no scheduler state)."""
from __future__ import annotations

import bisect
import math


def peak_lr(base_lr: float, unique_global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling by the *unique* global batch (Goyal et al. 2017); M does not change it."""
    return base_lr * unique_global_batch / reference_batch


def learning_rate(step: int, steps_per_epoch: int, peak: float, warmup_epochs: float,
                  milestones: list[float], decay: float, schedule: str = "step", epochs: int = 90) -> float:
    """LR for optimizer step `step` (0-based).

    Per-iteration linear warmup reaching `peak` at the end of `warmup_epochs`; then, for
    schedule "step", a factor of `decay` at each milestone epoch passed (the paper: /10 at 30,
    60, 80 of 90), or for "cosine", a half cosine from `peak` to 0 at `epochs`.
    """
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "cosine":
        total = epochs * steps_per_epoch
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = step / steps_per_epoch
    return peak * decay ** bisect.bisect_right(milestones, epoch)
