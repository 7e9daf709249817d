"""The demo's real-model page: what SmolLM2 says before and after each ROME edit, and a trace heatmap.

Reads only ``real.json`` (written by the demo's ``real`` stage, :mod:`superedit.commands.demo_real`)
and draws ``plots/trace_mlp.png`` from the trace grid saved there; template ``real.html.j2``.
"""

from __future__ import annotations

from pathlib import Path

from .page import Column, Figure, Page, Section, Table, load_results, render
from .plots import _figure, save_figure


def _load(out: Path) -> dict:
    return load_results(out, "real.json", "demo --stages real", ("model", "edits"))


def trace_figure(trace: dict):
    """Indirect effect per (token, layer) of one fact; subject tokens marked with *."""
    import numpy as np

    grid = np.asarray(trace["scores"], dtype=float).T - trace["p_corrupt"]  # (tokens, layers)
    first, last = trace["subject_span"]
    labels = [f"{t!r}{' *' if first <= i <= last else ''}" for i, t in enumerate(trace["tokens"])]
    fig = _figure(7.5, 0.32 * len(labels) + 1.6)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(111)
    im = ax.imshow(grid, aspect="auto", cmap="Purples", vmin=0)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel(f"layer (centre of a window of {trace['window']} restored layers)")
    ax.set_title(f"MLP restorations: {trace['fact']} → {trace['target']}", fontsize=9)
    fig.colorbar(im, ax=ax, label="indirect effect on p(target)")
    return fig


def write_report(out_dir) -> Path:
    """``out_dir/report.html`` from real.json (and ``plots/trace_mlp.png`` drawn from it)."""
    out = Path(out_dir)
    data = _load(out)
    prov = data.get("provenance") or {}
    rows = []
    for e in data["edits"]:
        for c in e["continuations"]:
            rows.append({"edit": e["edit"], "kind": c["kind"], "prompt": c["prompt"], "before": c["before"],
                         "after": c["after"], "ok": "yes" if c["as_intended"] else "no"})
    cont = Table([Column("edit", "edit", "text"), Column("kind", "prompt kind", "text"),
                  Column("prompt", "prompt", "text"), Column("before", "said before", "text"),
                  Column("after", "said after", "text"), Column("ok", "as intended", "text")], rows,
                 "greedy continuations (12 tokens)")
    keys = ("efficacy_score", "paraphrase_score", "neighborhood_score", "gen_efficacy", "gen_paraphrase",
            "gen_neighborhood", "rewrite_prob_new", "rewrite_prob_true")
    score_rows = [{"edit": e["edit"], **{k: (e["post"] or {}).get(k) for k in keys}} for e in data["edits"]]
    scores = Table([Column("edit", "edit", "text")] + [Column(k, k.replace("_", " ")) for k in keys], score_rows,
                   "after the edit: teacher-forced CounterFact scores and generation-based scores")
    sections = [Section("said", "What the model says", tables=[cont]),
                Section("scores", "Scores", tables=[scores])]
    tr = data.get("trace")
    if tr and tr.get("scores"):
        fig = save_figure(trace_figure(tr), out / "plots" / "trace_mlp.png")
        sections.append(Section("trace", "Where the fact lives", figures=[Figure(
            fig, "causal trace heatmap",
            f"Restoring the clean MLP output over a window of layers at one token of the corrupted run: dark cells "
            f"are where the fact is recovered. Look for the band at the subject's last token (marked *) in early "
            f"layers — the profile edits layer {data['rome_layer']}. p(target) clean {tr['p_clean']:.2f}, "
            f"corrupted {tr['p_corrupt']:.2f}.")]))
    page = Page(template="real.html.j2", title="A real model, edited", kind="real-model demo", out_dir=out,
                info=[("model", data["model"]), ("profile", data.get("profile")), ("ROME layer", data.get("rome_layer")),
                      ("quantisation", prov.get("quantisation")), ("GGUF sha256", (prov.get("gguf_sha256") or "")[:16]),
                      ("licence", prov.get("licence")), ("corpus documents for C", data.get("corpus_docs"))],
                sections=sections, sources=["real.json"],
                extra={"dequantised_note": "The weights are " + (prov.get("note") or "dequantised from a 4-bit GGUF file") + "."})
    return render(page)
