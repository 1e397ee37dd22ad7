"""The training step's input handling and the models it builds."""
import torch

import pytest

from hvd_ba.train.engine import TrainState, normalize
from hvd_ba.models import build_model

pytestmark = pytest.mark.unit


def test_normalize_permutes_converts_lights_and_normalises():
    images = torch.randint(0, 256, (6, 5, 7, 3), dtype=torch.uint8)  # HWC, as the loader gives
    lighting = torch.randn(6, 3) * 0.05
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    state = TrainState(model=None, optimizer=None, device=torch.device("cpu"), mean=mean.view(1, 3, 1, 1),
                       std=std.view(1, 3, 1, 1), peak_lr=0.1, steps_per_epoch=1)
    x = normalize({"images": images, "lighting": lighting}, state)
    assert x.shape == (6, 3, 5, 7) and x.dtype == torch.float32 and x.is_contiguous()
    expected = (images.permute(0, 3, 1, 2).float() / 255 + lighting.view(6, 3, 1, 1) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)


def test_mobilenet_v1_shape_and_size():
    model = build_model("mobilenet", 1000, ghost_size=None)
    params = sum(p.numel() for p in model.parameters())
    assert 4.1e6 < params < 4.3e6  # 4.2 M parameters (Howard et al. 2017, table 8)
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, 1000)
    half = build_model("mobilenet", 1000, ghost_size=None)
    assert sum(1 for m in half.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1) == 13


def test_weight_decay_can_exempt_biases():
    from hvd_ba.models import parameter_groups

    model = build_model("small_resnet", 10, ghost_size=32)
    decay, no_decay = parameter_groups(model, 1e-4, decay_biases=False)
    assert id(model.fc.bias) in {id(p) for p in no_decay["params"]}
    assert id(model.fc.weight) in {id(p) for p in decay["params"]}


def test_bf16_autocast_and_channels_last_step_on_cpu():
    """The AMP and channels_last switches run (on the CPU here; CUDA on a GPU machine)."""
    from hvd_ba.config import load_config
    from hvd_ba.train.engine import train_step
    from hvd_ba.models import parameter_groups

    cfg = load_config("demo")
    torch.manual_seed(0)
    model = build_model("small_resnet", 4, ghost_size=32).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(parameter_groups(model, 1e-4), lr=0.1, momentum=0.9)
    state = TrainState(model=model, optimizer=opt, device=torch.device("cpu"), mean=torch.zeros(1, 3, 1, 1),
                       std=torch.ones(1, 3, 1, 1), peak_lr=0.1, steps_per_epoch=1, amp_dtype=torch.bfloat16,
                       channels_last=True)
    batch = {"images": torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8),
             "lighting": torch.zeros(64, 3), "labels": torch.randint(0, 4, (64,))}
    before = model.fc.weight.detach().clone()
    loss, correct = train_step(state, batch, 0.1, cfg)
    assert 0.5 < loss < 5 and 0 <= correct <= 64
    assert model.fc.weight.dtype == torch.float32 and not torch.equal(before, model.fc.weight)


def test_progress_lines_say_the_training_time_left():
    from hvd_ba.train.engine import _time_left

    state = TrainState(model=None, optimizer=None, device=torch.device("cpu"), mean=None, std=None, peak_lr=0.1,
                       steps_per_epoch=10, epochs=3, epoch=0)
    # 5 of 10 steps of epoch 1 in 10 s: 5 + 2 x 10 steps left at 2 s each
    assert _time_left(state, 5, 10, elapsed=10.0) == ", about 50 s left"
    state.epoch = 2  # the last epoch, a resumed one at 3 s a step
    assert _time_left(state, 5, 10, elapsed=15.0) == ", about 15 s left"
    state.epochs, state.epoch = 90, 0
    assert _time_left(state, 5, 10, elapsed=10.0) == ", about 30 min left"  # 895 steps x 2 s
    state.epochs = 900
    assert _time_left(state, 5, 10, elapsed=10.0) == ", about 5.0 h left"
    state.epochs = 0  # not known: nothing said
    assert _time_left(state, 5, 10, elapsed=10.0) == ""
