"""Lambda tracking during training (run.track_lambda_every): lambda_max of the plain, BA and
plain-large batches at the current weights, next to 2/lr, into lambda.jsonl. Handed to the run
by `python -m hvd_ba train` (the run itself does not import the theory).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from hvd_ba import dist
from hvd_ba.config import Config, derive
from hvd_ba.theory.hessian import Batches, measure_lambda, standard_kinds
from hvd_ba.train.engine import TrainState, lr_at
from hvd_ba.train.records import append_jsonl

log = logging.getLogger("hvd_ba")


def track_lambda(cfg: Config, state: TrainState, model: torch.nn.Module, train_index, out: Path) -> None:
    """Collective: lambda_max of plain B, BA B x M and plain M*B batches at the current weights
    (one part per rank, as in training), appended to lambda.jsonl. Leaves the training exactly as
    it was: BN running statistics restored, no draw from the global RNG."""
    world = dist.size()
    unique_global = derive(cfg, world).unique_global
    kinds = standard_kinds(unique_global, cfg.data.copies)
    t0 = time.perf_counter()
    results = measure_lambda(model, Batches(cfg, train_index, state.epoch, state.device), kinds,
                             cfg.run.track_lambda_batches, world, cfg.optim.label_smoothing, tol=1e-2, max_iter=100,
                             first=state.step)
    lr = lr_at(state.step, state, cfg.optim)
    if dist.is_primary():
        record = {"step": state.step, "epoch": state.epoch + 1, "epochs_done": state.step / state.steps_per_epoch,
                  "unique": unique_global, "copies": cfg.data.copies, "lr": lr,
                  "two_over_lr": 2 / lr if lr else None,
                  "kinds": {name: {k: r[k] for k in ("unique", "copies", "samples", "lambda_max", "lambda_mean")}
                            for name, r in results.items()}, "seconds": time.perf_counter() - t0}
        append_jsonl(out / "lambda.jsonl", record)
        log.info("step %d lambda_max: %s | 2/lr %.4g", state.step,
                 ", ".join(f"{name} {r['lambda_max']:.4g}" for name, r in results.items()), 2 / lr if lr else math.inf)
