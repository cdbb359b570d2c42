"""LeNet-5 in its classic layout: conv 6 -> conv 16 -> fc 120 -> fc 84 -> classes.

We use ReLU and max pooling (the modern reading of LeCun et al. 1998), and pad the first convolution
so that 28x28 MNIST digits follow the original 32x32 geometry (two 5x5 convolutions, two 2x2 pools,
16x5x5 features into the classifier). ReLU (f(0) = 0) also makes masked and physically pruned
channels behave identically, which the search relies on.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


class LeNet5(nn.Module):
    """LeNet-5 for small grayscale (or colour) images."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        pad = 2 if tuple(image_size) == (28, 28) else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        h, w = image_size[0] + 2 * pad, image_size[1] + 2 * pad
        h, w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h * w, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: tuple[int, int] = (28, 28)) -> nn.Module:
    """LeNet-5 (6-16 conv, 120-84 fc)."""
    return LeNet5(num_classes, in_channels, image_size)
