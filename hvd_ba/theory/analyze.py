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
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hvd_ba import dist
from hvd_ba.cluster import launch_info
from hvd_ba.config import Config, ConfigError, load_config
from hvd_ba.data.model_input import channel_stats, normalize
from hvd_ba.data.manifest import load_index
from hvd_ba.data.copies import BACollate, BATrainSet
from hvd_ba.data.pipeline import _generator, train_preset
from hvd_ba.models import build_model
from hvd_ba.train.lr_schedule import config_lr, peak_lr


@dataclass(frozen=True)
class BatchKind:
    """One kind of batch: `unique` distinct images per global batch, `copies` augmentations each."""

    name: str
    unique: int
    copies: int

    @property
    def samples(self) -> int:
        return self.unique * self.copies


def standard_kinds(unique: int, copies: int) -> list[BatchKind]:
    """Plain batch B, BA batch B x M, plain batch M*B (the paper's three-way comparison)."""
    if copies == 1:  # the three coincide
        return [BatchKind(f"plain B={unique}", unique, 1)]
    return [BatchKind(f"plain B={unique}", unique, 1), BatchKind(f"BA B={unique} x M={copies}", unique, copies),
            BatchKind(f"plain B={unique * copies}", unique * copies, 1)]


class Batches:
    """Training-like batches of the training split: batch k of a kind is the next G files of the
    (seed, epoch) permutation, each with `copies` augmentations as the training loader makes them."""

    def __init__(self, cfg: Config, index, epoch: int, device: torch.device):
        self.cfg, self.index, self.epoch, self.device = cfg, index, epoch, device
        self.order = torch.randperm(len(index), generator=_generator(cfg.run.seed, epoch)).tolist()
        self.mean, self.std = channel_stats(cfg.augment, device)

    def part(self, kind: BatchKind, k: int, part: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (normalised NCHW) and labels of part `part` of batch k."""
        if kind.unique % parts:
            raise ConfigError(f"a batch of {kind.unique} unique images does not split into {parts} equal parts")
        per = kind.unique // parts
        start = (k * kind.unique) % len(self.order)
        files = [self.order[(start + part * per + i) % len(self.order)] for i in range(per)]
        a = self.cfg.augment
        dataset = BATrainSet(self.index, kind.copies, train_preset(self.cfg), self.cfg.run.seed,
                             a.canvas if a.where == "device" else None)
        batch = BACollate(self.cfg.data.layout)([dataset[(i, self.epoch, ())] for i in files])
        return normalize(batch, self.device, self.mean, self.std), batch["labels"].to(self.device)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


class AnalysisMode:
    """Training-mode forward without side effects: BN running statistics saved and restored,
    dropout off."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        return self.model

    def __exit__(self, *exc):
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(self.buffers[name])
        self.model.train(self.was_training)
        return False


def _part_loss(model, x, y, label_smoothing: float) -> torch.Tensor:
    logits = model(x)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def _local_parts(parts: int) -> list[int]:
    world = dist.size()
    if parts % world:
        raise ConfigError(f"--parts {parts} must be a multiple of the {world} ranks")
    return list(range(dist.rank(), parts, world))


def batch_hvp(model, batches: Batches, kind: BatchKind, k: int, parts: int, label_smoothing: float):
    """A function v -> <H>_k v for batch k (averaged over its parts and ranks), and the loss."""
    params = _params(model)
    grads, loss_sum = [], 0.0
    for p in _local_parts(parts):
        x, y = batches.part(kind, k, p, parts)
        loss = _part_loss(model, x, y, label_smoothing)
        grads.append(torch.autograd.grad(loss, params, create_graph=True))
        loss_sum += loss.item()
    loss = float(dist.allreduce_sum(torch.tensor([loss_sum], dtype=torch.float64), name="analysis.loss")) / parts

    def hvp(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = None
        for g in grads:
            hv = torch.autograd.grad(g, params, grad_outputs=vectors, retain_graph=True)
            part = torch.cat([t.reshape(-1) for t in hv]).double()  # parts add in float64, here as across ranks
            flat = part if flat is None else flat + part
        flat = dist.allreduce_sum(flat.cpu(), name="analysis.hvp").to(flat.device) / parts
        return [c.view_as(p).to(p.dtype) for c, p in zip(flat.split([p.numel() for p in params]), params)]

    return hvp, loss


def top_eigenvalue(hvp, params: list[torch.Tensor], tol: float = 1e-3, max_iter: int = 100, seed: int = 0,
                   method: str = "lanczos", ncv: int = 10) -> tuple[float, int]:
    """The largest (algebraic) eigenvalue of the symmetric operator `hvp`; (value, products used).

    lanczos: ARPACK's implicitly restarted Lanczos (scipy eigsh, which='LA') to relative
      accuracy `tol`, with `ncv` Lanczos vectors (memory: ncv x parameters in float64) and at
      most about `max_iter` products. Robust when the spectrum's top is not its largest
      magnitude, as near a minimum's flat directions or early in training.
    power: power iteration, stopped when the value changes by less than `tol` (relative); when
      the largest-magnitude eigenvalue is negative a second run on H - lambda I finds the top one.
      Needs one vector of memory, but slows to a crawl when the top is not well separated.
    The starting vector is seeded, so ranks that see the same products do the same arithmetic.
    """
    if method == "power":
        return _power_top(hvp, params, tol, max_iter, seed)
    if method != "lanczos":
        raise ConfigError(f"unknown eigenvalue method {method!r} (lanczos or power)")
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    sizes = [p.numel() for p in params]
    n = sum(sizes)
    products = 0

    def matvec(x):
        nonlocal products
        products += 1
        flat = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        vectors = [c.view(p.shape).to(p.device, p.dtype) for c, p in zip(flat.split(sizes), params)]
        return torch.cat([t.reshape(-1) for t in hvp(vectors)]).double().cpu().numpy()

    v0 = np.random.default_rng(seed).standard_normal(n)
    ncv = min(n, max(ncv, 3))
    try:
        values = eigsh(LinearOperator((n, n), matvec=matvec, dtype=np.float64), k=1, which="LA", tol=tol,
                       maxiter=max(1, max_iter // ncv), v0=v0, ncv=ncv, return_eigenvectors=False)
    except ArpackNoConvergence as err:
        values = err.eigenvalues if len(err.eigenvalues) else [float("nan")]
    return float(values[0]), products


def _power_top(hvp, params, tol, max_iter, seed) -> tuple[float, int]:
    def power(op) -> tuple[float, int]:
        g = torch.Generator().manual_seed(seed)
        v = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype) for p in params]
        norm = math.sqrt(_dot(v, v))
        v = [t / norm for t in v]
        value, previous = 0.0, None
        for it in range(1, max_iter + 1):
            hv = op(v)
            value = _dot(v, hv)
            norm = math.sqrt(_dot(hv, hv))
            if norm == 0:
                return 0.0, it
            v = [t / norm for t in hv]
            if previous is not None and abs(value - previous) <= tol * abs(value):
                return value, it
            previous = value
        return value, max_iter

    value, iterations = power(hvp)
    if value < 0:
        shift = value
        shifted, more = power(lambda v: [h - shift * t for h, t in zip(hvp(v), v)])
        value, iterations = shifted + shift, iterations + more
    return value, iterations


def measure_lambda(model, batches: Batches, kinds: list[BatchKind], num_batches: int, parts: int,
                   label_smoothing: float, tol: float, max_iter: int, first: int = 0, method: str = "lanczos") -> dict:
    """Per kind: the top eigenvalue of each of `num_batches` batches (first, first + 1, ...),
    their max and mean."""
    results = {}
    with AnalysisMode(model):
        params = _params(model)
        for kind in kinds:
            values, losses, iterations = [], [], []
            for k in range(first, first + num_batches):
                hvp, loss = batch_hvp(model, batches, kind, k, parts, label_smoothing)
                value, its = top_eigenvalue(hvp, params, tol, max_iter, seed=k, method=method)
                values.append(value)
                losses.append(loss)
                iterations.append(its)
            results[kind.name] = {"unique": kind.unique, "copies": kind.copies, "samples": kind.samples,
                                  "per_batch": values, "lambda_max": max(values),
                                  "lambda_mean": sum(values) / len(values), "losses": losses,
                                  "iterations": iterations}
    return results


def batch_gradient(model, batches: Batches, kind: BatchKind, k: int, parts: int, label_smoothing: float) -> torch.Tensor:
    params = _params(model)
    total = None
    for p in _local_parts(parts):
        x, y = batches.part(kind, k, p, parts)
        g = torch.autograd.grad(_part_loss(model, x, y, label_smoothing), params)
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
    from hvd_ba.train.checkpoint import find_checkpoint

    payload = None
    if args.run:
        run = Path(args.run)
        found = find_checkpoint(args.checkpoint or "auto", run)
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
    index = load_index(cfg.data.path, "train", os.path.expanduser(cfg.data.manifest_dir) if cfg.data.manifest_dir else None,
                       write=dist.is_primary())
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    model = build_model(m.arch, m.num_classes or len(index.classes), m.ghost_size, m.zero_init_residual, m.width, m.dropout)
    step, world = 0, dist.size()
    if payload is not None:
        model.load_state_dict(payload["model"])
        step, world = payload["step"], payload["world"]
    o = cfg.optim
    steps_per_epoch = (len(index) // world) // cfg.data.unique_batch
    if cfg.run.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.run.max_steps_per_epoch)
    peak = peak_lr(o.base_lr, cfg.data.unique_batch * world, o.reference_batch)
    lr = config_lr(step, steps_per_epoch, peak, o)
    facts = {"source": source, "step": step, "run_world": world, "lr": lr, "momentum": o.momentum,
             "epoch": step // max(steps_per_epoch, 1), "index": index}
    return cfg, model, facts


def _out_path(args, facts: dict, what: str) -> Path:
    if args.out:
        return Path(args.out)
    base = Path(args.run) if args.run else Path("runs/analysis")
    return base / "analysis" / f"{what}-step{facts['step']}.json"


def run_analysis(args) -> int:
    launch = launch_info()
    if launch.launcher == "horovodrun" or launch.mpi:
        dist.init()  # started by a launcher Horovod can join: parts are spread over the ranks
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // dist.local_size()))
    cfg, model, facts = load_analysis_target(args)
    index = facts.pop("index")
    device = torch.device("cpu")
    model = model.to(device)
    batches = Batches(cfg, index, facts["epoch"], device)
    unique = args.unique or cfg.data.unique_batch * facts["run_world"]
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
