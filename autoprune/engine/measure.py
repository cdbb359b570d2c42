"""Measurements of real modules: MACs and parameters (Torch-Pruning's counter) and serialised size.

Latency has its own module, :mod:`autoprune.engine.latency` (interleaved timing with its spread).
"""

from __future__ import annotations

import io

import torch
from torch import nn

from autoprune.engine.batches import Inputs
from autoprune.engine.space import Cost, counted_cost


def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's state dict as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def cost_of(model: nn.Module, example_inputs: Inputs) -> Cost:
    """MACs (Torch-Pruning's counter's total, per sample) and parameters counted on the real module."""
    return counted_cost(model, example_inputs)
