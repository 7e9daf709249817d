"""Shared plotting pieces (matplotlib, Agg backend, imported lazily inside each function).

Every plotting function takes plain numbers (lists / arrays / tensors) and either returns a
``matplotlib.figure.Figure`` (the ``*_figure`` builders, which tests inspect) or writes one image
atomically and returns its path. No pyplot global state: figures are drawn on an Agg canvas, so this
is safe in threads and headless.

House rules for every figure (issue #12): legends sit outside the axes (:func:`legend_outside`),
counts get integer ticks (:func:`integer_ticks`), rates run from 0 to 1 (:func:`rate_axis`) unless a
zoom is labelled, and small-n rates carry 95% Wilson intervals (:func:`wilson`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ..utils.io import atomic_path

#: colormaps for causal-tracing kinds (as in ROME's figures)
TRACE_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
TRACE_TITLES = {"resid": "single restored layer (residual stream)", "mlp": "restored MLP output",
                "attn": "restored attention output"}
#: one marker per series, so that coinciding lines stay distinguishable
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
#: z for a two-sided 95% interval
Z95 = 1.959963984540054


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` atomically; the format comes from ``path``'s suffix (default png)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, bbox_inches="tight")
    return path


def series_style(i: int) -> dict:
    """Colour and marker of the i-th series (a method, a setting): the same everywhere in a report."""
    return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]}


def legend_outside(fig, axes=None, handles=None, labels=None, title: str | None = None, ncol: int = 1):
    """One legend for the whole figure, to the right of every axes (never over the data).

    ``handles``/``labels`` default to the axes' labelled artists (deduplicated by label). With the
    constrained layout engine the axes make room for it ("outside right"); otherwise it is anchored
    just right of the rightmost axes and ``save_figure``'s tight bounding box keeps it."""
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    axes = list(axes if axes is not None else fig.axes)
    if handles is None:
        seen: dict[str, object] = {}
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab and not lab.startswith("_"):
                    seen.setdefault(lab, h)
        handles, labels = list(seen.values()), list(seen)
    if not handles:
        return None
    kw = dict(fontsize=8, frameon=False, title=title, title_fontsize=8, ncol=ncol, alignment="left")
    if isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine):
        return fig.legend(handles, labels, loc="outside right center", **kw)
    right = max(ax.get_position().x1 for ax in axes) if axes else 1.0
    return fig.legend(handles, labels, loc="center left", bbox_to_anchor=(right + 0.01, 0.5), **kw)


def count_ticks(axis, values: Sequence[float], max_ticks: int = 10) -> None:
    """Ticks at the given whole-number positions (e.g. the checkpoints) when there are few, else integer ticks."""
    vals = sorted({int(v) for v in values})
    if 0 < len(vals) <= max_ticks:
        axis.set_ticks(vals)
    else:
        integer_ticks(axis)


def integer_ticks(axis) -> None:
    """Ticks only at whole numbers on ``axis`` (``ax.xaxis`` / ``ax.yaxis``): for counts and indices."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, nbins="auto", min_n_ticks=2))


def rate_axis(ax, label: str = "rate", zoom: tuple[float, float] | None = None) -> None:
    """y from 0 to 1 for a rate; a zoom is allowed only with its range written in the label."""
    if zoom is None:
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(label)
    else:
        ax.set_ylim(*zoom)
        ax.set_ylabel(f"{label} (zoomed: {zoom[0]:g}–{zoom[1]:g})")


def wilson(p: float | None, n: int | None, z: float = Z95) -> tuple[float, float] | None:
    """95% Wilson score interval (lo, hi) of a share ``p`` observed on ``n`` trials (None when n < 1)."""
    if p is None or not n or n < 1 or not math.isfinite(p):
        return None
    p = min(1.0, max(0.0, float(p)))
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def dodge(n_series: int, xs: Sequence[float], frac: float = 0.022) -> list[float]:
    """Horizontal offsets (one per series) of ``frac`` of the x range, so that equal points sit side by side."""
    xs = [float(x) for x in xs]
    span = (max(xs) - min(xs)) if len(xs) > 1 else 1.0
    step = frac * (span or 1.0)
    return [(i - (n_series - 1) / 2) * step for i in range(n_series)]


def _as_rows(grid) -> list[list[float]]:
    if hasattr(grid, "tolist"):
        grid = grid.tolist()
    return [[float("nan") if v is None else float(v) for v in row] for row in grid]


def trace_heatmap(grid, row_labels: Sequence[str], path: str | Path, kind: str = "resid", title: str | None = None,
                  highlight: Sequence[int] = (), xlabel: str | None = None, cbar_label: str = "p(target)",
                  layer_labels: Sequence[int] | None = None) -> Path:
    """ROME-style causal-trace heatmap: layers on x, tokens (or token categories) on y.

    Args:
        grid: (n_rows, n_layers) values, e.g. restored probabilities per (token, layer)
            (pass ``TraceResult.scores.T``) or mean indirect effects per (category, layer).
        row_labels: one label per row (tokens; categories).
        highlight: row indices marked with ``*`` (the subject tokens).
        kind: "resid" | "mlp" | "attn" (picks the colormap and default x label).
    """
    import numpy as np

    data = np.array(_as_rows(grid), dtype=float)
    if data.ndim != 2 or data.shape[0] != len(row_labels):
        raise ValueError(f"grid of shape {data.shape} does not match {len(row_labels)} row labels")
    marked = set(highlight)
    labels = [f"{lab}*" if i in marked else str(lab) for i, lab in enumerate(row_labels)]
    n_rows, n_layers = data.shape
    fig = _figure(max(5.0, 0.28 * n_layers + 3.0), max(2.2, 0.3 * n_rows + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(data)
    im = ax.pcolormesh(masked, cmap=TRACE_CMAPS.get(kind, "viridis"), shading="flat")
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(n_rows)])
    ax.set_yticklabels(labels, fontsize=8)
    ticks = list(range(0, n_layers, max(1, n_layers // 12)))
    ax.set_xticks([t + 0.5 for t in ticks])
    ax.set_xticklabels([str((layer_labels or range(n_layers))[t]) for t in ticks], fontsize=8)
    ax.set_xlabel(xlabel or (f"center of interval of restored {kind} layers" if kind != "resid" else "layer"))
    ax.set_title(title or TRACE_TITLES.get(kind, kind), fontsize=9)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(cbar_label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return save_figure(fig, path)


def rate_by_layer_figure(rates: dict[str, Sequence[float]], layers: Sequence[int], title: str = "",
                         ylabel: str = "rate"):
    """Line plot of one or more per-layer rates (e.g. state-swap transfer / keep rates): y 0–1, whole layers."""
    fig = _figure(4.5, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, ys) in enumerate(rates.items()):
        ax.plot(list(layers), [float(y) for y in ys], label=name, **series_style(i))
    ax.set_xlabel("layer")
    integer_ticks(ax.xaxis)
    rate_axis(ax, ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    legend_outside(fig, [ax])
    return fig


def rate_by_layer(rates: dict[str, Sequence[float]], layers: Sequence[int], path: str | Path,
                  title: str = "", ylabel: str = "rate") -> Path:
    """:func:`rate_by_layer_figure` written to ``path``."""
    return save_figure(rate_by_layer_figure(rates, layers, title, ylabel), path)
