"""The networks: torchvision's where they exist, a compact ResNet and MobileNet v1 for CPU runs.

Every model keeps torchvision's module names, and ghost batch norm (models/ghost_bn.py)
subclasses BatchNorm2d with the same parameters and buffers, so a state dict saved here loads
strictly into the plain torchvision model (e.g. `torchvision.models.resnet50()`).
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from hvd_ba.config import ARCHS, MOBILENET_NARROWEST, width_problem
from hvd_ba.models.ghost_bn import use_ghost_batch_norm


class SmallResNet(torchvision.models.ResNet):
    """A narrow 4-stage ResNet (BasicBlock x [1, 1, 1, 1], widths 24-192) for the CPU demo.

    Built on torchvision's ResNet so its module names, init and zero-init-residual behave the same;
    only the stem (3x3 conv, stride 2, no max-pool: demo crops are small) and the widths differ.
    """

    def __init__(self, num_classes: int, width: int = 24, zero_init_residual: bool = True, dropout: float = 0.0):
        super().__init__(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, zero_init_residual=zero_init_residual)
        self.dropout = nn.Dropout(dropout) if dropout else None  # no parameters: state dict unchanged
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, width, 1)
        self.layer2 = self._make_layer(BasicBlock, width * 2, 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, width * 4, 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, width * 8, 1, stride=2)
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x) if self.dropout is not None else x)


def _conv_bn(c_in: int, c_out: int, stride: int, groups: int = 1) -> nn.Sequential:
    kernel = 3 if groups > 1 or c_in == 3 else 1
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """MobileNet v1 (Howard et al. 2017, table 1), the paper's reference [4]; torchvision has none.

    A 3x3 stem, then 13 depthwise-separable blocks (3x3 depthwise + 1x1 pointwise, each with BN
    and ReLU); `width` is the width multiplier alpha.
    """

    # (output channels, stride) of each depthwise-separable block
    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        c = int(MOBILENET_NARROWEST * width)  # the stem: the narrowest layer (config.width_problem)
        layers = [_conv_bn(3, c, 2)]
        for out, stride in self.BLOCKS:
            out = int(out * width)
            layers += [_conv_bn(c, c, stride, groups=c), _conv_bn(c, out, 1)]
            c = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _mobilenet(num_classes: int, zero_init_residual: bool, width: float, dropout: float) -> nn.Module:
    return MobileNetV1(num_classes, width)


def _resnet50(num_classes: int, zero_init_residual: bool, width: float, dropout: float) -> nn.Module:
    return torchvision.models.resnet50(num_classes=num_classes, zero_init_residual=zero_init_residual)


def _alexnet(num_classes: int, zero_init_residual: bool, width: float, dropout: float) -> nn.Module:
    return torchvision.models.alexnet(num_classes=num_classes)


def _small_resnet(num_classes: int, zero_init_residual: bool, width: float, dropout: float) -> nn.Module:
    return SmallResNet(num_classes, width=max(1, round(24 * width)), zero_init_residual=zero_init_residual,
                       dropout=dropout)


BUILDERS = {"resnet50": _resnet50, "mobilenet": _mobilenet, "alexnet": _alexnet, "small_resnet": _small_resnet}
assert tuple(BUILDERS) == ARCHS, "config.ARCHS (model.arch's choices) must name the networks built here"


def build_model(arch: str, num_classes: int, ghost_size: int | None = None,
                zero_init_residual: bool = True, width: float = 1.0, dropout: float = 0.0) -> nn.Module:
    """The network of model.arch; the config refuses what this does before any rank starts
    (config.ARCHS, config.width_problem), the same checks for callers without a config (benches)."""
    if arch not in ARCHS:
        raise ValueError(f"config key 'model.arch': unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    if width_problem(arch, width):
        raise ValueError(f"config key 'model.width': {width_problem(arch, width)}")
    model = BUILDERS[arch](num_classes, zero_init_residual, width, dropout)
    if ghost_size is not None:
        use_ghost_batch_norm(model, ghost_size)
    return model


def parameter_groups(model: nn.Module, weight_decay: float, decay_biases: bool = True) -> list[dict]:
    """Weight decay on every parameter except batch-norm ones (seed, section B); with
    decay_biases=False, biases are exempt too."""
    exempt = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              for p in m.parameters(recurse=False)}
    if not decay_biases:
        exempt |= {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    decay = [p for p in model.parameters() if id(p) not in exempt]
    no_decay = [p for p in model.parameters() if id(p) in exempt]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
