"""Figures of pruning runs and comparisons, drawn with matplotlib's Agg renderer into PNG bytes.

Each figure function takes plain data (numbers and names pulled out of ``report.json`` and
``history.jsonl``), returns the PNG's bytes and touches no global state: figures are built with
``matplotlib.figure.Figure`` directly, never through ``pyplot``, so nothing depends on a display or on
the process-wide backend. :func:`write_png` stores the bytes atomically; the HTML reports embed the same
bytes as data URIs. matplotlib is imported only when a figure is drawn.

The figures:

* :func:`accuracy_vs_macs`: test accuracy against MACs, one point per method (hollow: before
  fine-tuning), the unpruned model as a star and the MACs target as a dashed line;
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
    """One model in the accuracy-against-MACs figure.

    Attributes:
        label: method name (legend and annotation).
        macs: MACs of the pruned model.
        accuracy: test accuracy after fine-tuning, in [0, 1].
        accuracy_before: test accuracy straight after pruning (before fine-tuning), if known.
    """

    label: str
    macs: float
    accuracy: float
    accuracy_before: float | None = None


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


def accuracy_vs_macs(points: Sequence[AccuracyPoint], base: AccuracyPoint | None = None, *,
                     target_macs: float | None = None, title: str = "Test accuracy against MACs") -> bytes:
    """Scatter of test accuracy (%) against MACs (millions); returns PNG bytes.

    The MACs axis is logarithmic when the pruned models are far smaller than the unpruned one, so that
    they do not crowd into a corner. A single point is labelled beside it; several go by the legend.
    """
    fig = _figure(_WIDTH, 5.0)
    ax = fig.add_subplot()
    _style(ax)
    scale = 1e6
    all_macs = [p.macs for p in points] + ([base.macs] if base is not None else [])
    log_x = bool(points) and max(all_macs) > 4 * min(m for m in all_macs if m > 0)
    if base is not None:
        ax.scatter([base.macs / scale], [100 * base.accuracy], marker="*", s=260, color="black", zorder=5,
                   label=f"unpruned ({100 * base.accuracy:.2f}%)")
        ax.axhline(100 * base.accuracy, color="black", linestyle=":", linewidth=0.8, zorder=1)
    if target_macs is not None:
        ax.axvline(target_macs / scale, color="#999999", linestyle="--", linewidth=1, zorder=1,
                   label="MACs target")
    hollow = False
    for i, p in enumerate(points):
        color = color_of(p.label, i)
        x, y = p.macs / scale, 100 * p.accuracy
        if p.accuracy_before is not None and abs(p.accuracy_before - p.accuracy) > 1e-9:
            yb = 100 * p.accuracy_before
            ax.plot([x, x], [yb, y], color=color, linestyle=":", linewidth=1, zorder=2)
            ax.scatter([x], [yb], s=40, facecolors="white", edgecolors=color, linewidths=1.5, zorder=3)
            hollow = True
        ax.scatter([x], [y], s=70, color=color, edgecolors="white", linewidths=0.8, zorder=4,
                   label=f"{p.label} ({100 * p.accuracy:.2f}%)")
        if len(points) == 1:
            ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(7, 4), fontsize=9, color=color)
    if hollow:  # a grey legend entry for all the hollow markers
        ax.scatter([], [], s=40, facecolors="white", edgecolors="#555555", linewidths=1.5,
                   label="before fine-tuning (hollow)")
    if log_x:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("MACs per image (millions, log scale)")
    else:
        ax.set_xlim(left=0)
        ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("test accuracy (%)")
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
