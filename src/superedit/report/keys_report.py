"""Plots and the HTML report of ``superedit keys`` (key geometry behind non-robust edits).

Reads only what :class:`superedit.robust.geometry.GeometryResult` saved — ``geometry.json`` and
``similar_keys.jsonl`` — plus ``command.json``; writes ``plots/*.png`` and ``report.html`` (template
``keys.html.j2``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..utils.io import read_jsonl
from .page import Column, Figure, Page, Section, Table, load_results, render
from .plots import _figure, legend_outside, save_figure, series_style
from .provenance import read_command

#: one colour and marker per kind of key, the same in every figure of the page
KIND_COLOURS = {"orig": "C0", "rephrase": "C1", "shuffle": "C2", "long": "C3"}
PCA_MARKERS = {"orig": ("*", 180), "rephrase": ("o", 40), "shuffle": ("X", 45), "long": ("^", 40)}


def kind_colour(kind: str, i: int) -> str:
    return KIND_COLOURS.get(kind, series_style(i + len(KIND_COLOURS))["color"])


#: similar-but-unrelated positions per subject shown on the page (the JSONL has them all)
SIMILAR_SHOWN = 3
MEASURE_LABELS = {"cos": "whitening cosine kᵢᵀC⁻¹kⱼ / √(kᵢᵀC⁻¹kᵢ · kⱼᵀC⁻¹kⱼ)",
                  "whiten": "whitening similarity kᵢᵀC⁻¹kⱼ"}


def similarity_figure(dist: dict, measure: str = "cos"):
    """One row per group of key pairs (random subjects; a subject vs its variants, per kind): every pair as a
    dot, a box of its quartiles; the groups are labelled on the axis (no legend to look up)."""
    import numpy as np

    groups = [(f"random subject pairs (n={len(dist['random'][measure])})", dist["random"][measure], "0.45")]
    groups += [(f"same subject: {kind} (n={len(d[measure])})", d[measure], kind_colour(kind, i))
               for i, (kind, d) in enumerate(dist["same"].items())]
    groups = [g for g in groups if g[1]]
    fig = _figure(7.2, 0.55 * max(1, len(groups)) + 1.3)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(111)
    rng = np.random.default_rng(0)
    for row, (_, vals, colour) in enumerate(groups):
        ys = row + rng.uniform(-0.17, 0.17, len(vals))
        ax.scatter(vals, ys, s=12, alpha=0.6 if len(vals) < 200 else 0.25, color=colour, linewidths=0, zorder=3)
    if groups:
        ax.boxplot([g[1] for g in groups], positions=range(len(groups)), orientation="horizontal", widths=0.5,
                   showfliers=False, medianprops={"color": "k"}, boxprops={"color": "0.3"},
                   whiskerprops={"color": "0.3"}, capprops={"color": "0.3"})
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([g[0] for g in groups], fontsize=8.5)
    ax.set_ylim(-0.6, len(groups) - 0.4)
    if measure == "cos":
        ax.axvline(0.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel(MEASURE_LABELS.get(measure, measure))
    ax.grid(alpha=0.3, axis="x")
    ax.set_title("Key pairs: a subject's variants vs random subjects"
                 + (" (cosine)" if measure == "cos" else " (unnormalised)"), fontsize=10)
    return fig


def similarity_hist(dist: dict, path, measure: str = "cos") -> Path:
    return save_figure(similarity_figure(dist, measure), path)




def pca_figure(pca: dict):
    fig = _figure(7.0, 4.4)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(111)
    coords = pca["coords"]
    for i, kind in enumerate(dict.fromkeys(pca["kinds"])):
        pts = [c for c, k in zip(coords, pca["kinds"]) if k == kind]
        m, s = PCA_MARKERS.get(kind, ("o", 30))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=m, s=s, label=kind, color=kind_colour(kind, i),
                   edgecolor="k" if kind == "orig" else "none", linewidth=0.6, zorder=3 if kind == "orig" else 2)
    for c, k, lab in zip(coords, pca["kinds"], pca["labels"]):
        if k in ("orig", "rephrase"):
            ax.annotate(lab[:24], c, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.grid(alpha=0.3)
    ax.set_title(f"Whitened keys of the variants of {pca['subject']!r} (PCA)", fontsize=10)
    legend_outside(fig, [ax], title="variant")
    return fig


def pca_plot(pca: dict, path) -> Path:
    return save_figure(pca_figure(pca), path)


def value_norm_figure(norms: Sequence[dict]):
    fig = _figure(6.4, 4.4)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(111)
    groups: dict[str, tuple[list, list]] = {}
    for n in norms:
        if "error" in n:
            continue
        for k, b, a in zip(n["kinds"], n["before"], n["after"]):
            g = groups.setdefault(k, ([], []))
            g[0].append(b)
            g[1].append(a)
    for i, (k, (b, a)) in enumerate(groups.items()):
        m, s = PCA_MARKERS.get(k, ("o", 30))
        ax.scatter(b, a, s=min(s, 60), alpha=0.75, marker=m, color=kind_colour(k, i), label=k)
    vals = [v for b, a in groups.values() for v in b + a]
    lims = [min(vals), max(vals)] if vals else [0, 1]
    ax.plot(lims, lims, "k--", lw=0.8, label="unchanged (y = x)")
    ax.set_xlabel("‖W k‖ before the edit")
    ax.set_ylabel("‖(W + ΔW) k‖ after")
    ax.grid(alpha=0.3)
    ax.set_title("Value norms before vs after single ROME edits", fontsize=10)
    legend_outside(fig, [ax], title="key of")
    return fig


def value_norm_plot(norms: Sequence[dict], path) -> Path:
    return save_figure(value_norm_figure(norms), path)


def _load_geometry(out: Path) -> dict:
    return load_results(out, "geometry.json", "keys", ("layer", "distributions", "same_subject", "random_pairs"))


def render_keys_plots(out_dir) -> list[Path]:
    out = Path(out_dir)
    geo = _load_geometry(out)
    plots = out / "plots"
    written = [similarity_hist(geo["distributions"], plots / "similarity_cos.png", "cos"),
               similarity_hist(geo["distributions"], plots / "similarity_whiten.png", "whiten")]
    if geo.get("pca"):
        written.append(pca_plot(geo["pca"], plots / "pca_variants.png"))
    if geo.get("value_norms"):
        written.append(value_norm_plot(geo["value_norms"], plots / "value_norms.png"))
    return written


CAPTIONS = {
    "similarity_cos": "An edit made on a subject's key reaches a variant in proportion to their whitening similarity. "
                      "Each dot is one pair of keys, the box its quartiles. Look at how far each kind of variant "
                      "sits to the right of the random pairs (grey): a kind that overlaps them sees the edit no "
                      "more than an unrelated subject does.",
    "similarity_whiten": "The same comparison without normalising by the keys' lengths (what the rank-one update "
                         "actually multiplies).",
    "pca_variants": "The subject's own key (star) among its variants' keys. Variants far from the star are the "
                    "queries the edit misses; a tight cluster around it means the edit should transfer.",
    "value_norms": "Each point is one key: its value's norm before and after one ROME edit of the subject. Points "
                   "on the dashed line were not changed by the edit; the subject's own key (star) moves up.",
}


def write_keys_report(out_dir) -> Path:
    out = Path(out_dir)
    geo = _load_geometry(out)
    similar = read_jsonl(out / "similar_keys.jsonl") if (out / "similar_keys.jsonl").is_file() else []
    stats = ("n", "mean", "median")
    rows = [{"pairs": f"same subject: {k}", **{f"{m}_{s}": v[m][s] for m in ("cos", "whiten") for s in stats}}
            for k, v in geo["same_subject"].items()]
    rows.append({"pairs": "random subjects", **{f"{m}_{s}": geo["random_pairs"][m][s] for m in ("cos", "whiten")
                                                  for s in stats}})
    cols = [Column("pairs", "pairs", "text")] + [
        Column(f"{m}_{s}", f"{'cosine' if m == 'cos' else 'similarity'} {s}", "int" if s == "n" else "num")
        for m in ("cos", "whiten") for s in stats]
    plots = out / "plots"

    def fig(name: str, alt: str) -> list[Figure]:
        p = plots / f"{name}.png"
        return [Figure(p, alt, CAPTIONS[name])] if p.is_file() else []

    sections = [
        Section("similarity", "Whitening similarity", tables=[Table(cols, rows)],
                figures=fig("similarity_cos", "whitening cosine histogram")
                + fig("similarity_whiten", "whitening similarity histogram") + fig("pca_variants", "PCA of variants")),
    ]
    if geo.get("value_norms"):
        sections.append(Section("norms", "Value norms", figures=fig("value_norms", "value norms before and after")))
    shown = [h for h in similar if h.get("rank", 0) <= SIMILAR_SHOWN]
    sections.append(Section(
        "similar", "Similar but unrelated corpus keys",
        note=(f"Per subject, the corpus positions whose keys are closest to the subject's key in whitening cosine "
              f"although their prefix does not contain the subject: the places an edit leaks into. The closest "
              f"{SIMILAR_SHOWN} per subject ({len(shown)} of {len(similar)}); all are in similar_keys.jsonl.")
        if similar else "No corpus was scanned.",
        tables=[Table([Column("subject", "subject", "text"), Column("rank", "rank", "int"),
                       Column("whitening_cos", "whitening cosine"), Column("whitening_sim", "whitening similarity"),
                       Column("token", "token", "text"), Column("context", "context", "text")], shown)]
        if similar else [],
        links=[("similar_keys.jsonl", "every position (similar_keys.jsonl)")] if similar else []))
    params = read_command(out).get("params", {})
    info = [("model", params.get("model")), ("layer", geo["layer"]), ("subjects", geo.get("n_requests")),
            ("cond(C)", f"{geo['condition_number']:.3g}" if geo.get("condition_number") else None),
            ("ridge", geo.get("ridge"))]
    sources = ["geometry.json"] + (["similar_keys.jsonl"] if similar else []) + (
        ["command.json"] if read_command(out) else [])
    return render(Page("keys.html.j2", f"Key geometry at layer {geo['layer']}", "keys", out, info, sections, sources))
