"""`python -m hvd_ba analyze ...`: the paper's theory measured on a real network.

lambda-max: the top eigenvalue of each batch-averaged loss Hessian <H>_k (supplementary Eq. 4)
  over K batches of three kinds side by side, by Hessian-vector products (double backward) and
  Lanczos (ARPACK) or power iteration to a relative tolerance; lambda_max is their maximum,
  compared with 2/eta.
grad-variance: E||g_batch - g_ref||^2 of the minibatch gradient for BA with M = 1, 2, 4, 8 at
  fixed B and for plain batches of M*B distinct images; 1/M is what independent samples give.

Batches are drawn as in training: the (seed, epoch) permutation of the training files, each
image decoded once and augmented by the preset with the training's per-(seed, epoch, file)
randomness, BA batches laid out copy-major. The network is in training mode, so the loss is the
one SGD differentiates: batch norm normalises with the batch's own statistics over ghost groups
of model.ghost_size, and the Hessian includes how those statistics depend on the weights (each
ghost group is one block of the loss). Running statistics are restored afterwards and dropout
is switched off (a Hessian of a random loss has no fixed top eigenvalue); the loss is the data
loss (cross-entropy with the run's label smoothing), without weight decay, which would add
optim.weight_decay to every eigenvalue.

A global batch of G unique images is cut into `parts` equal sub-batches (at least one per rank;
under Horovod rank r takes parts r, r + world, ...): each part is one forward pass with its own
BN statistics, as a rank's share of a training step is, and the Hessian-vector products and
gradients of the parts are averaged (allreduced across ranks). One process with parts=P gives
the same numbers as P ranks.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from hvd_ba import dist
from hvd_ba.cluster import cores_per_task, cpu_mask, launch_info, rank_cores
from hvd_ba.config import Config, ConfigError, derive, load_config
from hvd_ba.config import steps_per_epoch as epoch_steps
from hvd_ba.data.shards import files_per_rank, load_split
from hvd_ba.models import build_model
from hvd_ba.theory.hessian import (AnalysisMode, Batches, BatchKind, local_parts, measure_lambda, part_loss,
                                   standard_kinds, trainable_params)
from hvd_ba.train.lr_schedule import config_lr


def batch_gradient(model, batches: Batches, kind: BatchKind, k: int, parts: int, label_smoothing: float) -> torch.Tensor:
    params = trainable_params(model)
    total = None
    for p in local_parts(parts):
        x, y = batches.part(kind, k, p, parts)
        g = torch.autograd.grad(part_loss(model, x, y, label_smoothing), params)
        flat = torch.cat([t.reshape(-1) for t in g]).double()
        total = flat if total is None else total + flat
    return dist.allreduce_sum(total.cpu(), name="analysis.grad") / parts


def reference_batches(n_train: int, unique: int, num_batches: int, max_copies: int,
                      reference_images: int) -> tuple[bool, int, int]:
    """(full?, first batch, batches) of the reference gradient, in batches of `unique` along the
    permutation: the whole split, or a sample that starts after the positions the measured batches
    use (their largest kind, plain M*B, takes num_batches * unique * max_copies)."""
    if reference_images <= 0 or reference_images >= n_train:
        return True, 0, n_train // unique
    used = num_batches * unique * max_copies
    if used + reference_images > n_train:
        raise ConfigError(f"grad-variance: {n_train} training images cannot hold the measured batches ({used} "
                          f"images) and a disjoint reference of {reference_images}; lower --reference-images "
                          f"or --batches, or use 0 (the full gradient)")
    return False, -(-used // unique), max(1, reference_images // unique)


def measure_grad_variance(model, batches: Batches, unique: int, copies_list: list[int], num_batches: int,
                          reference_images: int, parts: int, label_smoothing: float) -> dict:
    """E||g - g_ref||^2 over `num_batches` batches of each kind.

    g_ref, with one augmentation per image, in batches of `unique`: reference_images 0 (default)
    takes the whole training split, the full gradient. Batches of n distinct images drawn without
    replacement from N then have variance sigma^2 / n * (N - n) / (N - 1) (the finite-population
    factor), so the independent-sampling expectation for a plain batch of M*B, relative to B, is
    1/M * (N - M*B) / (N - B), what `independent_ratio` holds. A smaller reference is a sample
    taken after the images the measured batches use (disjoint from them), which adds its own
    variance, about that of one batch of its size, to every row.
    """
    n_train = len(batches.order)
    with AnalysisMode(model):
        ref_kind = BatchKind("reference", unique, 1)
        full, first, ref_batches = reference_batches(n_train, unique, num_batches, max(copies_list), reference_images)
        reference = sum(batch_gradient(model, batches, ref_kind, first + k, parts, label_smoothing)
                        for k in range(ref_batches)) / ref_batches
        rows = []
        for kind_type in ("BA", "plain"):
            for m in copies_list:
                kind = (BatchKind(f"BA B={unique} x M={m}", unique, m) if kind_type == "BA"
                        else BatchKind(f"plain B={unique * m}", unique * m, 1))
                dists = [float(((batch_gradient(model, batches, kind, k, parts, label_smoothing)
                                 - reference) ** 2).sum()) for k in range(num_batches)]
                rows.append({"kind": kind_type, "copies": m, "unique": kind.unique, "samples": kind.samples,
                             "name": kind.name, "variance": sum(dists) / len(dists), "per_batch": dists})
        base = next(r["variance"] for r in rows if r["kind"] == "BA" and r["copies"] == 1)
        for r in rows:
            r["ratio_to_m1"] = r["variance"] / base
            fpc = (n_train - unique * r["copies"]) / (n_train - unique) if full else 1.0
            r["independent_ratio"] = fpc / r["copies"]
    return {"reference_images": ref_batches * unique, "reference_is_full": full, "train_images": n_train,
            "reference_norm2": float((reference ** 2).sum()), "rows": rows}


# ------------------------------------------------------------------------------------ the command

def load_analysis_target(args) -> tuple[Config, torch.nn.Module, dict]:
    """Config, model (weights from the checkpoint, or fresh) and facts of the run being analysed."""
    from hvd_ba.train.checkpoint import CheckpointError, find_checkpoint

    payload = None
    if args.run:
        run = Path(args.run)
        try:
            found = find_checkpoint(args.checkpoint or "auto", run)
        except CheckpointError as err:
            raise ConfigError(f"--checkpoint '{args.checkpoint}': {err}") from None
        if found is None:
            raise FileNotFoundError(f"run directory '{run}' has no valid checkpoint")
        path, payload = found
        cfg = load_config(str(run / "config.yaml"), args.set)
        source = str(path)
    else:
        cfg = load_config(args.config, args.set)
        source = "fresh model (seed %d)" % cfg.run.seed
    if cfg.data.path is None:
        raise ConfigError("config key 'data.path': not set (the batches are drawn from its train/ split)")
    index = load_split(cfg, "train", write=dist.is_primary())
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    model = build_model(m.arch, m.num_classes or len(index.classes), m.ghost_size, m.zero_init_residual, m.width, m.dropout)
    step, world = 0, dist.size()
    if payload is not None:
        model.load_state_dict(payload["model"])
        step, world = payload["step"], payload["world"]
    o = cfg.optim
    figures = derive(cfg, world, len(index))
    # the run's own (its sampler's: static parts of whole packed shards take fewer), else the config's
    steps_per_epoch = ((payload or {}).get("plan") or {}).get("steps_per_epoch") or epoch_steps(
        len(index), world, cfg.data.unique_batch, cfg.run.max_steps_per_epoch,
        files_per_rank(index, cfg.data.shard, world))
    lr = config_lr(step, steps_per_epoch, figures.peak_lr, o)
    facts = {"source": source, "step": step, "run_world": world, "lr": lr, "momentum": o.momentum,
             "epoch": step // max(steps_per_epoch, 1), "index": index}
    return cfg, model, facts


def _out_path(args, facts: dict, what: str) -> Path:
    if args.out:
        return Path(args.out)
    base = Path(args.run) if args.run else Path("runs/analysis")
    return base / "analysis" / f"{what}-step{facts['step']}.json"


def run_analysis(args) -> int:
    backend = dist.launched_backend(launch_info())
    if backend:
        dist.init(backend=backend)  # started by a launcher: parts are spread over the ranks
    torch.set_num_threads(args.threads or rank_cores(cpu_mask(), dist.local_size(), cores_per_task()))
    cfg, model, facts = load_analysis_target(args)
    index = facts.pop("index")
    device = torch.device("cpu")
    model = model.to(device)
    batches = Batches(cfg, index, facts["epoch"], device)
    unique = args.unique or derive(cfg, facts["run_world"]).unique_global
    parts = args.parts or dist.size()
    t0 = time.perf_counter()
    if args.what == "lambda-max":
        copies = args.copies or cfg.data.copies
        kinds = standard_kinds(unique, copies)
        results = measure_lambda(model, batches, kinds, args.batches, parts, cfg.optim.label_smoothing, args.tol,
                                 args.max_iter, method=args.method)
        lr = facts["lr"]
        record = {**facts, "unique": unique, "copies": copies, "batches": args.batches, "parts": parts,
                  "ranks": dist.size(), "tol": args.tol, "method": args.method, "two_over_lr": 2 / lr if lr else math.inf,
                  "two_one_plus_mu_over_lr": 2 * (1 + facts["momentum"]) / lr if lr else math.inf,
                  "kinds": results, "seconds": time.perf_counter() - t0}
        lines = [f"lambda_max of batch-averaged Hessians, {facts['source']} (step {facts['step']}), "
                 f"{args.batches} batches per kind, {args.method} to rel. tol {args.tol:g}:"]
        lines.append(f"  {'batch kind':<22} {'samples':>7} {'lambda_max':>11} {'mean':>9} {'margin 2/lr-lmax':>17}  per batch")
        for name, r in results.items():
            lines.append(f"  {name:<22} {r['samples']:>7} {r['lambda_max']:>11.4g} {r['lambda_mean']:>9.4g} "
                         f"{record['two_over_lr'] - r['lambda_max']:>17.4g}  "
                         + " ".join(f"{v:.4g}" for v in r["per_batch"]))
        lines.append(f"  lr at this step {lr:.4g}: 2/lr = {record['two_over_lr']:.4g} (plain SGD, the theorem); "
                     f"2(1+mu)/lr = {record['two_one_plus_mu_over_lr']:.4g} (heavy-ball momentum {facts['momentum']:g})")
    else:
        copies_list = [int(c) for c in args.copies_list.split(",")]
        result = measure_grad_variance(model, batches, unique, copies_list, args.batches, args.reference_images, parts,
                                       cfg.optim.label_smoothing)
        record = {**facts, "unique": unique, "batches": args.batches, "parts": parts, "ranks": dist.size(),
                  **result, "seconds": time.perf_counter() - t0}
        lines = [f"gradient variance E||g - g_ref||^2, {facts['source']} (step {facts['step']}), {args.batches} "
                 f"batches per kind, g_ref over {result['reference_images']} images (||g_ref||^2 = "
                 f"{result['reference_norm2']:.4g}; {'the full gradient' if result['reference_is_full'] else 'a sample'} "
                 f"of {result['train_images']} training images):",
                 f"  {'batch kind':<22} {'samples':>7} {'variance':>10} {'ratio to M=1':>13} {'independent':>11}"]
        for r in result["rows"]:
            lines.append(f"  {r['name']:<22} {r['samples']:>7} {r['variance']:>10.4g} {r['ratio_to_m1']:>13.3f} "
                         f"{r['independent_ratio']:>11.3f}")
        lines.append("  independent: the ratio if the M*B samples were independent draws, 1/M (x the finite-population "
                     "factor (N-MB)/(N-B) when g_ref is the full gradient)")
    if dist.is_primary():
        out = _out_path(args, facts, args.what)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
        print("\n".join(lines) + f"\n  ({record['seconds']:.0f} s; written to {out})", flush=True)
    dist.shutdown()
    return 0
