"""Plots and the HTML report of ``superedit robust`` (edits with and without the REP key adaptor).

The report reads only the files the command wrote (``table.json``, ``command.json``) and the PNGs of
:func:`render_plots`; template ``robust.html.j2``. Accuracies are shares of queries, drawn on 0–1 with
95% Wilson intervals over the queries behind each bar or point. The key-geometry report of
``superedit keys`` is :mod:`superedit.report.keys_report`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import FileFormatError
from .page import Column, Figure, Page, Section, Table, load_results, render
from .plots import _figure, dodge, legend_outside, rate_axis, save_figure, series_style, wilson
from .provenance import read_command

ROBUST_METRICS = ["success", "paraphrase", "locality", "rephrase_id", "rephrase_ood", "shuffle_id", "shuffle_ood",
                  "long_id", "long_ood"]
METRIC_LABELS = {"success": "success", "paraphrase": "paraphrase", "locality": "locality",
                 "rephrase_id": "rephrase (ID)", "rephrase_ood": "rephrase (OOD)", "shuffle_id": "shuffle (ID)",
                 "shuffle_ood": "shuffle (OOD)", "long_id": "long context (ID)", "long_ood": "long context (OOD)"}


def _err(acc: float, n: int | None) -> tuple[float, float]:
    ci = wilson(acc, n)
    return (0.0, 0.0) if ci is None else (max(0.0, acc - ci[0]), max(0.0, ci[1] - acc))


# ------------------------------------------------------------------------------------------ figures
def metrics_figure(settings: dict, title: str = "Accuracy per setting"):
    """Grouped bars: one group per metric, one bar per setting, 95% Wilson intervals over the queries."""
    import numpy as np

    names = list(settings)
    metrics = [m for m in ROBUST_METRICS if any((settings[s].get(m) or {}).get("acc") is not None for s in names)]
    fig = _figure(max(7.0, 0.75 * len(metrics) * max(1, len(names)) / 2 + 3), 3.6)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(111)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(metrics))
    for i, s in enumerate(names):
        cells = [settings[s].get(m) or {} for m in metrics]
        xs = x + i * width - 0.4 + width / 2
        accs = [c.get("acc") for c in cells]
        errs = [_err(a, c.get("n")) if a is not None else (0.0, 0.0) for a, c in zip(accs, cells)]
        ax.bar(xs, [a if a is not None else 0 for a in accs], width, color=series_style(i)["color"], label=s,
               yerr=[[e[0] for e in errs], [e[1] for e in errs]], error_kw={"elinewidth": 0.9, "capsize": 2,
                                                                          "ecolor": "0.25"})
        for xi, a in zip(xs, accs):
            if a is None:
                ax.text(xi, 0.02, "n/a", ha="center", va="bottom", fontsize=6.5, rotation=90, color="0.4")
    ax.set_xticks(x)
    ax.set_xticklabels([METRIC_LABELS.get(m, m) for m in metrics], rotation=25, ha="right", fontsize=8.5)
    rate_axis(ax, "accuracy (every target token argmax)")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=10)
    legend_outside(fig, [ax], title="setting")
    return fig


def metrics_bar(settings: dict, path, title: str = "Accuracy per setting") -> Path:
    return save_figure(metrics_figure(settings, title), path)


def _adaptor_setting(settings: dict | None) -> dict:
    """The setting evaluated with the adaptor (its query counts are those of the τ sweep)."""
    for name, v in (settings or {}).items():
        if name.endswith("+rep"):
            return v
    return {}


def tau_sweep_figure(rows: Sequence[dict], settings: dict | None = None):
    """One line per metric against the gate threshold τ; 95% Wilson intervals over the queries."""
    fig = _figure(7.2, 3.6)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(111)
    taus = [r["tau"] for r in rows]
    counts = _adaptor_setting(settings)
    shown = [m for m in ROBUST_METRICS if any(r.get(m) is not None for r in rows)]
    offsets = dodge(len(shown), taus)
    for i, m in enumerate(shown):
        pts = [(t + offsets[i], r[m]) for t, r in zip(taus, rows) if r.get(m) is not None]
        n = (counts.get(m) or {}).get("n")
        errs = [_err(y, n) for _, y in pts]
        st = series_style(i)
        ax.errorbar([x for x, _ in pts], [y for _, y in pts], yerr=[[e[0] for e in errs], [e[1] for e in errs]],
                    color=st["color"], marker=st["marker"], ms=4, lw=1.3, elinewidth=0.8, capsize=2,
                    ls="-" if not m.endswith("_id") else ":", label=METRIC_LABELS.get(m, m))
    ax.set_xticks(taus)
    ax.set_xlabel("gate threshold τ")
    rate_axis(ax, "accuracy")
    ax.grid(alpha=0.3)
    ax.set_title("τ sweep: success and locality against robustness", fontsize=10)
    legend_outside(fig, [ax], title="metric (dotted: ID)")
    return fig


def tau_sweep_plot(rows: Sequence[dict], path, settings: dict | None = None) -> Path:
    return save_figure(tau_sweep_figure(rows, settings), path)


def _load_table(out: Path) -> dict:
    table = load_results(out, "table.json", "robust", ("settings",))
    if not isinstance(table["settings"], dict):
        raise FileFormatError(f"{Path(out) / 'table.json'}: 'settings' is not a mapping; it was not written by "
                              "`superedit robust`: rerun the command")
    return table


def render_plots(out_dir) -> list[Path]:
    out = Path(out_dir)
    table = _load_table(out)
    plots = out / "plots"
    written = [metrics_bar(table["settings"], plots / "metrics.png")]
    if table.get("tau_sweep"):
        written.append(tau_sweep_plot(table["tau_sweep"], plots / "tau_sweep.png", table["settings"]))
    return written


# ------------------------------------------------------------------------------------------ page
CAPTIONS = {
    "metrics": "Compare the bars of one group: the edit alone against the edit with the REP adaptor. Look at the OOD "
               "groups (perturbations never used to train the adaptor) and at locality: robustness gained there "
               "must not cost locality. 'pre' is the unedited model; whiskers are 95% Wilson intervals.",
    "tau": "Raising τ closes the gate on more queries: locality should rise and the perturbed-query accuracy fall. "
           "Look for the τ where the OOD lines are still high while locality has reached its plateau.",
}


def write_report(out_dir) -> Path:
    """``out_dir/report.html`` from table.json and plots/."""
    out = Path(out_dir)
    table = _load_table(out)
    cfg = table.get("config", {})
    settings = table["settings"]
    metrics = [m for m in ROBUST_METRICS if any((v.get(m) or {}).get("n") for v in settings.values())] or ROBUST_METRICS
    cols = [Column("setting", "setting", "text")] + [Column(m, METRIC_LABELS[m]) for m in metrics]
    rows = [{"setting": s, **{m: (v.get(m) or {}).get("acc") for m in metrics}} for s, v in settings.items()]
    nrows = [{"setting": s, **{m: (v.get(m) or {}).get("n") for m in metrics}} for s, v in settings.items()]
    ncols = [cols[0]] + [Column(m, METRIC_LABELS[m], "int") for m in metrics]
    plots = out / "plots"
    figs = {p.stem: p for p in plots.glob("*.png")} if plots.is_dir() else {}
    sections = [Section("accuracy", "Accuracy", note="Micro-averaged over queries; a query counts when every "
                        "target token is the argmax. ID variants trained the adaptor, OOD ones never did.",
                        tables=[Table(cols, rows, "accuracy"), Table(ncols, nrows, "queries behind each accuracy")],
                        figures=[Figure(figs["metrics"], "accuracy per setting", CAPTIONS["metrics"])]
                        if "metrics" in figs else [])]
    if table.get("tau_sweep"):
        sections.append(Section("tau", "τ sweep", tables=[Table([Column("tau", "τ")] + cols[1:], table["tau_sweep"])],
                                figures=[Figure(figs["tau_sweep"], "tau sweep", CAPTIONS["tau"])]
                                if "tau_sweep" in figs else []))
    if table.get("adaptor"):
        ahp = cfg.get("adaptor_hparams") or {}
        tables = [Table([Column(k, k.replace("_", " ")) for k in table["adaptor"]], [table["adaptor"]],
                        "training, means over edits and layers")]
        if ahp:
            tables.append(Table([Column(k, k.replace("_", " "), "text") for k in ahp],
                                [{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in ahp.items()}],
                                "hyperparameters"))
        sections.append(Section("adaptor", "Adaptor training", tables=tables))
    skips = [{"kind": k, "reason": r, "count": c} for k, rs in (table.get("skips") or {}).items() for r, c in rs.items()]
    sections.append(Section("skips", "Skipped perturbations",
                            note="" if skips else "None: every perturbation kind had variants for every request.",
                            tables=[Table([Column("kind", "kind", "text"), Column("reason", "reason", "text"),
                                           Column("count", "count", "int")], skips)] if skips else []))
    if table.get("errors"):
        sections.append(Section("errors", "Failed requests",
                                tables=[Table([Column("index", "index", "int"), Column("case_id", "case", "text"),
                                               Column("error", "error", "text")], table["errors"])]))
    info = [("model", cfg.get("model")), ("method", cfg.get("method")), ("layers", cfg.get("layers")),
            ("requests", table.get("n_requests")), ("failed", table.get("n_errors")), ("τ", cfg.get("tau")),
            ("adaptor", cfg.get("adaptor")), ("seed", cfg.get("seed"))]
    info = [(k, ", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in info]
    sources = ["table.json", "plots/"] + (["command.json"] if read_command(out) else [])
    return render(Page("robust.html.j2", "Robust edits (REP)", "robust", out, info, sections, sources))
