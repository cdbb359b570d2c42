"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers of basic blocks, widths 16-32-64.

Where the stride or width changes, the shortcut is a 1x1 convolution with BatchNorm (option B) rather
than the paper's zero-padding (option A): a parameter-free padding lambda cannot be traced or pruned,
and option B costs under 1% more parameters. Channels joined by a residual addition are coupled, so
the pruning space gives each stage's residual stream one shared ratio.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [max(1, int(round(w * width))) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


def _resnet_factory(depth: int):
    def factory(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels, width)

    factory.__doc__ = f"ResNet-{depth} for CIFAR (basic blocks, option-B shortcuts)."
    return factory


for _depth in (20, 32, 56):
    register_model(f"resnet{_depth}")(_resnet_factory(_depth))
