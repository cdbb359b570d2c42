"""A per-layer latency lookup table (NetAdapt / AMC style): the latency of any keep vector, without running it.

Measuring every candidate of a search on the target device is far too slow, and MACs predict latency
poorly (on a CPU a 16-channel 3x3 convolution at 32x32 costs about 3x a 32-channel one at 16x16 with the
same MACs). So, once per (model, device, threads, batch size), every convolution and linear layer that
the pruning space changes is timed *alone*, with its real input shape, stride, padding, kernel and
groups, on a grid of (input, output) widths; a keep vector's latency is then the sum of the table
values at the widths :meth:`PruningSpace.layer_channels` gives (bilinear interpolation between grid
points, exact at them) plus the *remainder*: the full model's measured latency minus the sum of its
layers at full width (the classifier, pooling, additions, Python overhead and whatever the layers do
differently inside the model than alone).

Choices, measured on ResNet-20 (``benchmarks/latency_table.py``; results and the exploration behind
these choices in ``benchmarks/results/latency_table/``):

* Each timed layer is a *block*: the convolution with the BatchNorm that reads its output and the
  activation module after that (when present as modules), because their cost also shrinks with the
  channel count (batch 64, CPU time: Spearman 0.94 against 0.92 for the convolution alone, median
  relative error 19.5% against 26.5%).
* Grid: widths ``C * GRID_FRACTIONS`` (1/16, 1/8, 1/4, 1/2, 3/4, 1; rounded, >= 1) plus the narrowest
  width the space allows, per prunable dimension: 6 x 6 points per distinct layer; a dimension the
  space never changes (the network's input channels, the classifier's outputs) is not gridded.
  Measured latency is smooth in the width (no steps at multiples of 8 on the Xeon we used), and
  bilinear interpolation is exact for a cost proportional to in x out channels.
* Distinct layer configurations (ResNet stages repeat them) are timed once.
* Every timed run is preceded by one untimed *settling* run of the same block: inside a network a
  layer's input was just written by the layer before it; timed cold, after dozens of other grid
  points, small blocks looked up to 1.5x slower than they run in the network.
* The *remainder* is not constant: residual additions, the activations after them and pooling work
  on as many channels as the pruned layers write. Two uniformly pruned whole networks (keep 0.25 and
  0.5) are timed during the build and the remainder is a line in the activation volume through the
  full model's remainder (:attr:`LatencyTable.remainder_slope_ms`), so the full model stays exact.
* Load from other processes drifts during the build, so every configuration's grid is timed in
  interleaved rounds *together with the full model*, and each grid value is the median over rounds of
  (layer time / full-model time of the same round), times the median full-model time of the whole
  build: a machine that got busier half-way scales both sides of a round alike, and the table stays
  consistent with itself. A configuration whose ratios still spread more than
  :data:`~autoprune.engine.latency.MAX_RELATIVE_SPREAD` is timed again once and the samples pooled.

What a table cannot see: with glibc's default malloc a CPU forward pass page-faults on fresh memory
for many of its activations, how many depending chaotically on the sequence of tensor sizes (ResNet-20,
batch 64: 0 to 16k faults per pass, up to a quarter of its latency, different for two pruned networks
of similar size), while a block timed alone reuses its memory. That biased predictions of pruned
networks low by about 20% in our measurements; with
:func:`~autoprune.engine.latency.steady_allocator` (or jemalloc / tcmalloc, as tuned CPU deployments
use) the bias disappeared (median relative error 5.7%). Time tables and speed-ups under the allocator
the model will be deployed with.

The table is cached as JSON (:meth:`LatencyTable.load_or_build`) under a key hashing everything it
depends on; after the build :meth:`LatencyTable.predict` is plain numpy and Python (no torch).
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from autoprune.engine.latency import (
    CLOCKS,
    MAX_RELATIVE_SPREAD,
    Inputs,
    Timing,
    allocator,
    batch_of,
    call,
    device_description,
    fixed_threads,
    measure_latency,
    resolve_clock,
    round_sig,
    speedup,
    time_interleaved,
    warn_if_busy,
)
from autoprune.engine.space import PruningSpace
from autoprune.errors import AutopruneError
from autoprune.io.files import read_json, write_json

log = logging.getLogger(__name__)

FORMAT = "autoprune-latency-table"
VERSION = 1

GRID_FRACTIONS: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
"""Widths timed per prunable dimension, as fractions of the full width (plus the space's minimum)."""

Measure = Callable[[Sequence[nn.Module], Sequence[Inputs]], Sequence[Sequence[float]]]
"""Times modules, each on its own inputs, in interleaved rounds: per module its samples (ms), sample r of
every module from round r. The default is :func:`interleaved_samples`; tests inject a fake cost model."""

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                     nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh)


# ---- recorded layers ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerConfig:
    """Everything about one convolution or linear layer (and what follows it) that its latency depends on.

    ``input_shape`` is the per-sample input without the channel dimension: the spatial size of a
    convolution's input, the leading dimensions of a linear layer's (empty for a flat (N, F) input).
    """

    kind: str  # "conv1d" | "conv2d" | "conv3d" | "linear"
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    padding_mode: str = "zeros"
    dtype: str = "torch.float32"
    norm: str | None = None  # e.g. "BatchNorm2d(eps=1e-05, affine=True, track_running_stats=True)"
    activation: str | None = None  # repr of the activation module, e.g. "ReLU(inplace=True)"

    @property
    def depthwise(self) -> bool:
        """One group per channel: input and output widths move together."""
        return self.kind != "linear" and self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclass
class _Recorded:
    name: str
    config: LayerConfig
    layer: nn.Module
    norm: nn.Module | None = None
    activation: nn.Module | None = None
    positions: int = 1  # output elements per sample and channel (H*W of a convolution's output)


def _touched_layers(space: PruningSpace) -> list[str]:
    names: dict[str, None] = {}
    for g in space.groups:
        for m in g.members:
            names.setdefault(m.module, None)
    return list(names)


def _record(model: nn.Module, example_inputs: Inputs, names: Sequence[str], device: torch.device,
            include_norm: bool, include_activation: bool) -> dict[str, _Recorded]:
    """One forward pass with hooks: the configuration of every named compute layer and what follows it."""
    modules = dict(model.named_modules())
    wanted = {n for n in names if isinstance(modules.get(n), (*_CONV_TYPES, nn.Linear))}
    recorded: dict[str, _Recorded] = {}
    tail: dict[int, tuple[str, torch.Tensor]] = {}  # id(tensor) -> (layer whose block produced it, tensor)

    def on_layer(name: str):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            if name in recorded:
                raise AutopruneError(f"layer {name!r} runs twice in one forward pass; a latency table needs "
                                     "each prunable layer to run once; give this model a MACs target instead")
            positions = int(np.prod(output.shape[2:] if not isinstance(module, nn.Linear) else output.shape[1:-1]))
            recorded[name] = _Recorded(name, _config_of(module, x), module, positions=max(1, positions))
            tail[id(output)] = (name, output)
        return hook

    def on_follower(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        x = inputs[0] if inputs else None
        found = tail.get(id(x))
        if found is None or found[1] is not x:
            return
        rec = recorded[found[0]]
        if isinstance(module, _NORM_TYPES):
            if rec.norm is not None or rec.activation is not None or module.num_features != rec.config.out_channels:
                return
            rec.norm = module
        elif rec.activation is None:
            rec.activation = module
        else:
            return
        if isinstance(output, torch.Tensor):
            tail[id(output)] = (rec.name, output)

    handles = [modules[n].register_forward_hook(on_layer(n)) for n in wanted]
    follower_types: tuple[type, ...] = ((_NORM_TYPES if include_norm else ())
                                        + (_ACTIVATION_TYPES if include_activation else ()))
    handles += [m.register_forward_hook(on_follower) for m in modules.values() if isinstance(m, follower_types)]
    try:
        with torch.no_grad():
            call(model, batch_of(example_inputs, 1, device))
    finally:
        for h in handles:
            h.remove()
    missing = sorted(wanted - set(recorded))
    if missing:
        raise AutopruneError(f"layers {missing} did not run on the example inputs; pass inputs that reach them")
    out = {}
    for name in names:
        if name not in recorded:
            continue
        rec = recorded[name]
        norm = (f"{type(rec.norm).__name__}(eps={rec.norm.eps}, affine={rec.norm.affine}, "
                f"track_running_stats={rec.norm.track_running_stats})") if rec.norm is not None else None
        act = repr(rec.activation) if rec.activation is not None else None
        rec.config = LayerConfig(**{**asdict(rec.config), "norm": norm, "activation": act})
        out[name] = rec
    return out


def _config_of(module: nn.Module, x: torch.Tensor) -> LayerConfig:
    dtype = str(module.weight.dtype)
    if isinstance(module, nn.Linear):
        return LayerConfig("linear", module.in_features, module.out_features, tuple(int(s) for s in x.shape[1:-1]),
                           bias=module.bias is not None, dtype=dtype)
    dims = len(module.kernel_size)
    padding = module.padding if isinstance(module.padding, str) else tuple(int(p) for p in module.padding)
    return LayerConfig(f"conv{dims}d", module.in_channels, module.out_channels,
                       tuple(int(s) for s in x.shape[-dims:]), tuple(module.kernel_size), tuple(module.stride),
                       padding, tuple(module.dilation), module.groups, module.bias is not None,
                       module.padding_mode, dtype)


# ---- the grid --------------------------------------------------------------------------------------

def grid_widths(full: int, lowest: int, fractions: Sequence[float] = GRID_FRACTIONS,
                multiple: int = 1) -> tuple[int, ...]:
    """Widths to time for a dimension of ``full`` channels that the space can narrow down to ``lowest``.

    Always contains ``full`` and ``lowest``; each fraction adds ``round(f * full)`` (rounded to a
    multiple of ``multiple`` for grouped convolutions) when it lies between them.
    """
    if lowest >= full:
        return (full,)
    widths = {full, max(multiple, math.ceil(lowest / multiple) * multiple)}
    for f in fractions:
        w = max(multiple, int(round(f * full / multiple)) * multiple)
        if lowest < w < full:
            widths.add(w)
    return tuple(sorted(widths))


@dataclass(frozen=True)
class _Entry:
    """The grid of one distinct layer configuration and its timed values (ms)."""

    config: LayerConfig
    grid_in: tuple[int, ...]
    grid_out: tuple[int, ...]
    values: np.ndarray  # (len(grid_in), len(grid_out)); one row for a depthwise convolution

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rows", self.values.tolist())  # plain floats: lookups without numpy overhead

    def points(self) -> list[tuple[int, int]]:
        if self.config.depthwise:  # input width follows the output width
            return [(c, c) for c in self.grid_out]
        return [(i, o) for i in self.grid_in for o in self.grid_out]

    def lookup(self, cin: int, cout: int) -> float:
        """Bilinear interpolation on the grid (exact at grid points, flat outside it)."""
        v: list[list[float]] = self._rows  # type: ignore[attr-defined]
        i, t = (0, 0.0) if self.config.depthwise else _locate(self.grid_in, cin)
        j, u = _locate(self.grid_out, cout)
        i1, j1 = min(i + 1, len(v) - 1), min(j + 1, len(v[0]) - 1)
        return ((1 - t) * ((1 - u) * v[i][j] + u * v[i][j1])) + (t * ((1 - u) * v[i1][j] + u * v[i1][j1]))


def _locate(grid: tuple[int, ...], x: float) -> tuple[int, float]:
    """Cell index and fraction within it of ``x`` on a sorted grid (clamped to the grid's range)."""
    if len(grid) == 1:
        return 0, 0.0
    i = min(max(bisect.bisect_right(grid, x) - 1, 0), len(grid) - 2)
    t = (x - grid[i]) / (grid[i + 1] - grid[i])
    return i, min(max(t, 0.0), 1.0)


class _Lookup:
    """Vectorised bilinear lookup of every tabulated layer for many keep vectors (numpy only).

    A layer's widths are linear in the groups' channel counts (what :meth:`PruningSpace.layer_channels`
    computes member by member): ``width = full - A @ removed``, with ``A[layer, group]`` the layer
    channels per group channel along that dimension.
    """

    def __init__(self, space: PruningSpace, entries: Sequence[_Entry], layers: dict[str, int],
                 positions: dict[str, int]):
        names = list(layers)
        row = {n: i for i, n in enumerate(names)}
        full = space.layer_channels(space.upper)
        self.channels = np.array([g.channels for g in space.groups], dtype=np.float64)
        self.a_in = np.zeros((len(names), len(space.groups)))
        self.a_out = np.zeros((len(names), len(space.groups)))
        for g in space.groups:
            for m in g.members:
                if m.module in row:
                    (self.a_out if m.dim == "out" else self.a_in)[row[m.module], g.index] += m.ratio
        self.full_in = np.array([full[n][0] for n in names], dtype=np.float64)
        self.full_out = np.array([full[n][1] for n in names], dtype=np.float64)
        self.positions = np.array([positions[n] for n in names], dtype=np.float64)
        self.full_volume = float(self.full_out @ self.positions) or 1.0
        grids_in = [(0,) if entries[layers[n]].config.depthwise else entries[layers[n]].grid_in for n in names]
        grids_out = [entries[layers[n]].grid_out for n in names]
        width = max(len(g) for g in grids_in + grids_out) if names else 1
        self.grid_in, self.n_in = self._pad(grids_in, width)
        self.grid_out, self.n_out = self._pad(grids_out, width)
        self.offset = np.cumsum([0] + [entries[layers[n]].values.size for n in names])[:-1].astype(np.int64)
        self.flat = np.concatenate([entries[layers[n]].values.ravel() for n in names]) if names else np.zeros(0)

    @staticmethod
    def _pad(grids: list[tuple[int, ...]], width: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.full((len(grids), width), np.inf)
        for i, g in enumerate(grids):
            out[i, : len(g)] = g
        return out, np.array([len(g) for g in grids], dtype=np.int64)

    @staticmethod
    def _locate(grid: np.ndarray, n: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per (candidate, layer): cell index, next index and fraction within the cell (clamped)."""
        rows = np.arange(grid.shape[0])[None, :]
        i = np.clip((grid[None, :, :] <= x[:, :, None]).sum(axis=2) - 1, 0, np.maximum(n - 2, 0))
        i1 = np.minimum(i + 1, n - 1)
        lo, hi = grid[rows, i], grid[rows, i1]
        span = np.where(hi > lo, hi - lo, 1.0)
        return i, i1, np.clip((x - lo) / span, 0.0, 1.0) * (hi > lo)

    def volume(self, counts: np.ndarray) -> np.ndarray:
        """Activation elements the tabulated layers write, as a fraction of the full network's."""
        widths = self.full_out - (self.channels - counts) @ self.a_out.T
        return widths @ self.positions / self.full_volume

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        if not self.flat.size:
            return np.zeros(counts.shape[0])
        removed = self.channels - counts
        i, i1, t = self._locate(self.grid_in, self.n_in, self.full_in - removed @ self.a_in.T)
        j, j1, u = self._locate(self.grid_out, self.n_out, self.full_out - removed @ self.a_out.T)
        base, cols = self.offset, self.n_out

        def v(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return self.flat[base + a * cols + b]

        per_layer = (1 - t) * ((1 - u) * v(i, j) + u * v(i, j1)) + t * ((1 - u) * v(i1, j) + u * v(i1, j1))
        return per_layer.sum(axis=1)


def _block(rec: _Recorded, cin: int, cout: int, batch_size: int,
           device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    """A freshly built layer of width (cin, cout) with its norm and activation, and a random input for it."""
    c = rec.config
    dtype = rec.layer.weight.dtype
    if c.kind == "linear":
        layer: nn.Module = nn.Linear(cin, cout, bias=c.bias)
        x = torch.rand(batch_size, *c.input_shape, cin, dtype=dtype, device=device)
    else:
        groups = cout if c.depthwise else c.groups
        conv_type = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[c.kind]
        layer = conv_type(cin, cout, c.kernel_size, stride=c.stride, padding=c.padding, dilation=c.dilation,
                          groups=groups, bias=c.bias, padding_mode=c.padding_mode)
        x = torch.rand(batch_size, cin, *c.input_shape, dtype=dtype, device=device)
    parts = [layer]
    if rec.norm is not None:
        n = rec.norm
        parts.append(type(n)(cout, eps=n.eps, affine=n.affine, track_running_stats=n.track_running_stats))
    if rec.activation is not None:
        parts.append(copy.deepcopy(rec.activation))
    return nn.Sequential(*parts).to(device=device, dtype=dtype).eval(), x


# ---- the default measurement -------------------------------------------------------------------------

def interleaved_samples(*, warmup: int = 3, repeats: int = 12, settle: int = 1, device: torch.device | str = "cpu",
                        target_ms: float = 1.0, clock: Callable[[], float] = time.perf_counter) -> Measure:
    """The default :data:`Measure`: the protocol's interleaved rounds (:func:`time_interleaved`).

    Each module gets ``ceil(target_ms / its time)`` calls per sample (at most 50, the sample is their
    mean), so sub-millisecond layers are timed over about a millisecond, and ``settle`` untimed calls
    before each sample, so it runs warm (inside a network a layer's input was just written by the
    layer before it) rather than after dozens of other grid points have evicted its data.
    """

    def measure(modules: Sequence[nn.Module], inputs: Sequence[Inputs]) -> list[list[float]]:
        calls = [(lambda m=m, x=x: call(m, x)) for m, x in zip(modules, inputs, strict=True)]
        first = time_interleaved(calls, warmup=warmup, repeats=1, device=device, clock=clock)
        number = [max(1, min(50, math.ceil(target_ms / max(s[0], 1e-6)))) for s in first]
        return time_interleaved(calls, warmup=0, repeats=repeats, device=device, number=number, settle=settle,
                                clock=clock)

    return measure


@dataclass(frozen=True)
class TableOptions:
    """How a latency table is built: the grid, what each timed block holds, and the timing protocol.

    Attributes:
        fractions: grid widths per prunable dimension, as fractions of the full width.
        include_norm: time the BatchNorm that reads a layer's output with the layer.
        include_activation: time the activation module after that with it too.
        clock: ``"wall"`` or ``"process"`` (CPU time; threads=1 only), see
            :data:`~autoprune.engine.latency.CLOCKS`.
        warmup: untimed runs per timed module.
        repeats: interleaved timed rounds per distinct layer configuration.
        settle: untimed runs of a module right before each of its timed runs (warm caches).
        retries: times a configuration is timed again (samples pooled) while the spread of any of its
            points exceeds :data:`~autoprune.engine.latency.MAX_RELATIVE_SPREAD`.
        calibrate: uniform keep ratios of whole pruned networks timed (against the full model) to fit
            how the remainder shrinks with the activation volume; empty: a constant remainder.
    """

    fractions: tuple[float, ...] = GRID_FRACTIONS
    include_norm: bool = True
    include_activation: bool = True
    clock: str = "wall"
    warmup: int = 3
    repeats: int = 12
    settle: int = 1
    retries: int = 1
    calibrate: tuple[float, ...] = (0.25, 0.5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        object.__setattr__(self, "calibrate", tuple(float(r) for r in self.calibrate))
        if any(not 0 < r < 1 for r in self.calibrate):
            raise AutopruneError(f"calibration keep ratios must lie in (0, 1), got {list(self.calibrate)}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise AutopruneError(f"grid fractions must lie in (0, 1], got {list(self.fractions)}")
        if self.warmup < 0 or self.repeats < 1 or self.settle < 0 or self.retries < 0:
            raise AutopruneError(f"need warmup >= 0, repeats >= 1, settle >= 0 and retries >= 0, got "
                                 f"{self.warmup}, {self.repeats}, {self.settle}, {self.retries}")
        if self.clock not in CLOCKS:
            raise AutopruneError(f"unknown clock {self.clock!r}; valid clocks: {', '.join(CLOCKS)}")


# ---- the table ----------------------------------------------------------------------------------------

class LatencyTable:
    """Predicted latency (ms) of the network a keep vector describes, from per-layer timings.

    Build it with :meth:`build` or, cached, :meth:`load_or_build`; then :meth:`predict` uses no torch
    (about 0.1-0.2 ms per keep vector, as much as two :meth:`PruningSpace.relative_macs` calls) and
    :meth:`predict_many` scores an (N, groups) array of candidates at once (about 20 us each).
    """

    def __init__(self, space: PruningSpace, entries: Sequence[_Entry], layers: dict[str, int], full_ms: float,
                 meta: dict[str, Any], key: str = "", positions: dict[str, int] | None = None,
                 calibration: Sequence[tuple[Sequence[float], float]] = ()):
        self.space = space
        self.entries = tuple(entries)
        self.layers = dict(layers)  # layer name -> index into entries
        self.full_ms = float(full_ms)
        self.meta = dict(meta)
        self.key = key
        self.positions = {n: int((positions or {}).get(n, 1)) for n in self.layers}
        self.calibration = tuple((tuple(float(r) for r in k), float(ms)) for k, ms in calibration)
        full = space.layer_channels(space.upper)
        missing = sorted(set(self.layers) - set(full))
        if missing:
            raise AutopruneError(f"latency table layers {missing} are not layers of the pruning space; "
                                 "rebuild the table for this model")
        self._lookup = _Lookup(space, self.entries, self.layers, self.positions)
        self.layers_full_ms = sum(self.entries[e].lookup(*full[n]) for n, e in self.layers.items())
        self.remainder_ms = self.full_ms - self.layers_full_ms
        self.remainder_slope_ms = self._fit_remainder()
        if self.remainder_ms < 0:
            log.info("the model's layers timed alone take %.3f ms, more than the whole model (%.3f ms)",
                     self.layers_full_ms, self.full_ms)

    def _fit_remainder(self) -> float:
        """Slope of the remainder in the activation volume, fitted through the full model's remainder.

        Residual additions, activations after them and pooling work on as many channels as the
        pruned layers write, so the remainder shrinks with the network; whole pruned networks timed
        during the build (``calibration``) give its slope, least squares through the full model's
        point (so the full model is still predicted exactly).
        """
        if not self.calibration:
            return 0.0
        keeps = np.array([k for k, _ in self.calibration])
        counts = self._counts(keeps)
        volume = self._lookup.volume(counts) - 1.0
        remainder = np.array([ms for _, ms in self.calibration]) - self._lookup(counts) - self.remainder_ms
        denom = float(volume @ volume)
        return float(volume @ remainder) / denom if denom > 1e-12 else 0.0

    @property
    def batch_size(self) -> int:
        """The batch size the table was measured at."""
        return int(self.meta["batch_size"])

    @property
    def device(self) -> str:
        """The device description (CPU model and threads, or GPU name) the table was measured on."""
        return str(self.meta["device"])

    # ---- prediction -----------------------------------------------------------------------------

    def layer_latency(self, keep: Sequence[float] | np.ndarray) -> dict[str, float]:
        """Predicted milliseconds of each tabulated layer (with its norm and activation) under ``keep``."""
        widths = self.space.layer_channels(keep)
        return {n: self.entries[e].lookup(*widths[n]) for n, e in self.layers.items()}

    def predict(self, keep: Sequence[float] | np.ndarray) -> float:
        """Predicted milliseconds per forward pass (at the table's batch size) of the network ``keep`` describes."""
        return float(self.predict_many(np.asarray(keep, dtype=np.float64)[None, :])[0])

    def predict_many(self, keeps: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """:meth:`predict` of every row of an (N, groups) array of keep vectors at once (vectorised numpy)."""
        counts = self._counts(keeps)
        remainder = self.remainder_ms + self.remainder_slope_ms * (self._lookup.volume(counts) - 1.0)
        return np.maximum(remainder + self._lookup(counts), 0.0)

    def predict_relative(self, keep: Sequence[float] | np.ndarray) -> float:
        """Predicted latency of ``keep`` as a fraction of the unpruned network's."""
        return self.predict(keep) / self.full_ms

    def _counts(self, keeps: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """:meth:`PruningSpace.counts` of many keep vectors (the same arithmetic, vectorised)."""
        keeps = np.asarray(keeps, dtype=np.float64)
        groups = self.space.groups
        if keeps.ndim != 2 or keeps.shape[1] != len(groups):
            raise AutopruneError(f"keep vectors of shape {keeps.shape}; the space has {len(groups)} groups "
                                 "(pass one keep vector, or an (N, groups) array)")
        if not np.all(np.isfinite(keeps)):
            raise AutopruneError("keep vector contains NaN or inf")
        channels = np.array([g.channels for g in groups], dtype=np.float64)
        lowest = np.array([g.min_keep for g in groups], dtype=np.float64)
        step = np.array([g.step for g in groups], dtype=np.float64)
        return np.minimum(channels, np.maximum(lowest, np.round(keeps * channels / step) * step))

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    def build(cls, model: nn.Module, example_inputs: Inputs, space: PruningSpace, *,
              device: torch.device | str = "cpu", batch_size: int = 64, threads: int | None = None,
              options: TableOptions | None = None, measure: Measure | None = None,
              device_label: str | None = None, progress: bool = True) -> LatencyTable:
        """Time every distinct prunable layer on its grid, and the full model, on ``device``.

        Args:
            model: the unpruned network (not modified: a copy is moved to ``device``).
            example_inputs: a tensor or tuple of tensors (dim 0 the batch) the model runs on.
            space: the pruning space of ``model``; its groups decide which layers are tabulated.
            device: where to time.
            batch_size: the batch size to time at.
            threads: intra-op threads while timing (default: the current setting).
            options: the grid, what a timed block holds, and the timing protocol (:class:`TableOptions`).
            measure: replaces the timing (tests inject a fake cost model here).
            device_label: the device description stored with the table (default: :func:`device_description`).
            progress: show a progress bar.
        """
        plan = _Plan.make(model, example_inputs, space, device, batch_size, threads, options or TableOptions(),
                          device_label)
        return plan.run(measure=measure, progress=progress)

    @classmethod
    def load_or_build(cls, model: nn.Module, example_inputs: Inputs, space: PruningSpace, *,
                      cache_dir: str | Path, device: torch.device | str = "cpu", batch_size: int = 64,
                      threads: int | None = None, options: TableOptions | None = None,
                      measure: Measure | None = None, device_label: str | None = None,
                      progress: bool = True) -> LatencyTable:
        """The cached table for this model, space, device, threads and batch size, or a new one (then cached).

        The cache file's name and contents carry a hash of everything the table depends on (device
        description with thread count, batch size, torch version, clock, model structure, the recorded
        layer configurations and grids); a file that does not parse, or whose key differs, is rebuilt
        and overwritten (atomically). Arguments as for :meth:`build`.
        """
        plan = _Plan.make(model, example_inputs, space, device, batch_size, threads, options or TableOptions(),
                          device_label)
        path = Path(cache_dir) / f"latency_{plan.key[:20]}.json"
        if path.exists():
            try:
                table = cls.from_json(read_json(path), space, expected_key=plan.key)
                log.info("latency table loaded from %s", path)
                return table
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:  # AutopruneError is a ValueError
                log.warning("latency table cache %s is unusable (%s: %s); rebuilding it", path,
                            type(exc).__name__, exc)
        table = plan.run(measure=measure, progress=progress)
        write_json(path, table.to_json())
        log.info("latency table written to %s", path)
        return table

    # ---- serialisation --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The table as plain JSON data (what :meth:`from_json` reads)."""
        return {"format": FORMAT, "version": VERSION, "key": self.key, "meta": self.meta,
                "full_ms": self.full_ms,
                "entries": [{"config": asdict(e.config), "grid_in": list(e.grid_in), "grid_out": list(e.grid_out),
                             "values_ms": e.values.tolist()} for e in self.entries],
                "layers": self.layers, "positions": self.positions,
                "calibration": [[list(k), ms] for k, ms in self.calibration]}

    @classmethod
    def from_json(cls, data: dict[str, Any], space: PruningSpace, *, expected_key: str | None = None) -> LatencyTable:
        """Rebuild a table written by :meth:`to_json`, checking its format, key and shapes."""
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise AutopruneError(f"not a latency table of version {VERSION}; rebuild it")
        if expected_key is not None and data.get("key") != expected_key:
            raise AutopruneError("latency table was measured for another model, device, batch size or torch; "
                                 "rebuild it")
        entries = []
        for e in data["entries"]:
            cfg = dict(e["config"])
            for k in ("input_shape", "kernel_size", "stride", "dilation"):
                cfg[k] = tuple(int(v) for v in cfg[k])
            if not isinstance(cfg["padding"], str):
                cfg["padding"] = tuple(int(v) for v in cfg["padding"])
            values = np.asarray(e["values_ms"], dtype=np.float64)
            grid_in, grid_out = tuple(int(v) for v in e["grid_in"]), tuple(int(v) for v in e["grid_out"])
            config = LayerConfig(**cfg)
            expected = (1 if config.depthwise else len(grid_in), len(grid_out))
            if values.shape != expected or not np.all(np.isfinite(values)) or np.any(values < 0):
                raise AutopruneError(f"latency table entry has values of shape {values.shape}, expected {expected}")
            if list(grid_in) != sorted(set(grid_in)) or list(grid_out) != sorted(set(grid_out)):
                raise AutopruneError("latency table grid is not increasing; rebuild it")
            entries.append(_Entry(config, grid_in, grid_out, values))
        layers = {str(n): int(i) for n, i in data["layers"].items()}
        if any(not 0 <= i < len(entries) for i in layers.values()):
            raise AutopruneError("latency table refers to a missing entry; rebuild it")
        full_ms = float(data["full_ms"])
        if not math.isfinite(full_ms) or full_ms <= 0:
            raise AutopruneError(f"latency table has full-model latency {full_ms}; rebuild it")
        positions = {str(n): int(p) for n, p in data["positions"].items()}
        if set(positions) != set(layers) or any(p < 1 for p in positions.values()):
            raise AutopruneError("latency table positions do not match its layers; rebuild it")
        calibration = [(tuple(float(r) for r in k), float(ms)) for k, ms in data["calibration"]]
        if any(len(k) != len(space) or not math.isfinite(ms) or ms <= 0 for k, ms in calibration):
            raise AutopruneError("latency table calibration does not fit the pruning space; rebuild it")
        return cls(space, entries, layers, full_ms, dict(data["meta"]), str(data.get("key", "")), positions,
                   calibration)


# ---- build plan (what to time, and the cache key) ------------------------------------------------

@dataclass
class _Plan:
    model: nn.Module
    example_inputs: Inputs
    space: PruningSpace
    device: torch.device
    batch_size: int
    threads: int | None
    options: TableOptions
    recorded: dict[str, _Recorded]
    grids: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    meta: dict[str, Any]
    key: str

    @classmethod
    def make(cls, model: nn.Module, example_inputs: Inputs, space: PruningSpace, device: torch.device | str,
             batch_size: int, threads: int | None, options: TableOptions, device_label: str | None) -> _Plan:
        if batch_size < 1:
            raise AutopruneError(f"batch size must be >= 1, got {batch_size}")
        device = torch.device(device)
        resolve_clock(options.clock, device, threads)
        base = copy.deepcopy(model).to(device).eval()
        with fixed_threads(threads) as used:
            recorded = _record(base, example_inputs, _touched_layers(space), device, options.include_norm,
                               options.include_activation)
        full, lowest = space.layer_channels(space.upper), space.layer_channels(space.lower)
        grids = {}
        for name, rec in recorded.items():
            c = rec.config
            multiple = 1 if c.depthwise or c.kind == "linear" else c.groups
            grids[name] = (grid_widths(full[name][0], lowest[name][0], options.fractions, multiple),
                           grid_widths(full[name][1], lowest[name][1], options.fractions, multiple))
        example = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
        meta = {"device": device_label or device_description(device, used), "threads": used,
                "batch_size": batch_size, "torch": torch.__version__, "clock": options.clock, "settle": options.settle,
                "allocator": allocator(),
                "fractions": list(options.fractions), "include_norm": options.include_norm,
                "include_activation": options.include_activation, "calibrate": list(options.calibrate)}
        material = {"format": FORMAT, "version": VERSION, **meta,
                    "model": repr(model),
                    "inputs": [[list(x.shape[1:]), str(x.dtype)] if isinstance(x, torch.Tensor) else repr(x)
                               for x in example],
                    "layers": {n: [asdict(r.config), grids[n], full[n]] for n, r in recorded.items()}}
        key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
        return cls(base, example_inputs, space, device, batch_size, threads, options, recorded, grids, meta, key)

    def run(self, *, measure: Measure | None, progress: bool) -> LatencyTable:
        o = self.options
        measure = measure or interleaved_samples(warmup=o.warmup, repeats=o.repeats, settle=o.settle,
                                                 device=self.device, clock=CLOCKS[o.clock])
        load = warn_if_busy("a latency table", o.clock)
        start, cpu_start = time.perf_counter(), time.process_time()
        distinct: dict[tuple[Any, ...], list[str]] = {}  # distinct (configuration, grid) pairs are timed once
        for name, rec in self.recorded.items():
            distinct.setdefault((rec.config, *self.grids[name]), []).append(name)
        full_inputs = batch_of(self.example_inputs, self.batch_size, self.device)
        measured: list[tuple[_Entry, np.ndarray]] = []
        layers: dict[str, int] = {}
        references: list[float] = []
        noisy = 0
        with fixed_threads(self.threads), torch.no_grad():
            bar = tqdm(distinct.items(), desc="latency table", unit="layer", leave=False,
                       disable=not progress or None)
            for (config, grid_in, grid_out), names in bar:
                shape = (1 if config.depthwise else len(grid_in), len(grid_out))
                entry = _Entry(config, grid_in, grid_out, np.zeros(shape))
                blocks = [_block(self.recorded[names[0]], ci, co, self.batch_size, self.device)
                          for ci, co in entry.points()]
                modules, inputs = [b for b, _ in blocks] + [self.model], [x for _, x in blocks] + [full_inputs]
                ratios, refs = _paired_ratios(measure(modules, inputs), len(modules))
                for attempt in range(o.retries):
                    if not np.any(_spread(ratios) > MAX_RELATIVE_SPREAD):
                        break
                    log.info("noisy timings of %s (%d of %d grid points); timing them again (%d of %d)", names[0],
                             int(np.sum(_spread(ratios) > MAX_RELATIVE_SPREAD)), len(blocks), attempt + 1, o.retries)
                    more, more_refs = _paired_ratios(measure(modules, inputs), len(modules))
                    ratios, refs = np.concatenate([ratios, more], axis=1), refs + more_refs
                noisy += int(np.sum(_spread(ratios) > MAX_RELATIVE_SPREAD))
                measured.append((entry, np.median(ratios, axis=1).reshape(shape)))
                references += refs
                for n in names:
                    layers[n] = len(measured) - 1
            if not references:  # nothing tabulated (not for a space with groups): time the model alone
                references = [float(v) for v in measure([self.model], [full_inputs])[0]]
            calibration = self._calibrate(measure, full_inputs, references)
        full = Timing.from_samples(references)
        entries = [_Entry(e.config, e.grid_in, e.grid_out, ratio * full.median_ms) for e, ratio in measured]
        meta = {**self.meta, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "build_seconds": round(time.perf_counter() - start, 2),
                "build_cpu_seconds": round(time.process_time() - cpu_start, 2), "load_average": round(load, 2),
                "full_model": full.to_json(),
                "points": sum(e.values.size for e in entries), "noisy_points": noisy}
        positions = {n: self.recorded[n].positions for n in layers}
        table = LatencyTable(self.space, entries, layers, full.median_ms, meta, self.key, positions,
                             [(k, ratio * full.median_ms) for k, ratio in calibration])
        log.info("latency table: %d layers, %d distinct, %d points (%d noisy), full model %.3f ms (IQR %.0f%%), "
                 "remainder %.3f ms (slope %.3f), %.1f s", len(layers), len(entries), meta["points"], noisy,
                 full.median_ms, 100 * full.relative_spread, table.remainder_ms, table.remainder_slope_ms,
                 meta["build_seconds"])
        return table

    def _calibrate(self, measure: Measure, full_inputs: Inputs,
                   references: list[float]) -> list[tuple[np.ndarray, float]]:
        """Whole networks pruned uniformly to each ``options.calibrate`` ratio, timed against the full model.

        Returns (keep vector, median per-round time ratio to the full model); the full model's
        samples are added to ``references``.
        """
        space, out = self.space, []
        for ratio in self.options.calibrate:
            keep = space.snap(np.clip(np.full(len(space), ratio), space.lower, 1.0))
            if np.all(keep >= 1.0):
                continue
            zeros = [np.zeros(g.channels) for g in space.groups]  # which channels go does not change latency
            pruned = space.apply(self.model, keep, zeros).eval()
            ratios, refs = _paired_ratios(measure([pruned, self.model], [full_inputs, full_inputs]), 2)
            out.append((keep, float(np.median(ratios[0]))))
            references += refs
        return out


def _paired_ratios(samples: Sequence[Sequence[float]], count: int) -> tuple[np.ndarray, list[float]]:
    """Per timed module, its samples over the last module's (the full model's) of the same round."""
    try:
        arr = np.asarray([[float(v) for v in s] for s in samples], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AutopruneError(f"the latency measurement must return {count} equally long lists of milliseconds "
                             f"({exc})") from exc
    if arr.shape[0] != count or arr.ndim != 2 or arr.shape[1] == 0 or not np.all(np.isfinite(arr) & (arr > 0)):
        raise AutopruneError(f"the latency measurement returned samples of shape {arr.shape}; expected {count} "
                             "equally long, non-empty lists of positive milliseconds")
    return arr[:-1] / arr[-1], arr[-1].tolist()


def _spread(ratios: np.ndarray) -> np.ndarray:
    q1, median, q3 = np.percentile(ratios, [25.0, 50.0, 75.0], axis=1)
    return (q3 - q1) / median


# ---- validation -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Validation:
    """How well a table's predictions match physically pruned networks measured by the protocol.

    ``median_error`` / ``max_error`` compare absolute milliseconds (|predicted - measured| / measured);
    ``relative_*`` compare latency as a fraction of the unpruned network's: predicted over predicted
    full, against the median per-round ratio candidate / base model (timed in the same rounds). That
    is what a latency target uses, and it cancels load that differed between the build and the
    validation, which the absolute errors do not. The correlations are taken against these paired
    relative measurements too (the most robust ranking of the candidates on a busy machine).
    """

    pearson: float
    spearman: float
    median_error: float
    max_error: float
    relative_median_error: float
    relative_max_error: float
    predicted_ms: tuple[float, ...]
    measured_ms: tuple[float, ...]
    measured_relative: tuple[float, ...]
    base_predicted_ms: float
    base_measured_ms: float
    reliable_fraction: float

    def to_json(self) -> dict[str, Any]:
        """Plain, rounded values, the per-candidate pairs included."""
        return {"pearson": round(self.pearson, 4), "spearman": round(self.spearman, 4),
                "median_error": round(self.median_error, 4), "max_error": round(self.max_error, 4),
                "relative_median_error": round(self.relative_median_error, 4),
                "relative_max_error": round(self.relative_max_error, 4),
                "base_ms": {"predicted": round_sig(self.base_predicted_ms),
                            "measured": round_sig(self.base_measured_ms)},
                "reliable_fraction": round(self.reliable_fraction, 3),
                "pairs_ms": [[round_sig(p), round_sig(m)]
                             for p, m in zip(self.predicted_ms, self.measured_ms, strict=True)],
                "measured_relative": [round(r, 4) for r in self.measured_relative]}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (NaN when either side is constant)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    for v in np.unique(x):  # ties share their average rank
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    return pearson(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


def validate(table: LatencyTable, model: nn.Module, space: PruningSpace, scores: Sequence[np.ndarray | torch.Tensor],
             keeps: Sequence[Sequence[float] | np.ndarray], example_inputs: Inputs, *,
             device: torch.device | str = "cpu", threads: int | None = None, warmup: int = 5,
             repeats: int = 20, clock: str | None = None) -> Validation:
    """Prune each keep vector for real, time it against the base model, and compare with the table.

    Each candidate is timed interleaved with the base model alone, as a pruning run measures its
    speed-up (timing all candidates in one interleaved batch would run each one cold, after a
    different network, and compress their differences).

    Args:
        table: the table to check.
        model: the unpruned network the table was built for (not modified).
        space: its pruning space.
        scores: per-group channel scores for :meth:`PruningSpace.apply` (random ones do for latency).
        keeps: the candidates.
        example_inputs: as for :meth:`LatencyTable.build`.
        device: where to time (the table's device).
        threads: intra-op threads (the table's, normally).
        warmup: untimed runs per network.
        repeats: interleaved timed rounds of each candidate and the base model.
        clock: ``"wall"`` or ``"process"`` (default: the table's).
    """
    if len(keeps) < 2:
        raise AutopruneError(f"validation needs at least 2 candidates, got {len(keeps)}")
    device = torch.device(device)
    base = copy.deepcopy(model).to(device).eval()
    b, clock = table.batch_size, clock or str(table.meta.get("clock", "wall"))
    measured, measured_rel, base_runs, reliable = [], [], [], []
    for keep in keeps:  # each candidate timed against the base model, as a pruning run reports it
        pruned = space.apply(base, keep, scores).eval()
        t_base, t_pruned = (t[b] for t in measure_latency([base, pruned], example_inputs, batch_sizes=(b,),
                                                          device=device, threads=threads, warmup=warmup,
                                                          repeats=repeats, clock=clock))
        measured.append(t_pruned.median_ms)
        measured_rel.append(1.0 / speedup(t_base.samples, t_pruned.samples).ratio)
        base_runs.append(t_base.median_ms)
        reliable.append(t_pruned.reliable)
    measured, measured_rel = np.array(measured), np.array(measured_rel)
    base_ms = float(np.median(base_runs))
    predicted = np.array([table.predict(k) for k in keeps])
    base_pred = table.predict(space.upper)
    err = np.abs(predicted - measured) / measured
    rel_err = np.abs(predicted / base_pred - measured_rel) / measured_rel
    return Validation(pearson(predicted, measured_rel), spearman(predicted, measured_rel), float(np.median(err)),
                      float(np.max(err)), float(np.median(rel_err)), float(np.max(rel_err)),
                      tuple(float(v) for v in predicted), tuple(float(v) for v in measured),
                      tuple(float(v) for v in measured_rel), float(base_pred),
                      base_ms, float(np.mean(reliable)))
