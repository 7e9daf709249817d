"""Plots and the HTML report of a superposition run, built from the files it wrote.

``render_plots(out_dir)`` reads ``stats.json``, ``kde.json`` and ``matrices/*.npy`` and writes PNGs
under ``out_dir/plots``; ``write_report(out_dir)`` reads ``stats.json``, ``top_pairs.json`` and
``command.json`` and writes ``out_dir/report.html`` (template ``superposition.html.j2``);
``render_scaling(out_dir)`` does the same for a ``--models`` run's ``scaling.json``. Nothing else is
read, so a report can be rebuilt from a copied output folder. matplotlib (Agg) is imported lazily.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .page import Column, Figure, Page, Section, Table, load_results, render
from .plots import _figure, integer_ticks, legend_outside, save_figure
from .provenance import read_command

#: up to this many layers get a legend entry each; more get a colour bar of depth
MAX_LAYER_LEGEND = 12
#: most superposed pairs per layer shown on the page (the CSV has them all)
PAIRS_SHOWN = 5


# ---------------------------------------------------------------------------------------- figures
def heatmap_figure(matrices: dict[str, Any], title: str = ""):
    """One panel per matrix (e.g. P, whitening cosine, activation cosine): diverging 'RdBu_r' centred at 0."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    names = list(matrices)
    fig = _figure(4.2 * len(names), 3.9)
    fig.set_layout_engine("constrained")
    for i, name in enumerate(names):
        M = np.asarray(matrices[name], dtype=float)
        ax = fig.add_subplot(1, len(names), i + 1)
        finite = M[np.isfinite(M)]
        lim = float(np.max(np.abs(finite))) if finite.size else 1.0
        lim = lim if lim > 0 else 1.0
        im = ax.imshow(M, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim), interpolation="nearest")
        ax.set_title(name, fontsize=9.5)
        ax.set_xlabel("item j")
        ax.set_ylabel("item i")
        integer_ticks(ax.xaxis)
        integer_ticks(ax.yaxis)
        fig.colorbar(im, ax=ax, shrink=0.85)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def heatmap(matrices: dict[str, Any], path: str | Path, title: str = "") -> Path:
    return save_figure(heatmap_figure(matrices, title), path)


def _layer_colours(layers: Sequence[str]):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return {l: cmap(n / max(1, len(layers) - 1)) for n, l in enumerate(layers)}


def _layer_key(fig, axes, layers: Sequence[str], colours) -> None:
    """Layers as a legend outside the axes (few) or as a colour bar of depth (many)."""
    if len(layers) <= MAX_LAYER_LEGEND:
        legend_outside(fig, axes, title="layer", ncol=1 if len(layers) <= 8 else 2)
        return
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(int(layers[0]), int(layers[-1])), cmap=colormaps["viridis"])
    fig.colorbar(sm, ax=axes, label="layer")


def kde_figure(kdes: dict[str, dict], title: str = "Off-diagonal p(kᵢ,kⱼ) density per layer"):
    """KDE curves of off-diagonal P, one line per layer (colour = depth)."""
    fig = _figure(6.4, 3.8)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(1, 1, 1)
    layers = sorted(kdes, key=int)
    colours = _layer_colours(layers)
    for l in layers:
        ax.plot(kdes[l]["x"], kdes[l]["y"], color=colours[l], lw=1.4, label=str(l))
    ax.axvline(0.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("p(kᵢ, kⱼ), i ≠ j")
    ax.set_ylabel("density (Gaussian KDE)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _layer_key(fig, [ax], layers, colours)
    return fig


def kde_plot(kdes: dict[str, dict], path: str | Path, title: str = "Off-diagonal p(kᵢ,kⱼ) density per layer") -> Path:
    return save_figure(kde_figure(kdes, title), path)


def angle_figure(wcos, acos, layer: int | str = "", bins: int = 90):
    """Histogram of pairwise angles (degrees) in whitening vs activation space, modes marked."""
    import numpy as np

    from ..analysis.superposition import angle_mode, angles_deg, offdiag

    fig = _figure(6.4, 3.4)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(1, 1, 1)
    for cos, name, colour in ((wcos, "whitening C^-1/2", "tab:red"), (acos, "activation", "tab:blue")):
        a = angles_deg(offdiag(np.asarray(cos)))
        mode = angle_mode(a)
        ax.hist(a, bins=bins, range=(0, 180), density=True, alpha=0.45, color=colour, label=f"{name} (mode {mode:.0f}°)")
        ax.axvline(mode, color=colour, lw=1.0, ls="--")
    ax.axvline(90, color="grey", lw=0.6, ls=":")
    ax.set_xlim(0, 180)
    ax.set_xticks(range(0, 181, 30))
    ax.set_xlabel("angle between keys (degrees)")
    ax.set_ylabel("density")
    ax.set_title(f"Key angles, layer {layer}", fontsize=10)
    legend_outside(fig, [ax])
    return fig


def angle_plot(wcos, acos, path: str | Path, layer: int | str = "", bins: int = 90) -> Path:
    return save_figure(angle_figure(wcos, acos, layer, bins), path)


def kurtosis_by_layer_figure(rows: Sequence[dict]):
    fig = _figure(6.0, 3.4)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(1, 1, 1)
    xs = [int(r["layer"]) for r in rows]
    ys = [_num(r.get("kurtosis")) for r in rows]
    ax.plot(xs, ys, marker="o", color="tab:purple")
    ax.axhline(0.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("layer")
    integer_ticks(ax.xaxis)
    ax.set_ylabel("excess kurtosis of off-diagonal P")
    ax.set_title("Kurtosis by layer (0 = Gaussian)", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def kurtosis_by_layer_plot(rows: Sequence[dict], path: str | Path) -> Path:
    return save_figure(kurtosis_by_layer_figure(rows), path)


def m_convergence_figure(conv: dict[str, list[dict]]):
    from matplotlib.ticker import NullLocator

    fig = _figure(6.4, 3.6)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(1, 1, 1)
    layers = sorted(conv, key=int)
    colours = _layer_colours(layers)
    ms = sorted({int(p["m"]) for pts in conv.values() for p in pts})
    for l in layers:
        pts = conv[l]
        ax.plot([p["m"] for p in pts], [_num(p.get("kurtosis")) for p in pts], marker="o", ms=3,
                color=colours[l], label=str(l))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ms)
    ax.set_xticklabels([str(m) for m in ms])
    ax.set_xlabel("m, items (nested subsets of one seeded permutation)")
    ax.set_ylabel("excess kurtosis")
    ax.set_title("m-convergence of the kurtosis", fontsize=10)
    ax.grid(alpha=0.3)
    _layer_key(fig, [ax], layers, colours)
    return fig


def m_convergence_plot(conv: dict[str, list[dict]], path: str | Path) -> Path:
    return save_figure(m_convergence_figure(conv), path)


def scaling_figure(rows: Sequence[dict]):
    """Kurtosis vs parameter count; points coloured by relative depth, per-model mean and max lines."""
    import numpy as np
    from matplotlib.colors import Normalize

    fig = _figure(7.0, 4.0)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(1, 1, 1)
    sc = ax.scatter([r["n_params"] for r in rows], [_num(r.get("kurtosis")) for r in rows],
                    c=[r["relative_depth"] for r in rows], cmap="viridis", norm=Normalize(0.0, 1.0), s=22, zorder=3)
    models: dict[str, list[dict]] = {}
    for r in rows:
        models.setdefault(r["model"], []).append(r)
    ordered = sorted(models.values(), key=lambda rs: rs[0]["n_params"])
    xs = [rs[0]["n_params"] for rs in ordered]
    for agg, style, label in ((np.nanmean, "-", "mean over layers"), (np.nanmax, "--", "max over layers")):
        ys = [float(agg([_num(r.get("kurtosis")) for r in rs])) for rs in ordered]
        ax.plot(xs, ys, style, color="black", lw=1.0, label=label)
    for rs in ordered:
        top = max(_num(r.get("kurtosis")) for r in rs)
        ax.annotate(str(rs[0]["model"]).split("/")[-1], (rs[0]["n_params"], top if math.isfinite(top) else 0),
                    fontsize=7.5, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("excess kurtosis of off-diagonal P")
    ax.set_title("Superposition scaling law", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25)  # room for the model names at the rightmost points
    fig.colorbar(sc, ax=ax, label="relative depth l/(L−1)")
    ax.legend(loc="upper left", fontsize=8, frameon=False)  # the upper left stays empty: small models first
    return fig


def scaling_plot(rows: Sequence[dict], path: str | Path) -> Path:
    return save_figure(scaling_figure(rows), path)


def _num(x) -> float:
    return float("nan") if x is None else float(x)


# ---------------------------------------------------------------------------------------- run folders
CAPTIONS = {
    "kurtosis_by_layer": "0 is a Gaussian spread of p(kᵢ,kⱼ); large values mean most pairs of facts are nearly "
                         "orthogonal in the whitening space and a few strongly superposed. Look for the layers that "
                         "stand out: an edit there leaks into few, specific other facts.",
    "kde_P": "Look at the width of each curve around 0: narrow means an edit of one fact barely moves the others' "
             "values at that layer; heavy tails are the few pairs that do interfere.",
    "m_convergence": "The statistic on nested subsets of the items. Curves that flatten towards the right mean m "
                     "is large enough to trust the kurtosis; curves still moving mean more items are needed.",
    "heatmap": "Row i, column j: the fraction of an edit of item i that reaches item j (P), and the two cosines. "
               "Look for saturated off-diagonal cells: pairs of facts that an edit of one would disturb; the "
               "whitening cosine should be paler than the activation cosine.",
    "angles": "Angles between the keys of different facts. Look at how far the whitening-space mode (red) sits "
              "from 90° compared to the raw activations (blue): near 90° means nearly orthogonal keys, which a "
              "closed-form edit can separate.",
    "heatmap_again": "Saturated off-diagonal cells are pairs of facts an edit of one would disturb (read as the "
                     "first layer's matrices above).",
    "angles_again": "Whitening-space mode (red) against activation mode (blue); near 90° means nearly orthogonal keys "
                    "(read as the first layer's angles above).",
    "scaling": "Each dot is one layer of one model (colour: relative depth); lines follow the mean and maximum "
               "over layers. Look for whether the kurtosis grows with model size, and only compare models "
               "trained on the same world with a similar budget (table below).",
}


def render_plots(out_dir: str | Path) -> list[Path]:
    """All plots of a superposition run folder, from its saved files."""
    import numpy as np

    out = Path(out_dir)
    stats = load_results(out, "stats.json", "superposition")
    kdes = load_results(out, "kde.json", "superposition")
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


def _item_text(item: dict) -> str:
    rel = f" [{item['relation']}]" if item.get("relation") else ""
    return f"{item.get('prompt')} → {item.get('target_true') or '?'}{rel}"


LAYER_COLUMNS = [Column("layer", "layer", "int"), Column("m", "items", "int"), Column("mean", "mean"),
                 Column("std", "std"), Column("mean_abs", "mean |p|"), Column("max_abs", "max |p|"),
                 Column("kurtosis", "excess kurtosis"), Column("frac_abs_gt", "share |p| > threshold"),
                 Column("angle_mode_whitening", "angle mode, whitening (°)", "deg"),
                 Column("angle_mode_activation", "angle mode, activation (°)", "deg"),
                 Column("condition_number", "cond(C)")]


def write_report(out_dir: str | Path) -> Path:
    """``out_dir/report.html`` from stats.json, top_pairs.json and plots/*.png."""
    out = Path(out_dir)
    stats = load_results(out, "stats.json", "superposition")
    pairs = load_results(out, "top_pairs.json", "superposition")
    model, cfg = stats.get("model", {}), stats.get("config", {})
    plots = out / "plots"

    def fig(name: str, alt: str, caption_key: str) -> list[Figure]:
        p = plots / f"{name}.png"
        return [Figure(p, alt, CAPTIONS[caption_key])] if p.is_file() else []

    layers = stats["layers"]
    threshold = layers[0].get("threshold", 0.1) if layers else 0.1
    conv_rows = [{"layer": int(l), **p} for l, pts in stats.get("m_convergence", {}).items() for p in pts]
    prow = [{"layer": p["layer"], "rank": p["rank"], "p": p["p"], "p_ji": p.get("p_ji"),
             "whitening_cos": p.get("whitening_cos"), "item_i": _item_text(p.get("item_i") or {}),
             "item_j": _item_text(p.get("item_j") or {})} for p in pairs]
    sections = [
        Section("layers", "Off-diagonal P by layer",
                note=f"share |p| > threshold uses threshold {threshold:g}; angle modes are histogram peaks.",
                tables=[Table(LAYER_COLUMNS, layers)],
                figures=fig("kurtosis_by_layer", "kurtosis by layer", "kurtosis_by_layer")
                + fig("kde_P", "density of off-diagonal P per layer", "kde_P")),
        Section("convergence", "m-convergence", figures=fig("m_convergence", "m-convergence", "m_convergence"),
                tables=[Table([Column("layer", "layer", "int"), Column("m", "items", "int"),
                               Column("kurtosis", "excess kurtosis"), Column("std", "std"),
                               Column("mean_abs", "mean |p|"), Column("frac_abs_gt", "share |p| > threshold")],
                              conv_rows)]),
    ]
    for k, row in enumerate(layers):
        l = row["layer"]
        sections.append(Section(f"layer-{l}", f"Layer {l}",
                                figures=fig(f"heatmap_L{l}", f"P and cosine matrices, layer {l}",
                                            "heatmap" if k == 0 else "heatmap_again")
                                + fig(f"angles_L{l}", f"key angles, layer {l}", "angles" if k == 0 else "angles_again")))
    shown = [r for r in prow if r["rank"] <= PAIRS_SHOWN]
    sections.append(Section(
        "pairs", "Most superposed pairs",
        note=f"p = p(kᵢ,kⱼ), the fraction of an edit of item i that reaches item j; p_ji the reverse. The top "
             f"{PAIRS_SHOWN} per layer ({len(shown)} of {len(prow)} rows); all of them are in top_pairs.csv.",
        tables=[Table([Column("layer", "layer", "int"), Column("rank", "rank", "int"), Column("p", "p"),
                       Column("p_ji", "p_ji"), Column("whitening_cos", "whitening cosine"),
                       Column("item_i", "item i", "text"), Column("item_j", "item j", "text")], shown)],
        links=[("top_pairs.csv", "every pair (top_pairs.csv)")] if (out / "top_pairs.csv").is_file() else []))
    info = [("model", model.get("source")), ("family", model.get("family")), ("parameters", model.get("n_params")),
            ("layers", model.get("n_layers")), ("key size", model.get("d_mlp")), ("items m", stats.get("m")),
            ("seed", cfg.get("seed")), ("keys at", cfg.get("fact_token")), ("ridge", cfg.get("ridge"))]
    info = [(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in info]
    sources = ["stats.json", "top_pairs.json", "plots/"] + (["command.json"] if read_command(out) else [])
    return render(Page("superposition.html.j2", "Knowledge in superposition", "superposition", out, info,
                       sections, sources))


def render_scaling(out_dir: str | Path) -> list[Path]:
    """``plots/scaling_kurtosis.png`` and ``report.html`` from ``scaling.json`` (and the per-model reports)."""
    out = Path(out_dir)
    data = load_results(out, "scaling.json", "superposition --models")
    png = scaling_plot(data["rows"], out / "plots" / "scaling_kurtosis.png")
    sub = data.get("config", {}).get("model_dirs", {})
    sections = [
        Section("law", "Kurtosis against model size", figures=[Figure(png, "superposition scaling law",
                                                                       CAPTIONS["scaling"])]),
        Section("models", "Models",
                note="A fair comparison needs one world and a comparable training budget: the testbeds' epochs and "
                     "recall are listed (empty for models that are not testbeds).",
                tables=[Table([Column("model", "model", "text"), Column("n_params", "parameters", "int"),
                               Column("n_layers", "layers", "int"), Column("train_epochs", "training epochs", "int"),
                               Column("train_recall", "training recall"),
                               Column("train_paraphrase_recall", "paraphrase recall"),
                               Column("kurtosis_mean", "kurtosis, mean"), Column("kurtosis_median", "kurtosis, median"),
                               Column("kurtosis_max", "kurtosis, max")], data["models"])]),
        Section("layers", "Per layer",
                tables=[Table([Column("model", "model", "text"), Column("n_params", "parameters", "int"),
                               Column("layer", "layer", "int"), Column("relative_depth", "relative depth"),
                               Column("kurtosis", "excess kurtosis"), Column("mean_abs", "mean |p|"),
                               Column("std", "std"), Column("frac_abs_gt", "share |p| > threshold")], data["rows"])]),
    ]
    if sub:
        sections.append(Section("reports", "Per-model reports",
                                links=[(f"{d}/report.html", m) for m, d in sub.items()]))
    cfg = data.get("config", {})
    info = [("models", len(data["models"])), ("items m", cfg.get("m")), ("seed", cfg.get("seed")),
            ("keys at", cfg.get("fact_token")), ("ridge", cfg.get("ridge"))]
    sources = ["scaling.json"] + (["command.json"] if read_command(out) else [])
    path = render(Page("scaling.html.j2", "Superposition scaling law", "superposition", out, info, sections, sources))
    return [png, path]
