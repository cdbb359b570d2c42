"""Shared fixtures: tiny models and data, so the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from autoprune.data import synthetic_dataset
from autoprune.models import NormalizedModel, create_model

torch.set_num_threads(2)


def small_model(name: str, *, num_classes: int = 10) -> tuple[NormalizedModel, torch.Tensor]:
    """A registry model (narrow where the architecture allows) with normalisation, and an input batch."""
    lenet = name == "lenet5"
    channels, size = (1, (28, 28)) if lenet else (3, (32, 32))
    kwargs = {} if lenet else {"width": 0.25}
    net = create_model(name, num_classes=num_classes, in_channels=channels, image_size=size, **kwargs)
    model = NormalizedModel(net, [0.5] * channels, [0.25] * channels).eval()
    return model, torch.rand(2, channels, *size)


@pytest.fixture(scope="session")
def digits():
    """Synthetic learnable 28x28 one-channel data (train/val/test)."""
    return synthetic_dataset(num_classes=10, in_channels=1, image_size=(28, 28), n_train=400, n_test=200, seed=0)


class ModernNet(torch.nn.Module):
    """Layers the classic CNNs lack, in one small classifier: a BatchNorm that reads a concatenation (DenseNet's
    pre-activation), a BatchNorm without affine parameters, a transposed convolution, and a ConvNeXt-style
    residual branch (channels-last LayerNorm, two linear layers, a layer-scale vector ``gamma``)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(in_channels, 8, 3, stride=2, padding=1)
        self.grow = nn.Conv2d(8, 6, 3, padding=1)
        self.pre = nn.BatchNorm2d(14)  # reads cat(stem, grow)
        self.mix = nn.Conv2d(14, 12, 1, bias=False)
        self.plain = nn.BatchNorm2d(12, affine=False)
        self.up = nn.ConvTranspose2d(12, 8, 2, stride=2)
        self.norm = nn.LayerNorm(8)
        self.expand, self.reduce = nn.Linear(8, 16), nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.cat([x, torch.relu(self.grow(x))], 1)
        x = self.mix(torch.relu(self.pre(x)))
        x = torch.relu(self.up(torch.relu(self.plain(x))))
        branch = self.reduce(torch.nn.functional.gelu(self.expand(self.norm(x.permute(0, 2, 3, 1))))) * self.gamma
        x = x + branch.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))
