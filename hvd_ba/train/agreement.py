"""After every step of every rank: lambda tracking when asked, and every run.sync_every steps (and
at checkpoints and the epoch's end) the ranks' agreement, one small allreduce, on a stop (a
signal, the stop file) and on finite losses; then the checkpoint that a stop or
run.checkpoint_every asks for, written together (train/checkpoint.py: write_checkpoint, also at
each epoch's end). Every rank takes the same decision at the same step, so no rank is left
waiting in a collective.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch

from hvd_ba import dist
from hvd_ba.config import Config
from hvd_ba.train.checkpoint import write_checkpoint
from hvd_ba.train.engine import TrainState
from hvd_ba.train.stop import StopRequest

log = logging.getLogger("hvd_ba")


class StepHooks:
    """What runs after every step on every rank: lambda tracking, and every run.sync_every steps,
    at checkpoints and at the epoch's end, the ranks' agreement (one small allreduce) on a stop
    and on finite losses, then the checkpoint that a stop or run.checkpoint_every asks for.
    Called with the step's index in its epoch (1-based); True ends the epoch (an agreed stop)."""

    def __init__(self, cfg: Config, state: TrainState, model: torch.nn.Module, out: Path, train_index,
                 stop: StopRequest, track_lambda=None):
        self.cfg, self.state, self.model, self.out, self.train_index, self.stop = cfg, state, model, out, train_index, stop
        self.track_lambda = track_lambda  # theory/tracking.py, handed over by `python -m hvd_ba train`
        self.first_bad_step = None
        self.stop_at_epoch_end = False  # a stop agreed at an epoch's last step: finish that epoch first

    def __call__(self, step_in_epoch: int) -> bool:
        cfg, state, r = self.cfg, self.state, self.cfg.run
        if r.track_lambda_every and state.step % r.track_lambda_every == 0:
            state.watchdog.pause()  # tens of Hessian-vector products: not a stall
            self.track_lambda(cfg, state, self.model, self.train_index, self.out)
        epoch_end = step_in_epoch == state.steps_per_epoch
        periodic = bool(r.checkpoint_every) and state.step % r.checkpoint_every == 0 and not epoch_end
        if not (state.step % r.sync_every == 0 or epoch_end or periodic):
            return False
        # One rank per node looks (the path is expanded on each node: '$SLURMD_NODENAME' names a
        # node's own file); the allreduce below makes any node's stop everyone's.
        if dist.local_rank() == 0 and r.stop_file and not self.stop.requested and os.path.exists(r.stop_file):
            self.stop.requested = True
            self.stop.signal_name = f"stop file {r.stop_file} on host {socket.gethostname()}"
        bad = int(state.bad_step) if state.bad_step is not None else -1  # the device is read here only
        if self.first_bad_step is None and bad >= 0:
            self.first_bad_step = bad
        flags = dist.allreduce_sum(torch.tensor([float(self.stop.requested), float(self.first_bad_step is not None)]),
                                   name="flags")
        if flags[1] > 0:
            where = f"step {self.first_bad_step}" if self.first_bad_step is not None else f"a step before {state.step}"
            raise FloatingPointError(f"non-finite loss at {where} (epoch {state.epoch + 1}) on {int(flags[1])} "
                                     "rank(s); stopping, no checkpoint after it: the last good one stays")
        if flags[0] > 0:
            log.warning("stop requested (%s); checkpointing at step %d", self.stop.signal_name or "another rank",
                        state.step)
            if epoch_end:
                # Let the epoch end as usual (evaluation, metrics, its checkpoint) and stop after
                # it, so a resumed run never starts with an empty epoch.
                self.stop_at_epoch_end = True
                return False
            write_checkpoint(cfg, state, self.model, self.out, step_in_epoch)
            return True
        if periodic:
            write_checkpoint(cfg, state, self.model, self.out, step_in_epoch)
        return False
