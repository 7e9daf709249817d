"""Lifelong-editing report: curves per method against the number of edits, tables of the final figures.

Reads ONLY the files :func:`superedit.lifelong.runner.run_lifelong` wrote — ``DIR/metrics.jsonl`` (one
record per (method, checkpoint)), ``DIR/<method>/edit_probs.jsonl``, ``DIR/run.json`` — and the
command's ``DIR/command.json``; writes PNGs into ``DIR/plots/`` and ``DIR/report.html`` (template
``lifelong.html.j2``). The library never calls this: ``superedit lifelong`` does, after the run.

Rates (efficacy, paraphrase, neighbourhood, retention, recall) are drawn on 0–1 with 95% Wilson
intervals over the trials behind each point (edits so far, edits of the latest block, probe facts
the base model recalled): error bars, side by side per method, while there are few checkpoints; a
shaded band when there are many.

The collapse horizon (:mod:`superedit.lifelong.horizon`: edits until efficacy over all edits or untouched
retention first falls below the threshold, 0.8 unless ``summary.json`` says otherwise) is drawn as one bar
per method, hatched "> N" where no checkpoint fell below; general ability (``ability`` of each checkpoint:
perplexity, fluency, multiple-choice accuracies, lm-eval tasks) as curves and a table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import FileFormatError
from ..utils.io import read_jsonl
from .page import Column, Figure, Page, Section, Table, render
from .plots import (_figure, count_ticks, dodge, integer_ticks, legend_outside, rate_axis, save_figure, series_style,
                    wilson)

#: at most this many checkpoints per method: error bars; more: shaded bands
MAX_ERRORBAR_POINTS = 12


def _num(x) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _get(rec: dict, path: str):
    cur: Any = rec
    for p in path.split("."):
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


# ------------------------------------------------------------------------------------------ trials per rate
def n_scored_edits(rec: dict) -> int | None:
    """Edits the efficacy over all edits is a share of: every edit so far, or on a re-edit stream
    (``--reedit-facts``) each fact's latest edit only (``n_live``)."""
    return int(rec.get("n_live") or rec["n_edits"]) or None


def n_paraphrased(rec: dict) -> int | None:
    """Edits the paraphrase share is over (those with paraphrases), as recorded; else the scored edits."""
    return rec.get("paraphrase_all_n") or n_scored_edits(rec)


def n_with_neighbours(rec: dict) -> int | None:
    """Edits the neighbourhood share is over (those with unedited neighbours), as recorded; else the scored edits."""
    return rec.get("neighborhood_all_n") or n_scored_edits(rec)


def n_last_block(rec: dict) -> int | None:
    lb = rec.get("last_block") or [0, rec["n_edits"]]
    return int(lb[1]) - int(lb[0]) or None


def n_recalled(rec: dict) -> int | None:
    """Probe facts the base model recalled (retention is a share of them)."""
    parts = [rec.get("untouched_n_edited_subjects"), rec.get("untouched_n_other_subjects")]
    if all(isinstance(p, int) for p in parts):
        return sum(parts) or None
    base, n = _num(rec.get("untouched_base_recall")), rec.get("untouched_n")
    if base is None or not n:
        return None
    return round(base * n) or None


def _n_field(key: str) -> Callable[[dict], int | None]:
    return lambda rec: rec.get(key) or None


@dataclass(frozen=True)
class Quantity:
    """One panel: a field of the checkpoint records (dotted for nested), its panel title and y label;
    ``trials`` gives the n behind a rate (95% Wilson intervals); a rate (``rate`` or with ``trials``) is drawn
    on 0–1."""

    key: str
    title: str
    ylabel: str
    trials: Callable[[dict], int | None] | None = None
    logy: bool = False
    rate: bool = False

    @property
    def is_rate(self) -> bool:
        return self.rate or self.trials is not None


@dataclass(frozen=True)
class CurveFigure:
    name: str
    title: str
    quantities: tuple[Quantity, ...]
    caption: str


CURVE_FIGURES: tuple[CurveFigure, ...] = (
    CurveFigure("efficacy", "Efficacy: P(new) > P(true) on the edit prompt", (
        Quantity("efficacy_all", "all edits so far", "share of edits", n_scored_edits),
        Quantity("efficacy_last_block", "edits since the previous checkpoint", "share of edits", n_last_block)),
        "Left: of all edits made so far, the share whose new object still beats the old one; right: the same for "
        "the edits made since the previous checkpoint only. A method that keeps its latest edits (right stays "
        "high) while the left curve sinks is overwriting its earlier edits."),
    CurveFigure("generalisation", "Paraphrases and neighbourhood", (
        Quantity("paraphrase_all", "paraphrase success, all edits", "share of edits", n_paraphrased),
        Quantity("neighborhood_all", "neighbourhood kept, all edits", "share of edits", n_with_neighbours)),
        "Left: the edit also holds when the question is rephrased. Right: prompts about other subjects keep "
        "their original answer (1 = no collateral damage). Look for the curve that falls as edits accumulate."),
    CurveFigure("drift", "How far the edited weights drift", (
        Quantity("perplexity", "perplexity of held-out text", "perplexity"),
        Quantity("w_l1_rel_mean", "‖W‖₁ of edited layers / original", "ratio"),
        Quantity("delta_fro_total", "‖W − W₀‖_F (all edited layers)", "Frobenius norm"),
        Quantity("v_target_norm_last_block", "‖v*‖ of the latest edits", "norm")),
        "Rising perplexity or a weight norm that keeps growing with the number of edits is the model degrading; "
        "a method whose ‖W − W₀‖ grows much faster than the others will break first in longer streams."),
)


def knowledge_quantities(runs: dict[str, list[dict]]) -> tuple[Quantity, ...]:
    """Retention panels; the split by subject only when facts of edited subjects were probed (else it is
    the same line as the total)."""
    qs = [Quantity("untouched_retention", "untouched facts still recalled", "share of recalled facts", n_recalled)]
    def after_edits(field: str) -> bool:  # measured at some checkpoint after edits were made
        return any((r.get(field) or 0) > 0 and r["n_edits"] > 0 for recs in runs.values() for r in recs)

    if after_edits("untouched_n_edited_subjects"):
        if after_edits("untouched_n_other_subjects"):  # (a stream that edits every subject leaves none)
            qs.append(Quantity("untouched_retention_other_subjects", "… of never-edited subjects",
                               "share of recalled facts", _n_field("untouched_n_other_subjects")))
        qs.append(Quantity("untouched_retention_edited_subjects", "… of edited subjects' other facts",
                           "share of recalled facts", _n_field("untouched_n_edited_subjects")))
    if any(r.get("all_facts_recall") is not None for recs in runs.values() for r in recs):
        qs.append(Quantity("all_facts_recall", "all original facts recalled (testbed)", "share of facts", rate=True))
    return tuple(qs)


KNOWLEDGE_CAPTION = ("Teacher-forced recall of facts no edit touched, as a share of those the unedited model "
                     "recalled (1 = nothing lost). Look for the method whose curve drops first; the gap between "
                     "methods is meaningful only where the intervals do not overlap.")


def _ability_n(name: str) -> Callable[[dict], int | None]:
    return lambda rec: _get(rec, f"ability.{name}.n") or None


#: general-ability metrics drawn when a run has them: (name in ``ability``, panel title, y label, is a rate)
ABILITY_METRICS = (("fluency", "generation fluency (n-gram entropy)", "bits", False),
                   ("known_mc", "known facts: multiple choice (4 options)", "accuracy", True),
                   ("mqd_tf", "MQD true/false, unedited tuples", "accuracy", True),
                   ("mqd_mc", "MQD multiple choice, unedited tuples", "accuracy", True))


def ability_quantities(runs: dict[str, list[dict]]) -> tuple[Quantity, ...]:
    """Panels of the general-ability metrics some checkpoint carries (rates with Wilson intervals)."""
    qs = []
    for name, title, ylabel, rate in ABILITY_METRICS:
        if any(_num(_get(r, f"ability.{name}.value")) is not None for recs in runs.values() for r in recs):
            qs.append(Quantity(f"ability.{name}.value", title, ylabel, _ability_n(name) if rate else None))
    return tuple(qs)


ABILITY_CAPTION = ("What the model can still do besides the edited facts, measured on fixed items at every "
                   "checkpoint: the entropy of its sampled continuations (falling: repetitive text), and its "
                   "choice (highest log-probability option) on questions about facts and MQD tuples no edit "
                   "touched. Chance is 0.25 for four options and 0.5 for true/false.")


def horizon_figure(hz: dict[str, dict]):
    """One horizontal bar per method: edits until collapse; "> N" (hatched) where it was not reached.

    A whisker marks the bracket (last checkpoint above the threshold, first below): the horizon is known
    to checkpoint resolution only. Returns the Figure, or None without methods."""
    if not hz:
        return None
    methods = list(hz)
    styles = _method_styles(hz)
    fig = _figure(7.0, 0.55 * len(methods) + 1.3)
    ax = fig.add_subplot(1, 1, 1)
    right = max(h["n_edits"] if h["reached"] else h["within"] for h in hz.values()) or 1
    for i, m in enumerate(methods):
        h = hz[m]
        color = styles[m]["color"]
        if h["reached"]:
            ax.barh(i, h["n_edits"], color=color, edgecolor=color, height=0.6)
            lo = h["last_ok"] if h["last_ok"] is not None else 0
            ax.errorbar([h["n_edits"]], [i], xerr=[[h["n_edits"] - lo], [0]], fmt="none", ecolor="k", capsize=3,
                        lw=1)
            label = f"{h['n_edits']} ({_HORIZON_NAMES.get(h['metric'], h['metric'])} {h['value']:.2f})"
        else:
            ax.barh(i, h["within"], color="white", edgecolor=color, hatch="///", height=0.6, lw=1.5)
            label = f"> {h['within']} (not reached)"
        ax.text((h["n_edits"] if h["reached"] else h["within"]) + 0.01 * right, i, label, va="center", fontsize=8)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels(methods)
    ax.invert_yaxis()
    ax.set_xlim(0, right * 1.45)
    ax.set_xlabel("edits until efficacy (all edits) or untouched retention < "
                  f"{next(iter(hz.values()))['threshold']:g}")
    integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3, axis="x")
    ax.set_title("Collapse horizon", fontsize=11)
    return fig


_HORIZON_NAMES = {"efficacy_all": "efficacy", "untouched_retention": "retention"}


def horizon_table(hz: dict[str, dict]) -> Table | None:
    """Method, horizon ("> N" when not reached), what fell first and to what, the bracket."""
    if not hz:
        return None
    rows = []
    for m, h in hz.items():
        rows.append({"method": m, "horizon": str(h["n_edits"]) if h["reached"] else f"> {h['within']}",
                     "metric": _HORIZON_NAMES.get(h["metric"], h["metric"]) if h["reached"] else "–",
                     "value": h["value"],
                     "bracket": (f"{h['last_ok'] if h['last_ok'] is not None else '–'} → {h['n_edits']}"
                                 if h["reached"] else "–"),
                     "within": h["within"]})
    thr = next(iter(hz.values()))["threshold"]
    cols = [Column("method", "method", "text"), Column("horizon", "horizon (edits)", "text"),
            Column("metric", "first below", "text"), Column("value", "its value"),
            Column("bracket", "last checkpoint above → first below", "text"),
            Column("within", "edits run", "int")]
    return Table(cols, rows, f"Collapse horizon: edits until efficacy over all edits or untouched retention first "
                             f"falls below {thr:g} (checkpoint resolution)")


def run_horizons(out_dir: str | Path, runs: dict[str, list[dict]] | None = None) -> dict[str, dict]:
    """Each method's collapse horizon, from ``metrics.jsonl`` with the threshold in ``summary.json``
    (default 0.8)."""
    from ..lifelong.horizon import DEFAULT_THRESHOLD, collapse_horizon

    runs = load_metrics(out_dir) if runs is None else runs
    thr = _num(_read_json(Path(out_dir) / "summary.json").get("horizon_threshold")) or DEFAULT_THRESHOLD
    return {m: collapse_horizon(recs, thr) for m, recs in runs.items() if recs}


RATE_ABILITIES = frozenset({"known_retention"})  # ability values that are shares of their n items


def ability_table(runs: dict[str, list[dict]]) -> Table | None:
    """First and last checkpoint's general-ability metrics per method (value and n; lm-eval tasks too)."""
    rows, keys = [], []
    for m, recs in runs.items():
        for r in (recs[0], recs[-1]) if len(recs) > 1 else recs[-1:]:
            ab = r.get("ability")
            if not ab:
                continue
            row = {"method": m, "n_edits": r["n_edits"]}
            for name, v in ab.items():
                if name == "lm_eval":
                    for task, tr in v.items():
                        key = f"lm_eval:{task}"
                        row[key] = "skipped: " + tr["skipped"] if "skipped" in tr else ", ".join(
                            f"{k} {x:.3f}" for k, x in tr.items() if k != "n" and isinstance(x, float)) + (
                            f" (n={tr['n']})" if tr.get("n") else "")
                        keys.append((key, f"lm-eval {task}", "text"))
                elif isinstance(v, dict) and "value" in v:
                    row[name] = v["value"]
                    row[f"{name}_n"] = v.get("n")
                    keys.append((name, name.replace("_", " ")))
                    keys.append((f"{name}_n", "n", "int"))
                    if name in RATE_ABILITIES or "chance" in v:  # a share of n items: its 95% interval
                        row[f"{name}_ci"] = _ci_text(v["value"], v.get("n"))
                        keys.append((f"{name}_ci", "95% interval", "text"))
            rows.append(row)
    if not rows:
        return None
    cols = [Column("method", "method", "text"), Column("n_edits", "edits", "int")]
    cols += [Column(*k) for k in dict.fromkeys(keys)]
    return Table(cols, rows, "General ability before the first edit and at the last checkpoint (each value with "
                             "the number of items behind it)")


# ------------------------------------------------------------------------------------------ loading
def load_metrics(out_dir: str | Path) -> dict[str, list[dict]]:
    """method → its checkpoint records sorted by n_edits (a checkpoint recorded twice: the last wins).

    Raises :class:`FileFormatError` when ``out_dir/metrics.jsonl`` is missing or a record lacks its
    method / n_edits."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file; the lifelong report is drawn from the metrics of a run: "
                              f"run `superedit lifelong --out {out_dir}` first")
    by: dict[str, dict[int, dict]] = {}
    for i, r in enumerate(read_jsonl(path), 1):
        if not isinstance(r, dict) or not isinstance(r.get("method"), str) or not isinstance(r.get("n_edits"), int):
            raise FileFormatError(f"{path}: record {i} has no 'method' (text) and 'n_edits' (integer); "
                                  "it was not written by `superedit lifelong`: repair or remove it")
        by.setdefault(r["method"], {})[int(r["n_edits"])] = r
    return {m: [v[k] for k in sorted(v)] for m, v in by.items()}


def load_edit_probs(out_dir: str | Path, methods: Sequence[str]) -> dict[str, dict]:
    """method → its latest ``edit_probs.jsonl`` record (methods without one are left out)."""
    out = {}
    for m in methods:
        p = Path(out_dir) / m / "edit_probs.jsonl"
        if p.is_file():
            recs = [r for r in read_jsonl(p) if isinstance(r, dict) and isinstance(r.get("n_edits"), int)]
            if recs:
                out[m] = max(recs, key=lambda r: r["n_edits"])
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FileFormatError(f"{path}: not valid JSON ({exc}); repair or remove it") from exc
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------ figures
def _points(recs: list[dict], q: Quantity) -> list[tuple[int, float, tuple[float, float] | None]]:
    pts = []
    for r in recs:
        y = _num(_get(r, q.key))
        if y is None or (q.logy and y <= 0):
            continue
        pts.append((int(r["n_edits"]), y, wilson(y, q.trials(r)) if q.trials else None))
    return pts


def _draw_quantity(ax, runs: dict[str, list[dict]], q: Quantity, styles: dict[str, dict]) -> bool:
    all_x = sorted({int(r["n_edits"]) for recs in runs.values() for r in recs})
    offsets = dict(zip(runs, dodge(len(runs), all_x or [0, 1])))
    drawn = False
    for m, recs in runs.items():
        pts = _points(recs, q)
        if not pts:
            continue
        st = styles[m]
        xs = [x + offsets[m] for x, _, _ in pts]
        ys = [y for _, y, _ in pts]
        ax.plot(xs, ys, color=st["color"], marker=st["marker"], ms=5, lw=1.4, label=m, zorder=3)
        iv = [(x, y, ci) for x, (_, y, ci) in zip(xs, pts) if ci is not None]
        if iv and len(pts) <= MAX_ERRORBAR_POINTS:
            ax.errorbar([x for x, _, _ in iv], [y for _, y, _ in iv],
                        yerr=[[max(0.0, y - ci[0]) for _, y, ci in iv], [max(0.0, ci[1] - y) for _, y, ci in iv]],
                        fmt="none", ecolor=st["color"], elinewidth=1.0, capsize=2.5, alpha=0.8, zorder=2)
        elif iv:
            ax.fill_between([x for x, _, _ in iv], [ci[0] for _, _, ci in iv], [ci[1] for _, _, ci in iv],
                            color=st["color"], alpha=0.15, lw=0, zorder=1)
        drawn = True
    ax.set_title(q.title, fontsize=9.5)
    ax.set_xlabel("number of edits")
    count_ticks(ax.xaxis, all_x)
    if q.is_rate:
        rate_axis(ax, q.ylabel)
    else:
        ax.set_ylabel(q.ylabel)
        if q.logy:
            ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return drawn


def _method_styles(runs) -> dict[str, dict]:
    return {m: series_style(i) for i, m in enumerate(runs)}


def curves_figure(runs: dict[str, list[dict]], title: str, quantities: Sequence[Quantity], ncols: int | None = None):
    """One panel per quantity, one line per method, a legend of the methods outside the panels.

    Returns the matplotlib Figure, or None when no quantity has a value."""
    ncols = ncols or len(quantities)
    nrows = math.ceil(len(quantities) / ncols)
    fig = _figure(3.5 * ncols, 2.8 * nrows + 0.4)
    fig.set_layout_engine("constrained")
    styles = _method_styles(runs)
    axes, drawn = [], False
    for i, q in enumerate(quantities):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        drawn |= _draw_quantity(ax, runs, q, styles)
        axes.append(ax)
    if not drawn:
        return None
    fig.suptitle(title, fontsize=11)
    legend_outside(fig, axes, title="method")
    return fig


def forgetting_figure(runs: dict[str, list[dict]]):
    """Left: mean forgetting against the number of edits; right: forgetting per block at the last checkpoint."""
    import numpy as np

    finals = {m: recs[-1] for m, recs in runs.items() if recs and recs[-1].get("forgetting_blocks")}
    if not finals:
        return None
    styles = _method_styles(runs)
    fig = _figure(8.0, 3.2)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(1, 2, 1)
    _draw_quantity(ax, runs, Quantity("forgetting_mean", "mean over blocks of edits", "efficacy at edit − now"), styles)
    ax.axhline(0, color="k", lw=0.6)
    ax2 = fig.add_subplot(1, 2, 2)
    blocks = max(finals.values(), key=lambda r: len(r["forgetting_blocks"]))["forgetting_blocks"]
    width = 0.8 / len(finals)
    for i, (m, r) in enumerate(finals.items()):
        xs = np.arange(len(r["forgetting_blocks"])) + (i - (len(finals) - 1) / 2) * width
        ys = [_num(b.get("forgetting")) for b in r["forgetting_blocks"]]
        # the edge keeps a zero bar visible as a coloured line at 0 (zero is not missing)
        ax2.bar(xs, [0.0 if y is None else y for y in ys], width, color=styles[m]["color"],
                edgecolor=styles[m]["color"], linewidth=1.5, label=m)
    ax2.set_xticks(range(len(blocks)))
    ax2.set_xticklabels([f"{b['start'] + 1}–{b['end']}" for b in blocks], fontsize=8,
                        rotation=0 if len(blocks) <= 6 else 45)
    ax2.set_xlabel("edits in the block (stream order)")
    ax2.set_ylabel("efficacy at edit − now")
    ax2.set_title(f"per block, after all {max(r['n_edits'] for r in finals.values())} edits", fontsize=9.5)
    ax2.axhline(0, color="k", lw=0.6, zorder=0)
    vals = [v for r in finals.values() for v in (_num(b.get("forgetting")) for b in r["forgetting_blocks"])
            if v is not None] + [0.0]
    pad = 0.08 * ((max(vals) - min(vals)) or 1.0)
    ax2.set_ylim(min(vals) - pad, max(vals) + pad)  # zero bars stay visible off the frame
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle("Forgetting: success right after each edit minus success now", fontsize=11)
    legend_outside(fig, [ax, ax2], title="method")
    return fig


def interference_figure(runs: dict[str, list[dict]]):
    """Measured (line) vs predicted Σ p δ (hollow markers) shift of probe keys' values; relative error (log)."""
    from matplotlib.lines import Line2D

    have = {m: recs for m, recs in runs.items() if any(_get(r, "interference.o") for r in recs)}
    if not have:
        return None
    styles = _method_styles(runs)
    fig = _figure(10.5, 3.2)
    fig.set_layout_engine("constrained")
    axes = []
    for i, (part, title) in enumerate((("o", "untouched probe keys"), ("e", "earlier edits' keys"))):
        ax = fig.add_subplot(1, 3, i + 1)
        for m, recs in have.items():
            pts = [(r["n_edits"], _num(_get(r, f"interference.{part}.meas_shift_mean")),
                    _num(_get(r, f"interference.{part}.pred_shift_mean"))) for r in recs]
            meas = [(x, y) for x, y, _ in pts if y is not None]
            pred = [(x, y) for x, _, y in pts if y is not None]
            if meas:
                ax.plot(*zip(*meas), color=styles[m]["color"], lw=1.4, marker=".", label=m)
            if pred:
                ax.plot(*zip(*pred), ls="none", marker="o", ms=8, mfc="none", color=styles[m]["color"])
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("number of edits")
        ax.set_ylabel("mean ‖Δv‖")
        count_ticks(ax.xaxis, [r["n_edits"] for recs in have.values() for r in recs])
        ax.grid(alpha=0.3)
        axes.append(ax)
    ax = fig.add_subplot(1, 3, 3)
    for m, recs in have.items():
        for part, ls in (("o", "-"), ("e", "--")):
            pts = [(r["n_edits"], _num(_get(r, f"interference.{part}.rel_error"))) for r in recs]
            pts = [(x, y) for x, y in pts if y is not None and y > 0]
            if pts:
                ax.plot(*zip(*pts), ls=ls, color=styles[m]["color"], marker=styles[m]["marker"], ms=4)
    ax.set_yscale("log")
    ax.set_title("identity error ‖pred − meas‖/‖meas‖", fontsize=9.5)
    ax.set_xlabel("number of edits")
    count_ticks(ax.xaxis, [r["n_edits"] for recs in have.values() for r in recs])
    ax.grid(alpha=0.3)
    axes.append(ax)
    handles = [Line2D([], [], color=styles[m]["color"], lw=2) for m in have]
    labels = list(have)
    handles += [Line2D([], [], color="k", lw=1.4, marker="."), Line2D([], [], color="k", ls="none", marker="o",
                                                                        mfc="none", ms=8),
                Line2D([], [], color="k", ls="--")]
    labels += ["measured (W − W₀)k", "predicted Σ p δ", "error on earlier edits"]
    fig.suptitle("Interference at the edited layer: predicted vs measured", fontsize=11)
    legend_outside(fig, axes, handles, labels)
    return fig


def edit_probs_figure(probs: dict[str, dict]):
    """One row per method: every edit's P(new) right after it (hollow) and now (filled), joined by a stem."""
    if not probs:
        return None
    from matplotlib.lines import Line2D

    n_max = max(len(r.get("prob_new_at_edit") or []) for r in probs.values())
    fig = _figure(min(11.0, max(6.5, 0.09 * n_max + 4.0)), 1.45 * len(probs) + 0.9)
    fig.set_layout_engine("constrained")
    axes = []
    for i, (m, r) in enumerate(probs.items()):
        ax = fig.add_subplot(len(probs), 1, i + 1, sharex=axes[0] if axes else None)
        at, now = r.get("prob_new_at_edit") or [], r.get("prob_new_now") or []
        color = series_style(i)["color"]
        rows = [(k + 1, _num(a), _num(b)) for k, (a, b) in enumerate(zip(at, now))]
        both = [(x, a, b) for x, a, b in rows if a is not None and b is not None]
        ms = 5 if n_max <= 60 else 3 if n_max <= 300 else 1.5
        if both:
            ax.vlines([x for x, _, _ in both], [a for _, a, _ in both], [b for _, _, b in both], color="0.6", lw=0.8)
        ax.plot([x for x, a, _ in rows if a is not None], [a for _, a, _ in rows if a is not None], ls="none",
                marker="o", ms=ms, mfc="white", mec="0.35")
        ax.plot([x for x, _, b in rows if b is not None], [b for _, _, b in rows if b is not None], ls="none",
                marker="o", ms=ms, color=color)
        ax.set_ylim(-0.03, 1.03)
        ax.set_yticks([0, 0.5, 1])
        ax.set_ylabel("P(new)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{m}: after {r['n_edits']} edits", fontsize=9.5, loc="left")
        integer_ticks(ax.xaxis)
        axes.append(ax)
    axes[-1].set_xlabel("edit (stream order)")
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    handles = [Line2D([], [], ls="none", marker="o", mfc="white", mec="0.35"),
               Line2D([], [], ls="none", marker="o", color="0.3"), Line2D([], [], color="0.6")]
    legend_outside(fig, axes, handles, ["right after its edit", "now (method's colour)", "change"])
    fig.suptitle("Probability of each edit's new object", fontsize=11)
    return fig


def render_plots(out_dir: str | Path) -> list[Figure]:
    """All figures of a lifelong run folder (PNGs in ``out_dir/plots``), with their captions."""
    out_dir = Path(out_dir)
    runs = load_metrics(out_dir)
    plot_dir = out_dir / "plots"
    made: list[Figure] = []

    def keep(fig, name: str, alt: str, caption: str) -> None:
        if fig is not None:
            made.append(Figure(save_figure(fig, plot_dir / f"{name}.png"), alt, caption))

    for spec in CURVE_FIGURES[:2]:
        keep(curves_figure(runs, spec.title, spec.quantities), spec.name, spec.title, spec.caption)
    keep(curves_figure(runs, "Knowledge the edits did not target", knowledge_quantities(runs)), "knowledge",
         "Knowledge the edits did not target", KNOWLEDGE_CAPTION)
    keep(forgetting_figure(runs), "forgetting", "Forgetting",
         "Positive bars are edits that worked when made and no longer do. Look for bars that grow towards the "
         "left (old edits worn away by later ones); negative values mean later edits repaired earlier ones.")
    keep(edit_probs_figure(load_edit_probs(out_dir, list(runs))), "edit_probs", "Per-edit probability",
         "Each column is one edit: hollow is P(new) right after it was made, filled is P(new) now; the grey stem "
         "is the change since. Long downward stems, especially among the early edits (left), are forgetting.")
    spec = CURVE_FIGURES[2]
    keep(curves_figure(runs, spec.title, spec.quantities, ncols=2), spec.name, spec.title, spec.caption)
    aq = ability_quantities(runs)
    if aq:
        keep(curves_figure(runs, "General ability", aq, ncols=min(2, len(aq))), "ability", "General ability",
             ABILITY_CAPTION)
    keep(horizon_figure(run_horizons(out_dir, runs)), "horizon", "Collapse horizon",
         "Longer bars last longer. A solid bar ends at the first checkpoint where efficacy over all edits or "
         "untouched retention fell below the threshold (the whisker reaches back to the last checkpoint above "
         "it); a hatched bar \"> N\" means no checkpoint fell below within the N edits run.")
    keep(interference_figure(runs), "interference", "Interference",
         "Lines are the measured change of probe keys' values, hollow markers the prediction Σᵢ p(kᵢ,kⱼ)δᵢ. "
         "Hollow markers sitting on the lines (and a small error, right) confirm that the closed-form "
         "interference explains the damage.")
    return made


# ------------------------------------------------------------------------------------------ tables
def _ci_text(p, n) -> str | None:
    ci = wilson(_num(p), n)
    return None if ci is None else f"{ci[0]:.2f}–{ci[1]:.2f}"


TABLE_COLS = [("efficacy_all", "efficacy"), ("efficacy_last_block", "efficacy (last block)"),
              ("paraphrase_all", "paraphrase"), ("neighborhood_all", "neighbourhood"), ("score_all", "S"),
              ("forgetting_mean", "forgetting"), ("untouched_retention", "untouched retention"),
              ("untouched_retention_other_subjects", "retention, never-edited subjects"),
              ("untouched_retention_edited_subjects", "retention, edited subjects"),
              ("untouched_recall", "untouched recall"), ("all_facts_recall", "all-facts recall"),
              ("perplexity", "perplexity"), ("w_l1_rel_mean", "L1 rel."), ("delta_fro_total", "‖ΔW‖_F"),
              ("v_target_norm_all", "‖v*‖"), ("edit_s", "edit time (s)")]


def final_table(runs: dict[str, list[dict]]) -> list[dict]:
    """The last checkpoint of each method as a flat row (also what ``superedit lifelong`` prints)."""
    rows = []
    for m, recs in runs.items():
        if not recs:
            continue
        r = recs[-1]
        row = {"method": m, "n_edits": r["n_edits"]}
        row.update({k: r.get(k) for k, _ in TABLE_COLS})
        row["efficacy_ci"] = _ci_text(r.get("efficacy_all"), n_scored_edits(r))
        row["efficacy_last_block_n"] = n_last_block(r)
        row["efficacy_last_block_ci"] = _ci_text(r.get("efficacy_last_block"), n_last_block(r))
        for name in ("paraphrase", "neighborhood"):  # bootstrap over the per-edit shares (runs since they are saved)
            ci = r.get(f"{name}_all_ci")
            row[f"{name}_all_ci"] = f"{ci[0]:.2f}–{ci[1]:.2f}" if ci and None not in ci else None
            row[f"{name}_all_n"] = r.get(f"{name}_all_n")
        row["untouched_retention_n"] = n_recalled(r)
        row["untouched_retention_ci"] = _ci_text(r.get("untouched_retention"), n_recalled(r))
        for part in ("other", "edited"):
            n_part = r.get(f"untouched_n_{part}_subjects") or None
            row[f"untouched_retention_{part}_subjects_ci"] = _ci_text(
                r.get(f"untouched_retention_{part}_subjects"), n_part)
        row["untouched_recall_n"] = r.get("untouched_n") or None
        row["untouched_recall_ci"] = _ci_text(r.get("untouched_recall"), row["untouched_recall_n"])
        inter = r.get("interference") or {}
        for s in ("o", "e"):
            if s in inter:
                row[f"interference_{s}_rel_error"] = inter[s].get("rel_error")
                row[f"interference_{s}_top5_share"] = inter[s].get("top5_share")
        rows.append(row)
    return rows


def summary_rows(out_dir: str | Path) -> list[dict]:
    """The final-figures table as dicts (for the CLI)."""
    return final_table(load_metrics(out_dir))


def _tables(rows: list[dict]) -> list[Table]:
    key = [Column("method", "method", "text"), Column("n_edits", "edits", "int")]
    groups = [
        ("Edits: success rates after the last edit; n is the edits column (efficacy: 95% Wilson interval over the "
         "edits; paraphrase and neighbourhood: means of per-edit shares, 95% bootstrap interval over the edits)",
         [("efficacy_all", "efficacy"), ("efficacy_ci", "efficacy 95% interval", "text"),
          ("efficacy_last_block", "efficacy, last block"), ("efficacy_last_block_n", "n, last block", "int"),
          ("efficacy_last_block_ci", "95% interval, last block", "text"), ("paraphrase_all", "paraphrase"),
          ("paraphrase_all_ci", "paraphrase 95% interval", "text"), ("neighborhood_all", "neighbourhood"),
          ("neighborhood_all_ci", "neighbourhood 95% interval", "text"), ("score_all", "S (harmonic mean)"),
          ("forgetting_mean", "forgetting")]),
        ("Knowledge the edits did not target (95% Wilson interval over the probe facts the base model recalled)",
         [("untouched_retention", "untouched retention"), ("untouched_retention_n", "n (facts recalled before)", "int"),
          ("untouched_retention_ci", "95% interval", "text"),
          ("untouched_retention_other_subjects", "never-edited subjects"),
          ("untouched_retention_other_subjects_ci", "95% interval", "text"),
          ("untouched_retention_edited_subjects", "edited subjects' other facts"),
          ("untouched_retention_edited_subjects_ci", "95% interval", "text"),
          ("untouched_recall", "untouched recall"), ("untouched_recall_n", "n (probe facts)", "int"),
          ("untouched_recall_ci", "95% interval", "text"), ("all_facts_recall", "all-facts recall"),
          ("perplexity", "perplexity")]),
        ("Weights, values and cost",
         [("w_l1_rel_mean", "‖W‖₁ / original"), ("delta_fro_total", "‖W − W₀‖_F"), ("v_target_norm_all", "mean ‖v*‖"),
          ("edit_s", "edit time (s)"), ("interference_o_rel_error", "interference error, untouched"),
          ("interference_o_top5_share", "top-5 share, untouched"),
          ("interference_e_rel_error", "interference error, earlier edits"),
          ("interference_e_top5_share", "top-5 share, earlier edits")]),
    ]
    if not any(r.get("untouched_retention_edited_subjects") is not None for r in rows):
        # no probe fact of an edited subject: "never-edited subjects" is the total again, shown once
        drop = {"untouched_retention_other_subjects", "untouched_retention_edited_subjects",
                "untouched_retention_other_subjects_ci", "untouched_retention_edited_subjects_ci"}
        groups = [(cap, [c for c in cols if c[0] not in drop]) for cap, cols in groups]
    tables = []
    for caption, cols in groups:
        present = [c for c in cols if any(r.get(c[0]) is not None for r in rows)]
        if present:
            tables.append(Table(key + [Column(*c) for c in present], rows, caption))
    return tables


def write_report(out_dir: str | Path) -> Path:
    """``out_dir/report.html`` (and ``out_dir/plots/*.png``) from the run's saved files; returns its path."""
    from .provenance import read_command

    out_dir = Path(out_dir)
    runs = load_metrics(out_dir)
    run = _read_json(out_dir / "run.json")
    figures = {f.path.stem: f for f in render_plots(out_dir)}
    rows = final_table(runs)
    probe = run.get("probe") or {}
    params = read_command(out_dir).get("params", {})
    info = [("model", params.get("model")), ("methods", ", ".join(runs)),
            ("edits", run.get("edits") or max((r["n_edits"] for r in rows), default=0)),
            ("batch size", run.get("batch_size")), ("checkpoint every", run.get("eval_every")),
            ("block", run.get("block_size")), ("probe facts", probe.get("facts")), ("seed", run.get("seed"))]
    pick = lambda *names: [figures[n] for n in names if n in figures]  # noqa: E731
    hz_table = horizon_table(run_horizons(out_dir, runs))
    ab_table = ability_table(runs)
    sections = [
        Section("horizon", "Collapse horizon", tables=[hz_table] if hz_table else [], figures=pick("horizon")),
        Section("final", "Final figures", tables=_tables(rows),
                note="The last checkpoint of each method. Success is the CounterFact rule: mean-token NLL(new) < "
                     "NLL(true)."),
        Section("success", "Edit success", figures=pick("efficacy", "generalisation")),
        Section("knowledge", "Knowledge kept", figures=pick("knowledge")),
        Section("forgetting", "Forgetting", figures=pick("forgetting", "edit_probs")),
        Section("drift", "Weights and interference", figures=pick("drift", "interference")),
        Section("ability", "General ability", tables=[ab_table] if ab_table else [], figures=pick("ability"),
                note="Fixed probe items, the same at every checkpoint; perplexity and the edited layers' L1 norm "
                     "are under Weights."),
    ]
    sections = [s for s in sections if s.tables or s.figures]
    sources = ["metrics.jsonl"] + [f"{m}/edit_probs.jsonl" for m in runs if (out_dir / m / "edit_probs.jsonl").is_file()]
    sources += [n for n in ("run.json", "summary.json", "command.json") if (out_dir / n).is_file()]
    return render(Page("lifelong.html.j2", "Lifelong editing", "lifelong", out_dir, info, sections, sources))


__all__: Sequence[str] = ["write_report", "render_plots", "load_metrics", "final_table", "summary_rows",
                          "curves_figure", "forgetting_figure", "edit_probs_figure", "interference_figure",
                          "horizon_figure", "horizon_table", "run_horizons", "ability_table", "ability_quantities"]
