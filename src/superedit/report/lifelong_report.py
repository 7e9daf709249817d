"""Lifelong-editing report: curves per method vs number of edits, and a self-contained HTML page.

Reads ONLY ``DIR/metrics.jsonl`` (one record per (method, checkpoint), written by
:func:`superedit.lifelong.runner.run_lifelong`) and ``DIR/<method>/edit_probs.jsonl``; writes PNGs into
``DIR/plots/`` and ``DIR/report.html`` with the images embedded as base64 plus a table of the final
figures per method.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from ..utils.io import read_jsonl, write_text_atomic
from .plots import _figure, save_figure

#: (file stem, title, y label, [(label suffix, getter, line style)], log-y)
Getter = Callable[[dict], Any]


def _get(*path) -> Getter:
    def g(rec):
        cur = rec
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur
    return g


CURVES: list[tuple[str, str, str, list[tuple[str, Getter, str]], bool]] = [
    ("efficacy", "Efficacy (P(new) > P(true))", "success rate",
     [("all edits", _get("efficacy_all"), "-"), ("last block", _get("efficacy_last_block"), "--")], False),
    ("paraphrase", "Paraphrase success", "success rate",
     [("all edits", _get("paraphrase_all"), "-"), ("last block", _get("paraphrase_last_block"), "--")], False),
    ("neighborhood", "Neighbourhood specificity", "score",
     [("all edits", _get("neighborhood_all"), "-")], False),
    ("retention", "Untouched facts (teacher-forced recall)", "rate",
     [("retention of recalled", _get("untouched_retention"), "-"), ("recall", _get("untouched_recall"), ":"),
      ("retention, never-edited subjects", _get("untouched_retention_other_subjects"), "--"),
      ("retention, edited subjects' other facts", _get("untouched_retention_edited_subjects"), "-.")], False),
    ("all_facts", "Recall of all original facts (testbed)", "recall",
     [("all facts", _get("all_facts_recall"), "-")], False),
    ("perplexity", "Perplexity of held-out text", "perplexity",
     [("", _get("perplexity"), "-")], False),
    ("l1_norm", "L1 norm of edited layers (‖W‖₁/numel, relative to the original)", "ratio",
     [("", _get("w_l1_rel_mean"), "-")], False),
    ("delta_fro", "Frobenius norm of the total delta (all edited layers)", "‖W − W₀‖_F",
     [("", _get("delta_fro_total"), "-")], False),
    ("value_norms", "Norms of the inserted values (last block mean)", "norm",
     [("‖v*‖", _get("v_target_norm_last_block"), "-"), ("‖v* − v₀‖", _get("v_delta_norm_last_block"), "--")], False),
    ("forgetting", "Degree of forgetting (efficacy right after the edit − now), mean over blocks", "drop",
     [("", _get("forgetting_mean"), "-")], False),
    ("interference", "Interference: mean shift of probe keys' values, predicted (Σ p δ) vs measured", "‖Δv‖",
     [("untouched, measured", _get("interference", "o", "meas_shift_mean"), "-"),
      ("untouched, predicted", _get("interference", "o", "pred_shift_mean"), "o"),
      ("earlier edits, measured", _get("interference", "e", "meas_shift_mean"), "--"),
      ("earlier edits, predicted", _get("interference", "e", "pred_shift_mean"), "x")], False),
    ("interference_error", "Interference identity: relative error ‖pred − meas‖/‖meas‖", "relative error",
     [("untouched", _get("interference", "o", "rel_error"), "-"),
      ("earlier edits", _get("interference", "e", "rel_error"), "--")], True),
]

TABLE_COLS = [("efficacy_all", "efficacy"), ("efficacy_last_block", "efficacy (last block)"),
              ("paraphrase_all", "paraphrase"), ("neighborhood_all", "neighbourhood"), ("score_all", "S"),
              ("forgetting_mean", "forgetting"), ("untouched_retention", "untouched retention"),
              ("untouched_retention_other_subjects", "retention, never-edited subjects"),
              ("untouched_retention_edited_subjects", "retention, edited subjects"),
              ("untouched_recall", "untouched recall"), ("all_facts_recall", "all-facts recall"),
              ("perplexity", "perplexity"), ("w_l1_rel_mean", "L1 rel."), ("delta_fro_total", "‖ΔW‖_F"),
              ("v_target_norm_all", "‖v*‖"), ("edit_s", "edit time (s)")]


def _num(x) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def load_metrics(out_dir: str | Path) -> dict[str, list[dict]]:
    """method → its checkpoint records sorted by n_edits (a checkpoint recorded twice: the last wins)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return {}
    by: dict[str, dict[int, dict]] = {}
    for r in read_jsonl(path):
        by.setdefault(r["method"], {})[int(r["n_edits"])] = r
    return {m: [v[k] for k in sorted(v)] for m, v in by.items()}


def _curve_plot(runs: dict[str, list[dict]], name: str, title: str, ylabel: str, series, logy: bool,
                plot_dir: Path) -> Path | None:
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    any_line = False
    colors = {}
    for i, (m, recs) in enumerate(runs.items()):
        colors[m] = f"C{i % 10}"
        for label, get, style in series:
            pts = [(r["n_edits"], _num(get(r))) for r in recs]
            pts = [(x, y) for x, y in pts if y is not None and (not logy or y > 0)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            lab = f"{m} {label}".strip()
            if style in ("o", "x"):
                ax.plot(xs, ys, style, color=colors[m], label=lab, markersize=5, markerfacecolor="none")
            else:
                ax.plot(xs, ys, style, color=colors[m], label=lab, marker=".")
            any_line = True
    if not any_line:
        return None
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("number of edits")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, plot_dir / f"{name}.png")


def _forgetting_blocks_plot(runs: dict[str, list[dict]], plot_dir: Path) -> Path | None:
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    methods = [m for m, recs in runs.items() if recs and recs[-1].get("forgetting_blocks")]
    if not methods:
        return None
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        blocks = runs[m][-1]["forgetting_blocks"]
        xs = [b["block"] + i * width for b in blocks]
        ys = [_num(b.get("forgetting")) or 0.0 for b in blocks]
        ax.bar(xs, ys, width=width, label=m, color=f"C{list(runs).index(m) % 10}")
    size = runs[methods[0]][-1]["forgetting_blocks"][0]["end"] - runs[methods[0]][-1]["forgetting_blocks"][0]["start"]
    ax.set_xlabel(f"block of {size} edits (at the final checkpoint)")
    ax.set_ylabel("efficacy at edit − now")
    ax.set_title("Forgetting per block at the end of the run", fontsize=9)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    return save_figure(fig, plot_dir / "forgetting_blocks.png")


def _edit_probs_plot(out_dir: Path, runs: dict[str, list[dict]], plot_dir: Path) -> Path | None:
    data = {}
    for m in runs:
        p = out_dir / m / "edit_probs.jsonl"
        if p.exists():
            recs = read_jsonl(p)
            if recs:
                data[m] = max(recs, key=lambda r: r["n_edits"])
    if not data:
        return None
    fig = _figure(3.2 * len(data), 3.2)
    for i, (m, r) in enumerate(data.items()):
        ax = fig.add_subplot(1, len(data), i + 1)
        pairs = [(a, b) for a, b in zip(r["prob_new_at_edit"], r["prob_new_now"]) if a is not None and b is not None]
        if pairs:
            ax.scatter([a for a, _ in pairs], [b for _, b in pairs], s=6, alpha=0.6, c=list(range(len(pairs))),
                       cmap="viridis")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{m} (n={r['n_edits']})", fontsize=9)
        ax.set_xlabel("P(new) right after the edit", fontsize=8)
        if i == 0:
            ax.set_ylabel("P(new) now", fontsize=8)
    return save_figure(fig, plot_dir / "edit_probs.png")


def render_plots(out_dir: str | Path) -> list[tuple[str, Path]]:
    """All plots of ``out_dir``; returns (title, path) pairs."""
    out_dir = Path(out_dir)
    runs = load_metrics(out_dir)
    plot_dir = out_dir / "plots"
    made = []
    for name, title, ylabel, series, logy in CURVES:
        p = _curve_plot(runs, name, title, ylabel, series, logy, plot_dir)
        if p is not None:
            made.append((title, p))
    for title, fn in (("Forgetting per block", lambda: _forgetting_blocks_plot(runs, plot_dir)),
                      ("Probability of each edit's target: right after the edit vs now",
                       lambda: _edit_probs_plot(out_dir, runs, plot_dir))):
        p = fn()
        if p is not None:
            made.append((title, p))
    return made


def _fmt(v) -> str:
    v2 = _num(v)
    if v2 is None:
        return "–"
    if abs(v2) >= 1000 or (0 < abs(v2) < 1e-3):
        return f"{v2:.3g}"
    return f"{v2:.3f}"


def final_table(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for m, recs in runs.items():
        if not recs:
            continue
        r = recs[-1]
        row = {"method": m, "n_edits": r["n_edits"]}
        row.update({k: r.get(k) for k, _ in TABLE_COLS})
        inter = r.get("interference") or {}
        for s in ("o", "e"):
            if s in inter:
                row[f"interference_{s}_rel_error"] = inter[s].get("rel_error")
                row[f"interference_{s}_top5_share"] = inter[s].get("top5_share")
        rows.append(row)
    return rows


def write_report(out_dir: str | Path) -> Path:
    """``out_dir/report.html`` from metrics.jsonl (+ edit_probs.jsonl); returns its path."""
    out_dir = Path(out_dir)
    runs = load_metrics(out_dir)
    plots = render_plots(out_dir)
    rows = final_table(runs)
    cols = [("method", "method"), ("n_edits", "edits")] + TABLE_COLS
    extra = [c for c in ("interference_o_rel_error", "interference_o_top5_share", "interference_e_rel_error",
                         "interference_e_top5_share") if any(c in r for r in rows)]
    cols += [(c, c.replace("interference_", "interf. ").replace("_", " ")) for c in extra]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in cols)
    body = ""
    for r in rows:
        cells = "".join(f"<td>{html.escape(str(r.get(k))) if k in ('method', 'n_edits') else _fmt(r.get(k))}</td>"
                        for k, _ in cols)
        body += f"<tr>{cells}</tr>\n"
    imgs = ""
    for title, p in plots:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        imgs += (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                 f"<figcaption>{html.escape(title)}</figcaption></figure>\n")
    n_ckpt = sum(len(v) for v in runs.values())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>superedit lifelong editing report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
th {{ background: #f3f3f3; }}
td:first-child {{ text-align: left; font-weight: bold; }}
figure {{ display: inline-block; margin: 0.6em; vertical-align: top; }}
figcaption {{ font-size: 11px; color: #555; max-width: 640px; }}
img {{ max-width: 640px; }}
</style></head><body>
<h1>Lifelong editing</h1>
<p>{len(runs)} method(s), {n_ckpt} checkpoint record(s) from <code>metrics.jsonl</code>.
Success = mean-token NLL(new) &lt; NLL(true) (CounterFact). Forgetting = efficacy right after each edit minus
efficacy now, per block of edits. Untouched retention = share of the probe facts the base model recalled
(teacher-forced) that are still recalled. Interference: predicted Σᵢ p(kᵢ,kⱼ)δᵢ vs measured (W − W₀)kⱼ at the
edited layer (single-layer rank-one methods).</p>
<h2>Final figures</h2>
<table><tr>{head}</tr>
{body}</table>
<h2>Curves</h2>
{imgs}
</body></html>
"""
    path = out_dir / "report.html"
    write_text_atomic(path, page)
    return path


def summary_rows(out_dir: str | Path) -> list[dict]:
    """The final-figures table as dicts (for the CLI)."""
    return final_table(load_metrics(out_dir))


__all__: Sequence[str] = ["write_report", "render_plots", "load_metrics", "final_table", "summary_rows"]
