"""VGG for CIFAR-sized images, with BatchNorm (the variant used by PFEC, network slimming and PSOPruner).

The convolutional stack is Simonyan & Zisserman's; as in the CIFAR literature the classifier is a
single linear layer on the globally pooled features (512 -> classes), which keeps VGG-16 at about
15M parameters and 313M MACs on 32x32 inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model

CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """A VGG network with BatchNorm after every convolution."""

    def __init__(self, config: tuple[int | str, ...], num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = max(1, int(round(int(item) * width)))
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                           nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _vgg_factory(name: str):
    def factory(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
        return VGG(CONFIGS[name], num_classes, in_channels, width)

    factory.__doc__ = f"{name.upper()} with BatchNorm for CIFAR-sized inputs (``width`` scales every layer)."
    return factory


for _name in CONFIGS:
    register_model(_name)(_vgg_factory(_name))
