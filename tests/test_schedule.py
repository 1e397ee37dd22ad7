"""LR: linear scaling by the unique global batch, per-iteration warmup, step decay."""
import pytest

from hvd_ba.schedule import learning_rate, peak_lr


def test_linear_scaling_uses_unique_batch():
    assert peak_lr(0.1, 256) == pytest.approx(0.1)
    assert peak_lr(0.1, 8192) == pytest.approx(3.2)  # Goyal et al.: 8k batch -> 3.2
    assert peak_lr(0.1, 64 * 32, 256) == pytest.approx(0.8)


def test_warmup_is_linear_per_iteration_and_reaches_peak():
    spe, peak = 100, 0.8
    lrs = [learning_rate(s, spe, peak, 5, [30, 60, 80], 0.1) for s in range(500)]
    assert lrs[0] == pytest.approx(peak / 500)
    assert lrs[249] == pytest.approx(peak / 2)
    assert lrs[499] == pytest.approx(peak)
    diffs = {round(b - a, 12) for a, b in zip(lrs, lrs[1:])}
    assert diffs == {round(peak / 500, 12)}


@pytest.mark.parametrize("epoch, factor", [(5, 1), (29.99, 1), (30, 0.1), (59, 0.1), (60, 0.01), (80, 0.001), (89.9, 0.001)])
def test_step_decay_at_milestones(epoch, factor):
    spe = 1000
    lr = learning_rate(round(epoch * spe), spe, 0.4, 5, [30, 60, 80], 0.1)
    assert lr == pytest.approx(0.4 * factor)


def test_no_warmup():
    assert learning_rate(0, 10, 0.3, 0, [1], 0.5) == pytest.approx(0.3)
    assert learning_rate(10, 10, 0.3, 0, [1], 0.5) == pytest.approx(0.15)


def test_cosine_after_warmup():
    spe, peak = 10, 0.4
    lrs = [learning_rate(s, spe, peak, 1, [], 0.1, "cosine", 5) for s in range(50)]
    assert lrs[9] == pytest.approx(peak)  # end of warmup
    assert lrs[10] == pytest.approx(peak)  # cosine starts at the peak
    assert lrs[30] == pytest.approx(peak / 2, rel=0.02)  # half way through the remaining 40 steps
    assert lrs[49] < 0.01 * peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
