"""Theorem A of the supplementary, checked numerically on least squares (H_n = x_n x_n^T known
exactly): SGD converges for eta below 2/lambda_max, for every batch size; the bound is tight for
the single-batch dataset; and the true threshold lies between 2/lambda_max and 2/lambda_bar."""
import numpy as np
import pytest

from hvd_ba.theory.theorem import (batch_hessians, lambda_bar, lambda_max, mean_square, random_dataset, second_moment_radius, sgd,
                           single_batch_dataset, stability_threshold)

pytestmark = pytest.mark.unit

BATCHES = (1, 2, 4, 8, 16)


def test_lambda_max_is_the_max_over_batches_of_the_top_eigenvalue():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    h = batch_hessians(x, 2)
    # batch 0: diag(1, 4)/2, batch 1: diag(9, 0)/2 -> top eigenvalues 2 and 4.5
    assert np.allclose(h[0], np.diag([0.5, 2.0])) and np.allclose(h[1], np.diag([4.5, 0.0]))
    assert lambda_max(h) == pytest.approx(4.5)
    assert lambda_bar(h) == pytest.approx(2.5)  # mean diag(2.5, 1.0)
    # against a brute-force maximum of the Rayleigh quotient over many unit vectors
    x = random_dataset(24, 3, seed=5)
    h = batch_hessians(x, 4)
    v = np.random.default_rng(0).standard_normal((200_000, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    brute = max(np.einsum("ni,ij,nj->n", v, hk, v).max() for hk in h)
    assert brute <= lambda_max(h) + 1e-9 and brute == pytest.approx(lambda_max(h), rel=1e-3)


@pytest.mark.parametrize("batch", BATCHES)
def test_sgd_converges_below_two_over_lambda_max(batch):
    h = batch_hessians(random_dataset(64, 5, seed=batch), batch)
    eta = 0.95 * 2 / lambda_max(h)
    assert second_moment_radius(h, eta) < 1  # exact: E||w_t||^2 -> 0
    for seed in range(5):
        norms = sgd(h, eta, steps=3000, seed=seed)
        assert norms[-1] < 1e-6 * norms[0], (seed, norms[-1] / norms[0])


@pytest.mark.parametrize("batch", BATCHES)
def test_the_bound_is_tight_on_the_single_batch_dataset(batch):
    """Necessity: all samples but one batch have H_n = 0; then SGD diverges just above 2/lambda_max."""
    h = batch_hessians(single_batch_dataset(8 * batch, 5, batch, seed=batch), batch)
    bound = 2 / lambda_max(h)
    assert stability_threshold(h) == pytest.approx(bound, rel=1e-5)
    assert second_moment_radius(h, 0.95 * bound) < 1 < second_moment_radius(h, 1.05 * bound)
    for seed in range(3):
        below, above = sgd(h, 0.95 * bound, 4000, seed), sgd(h, 1.05 * bound, 4000, seed)
        assert below[-1] < 1e-6 * below[0]
        assert above[-1] > 1e6 * above[0]


@pytest.mark.parametrize("batch", BATCHES)
def test_true_threshold_lies_between_the_sufficient_and_the_necessary_bound(batch):
    h = batch_hessians(random_dataset(64, 5, seed=batch), batch)
    threshold = stability_threshold(h)
    assert 2 / lambda_max(h) <= threshold * (1 + 1e-6)
    assert threshold <= 2 / lambda_bar(h) * (1 + 1e-6)
    # E||w_t||^2, iterated exactly, decays just below the threshold and grows just above it
    w0 = np.ones(5)
    assert mean_square(h, 0.98 * threshold, 3000, w0)[-1] < 1e-3 * 5
    assert mean_square(h, 1.05 * threshold, 3000, w0)[-1] > 1e3 * 5
    # ... while a typical single run still shrinks there: above eta* it is the second moment
    # (heavy tails), not every trajectory, that diverges; the theorem is a mean-square statement.
    norms = sgd(h, 1.05 * threshold, 20_000, seed=1)
    assert norms[-1] < 1e-3 * norms[0]


def test_larger_batches_lower_lambda_max_toward_lambda_bar():
    """The paper's mechanism: averaging over bigger batches replaces max by mean."""
    x = random_dataset(256, 5, seed=7)
    values = [lambda_max(batch_hessians(x, b)) for b in (1, 4, 16, 64, 256)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(lambda_bar(batch_hessians(x, 1)))
