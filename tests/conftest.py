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
