"""The training step's input handling and the models it builds."""
import torch

from hvd_ba.engine import TrainState, normalize
from hvd_ba.models import build_model


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
