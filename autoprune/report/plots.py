"""Figures of pruning runs and comparisons, drawn with matplotlib's Agg renderer into PNG bytes.

Each figure function takes plain data (numbers and names pulled out of ``report.json`` and
``history.jsonl``), returns the PNG's bytes and touches no global state: figures are built with
``matplotlib.figure.Figure`` directly, never through ``pyplot``, so nothing depends on a display or on
the process-wide backend. :func:`write_png` stores the bytes atomically; the HTML reports embed the same
bytes as data URIs. matplotlib is imported only when a figure is drawn.

The figures:

* :func:`accuracy_vs_macs`: accuracy against MACs, one point per method, zoomed on the pruned models, the
  unpruned model as a reference line and the MACs target as a dashed line;
* :func:`accuracy_vs_latency`: accuracy against measured latency, with the latency's interquartile range;
* :func:`channels_per_layer`: the share of channels each method kept in every prunable layer;
* :func:`search_progress`: the best search score found so far against the number of evaluations.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autoprune.io.files import write_with

#: Fixed colours for the registered methods, so a method looks the same in every figure and report.
_COLORS = {
    "otp": "#1f77b4", "pso": "#ff7f0e", "sa": "#2ca02c", "ssa": "#d62728", "gdp": "#9467bd",
    "l1": "#8c564b", "global": "#e377c2", "slim": "#17becf", "random": "#7f7f7f",
}
_FALLBACK = ("#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")
_DPI = 110
_WIDTH = 9.5  # inches: about 1,050 pixels, the width of a report page


@dataclass(frozen=True)
class AccuracyPoint:
    """One model in the accuracy figures.

    Attributes:
        label: method name (legend and annotation).
        macs: MACs of the model.
        accuracy: test accuracy (or score) after fine-tuning, in [0, 1].
        accuracy_before: test accuracy straight after pruning (before fine-tuning), if known.
        latency_ms: measured latency (median) at the large batch, if known.
        latency_iqr: its interquartile range ``(q1, q3)`` in ms, if known.
    """

    label: str
    macs: float
    accuracy: float
    accuracy_before: float | None = None
    latency_ms: float | None = None
    latency_iqr: tuple[float, float] | None = None


def color_of(name: str, index: int = 0) -> str:
    """The colour used for method ``name`` (registered methods have fixed colours)."""
    return _COLORS.get(name, _FALLBACK[index % len(_FALLBACK)])


def short_layer_name(name: str) -> str:
    """A layer name without the ``net.`` prefix of the normalising wrapper."""
    return name[4:] if name.startswith("net.") else name


def running_max(scores: Sequence[float]) -> list[float]:
    """The best score so far after each evaluation (non-finite scores never raise it; ``-inf`` before any)."""
    best, out = -math.inf, []
    for s in scores:
        if s is not None and math.isfinite(s) and s > best:
            best = float(s)
        out.append(best)
    return out


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    return fig


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white")
    return buffer.getvalue()


def _style(ax: Any) -> None:
    ax.grid(True, color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def write_png(path: str | os.PathLike[str], png: bytes) -> None:
    """Write PNG bytes to ``path`` atomically."""
    write_with(path, lambda tmp: tmp.write_bytes(png))


def _legend_outside(ax: Any) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, borderaxespad=0)


def _zoom(values: Sequence[float], pad: float = 0.15, floor: float = 0.0) -> tuple[float, float]:
    """Axis limits around ``values`` (at least a small span, so one point or equal values still show)."""
    low, high = min(values), max(values)
    span = max(high - low, 0.02 * max(abs(high), 1e-9), 1e-6)
    return max(floor, low - pad * span), high + pad * span


def _reference(ax: Any, base: AccuracyPoint | None, ylim: tuple[float, float], what: str,
               x: float | None = None) -> None:
    """The unpruned model as a labelled horizontal line (or a note when it lies outside the zoomed range); at
    ``x`` also as a star (single runs, whose range includes it)."""
    if base is None:
        return
    if x is not None:
        ax.scatter([x], [100 * base.accuracy], marker="*", s=220, color="black", zorder=5)
    y = 100 * base.accuracy
    text = f"unpruned: {y:.2f}% at {what}"
    if ylim[0] <= y <= ylim[1]:
        ax.axhline(y, color="black", linestyle=":", linewidth=1, zorder=1)
        ax.annotate(text, (0.01, y), xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(0, 4),
                    fontsize=8)
    else:
        ax.annotate(text + (" (above this range)" if y > ylim[1] else " (below this range)"), (0.01, 0.97),
                    xycoords="axes fraction", va="top", fontsize=8)


def _scatter(ax: Any, points: Sequence[tuple[AccuracyPoint, float]], *, xerr: bool = False) -> None:
    for i, (p, x) in enumerate(points):
        color = color_of(p.label, i)
        y = 100 * p.accuracy
        if xerr and p.latency_iqr is not None:
            ax.errorbar([x], [y], xerr=[[x - p.latency_iqr[0]], [p.latency_iqr[1] - x]], fmt="none", ecolor=color,
                        elinewidth=1, capsize=3, zorder=3)
        ax.scatter([x], [y], s=70, color=color, edgecolors="white", linewidths=0.8, zorder=4,
                   label=f"{p.label} ({y:.2f}%)")
        ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8, color=color)


def accuracy_vs_macs(points: Sequence[AccuracyPoint], base: AccuracyPoint | None = None, *,
                     target_macs: float | None = None, title: str = "Accuracy against MACs") -> bytes:
    """Accuracy (%) after fine-tuning against MACs (millions), zoomed on the pruned models; returns PNG bytes.

    Both axes span the pruned models (and the target), not the unpruned model, whose accuracy is a labelled
    reference line and whose MACs are named in its label: otherwise every method crowds into a corner.
    """
    fig = _figure(_WIDTH, 5.0)
    ax = fig.add_subplot()
    _style(ax)
    scale = 1e6
    xs = [p.macs / scale for p in points] + ([target_macs / scale] if target_macs is not None else [])
    ys = [100 * p.accuracy for p in points]
    if target_macs is not None:
        ax.axvline(target_macs / scale, color="#999999", linestyle="--", linewidth=1, zorder=1, label="MACs target")
    _scatter(ax, [(p, p.macs / scale) for p in points])
    alone = base is not None and len(points) < 2  # one run: show where it started from, too
    if alone:
        xs, ys = xs + [base.macs / scale], ys + [100 * base.accuracy]
    if points:
        ax.set_xlim(*_zoom(xs))
        ax.set_ylim(*_zoom(ys, floor=-1))
    _reference(ax, base, ax.get_ylim(), f"{base.macs / scale:.3g} M MACs" if base is not None else "",
               x=base.macs / scale if alone else None)
    ax.set_xlabel("MACs per sample (millions)")
    ax.set_ylabel("accuracy after fine-tuning (%)")
    ax.set_title(title, fontsize=11)
    _legend_outside(ax)
    return _png(fig)


def accuracy_vs_latency(points: Sequence[AccuracyPoint], base: AccuracyPoint | None = None, *, batch: str = "",
                        device: str = "", title: str = "Accuracy against measured latency") -> bytes:
    """Accuracy (%) after fine-tuning against measured latency (ms, median with its interquartile range)."""
    fig = _figure(_WIDTH, 5.0)
    ax = fig.add_subplot()
    _style(ax)
    timed = [p for p in points if p.latency_ms is not None]
    _scatter(ax, [(p, float(p.latency_ms)) for p in timed], xerr=True)
    alone = base is not None and base.latency_ms is not None and len(timed) < 2
    if timed:
        spans = [v for p in timed for v in (p.latency_iqr or (p.latency_ms, p.latency_ms))]
        accuracies = [100 * p.accuracy for p in timed]
        if alone:
            spans.append(float(base.latency_ms))
            accuracies.append(100 * base.accuracy)
        ax.set_xlim(*_zoom(spans))
        ax.set_ylim(*_zoom(accuracies, floor=-1))
    latency = f"{base.latency_ms:.3g} ms" if base is not None and base.latency_ms is not None else "its latency"
    _reference(ax, base, ax.get_ylim(), latency, x=float(base.latency_ms) if alone else None)
    where = f" at batch {batch}" if batch else ""
    ax.set_xlabel(f"latency{where} (ms, median and interquartile range{'; ' + device if device else ''})")
    ax.set_ylabel("accuracy after fine-tuning (%)")
    ax.set_title(title, fontsize=11)
    _legend_outside(ax)
    return _png(fig)


def channels_per_layer(layers: Mapping[str, Sequence[Mapping[str, Any]]], *,
                       title: str = "Channels kept per layer") -> bytes:
    """Share of channels kept in each prunable layer, per method; returns PNG bytes.

    Args:
        layers: per method, its ``report["layers"]`` rows (``name``, ``before``, ``after``); the layer
            order of the first method sets the x axis.
        title: the figure title.
    """
    methods = [m for m, rows in layers.items() if rows]
    names: list[str] = []
    before: dict[str, int] = {}
    for m in methods:
        for row in layers[m]:
            if row["name"] not in before:
                names.append(row["name"])
                before[row["name"]] = int(row["before"])
    n = max(len(names), 1)
    fig = _figure(min(max(_WIDTH, 0.3 * n + 3), 16), 5.0)
    ax = fig.add_subplot()
    _style(ax)
    xs = list(range(len(names)))
    if len(methods) == 1:  # one run: bars annotated with the channel counts
        rows = {r["name"]: r for r in layers[methods[0]]}
        kept = [100 * rows[nm]["after"] / max(rows[nm]["before"], 1) for nm in names]
        bars = ax.bar(xs, kept, color=color_of(methods[0]), width=0.6, label=methods[0])
        ax.bar(xs, [100] * len(xs), color="none", edgecolor="#999999", linewidth=0.8, width=0.6,
               label="unpruned width")
        if n <= 30:
            for bar, nm in zip(bars, names, strict=True):
                ax.annotate(f"{rows[nm]['after']}/{rows[nm]['before']}", (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()), textcoords="offset points", xytext=(0, 3), ha="center",
                            fontsize=8 if n <= 12 else 6)
    else:  # several methods: one line per method
        for i, m in enumerate(methods):
            rows = {r["name"]: r for r in layers[m]}
            ys = [100 * rows[nm]["after"] / max(rows[nm]["before"], 1) if nm in rows else math.nan for nm in names]
            ax.plot(xs, ys, marker="o", markersize=5, linewidth=1.6, color=color_of(m, i), label=m, alpha=0.9)
    ax.set_xticks(xs)
    rotate = 0 if n <= 6 else 45 if n <= 16 else 90
    ax.set_xticklabels([f"{short_layer_name(nm)}\n({before[nm]})" if rotate == 0 else
                        f"{short_layer_name(nm)} ({before[nm]})" for nm in names],
                       rotation=rotate, ha="right" if rotate == 45 else "center", fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_ylabel("channels kept (% of the unpruned width)")
    ax.set_xlabel("prunable layer (unpruned channels)")
    ax.set_title(title, fontsize=11)
    _legend_outside(ax)
    return _png(fig)


def search_progress(scores: Mapping[str, Sequence[float]], *, ylabel: str = "best score so far",
                    title: str = "Search: best fitness against evaluations") -> bytes:
    """Running maximum of each method's search score against the evaluation count; returns PNG bytes.

    A curve starts at its method's first feasible candidate (score >= 0); methods with a single
    evaluation appear as one point.
    """
    from matplotlib.ticker import MaxNLocator

    fig = _figure(_WIDTH, 5.0)
    ax = fig.add_subplot()
    _style(ax)
    longest = 1
    drawn = False
    for i, (m, values) in enumerate(scores.items()):
        best = running_max(values)
        evals = f"{len(values)} eval{'s' if len(values) != 1 else ''}"
        pts = [(k + 1, b) for k, b in enumerate(best) if math.isfinite(b) and b >= 0]
        if not pts:  # still listed, so that a missing curve is explained
            ax.plot([], [], color=color_of(m, i), linestyle=":", label=f"{m} ({evals}, none within the target)")
            continue
        drawn = True
        longest = max(longest, len(best))
        xs, ys = zip(*pts, strict=True)
        ax.step(xs, ys, where="post", color=color_of(m, i), linewidth=1.8, alpha=0.9,
                label=f"{m} ({evals}, best {ys[-1]:.4f})")
        ax.scatter([xs[-1]], [ys[-1]], color=color_of(m, i), s=28, zorder=3)
    if longest > 100:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("candidate evaluations" + (" (log scale)" if longest > 100 else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    if not drawn:  # empty axes: no meaningless ticks, just the explanation
        ax.set_xlim(0.5, max([len(v) for v in scores.values()] + [1]) + 0.5)
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no candidate within the target was recorded", ha="center", va="center",
                transform=ax.transAxes)
    if scores:
        _legend_outside(ax)
    return _png(fig)
