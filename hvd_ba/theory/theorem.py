"""The stability theorem of the paper's supplementary section A, on a model where every
per-sample Hessian is known exactly: least squares at a global minimum.

Loss l_n(w) = (x_n . w)^2 / 2 with every target 0, so w* = 0 is a global minimum of every sample
and H_n = x_n x_n^T (PSD). The batches are a fixed partition of the N samples into N/B batches of
B; SGD picks one uniformly each step (the supplementary's setting):

    w_{t+1} = (I - eta <H>_k) w_t,   <H>_k = mean of H_n over batch k.

Theorem A: SGD converges if lambda_max = max_k top eigenvalue of <H>_k is below 2/eta; the bound
is tight for a dataset whose samples are all zero outside one batch. Here the claim is checked
both by simulation and exactly: the mean-square dynamics E[w w^T] evolve linearly,
S -> E_k[(I - eta <H>_k) S (I - eta <H>_k)], and converge iff that map's spectral radius is
below 1 (`second_moment_radius`), which gives the true threshold eta* to compare with 2/lambda_max
(sufficient) and 2/lambda_bar (the full-batch, first-moment condition, necessary).
"""
from __future__ import annotations

import numpy as np


def batch_hessians(x: np.ndarray, batch: int) -> np.ndarray:
    """<H>_k for the batches of `batch` consecutive samples of x (N x d); shape (N/B, d, d)."""
    n, d = x.shape
    if n % batch:
        raise ValueError(f"batch {batch} does not divide the {n} samples")
    xb = x.reshape(n // batch, batch, d)
    return np.einsum("kbi,kbj->kij", xb, xb) / batch


def lambda_max(hessians: np.ndarray) -> float:
    """max over batches of the top eigenvalue of <H>_k (Eq. 4), exactly."""
    return float(np.linalg.eigvalsh(hessians)[:, -1].max())


def lambda_bar(hessians: np.ndarray) -> float:
    """Top eigenvalue of the full-data Hessian <H> (the mean of the <H>_k)."""
    return float(np.linalg.eigvalsh(hessians.mean(axis=0))[-1])


def range_basis(hessians: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Orthonormal basis (d x r) of the range of <H>: directions outside it (the null space V of
    the proof, shared by every H_n) never move under SGD, so convergence is measured on V-bar."""
    values, vectors = np.linalg.eigh(hessians.mean(axis=0))
    return vectors[:, values > rtol * max(values.max(), 1e-300)]


def second_moment_radius(hessians: np.ndarray, eta: float) -> float:
    """Spectral radius of S -> E_k[A_k S A_k], A_k = I - eta <H>_k, on V-bar: E||P w_t||^2 -> 0
    iff it is < 1 (Eq. 8-9)."""
    u = range_basis(hessians)
    hessians = np.einsum("ia,kij,jb->kab", u, hessians, u)
    d = hessians.shape[1]
    a = np.eye(d)[None] - eta * hessians
    operator = np.einsum("kij,kab->iajb", a, a).reshape(d * d, d * d) / len(hessians)
    return float(np.abs(np.linalg.eigvals(operator)).max())


def mean_square(hessians: np.ndarray, eta: float, steps: int, w0: np.ndarray) -> np.ndarray:
    """E||w_t||^2 over the batch draws, exactly: S_{t+1} = mean_k A_k S_t A_k, S_0 = w0 w0^T."""
    a = np.eye(hessians.shape[1])[None] - eta * hessians
    s = np.outer(w0, w0)
    out = [np.trace(s)]
    for _ in range(steps):
        s = np.einsum("kij,jl,kml->im", a, s, a) / len(a)
        out.append(np.trace(s))
    return np.array(out)


def stability_threshold(hessians: np.ndarray, tol: float = 1e-6) -> float:
    """The largest eta for which SGD is mean-square stable (bisection on second_moment_radius)."""
    lo, hi = 0.0, 4.0 / max(lambda_bar(hessians), 1e-12)
    while second_moment_radius(hessians, hi) < 1:
        hi *= 2
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if second_moment_radius(hessians, mid) < 1 else (lo, mid)
    return lo


def sgd(hessians: np.ndarray, eta: float, steps: int, seed: int = 0, w0: np.ndarray | None = None) -> np.ndarray:
    """||P w_t|| (the part on V-bar) along one SGD run from a perturbed minimum (Eq. 3);
    batches drawn uniformly."""
    rng = np.random.default_rng(seed)
    d = hessians.shape[1]
    u = range_basis(hessians)
    w = rng.standard_normal(d) * 1e-3 if w0 is None else w0.copy()
    norms = np.empty(steps + 1)
    norms[0] = np.linalg.norm(u.T @ w)
    for t, k in enumerate(rng.integers(len(hessians), size=steps), start=1):
        w = w - eta * hessians[k] @ w
        norms[t] = np.linalg.norm(u.T @ w)
        if not np.isfinite(norms[t]) or norms[t] > 1e12:
            norms[t:] = np.inf
            break
    return norms


def random_dataset(n: int, d: int, seed: int) -> np.ndarray:
    """Samples with unequal scales, so batches differ and lambda_max exceeds lambda_bar."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * rng.uniform(0.2, 2.0, size=(n, 1))


def single_batch_dataset(n: int, d: int, batch: int, seed: int) -> np.ndarray:
    """The supplementary's example: H_n = 0 for every sample outside one batch."""
    x = np.zeros((n, d))
    x[:batch] = np.random.default_rng(seed).standard_normal((batch, d))
    return x
