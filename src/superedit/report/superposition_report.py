"""Plots and a self-contained HTML report for a superposition run, built from the files it wrote.

``render_plots(out_dir)`` reads ``stats.json``, ``kde.json`` and ``matrices/*.npy`` and writes PNGs
under ``out_dir/plots``; ``write_report(out_dir)`` reads ``stats.json``, ``top_pairs.json`` and the
PNGs and writes ``out_dir/report.html`` with the images embedded as base64 (nothing else is read, so
the report can be rebuilt from a copied output folder). matplotlib (Agg) is imported inside functions.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..utils.io import write_text_atomic
from .plots import _figure, save_figure


# ---------------------------------------------------------------------------------------- single plots
def heatmap(matrices: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """One panel per matrix (e.g. P, whitening cosine, activation cosine): diverging 'RdBu_r' centred at 0."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    names = list(matrices)
    fig = _figure(4.6 * len(names), 3.9)
    fig.set_layout_engine("constrained")
    for i, name in enumerate(names):
        M = np.asarray(matrices[name], dtype=float)
        ax = fig.add_subplot(1, len(names), i + 1)
        finite = M[np.isfinite(M)]
        lim = float(np.max(np.abs(finite))) if finite.size else 1.0
        lim = lim if lim > 0 else 1.0
        norm = TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)
        im = ax.imshow(M, cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("item j")
        ax.set_ylabel("item i")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def kde_plot(kdes: dict[str, dict], path: str | Path, title: str = "Off-diagonal p(kᵢ,kⱼ) density per layer") -> Path:
    """KDE curves of off-diagonal P, one line per layer (colour = depth)."""
    from matplotlib import colormaps

    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    layers = sorted(kdes, key=int)
    cmap = colormaps["viridis"]
    for n, l in enumerate(layers):
        c = cmap(n / max(1, len(layers) - 1))
        ax.plot(kdes[l]["x"], kdes[l]["y"], color=c, lw=1.3, label=f"L{l}")
    ax.axvline(0.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("p(kᵢ, kⱼ), i ≠ j")
    ax.set_ylabel("density (Gaussian KDE)")
    ax.set_title(title, fontsize=10)
    if len(layers) <= 16:
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def angle_plot(wcos, acos, path: str | Path, layer: int | str = "", bins: int = 90) -> Path:
    """Histogram of pairwise angles (degrees) in whitening vs activation space, modes marked."""
    import numpy as np

    from ..analysis.superposition import angle_mode, angles_deg, offdiag

    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for cos, name, colour in ((wcos, "whitening C^-1/2", "tab:red"), (acos, "activation", "tab:blue")):
        a = angles_deg(offdiag(np.asarray(cos)))
        mode = angle_mode(a)
        ax.hist(a, bins=bins, range=(0, 180), density=True, alpha=0.45, color=colour, label=f"{name} (mode {mode:.0f}°)")
        ax.axvline(mode, color=colour, lw=1.0, ls="--")
    ax.axvline(90, color="grey", lw=0.6, ls=":")
    ax.set_xlim(0, 180)
    ax.set_xlabel("angle between keys (degrees)")
    ax.set_ylabel("density")
    ax.set_title(f"Key angles, layer {layer}", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def kurtosis_by_layer_plot(rows: Sequence[dict], path: str | Path) -> Path:
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    xs = [r["layer"] for r in rows]
    ys = [_num(r.get("kurtosis")) for r in rows]
    ax.plot(xs, ys, marker="o", color="tab:purple")
    ax.axhline(0.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("layer")
    ax.set_ylabel("excess kurtosis of off-diagonal P")
    ax.set_title("Kurtosis by layer (0 = Gaussian; large = sparse, near-orthogonal superposition)", fontsize=9)
    return save_figure(fig, path)


def m_convergence_plot(conv: dict[str, list[dict]], path: str | Path) -> Path:
    from matplotlib import colormaps

    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    layers = sorted(conv, key=int)
    cmap = colormaps["viridis"]
    for n, l in enumerate(layers):
        pts = conv[l]
        ax.plot([p["m"] for p in pts], [_num(p.get("kurtosis")) for p in pts], marker="o", ms=3,
                color=cmap(n / max(1, len(layers) - 1)), label=f"L{l}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (nested subsets of one seeded permutation)")
    ax.set_ylabel("excess kurtosis")
    ax.set_title("m-convergence of the kurtosis", fontsize=10)
    if len(layers) <= 16:
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def scaling_plot(rows: Sequence[dict], path: str | Path) -> Path:
    """Kurtosis vs parameter count; points coloured by relative depth, per-model mean and max lines."""
    import numpy as np
    from matplotlib.colors import Normalize

    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    norm = Normalize(0.0, 1.0)
    sc = ax.scatter([r["n_params"] for r in rows], [_num(r.get("kurtosis")) for r in rows],
                    c=[r["relative_depth"] for r in rows], cmap="viridis", norm=norm, s=22, zorder=3)
    models: dict[str, list[dict]] = {}
    for r in rows:
        models.setdefault(r["model"], []).append(r)
    ordered = sorted(models.values(), key=lambda rs: rs[0]["n_params"])
    xs = [rs[0]["n_params"] for rs in ordered]
    for agg, style, label in ((np.nanmean, "-", "mean over layers"), (np.nanmax, "--", "max over layers")):
        ys = [float(agg([_num(r.get("kurtosis")) for r in rs])) for rs in ordered]
        ax.plot(xs, ys, style, color="black", lw=1.0, label=label)
    for rs in ordered:
        ax.annotate(str(rs[0]["model"]).split("/")[-1], (rs[0]["n_params"], _num(rs[0].get("kurtosis"))),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("excess kurtosis of off-diagonal P")
    ax.set_title("Superposition scaling law", fontsize=10)
    fig.colorbar(sc, ax=ax, label="relative depth l/(L-1)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _num(x) -> float:
    return float("nan") if x is None else float(x)


# ---------------------------------------------------------------------------------------- run folders
def render_plots(out_dir: str | Path) -> list[Path]:
    """All plots of a superposition run folder, from its saved files."""
    import numpy as np

    out = Path(out_dir)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    kdes = json.loads((out / "kde.json").read_text(encoding="utf-8"))
    plots = out / "plots"
    written = []
    for row in stats["layers"]:
        l = row["layer"]
        mats = {name: np.load(out / "matrices" / f"{name}_L{l}.npy") for name in ("P", "wcos", "acos")}
        written.append(heatmap({"P = kᵢᵀC⁻¹kⱼ / kᵢᵀC⁻¹kᵢ": mats["P"], "whitening cosine": mats["wcos"],
                                "activation cosine": mats["acos"]}, plots / f"heatmap_L{l}.png", title=f"layer {l}"))
        written.append(angle_plot(mats["wcos"], mats["acos"], plots / f"angles_L{l}.png", layer=l))
    written.append(kde_plot(kdes, plots / "kde_P.png"))
    written.append(kurtosis_by_layer_plot(stats["layers"], plots / "kurtosis_by_layer.png"))
    written.append(m_convergence_plot(stats["m_convergence"], plots / "m_convergence.png"))
    return written


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return f"<p><em>missing plot {html.escape(path.name)}</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:nth-child(n){white-space:nowrap}img{max-width:100%;margin:.5em 0}
.pairs td{text-align:left;white-space:normal}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}code{background:#f5f5f5}"""


def write_report(out_dir: str | Path) -> Path:
    """``out_dir/report.html`` from stats.json, top_pairs.json and plots/*.png (images as base64)."""
    out = Path(out_dir)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    pairs = json.loads((out / "top_pairs.json").read_text(encoding="utf-8"))
    model, cfg = stats.get("model", {}), stats.get("config", {})
    plots = out / "plots"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Knowledge in superposition — "
             f"{html.escape(str(model.get('source')))}</title><style>{_CSS}</style></head><body>",
             "<h1>Knowledge in superposition</h1>",
             f"<p>Model <code>{html.escape(str(model.get('source')))}</code> ({html.escape(str(model.get('family')))}, "
             f"{_fmt(model.get('n_params'))} parameters, {_fmt(model.get('n_layers'))} layers, key size "
             f"{_fmt(model.get('d_mlp'))}); m = {_fmt(stats.get('m'))} items (seed {_fmt(cfg.get('seed'))}), keys at "
             f"<code>{html.escape(str(cfg.get('fact_token')))}</code>, ridge {_fmt(cfg.get('ridge'))}.</p>",
             "<p>p(kᵢ,kⱼ) = kᵢᵀC⁻¹kⱼ / kᵢᵀC⁻¹kᵢ is the fraction of an edit of item i's value that leaks into "
             "item j. Zero everywhere would mean the keys are orthogonal in the whitening space C^-1/2 and edits "
             "never interfere; a high excess kurtosis means most pairs are nearly orthogonal and a few strongly "
             "superposed.</p>",
             "<h2>Statistics of off-diagonal P by layer</h2>",
             _table(stats["layers"], ["layer", "m", "mean", "std", "mean_abs", "max_abs", "kurtosis", "frac_abs_gt",
                                      "angle_mode_whitening", "angle_mode_activation", "condition_number"]),
             f"<p>frac_abs_gt: share of |p| &gt; {_fmt(stats['layers'][0].get('threshold') if stats['layers'] else 0.1)}"
             "; angle modes in degrees (histogram peak).</p>",
             _img(plots / "kurtosis_by_layer.png", "kurtosis by layer"),
             _img(plots / "kde_P.png", "KDE of off-diagonal P"),
             "<h2>m-convergence (nested subsets)</h2>",
             _img(plots / "m_convergence.png", "m-convergence")]
    conv_rows = [{"layer": int(l), **p} for l, pts in stats.get("m_convergence", {}).items() for p in pts]
    parts.append(_table(conv_rows, ["layer", "m", "kurtosis", "std", "mean_abs", "frac_abs_gt"]))
    parts.append("<h2>Most superposed pairs</h2>")
    prow = []
    for p in pairs:
        a, b = p.get("item_i") or {}, p.get("item_j") or {}
        prow.append({"layer": p["layer"], "rank": p["rank"], "p": p["p"], "p_ji": p.get("p_ji"),
                     "whitening_cos": p.get("whitening_cos"),
                     "item i": f"{a.get('prompt')} → {a.get('target_true') or '?'}"
                               + (f" [{a['relation']}]" if a.get("relation") else ""),
                     "item j": f"{b.get('prompt')} → {b.get('target_true') or '?'}"
                               + (f" [{b['relation']}]" if b.get("relation") else "")})
    parts.append(_table(prow, ["layer", "rank", "p", "p_ji", "whitening_cos", "item i", "item j"])
                 .replace("<table>", "<table class='pairs'>"))
    for row in stats["layers"]:
        l = row["layer"]
        parts.append(f"<h2>Layer {l}</h2>")
        parts.append(_img(plots / f"heatmap_L{l}.png", f"heatmaps layer {l}"))
        parts.append(_img(plots / f"angles_L{l}.png", f"angles layer {l}"))
    parts.append("</body></html>")
    path = out / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return path


def render_scaling(out_dir: str | Path) -> list[Path]:
    """``plots/scaling_kurtosis.png`` and ``report.html`` from ``scaling.json`` (and model sub-reports' stats)."""
    out = Path(out_dir)
    data = json.loads((out / "scaling.json").read_text(encoding="utf-8"))
    png = scaling_plot(data["rows"], out / "plots" / "scaling_kurtosis.png")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Superposition scaling law</title>"
             f"<style>{_CSS}</style></head><body><h1>Superposition scaling law</h1>",
             "<p>Excess kurtosis of the off-diagonal p(kᵢ,kⱼ) per layer against model size; colour is the "
             "relative depth l/(L-1).</p>", _img(png, "scaling"),
             "<p>A fair comparison needs one world and a comparable training budget: the testbeds' epochs "
             "and recall are listed (empty for models that are not testbeds).</p>",
             _table(data["models"], ["model", "n_params", "n_layers", "train_epochs", "train_recall",
                                     "train_paraphrase_recall", "kurtosis_mean", "kurtosis_median", "kurtosis_max"]),
             _table(data["rows"], ["model", "n_params", "layer", "relative_depth", "kurtosis", "mean_abs", "std",
                                   "frac_abs_gt"])]
    sub = data.get("config", {}).get("model_dirs", {})
    if sub:
        parts.append("<h2>Per-model reports</h2><ul>" + "".join(
            f"<li><a href='{html.escape(d)}/report.html'>{html.escape(m)}</a></li>" for m, d in sub.items()) + "</ul>")
    parts.append("</body></html>")
    path = out / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return [png, path]
