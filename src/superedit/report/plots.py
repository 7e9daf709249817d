"""Small plotting functions (matplotlib, Agg backend, imported lazily inside each function).

Every function takes plain numbers (lists / arrays / tensors), writes one image atomically and
returns its path. No pyplot global state: figures are ``matplotlib.figure.Figure`` objects drawn
on an Agg canvas, so this is safe in threads and headless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..utils.io import atomic_path

#: colormaps for causal-tracing kinds (as in ROME's figures)
TRACE_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
TRACE_TITLES = {"resid": "single restored layer (residual stream)", "mlp": "restored MLP output",
                "attn": "restored attention output"}


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


def rate_by_layer(rates: dict[str, Sequence[float]], layers: Sequence[int], path: str | Path,
                  title: str = "", ylabel: str = "rate") -> Path:
    """Line plot of one or more per-layer rates (e.g. state-swap transfer / keep rates)."""
    fig = _figure(4.5, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, ys in rates.items():
        ax.plot(list(layers), [float(y) for y in ys], marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
