"""Plots and self-contained HTML reports for ``superedit robust`` and ``superedit keys``.

Both reports read only the files their command wrote (``table.json`` / ``geometry.json`` +
``similar_keys.jsonl`` and ``plots/*.png``); images are embedded as base64. matplotlib (Agg) is
imported inside the functions through :mod:`superedit.report.plots`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

from ..utils.io import read_jsonl, write_text_atomic
from .plots import _figure, save_figure
from .superposition_report import _CSS, _fmt, _img, _table

ROBUST_METRICS = ["success", "paraphrase", "locality", "rephrase_id", "rephrase_ood", "shuffle_id", "shuffle_ood",
                  "long_id", "long_ood"]


# ------------------------------------------------------------------------------------------ robust
def metrics_bar(settings: dict, path, title: str = "Metrics per setting (micro-averaged)") -> Path:
    import numpy as np

    names = list(settings)
    metrics = [m for m in ROBUST_METRICS if any((settings[s].get(m) or {}).get("acc") is not None for s in names)]
    fig = _figure(max(7.0, 0.9 * len(metrics) * max(1, len(names)) / 2), 3.8)
    ax = fig.add_subplot(111)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(metrics))
    for i, s in enumerate(names):
        vals = [(settings[s].get(m) or {}).get("acc") for m in metrics]
        ax.bar(x + i * width - 0.4 + width / 2, [v if v is not None else 0 for v in vals], width, label=s)
        for xi, v in zip(x, vals):
            if v is None:
                ax.text(xi + i * width - 0.4 + width / 2, 0.01, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x)
    ax.set_xticklabels(metrics, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (all target tokens argmax)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def tau_sweep_plot(rows: Sequence[dict], path) -> Path:
    fig = _figure(6.5, 3.8)
    ax = fig.add_subplot(111)
    taus = [r["tau"] for r in rows]
    for m, style in [("success", "-o"), ("locality", "-s"), ("rephrase_ood", "--^"), ("shuffle_ood", "--v"),
                     ("long_ood", "--d"), ("rephrase_id", ":^"), ("long_id", ":d")]:
        ys = [r.get(m) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(taus, [float("nan") if y is None else y for y in ys], style, label=m)
    ax.set_xlabel("gate threshold τ")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("τ sweep: success/locality vs robustness", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def render_plots(out_dir) -> list[Path]:
    out = Path(out_dir)
    table = json.loads((out / "table.json").read_text(encoding="utf-8"))
    plots = out / "plots"
    written = [metrics_bar(table["settings"], plots / "metrics.png")]
    if table.get("tau_sweep"):
        written.append(tau_sweep_plot(table["tau_sweep"], plots / "tau_sweep.png"))
    return written


def write_report(out_dir) -> Path:
    """``out_dir/report.html`` from table.json and plots/ (and records.jsonl for per-edit rows)."""
    out = Path(out_dir)
    table = json.loads((out / "table.json").read_text(encoding="utf-8"))
    cfg = table.get("config", {})
    settings = table["settings"]
    rows = [{"setting": s, **{m: (v.get(m) or {}).get("acc") for m in ROBUST_METRICS}} for s, v in settings.items()]
    nrows = [{"setting": s, **{m: (v.get(m) or {}).get("n") for m in ROBUST_METRICS}} for s, v in settings.items()]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Robust edits (REP) — "
             f"{html.escape(str(cfg.get('model')))}</title><style>{_CSS}</style></head><body>",
             "<h1>Keys to robust edits (REP)</h1>",
             f"<p>Model <code>{html.escape(str(cfg.get('model')))}</code>, method <code>{html.escape(str(cfg.get('method')))}"
             f"</code> at layers {html.escape(str(cfg.get('layers')))}, {table.get('n_requests')} requests "
             f"({table.get('n_errors')} failed), τ = {_fmt(cfg.get('tau'))}. Single-edit protocol: weights restored "
             "and the adaptor removed between edits. A query counts when every target token is the argmax. "
             "<em>_id</em> variants were used to train the adaptor, <em>_ood</em> ones never.</p>",
             "<h2>Accuracy (micro-averaged over queries)</h2>", _table(rows, ["setting"] + ROBUST_METRICS),
             "<h3>Number of queries</h3>", _table(nrows, ["setting"] + ROBUST_METRICS),
             _img(out / "plots" / "metrics.png", "metrics per setting")]
    if table.get("tau_sweep"):
        parts += ["<h2>τ sweep</h2>", _table(table["tau_sweep"], ["tau"] + ROBUST_METRICS),
                  _img(out / "plots" / "tau_sweep.png", "tau sweep")]
    if table.get("adaptor"):
        parts += ["<h2>Adaptor training (means over edits and layers)</h2>",
                  _table([table["adaptor"]], list(table["adaptor"]))]
        parts.append(f"<p>Adaptor hyperparameters: <code>{html.escape(json.dumps(cfg.get('adaptor_hparams')))}</code></p>")
    skips = [{"kind": k, "reason": r, "count": c} for k, rs in (table.get("skips") or {}).items() for r, c in rs.items()]
    parts += ["<h2>Skipped perturbations</h2>",
              _table(skips, ["kind", "reason", "count"]).replace("<table>", "<table class='pairs'>") if skips
              else "<p>none</p>"]
    if table.get("errors"):
        parts += ["<h2>Failed requests</h2>",
                  _table(table["errors"], ["index", "case_id", "error"]).replace("<table>", "<table class='pairs'>")]
    parts.append("</body></html>")
    path = out / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return path


# ------------------------------------------------------------------------------------------ keys
def similarity_hist(dist: dict, path, measure: str = "cos") -> Path:
    fig = _figure(6.5, 3.8)
    ax = fig.add_subplot(111)
    rnd = dist["random"][measure]
    if rnd:
        ax.hist(rnd, bins=40, alpha=0.5, density=True, label=f"random subject pairs (n={len(rnd)})", color="grey")
    for kind, d in dist["same"].items():
        if d[measure]:
            ax.hist(d[measure], bins=30, alpha=0.5, density=True, label=f"same subject: {kind} (n={len(d[measure])})")
    ax.set_xlabel("whitening cosine kᵢᵀC⁻¹kⱼ/√(..)" if measure == "cos" else "whitening similarity kᵢᵀC⁻¹kⱼ")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title("Keys of a subject's variants vs random subjects", fontsize=10)
    return save_figure(fig, path)


def pca_plot(pca: dict, path) -> Path:
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot(111)
    coords = pca["coords"]
    markers = {"orig": ("*", 160), "rephrase": ("o", 40), "shuffle": ("x", 40), "long": ("^", 40)}
    for kind in dict.fromkeys(pca["kinds"]):
        pts = [c for c, k in zip(coords, pca["kinds"]) if k == kind]
        m, s = markers.get(kind, ("o", 30))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=m, s=s, label=kind)
    for c, k, lab in zip(coords, pca["kinds"], pca["labels"]):
        if k in ("orig", "rephrase"):
            ax.annotate(lab[:24], c, fontsize=6)
    ax.set_title(f"PCA of whitened keys: variants of {pca['subject']!r}", fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def value_norm_plot(norms: Sequence[dict], path) -> Path:
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(111)
    groups: dict[str, tuple[list, list]] = {}
    for n in norms:
        if "error" in n:
            continue
        for k, b, a in zip(n["kinds"], n["before"], n["after"]):
            g = groups.setdefault(k, ([], []))
            g[0].append(b)
            g[1].append(a)
    for k, (b, a) in groups.items():
        ax.scatter(b, a, s=14, alpha=0.7, label=k)
    lims = [min([min(b + a) for b, a in groups.values()] or [0]), max([max(b + a) for b, a in groups.values()] or [1])]
    ax.plot(lims, lims, "k--", lw=0.8)
    ax.set_xlabel("‖W k‖ before the edit")
    ax.set_ylabel("‖(W+ΔW) k‖ after")
    ax.set_title("Value norms before vs after single ROME edits", fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def render_keys_plots(out_dir) -> list[Path]:
    out = Path(out_dir)
    geo = json.loads((out / "geometry.json").read_text(encoding="utf-8"))
    plots = out / "plots"
    written = [similarity_hist(geo["distributions"], plots / "similarity_cos.png", "cos"),
               similarity_hist(geo["distributions"], plots / "similarity_whiten.png", "whiten")]
    if geo.get("pca"):
        written.append(pca_plot(geo["pca"], plots / "pca_variants.png"))
    if geo.get("value_norms"):
        written.append(value_norm_plot(geo["value_norms"], plots / "value_norms.png"))
    return written


def write_keys_report(out_dir) -> Path:
    out = Path(out_dir)
    geo = json.loads((out / "geometry.json").read_text(encoding="utf-8"))
    similar = read_jsonl(out / "similar_keys.jsonl") if (out / "similar_keys.jsonl").exists() else []
    rows = [{"pairs": f"same subject: {k}", **{f"{m}_{s}": v[m][s] for m in ("cos", "whiten") for s in ("n", "mean", "median")}}
            for k, v in geo["same_subject"].items()]
    rows.append({"pairs": "random subjects", **{f"{m}_{s}": geo["random_pairs"][m][s] for m in ("cos", "whiten")
                                                  for s in ("n", "mean", "median")}})
    cols = ["pairs"] + [f"{m}_{s}" for m in ("cos", "whiten") for s in ("n", "mean", "median")]
    plots = out / "plots"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Key geometry — layer {geo['layer']}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>Key geometry at layer {geo['layer']}</h1>",
             f"<p>{geo['n_requests']} subjects; C condition number {_fmt(geo.get('condition_number'))}, ridge "
             f"{_fmt(geo.get('ridge'))}. An edit on k* reaches a key k in proportion to kᵀC⁻¹k*: variants whose "
             "whitening similarity is low do not see the edit.</p>",
             "<h2>Whitening similarity</h2>", _table(rows, cols),
             _img(plots / "similarity_cos.png", "cosine histogram"), _img(plots / "similarity_whiten.png", "histogram"),
             _img(plots / "pca_variants.png", "PCA")]
    if (plots / "value_norms.png").exists():
        parts += ["<h2>Value norms</h2>", _img(plots / "value_norms.png", "value norms")]
    parts.append("<h2>Similar but unrelated corpus keys</h2>")
    parts.append(_table(similar, ["subject", "rank", "whitening_cos", "whitening_sim", "token", "context"])
                 .replace("<table>", "<table class='pairs'>") if similar else "<p>no corpus scanned</p>")
    parts.append("</body></html>")
    path = out / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return path
