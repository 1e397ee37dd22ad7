"""LR: linear scaling by the unique global batch, per-iteration warmup, step decay."""
import pytest

from hvd_ba.config import peak_lr
from hvd_ba.train.lr_schedule import learning_rate

pytestmark = pytest.mark.unit


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


# Goyal et al.'s warmup: from the base LR (0.1 for 256 images) at iteration 0, a constant rise per
# iteration, the peak k x 0.1 at the end of epoch 5. ResNet-50 on 32 ranks x 64 unique images:
# ImageNet-1k's 1,281,167 images give 625 steps per epoch, peak 0.8.
GOYAL_32x64 = [(0, 0.1), (1, 0.1 + 0.7 / 3125), (625, 0.24), (3124, 0.8 - 0.7 / 3125), (3125, 0.8),
               (18749, 0.8), (18750, 0.08), (37500, 0.008), (50000, 0.0008), (56249, 0.0008)]


@pytest.mark.parametrize("step, expected", GOYAL_32x64)
def test_warmup_from_the_base_lr_as_goyal(step, expected):
    from hvd_ba.config import load_config
    from hvd_ba.train.lr_schedule import config_lr

    cfg = load_config("resnet50", ["data.unique_batch=64"])
    assert cfg.optim.warmup_from == "base"
    peak = peak_lr(cfg.optim.base_lr, 64 * 32, cfg.optim.reference_batch)
    assert peak == pytest.approx(0.8) and (1_281_167 // 32) // 64 == 625
    assert config_lr(step, 625, peak, cfg.optim) == pytest.approx(expected, rel=1e-12)


def test_warmup_from_zero_stays_available_and_no_warmup_below_the_base():
    from hvd_ba.config import load_config
    from hvd_ba.train.lr_schedule import config_lr, describe_warmup

    zero = load_config("resnet50", ["optim.warmup_from=zero"]).optim
    assert config_lr(0, 625, 0.8, zero) == pytest.approx(0.8 / 3125)  # 0.000256, the old rule
    assert config_lr(625, 625, 0.8, zero) == pytest.approx(0.8 * 626 / 3125)
    assert describe_warmup(0.8, zero) == "warmup from 0 to 0.8 over 5 epochs (linear per iteration)"
    base = load_config("resnet50").optim
    assert describe_warmup(0.8, base) == "warmup from 0.1 to 0.8 over 5 epochs (linear per iteration)"
    # 2 ranks x 32: peak 0.025 is below the base 0.1, so there is nothing to warm up to
    assert [config_lr(s, 100, 0.025, base) for s in (0, 250, 499, 500)] == [0.025] * 4
    assert describe_warmup(0.025, base).startswith("no warmup (peak 0.025 is not above the base LR 0.1)")


def test_cosine_without_a_warmup_to_do_starts_at_the_peak():
    """peak <= base LR: no warmup, so the cosine runs from step 0 (not from the nominal warmup's end)."""
    from hvd_ba.config import load_config
    from hvd_ba.train.lr_schedule import config_lr

    o = load_config("resnet50", ["optim.schedule=cosine", "optim.epochs=10", "optim.warmup_epochs=2"]).optim
    lrs = [config_lr(s, 10, 0.05, o) for s in range(100)]
    assert lrs[0] == pytest.approx(0.05) and all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[50] == pytest.approx(0.025, rel=0.05)
