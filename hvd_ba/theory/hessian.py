"""Batch Hessians of a real network: Hessian-vector products of batch-averaged losses (double
backward) and their top eigenvalue (Lanczos via ARPACK, or power iteration), over batches drawn
as training draws them (plain B, BA B x M, plain M*B). Used by `python -m hvd_ba analyze`
(theory/analyze.py) and, during training, by lambda tracking (theory/tracking.py).

A global batch of G unique images is cut into `parts` equal sub-batches (at least one per rank;
under Horovod rank r takes parts r, r + world, ...): each part is one forward pass with its own
BN statistics, as a rank's share of a training step is, and the Hessian-vector products are
averaged (allreduced across ranks). The network is in training mode with its running statistics
restored afterwards and dropout off (theory/analyze.py says why).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hvd_ba import dist
from hvd_ba.config import Config, ConfigError
from hvd_ba.data.copies import BACollate, BATrainSet
from hvd_ba.data.model_input import channel_stats, normalize
from hvd_ba.data.pipeline import _generator, train_preset


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


def trainable_params(model: torch.nn.Module) -> list[torch.Tensor]:
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


def part_loss(model, x, y, label_smoothing: float) -> torch.Tensor:
    logits = model(x)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def local_parts(parts: int) -> list[int]:
    world = dist.size()
    if parts % world:
        raise ConfigError(f"--parts {parts} must be a multiple of the {world} ranks")
    return list(range(dist.rank(), parts, world))


def batch_hvp(model, batches: Batches, kind: BatchKind, k: int, parts: int, label_smoothing: float):
    """A function v -> <H>_k v for batch k (averaged over its parts and ranks), and the loss."""
    params = trainable_params(model)
    grads, loss_sum = [], 0.0
    for p in local_parts(parts):
        x, y = batches.part(kind, k, p, parts)
        loss = part_loss(model, x, y, label_smoothing)
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
        params = trainable_params(model)
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
