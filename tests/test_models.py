"""Models: ghost BN equals separate forward passes; our weights load into plain torchvision."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hvd_ba.models import GhostBatchNorm2d, build_model, parameter_groups, use_ghost_batch_norm

pytestmark = pytest.mark.unit


def test_ghost_bn_equals_one_forward_per_group():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    ghost = use_ghost_batch_norm(copy.deepcopy(plain), ghost_size=16)
    assert sum(isinstance(m, GhostBatchNorm2d) for m in ghost.modules()) == 2
    x = torch.randn(64, 3, 10, 10)
    target = torch.randn(64, 4, 6, 6)
    # Reference: four separate forward passes of 16 samples with gradient accumulation.
    out_ref = torch.cat([plain(chunk) for chunk in x.split(16)])
    F.mse_loss(out_ref, target).backward()
    out = ghost(x)
    F.mse_loss(out, target).backward()
    assert torch.allclose(out, out_ref, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), ghost.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    for a, b in zip(plain.modules(), ghost.modules()):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
            assert torch.allclose(a.running_var, b.running_var, atol=1e-6)
            assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 4
    # ...and it is not plain BN over all 64 samples.
    assert not torch.allclose(out, nn.Sequential(*copy.deepcopy(list(plain.children())))(x), atol=1e-3)


def test_ghost_bn_rejects_a_partial_group():
    bn = GhostBatchNorm2d(4, ghost_size=16)
    with pytest.raises(ValueError, match="40 samples are not a multiple of ghost_size 16"):
        bn(torch.randn(40, 4, 2, 2))


def test_resnet50_weights_load_into_plain_torchvision():
    model = build_model("resnet50", 1000, ghost_size=64)
    plain = torchvision.models.resnet50()
    plain.load_state_dict(model.state_dict(), strict=True)
    # zero-init of the last BN gamma in every residual block
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in model.modules()
               if isinstance(b, torchvision.models.resnet.Bottleneck))


def test_weight_decay_skips_batch_norm_only():
    model = build_model("small_resnet", 10, ghost_size=32)
    decay, no_decay = parameter_groups(model, 1e-4)
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in no_decay["params"]} == bn_ids and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 1e-4
    assert id(model.fc.bias) in {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_unknown_arch_names_the_key():
    with pytest.raises(ValueError, match="config key 'model.arch': unknown architecture 'resnet5'"):
        build_model("resnet5", 10)
