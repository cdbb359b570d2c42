"""The model users get: input normalisation folded into the module.

A saved or returned model takes float images in [0, 1], shape (N, C, H, W); the per-dataset mean and
std live in buffers of the first layer, so it can be used, exported or benchmarked without
autoprune's data code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Subtract a per-channel mean and divide by a per-channel std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """``net`` preceded by :class:`Normalize`: the unit that autoprune trains, prunes and saves."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
