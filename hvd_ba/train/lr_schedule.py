"""Learning rate as a pure function of the global step (so resume needs no scheduler state).

The peak is config.derive()'s: the base LR (0.1 per 256 images) scaled linearly by the *unique*
global batch (config.peak_lr); M does not change it. From it: warmup, then the step (or cosine)
schedule.
"""
from __future__ import annotations

import bisect
import math


def learning_rate(step: int, steps_per_epoch: int, peak: float, warmup_epochs: float,
                  milestones: list[float], decay: float, schedule: str = "step", epochs: int = 90,
                  warmup_start: float | None = None) -> float:
    """LR for optimizer step `step` (0-based).

    Per-iteration linear warmup reaching `peak` at the end of `warmup_epochs`: with
    `warmup_start` (Goyal et al.: the base LR of 256 images) from that LR at iteration 0, rising
    by a constant amount per iteration, and no warmup where the peak is not above it; with None,
    from zero (peak x (step + 1) / warmup steps). Then, for schedule "step", a factor of `decay`
    at each milestone epoch passed (the paper: /10 at 30, 60, 80 of 90), or for "cosine", a half
    cosine from `peak` to 0 at `epochs`.
    """
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if warmup_start is not None and peak <= warmup_start:
        warmup_steps = 0  # nothing to rise to: the schedule starts at the peak
    if step < warmup_steps:
        if warmup_start is None:
            return peak * (step + 1) / warmup_steps
        return warmup_start + (peak - warmup_start) * step / warmup_steps
    if schedule == "cosine":
        total = epochs * steps_per_epoch
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = step / steps_per_epoch
    return peak * decay ** bisect.bisect_right(milestones, epoch)


def config_lr(step: int, steps_per_epoch: int, peak: float, optim) -> float:
    """The LR of `step` under an OptimConfig (optim.warmup_from: base | zero)."""
    return learning_rate(step, steps_per_epoch, peak, optim.warmup_epochs, optim.milestones, optim.decay,
                         optim.schedule, optim.epochs, warmup_start(optim))


def warmup_start(optim) -> float | None:
    return optim.base_lr if optim.warmup_from == "base" else None


def describe_warmup(peak: float, optim) -> str:
    """'warmup from 0.1 to 0.8 over 5 epochs' (what plan and every run print)."""
    if not optim.warmup_epochs:
        return "no warmup"
    start = warmup_start(optim)
    if start is not None and peak <= start:
        return f"no warmup (peak {peak:.4g} is not above the base LR {start:g})"
    return (f"warmup from {start if start is not None else 0:.4g} to {peak:.4g} over {optim.warmup_epochs:g} epochs "
            "(linear per iteration)")
