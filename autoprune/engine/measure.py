"""Measurements: latency by a fixed protocol, size, MACs and parameters of real modules.

Latency protocol (DESIGN.md): eval mode, no gradients, a fixed number of threads, warm-up runs, then
the median of repeated timed runs, at batch 1 and at a larger batch. When two models are compared
their runs are interleaved in the same process, so both see the same machine state; the ratio is
what to quote, with the device.
"""

from __future__ import annotations

import contextlib
import io
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from autoprune.engine.batches import Inputs, forward, random_batch
from autoprune.engine.space import Cost, counted_cost
from autoprune.engine.train import model_device


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per forward pass, by batch size."""

    ms: dict[int, float]
    device: str
    threads: int
    repeats: int = 0
    samples: dict[int, list[float]] = field(default_factory=dict, repr=False, compare=False)


def device_name(device: torch.device | str) -> str:
    """A readable name of the device: the CPU model and thread count, or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu} ({torch.get_num_threads()} threads)"


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (the current number if None)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def compare_latency(models: Sequence[nn.Module], example_inputs: Inputs, *,
                    batch_sizes: Sequence[int] = (1, 256), warmup: int = 10, repeats: int = 30,
                    threads: int | None = None) -> list[Latency]:
    """Latency of several models by the protocol, their timed runs interleaved.

    Args:
        models: the models (each on its device); their train/eval mode is restored afterwards.
        example_inputs: what the models take (batches of each size are made like it).
        batch_sizes: batch sizes to time.
        warmup: untimed runs per model and batch size.
        repeats: timed runs per model and batch size; the median is reported.
        threads: intra-op threads during the measurement (default: the current setting).
    """
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    samples: list[dict[int, list[float]]] = [{b: [] for b in batch_sizes} for _ in models]
    try:
        with fixed_threads(threads) as used:
            for b in batch_sizes:
                inputs = [random_batch(example_inputs, b, model_device(m)) for m in models]
                for m, x in zip(models, inputs, strict=True):
                    for _ in range(warmup):
                        forward(m, x)
                    _sync(model_device(m))
                for _ in range(repeats):
                    for i, (m, x) in enumerate(zip(models, inputs, strict=True)):
                        start = time.perf_counter()
                        forward(m, x)
                        _sync(model_device(m))
                        samples[i][b].append((time.perf_counter() - start) * 1000.0)
            names = [device_name(model_device(m)) for m in models]
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return [Latency({b: statistics.median(s[b]) for b in batch_sizes}, name, used, repeats, s)
            for s, name in zip(samples, names, strict=True)]


def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's state dict as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def cost_of(model: nn.Module, example_inputs: Inputs) -> Cost:
    """MACs (convolution and linear layers, per sample) and parameters counted on the real module."""
    return counted_cost(model, example_inputs)
