"""The editing-objective perplexity histogram for ``superedit data objective-ppl``.

Reads only the per-request rows the command wrote (``objective_ppl.jsonl``); matplotlib (Agg) is
imported inside the functions through :mod:`superedit.report.plots`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from .plots import _figure, save_figure

#: display order and names of the MQD question types
_TYPE_LABELS = {"dg": "direct generation", "mc": "multiple-choice", "tf": "true/false"}


def ppl_histogram(ppl_by_type: Mapping[str, Sequence[float]], path: str | Path, title: str = "",
                  reference: Mapping[str, float] | None = None, bins: int = 40) -> Path:
    """Step histograms of per-request PPL, one per question type, on shared log-spaced bins (log x).

    ``reference`` (type -> value) draws a dashed vertical line per type, e.g. the paper's means; the
    solid line is this run's median."""
    import numpy as np

    values = [v for vs in ppl_by_type.values() for v in vs if math.isfinite(v) and v > 0]
    fig = _figure(6.8, 3.9)
    ax = fig.add_subplot(111)
    if values:
        lo, hi = min(values), max(values)
        edges = np.geomspace(lo, hi * 1.0001 if hi > lo else lo * 1.1, bins + 1)
        order = [t for t in _TYPE_LABELS if t in ppl_by_type] + sorted(set(ppl_by_type) - set(_TYPE_LABELS))
        for i, qtype in enumerate(order):
            vs = [v for v in ppl_by_type[qtype] if math.isfinite(v) and v > 0]
            if not vs:
                continue
            color = f"C{i}"
            name = _TYPE_LABELS.get(qtype, qtype)
            ax.hist(vs, bins=edges, histtype="step", linewidth=1.6, color=color,
                    label=f"{name} (n={len(vs)}, median {np.median(vs):.3g})")
            ax.axvline(float(np.median(vs)), color=color, linewidth=0.9)
            if reference and qtype in reference:
                ax.axvline(reference[qtype], color=color, linestyle="--", linewidth=0.9)
    ax.set_xscale("log")
    ax.set_xlabel("editing-objective perplexity exp(mean token NLL)  (log scale)")
    ax.set_ylabel("requests")
    if reference:
        ax.plot([], [], color="grey", linestyle="--", linewidth=0.9, label="paper's mean (dashed)")
    ax.legend(fontsize=7)
    ax.set_title(title or "Editing-objective perplexity per question type", fontsize=10)
    return save_figure(fig, path)
