"""After every step of every rank: lambda tracking when asked, and every run.sync_every steps (and
at checkpoints and the epoch's end) the ranks' agreement, one small allreduce, on a stop (a
signal, the stop file) and on finite losses; then the checkpoint that a stop or
run.checkpoint_every asks for, written together (write_checkpoint, also at each epoch's end). Every rank takes the same decision at the same step, so no rank
is left waiting in a collective.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
from pathlib import Path

import torch

from hvd_ba import dist, fsio
from hvd_ba.config import Config
from hvd_ba.fsio import DiskFull
from hvd_ba.train.checkpoint import checkpoint_dir, rng_states, save_checkpoint
from hvd_ba.train.engine import TrainState, average_bn_statistics
from hvd_ba.train.records import RECORD_FILES
from hvd_ba.train.stop import StopRequest, pause_point

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
