"""Reports: rendered from saved files only (synthetic fixtures, no model), one template, escaped text,
every image present, legends outside the axes, whole-number ticks for counts, a run index."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from superedit.errors import FileFormatError
from superedit.report.plots import wilson

EVIL = "<script>alert('x')</script>"


class Tags(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if "id" in a}


def parse(path: Path) -> Tags:
    return Tags(path.read_text(encoding="utf-8"))


def assert_images_exist(page: Path, tags: Tags) -> list[Path]:
    imgs = [page.parent / a["src"] for a in tags.all("img")]
    assert imgs, f"{page} has no image"
    for img in imgs:
        assert not str(img).startswith("data:") and img.is_file() and img.stat().st_size > 0, img
    return imgs


def assert_nav_targets(tags: Tags) -> None:
    anchors = [a["href"][1:] for a in tags.all("a") if a.get("href", "").startswith("#")]
    assert anchors and set(anchors) <= tags.ids(), set(anchors) - tags.ids()


def legend_is_outside(fig) -> bool:
    """The figure legend's box lies right of every axes (drawn, in display pixels)."""
    fig.canvas.draw()
    legends = fig.legends or [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends, "figure has no legend"
    renderer = fig.canvas.get_renderer()
    box = legends[0].get_window_extent(renderer)
    return all(box.x0 >= ax.get_window_extent(renderer).x1 - 1 for ax in fig.axes if ax.get_label() != "<colorbar>")


def integer_xticks(ax) -> bool:
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


# ------------------------------------------------------------------------------------------ fixtures
def write_jsonl(path: Path, recs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")


def lifelong_dir(root: Path, checkpoints=(0, 2, 4, 6), edited_subject_facts: int = 0,
                 methods=("rome", "d4s")) -> Path:
    """A lifelong run folder as run_lifelong writes it (metrics, edit_probs, run.json, command.json)."""
    out = root / "lifelong"
    recs = []
    n_total = max(checkpoints)
    for i, m in enumerate(methods):
        prev = 0
        for n in checkpoints:
            eff = None if n == 0 else 1.0 - 0.1 * i * n / n_total
            blocks = [{"block": b, "start": 2 * b, "end": 2 * b + 2, "complete": True, "efficacy_at_edit": 1.0,
                       "efficacy_now": 1.0 - 0.5 * i, "forgetting": 0.5 * i} for b in range(n // 2)]
            rec = {"method": m, "n_edits": n, "final": n == n_total, "last_block": [prev, n],
                   "efficacy_all": eff, "efficacy_last_block": eff, "paraphrase_all": eff, "neighborhood_all": eff,
                   "score_all": eff, "forgetting_blocks": blocks,
                   "forgetting_mean": (0.5 * i if blocks else None), "untouched_recall": 0.8 - 0.05 * n,
                   "untouched_retention": 1.0 - 0.05 * n, "untouched_base_recall": 0.8, "untouched_n": 50,
                   "untouched_retention_other_subjects": 1.0 - 0.05 * n,
                   "untouched_n_other_subjects": 40 - edited_subject_facts,
                   "untouched_retention_edited_subjects": (0.5 if edited_subject_facts else None),
                   "untouched_n_edited_subjects": edited_subject_facts, "all_facts_recall": 0.9 - 0.02 * n,
                   "perplexity": 2.0 + 0.1 * n, "w_l1_rel_mean": 1.0 + 0.1 * n, "delta_fro_total": 3.0 * n,
                   "v_target_norm_last_block": 10.0 if n else None, "v_target_norm_all": 10.0 if n else None,
                   "edit_s": 0.5 * n}
            if m == "rome" and n:
                rec["interference"] = {"layer": 1, "n_edits": n,
                                       "o": {"meas_shift_mean": 1.0 * n, "pred_shift_mean": 1.0 * n,
                                             "rel_error": 1e-7, "top5_share": 0.9},
                                       "e": {"meas_shift_mean": 0.5 * n, "pred_shift_mean": 0.5 * n,
                                             "rel_error": 2e-7, "top5_share": 0.8}}
            if m != "rome" and n:  # a run that recorded the per-edit bootstrap interval (rome's did not)
                rec.update({"paraphrase_all_ci": [eff - 0.1, eff], "paraphrase_all_n": n,
                            "neighborhood_all_ci": [eff - 0.2, eff], "neighborhood_all_n": n})
            recs.append(rec)
            prev = n
        write_jsonl(out / m / "edit_probs.jsonl", [
            {"method": m, "n_edits": n, "prob_new_at_edit": [0.9] * n, "prob_new_now": [0.9 - 0.1 * i] * n}
            for n in checkpoints])
    write_jsonl(out / "metrics.jsonl", recs)
    (out / "run.json").write_text(json.dumps({"edits": n_total, "batch_size": 1, "eval_every": 2, "block_size": 2,
                                              "seed": 0, "methods": list(methods), "probe": {"facts": 50}}))
    (out / "command.json").write_text(json.dumps({"command": f"superedit lifelong --edits {n_total} --model {EVIL}",
                                                  "params": {"model": EVIL}}))
    return out


def superposition_dir(root: Path, layers=(0, 1), m: int = 6) -> Path:
    out = root / "superposition"
    (out / "matrices").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for l in layers:
        K = rng.normal(size=(m, 8))
        G = K @ K.T
        d = np.sqrt(np.diag(G))
        for name, M in (("P", G / np.diag(G)[:, None]), ("wcos", G / np.outer(d, d)), ("acos", G / np.outer(d, d)),
                        ("Q", G)):
            np.save(out / "matrices" / f"{name}_L{l}.npy", M)
    rows = [{"layer": l, "m": m, "mean": 0.01, "std": 0.1, "mean_abs": 0.05, "max_abs": 0.6, "kurtosis": 3.0 + l,
             "frac_abs_gt": 0.2, "threshold": 0.1, "angle_mode_whitening": 89.5, "angle_mode_activation": 70.5,
             "condition_number": 1.2e9} for l in layers]
    stats = {"model": {"source": "builtin", "family": "gpt2", "n_params": 1376896, "n_layers": 6, "d_mlp": 512},
             "config": {"seed": 0, "fact_token": "subject_last", "ridge": 0.0}, "m": m, "layers": rows,
             "m_convergence": {str(l): [{"m": 4, "kurtosis": 2.0}, {"m": m, "kurtosis": 3.0 + l}] for l in layers}}
    (out / "stats.json").write_text(json.dumps(stats))
    xs = np.linspace(-1, 1, 50)
    (out / "kde.json").write_text(json.dumps({str(l): {"x": xs.tolist(), "y": np.exp(-xs ** 2 * 20).tolist()}
                                              for l in layers}))
    item = {"prompt": f"{EVIL} was born in", "target_true": "Paris", "relation": "birthplace"}
    (out / "top_pairs.json").write_text(json.dumps([{"layer": 0, "rank": 1, "p": 0.6, "p_ji": 0.5,
                                                     "whitening_cos": 0.55, "item_i": item, "item_j": item}]))
    return out


def robust_dir(root: Path) -> Path:
    out = root / "robust"
    out.mkdir(parents=True)
    cell = lambda acc, n: {"acc": acc, "n": n, "edits": 4}  # noqa: E731
    settings = {s: {"success": cell(a, 4), "locality": cell(None if s == "pre" else 1.0, 0 if s == "pre" else 40),
                    "rephrase_ood": cell(a * 0.8, 8)} for s, a in (("pre", 0.0), ("rome", 0.5), ("rome+rep", 1.0))}
    table = {"n_requests": 4, "n_errors": 1, "settings": settings,
             "tau_sweep": [{"tau": t, "success": 1.0, "locality": t, "rephrase_ood": 1 - t} for t in (0.5, 0.9)],
             "skips": {"shuffle": {"only one variant": 4}}, "adaptor": {"loss_start": 1.0, "loss_end": -0.5},
             "errors": [{"index": 3, "case_id": EVIL, "error": "failed"}],
             "config": {"model": "builtin", "method": "rome", "layers": [0], "tau": 0.9, "seed": 0}}
    (out / "table.json").write_text(json.dumps(table))
    return out


def keys_dir(root: Path) -> Path:
    out = root / "keys"
    out.mkdir(parents=True)
    summ = {"n": 3, "mean": 0.5, "median": 0.5}
    geo = {"layer": 2, "n_requests": 2, "ridge": 0.0, "condition_number": 1e5,
           "same_subject": {"rephrase": {"cos": summ, "whiten": summ}},
           "random_pairs": {"cos": summ, "whiten": summ},
           "distributions": {"same": {"rephrase": {"cos": [0.5, 0.6, 0.7], "whiten": [5, 6, 7]}},
                             "random": {"cos": [0.0, 0.1, -0.1], "whiten": [0, 1, -1]}},
           "pca": {"subject": EVIL, "kinds": ["orig", "rephrase"], "labels": [EVIL, "Anna B."],
                   "coords": [[0, 0], [1, 1]]},
           "value_norms": [{"case_id": "a", "subject": "A", "kinds": ["orig", "rephrase"], "before": [1.0, 2.0],
                            "after": [3.0, 2.0]}]}
    (out / "geometry.json").write_text(json.dumps(geo))
    write_jsonl(out / "similar_keys.jsonl", [{"subject": EVIL, "rank": 1, "whitening_cos": 0.4, "whitening_sim": 3.0,
                                              "token": "x", "context": f"before {EVIL} after"}])
    return out


def assert_escaped(page: Path) -> None:
    raw = page.read_text(encoding="utf-8")
    assert EVIL not in raw and "&lt;script&gt;" in raw


# ------------------------------------------------------------------------------------------ tests
def test_wilson_interval_known_values():
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson(1.0, 5)
    assert hi == 1.0 and lo == pytest.approx(0.5655, abs=1e-3)
    assert wilson(0.3, 0) is None and wilson(None, 10) is None


def test_lifelong_report_from_saved_files(tmp_path):
    from superedit.report.lifelong_report import write_report

    out = lifelong_dir(tmp_path)
    page = write_report(out)
    tags = parse(page)
    assert {"final", "success", "knowledge", "forgetting", "drift"} <= tags.ids()
    imgs = {p.name for p in assert_images_exist(page, tags)}
    assert {"efficacy.png", "generalisation.png", "knowledge.png", "forgetting.png", "edit_probs.png", "drift.png",
            "interference.png"} <= imgs
    assert_nav_targets(tags)
    assert_escaped(page)  # the model name from command.json
    text = " ".join("".join(tags.text).split())
    assert "superedit lifelong --edits 6" in text and "rome" in text and "d4s" in text
    # every figure has a caption saying what to look for, not its alt text again
    captions = page.read_text().split("<figcaption>")[1:]
    alts = [a["alt"] for a in tags.all("img")]
    assert len(captions) == len(alts) and all(not c.startswith(alt) for c, alt in zip(captions, alts))
    # headers are never clipped: no nowrap on th in the page's CSS
    css = page.read_text().split("<style>")[1].split("</style>")[0]
    th_rule = css.split("\nth {", 1)[1].split("}", 1)[0]
    assert "white-space: normal" in th_rule and "overflow-x: auto" in css  # wide tables scroll, never clip


def test_lifelong_report_needs_metrics(tmp_path):
    from superedit.report.lifelong_report import write_report

    with pytest.raises(FileFormatError, match="metrics.jsonl.*superedit lifelong"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()
    write_jsonl(tmp_path / "metrics.jsonl", [{"n_edits": 2}])
    with pytest.raises(FileFormatError, match="record 1"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_lifelong_curves_read_at_a_glance(tmp_path):
    from superedit.report.lifelong_report import (CURVE_FIGURES, curves_figure, edit_probs_figure,
                                                  forgetting_figure, load_edit_probs, load_metrics)

    out = lifelong_dir(tmp_path)
    runs = load_metrics(out)
    spec = CURVE_FIGURES[0]
    fig = curves_figure(runs, spec.title, spec.quantities)
    assert legend_is_outside(fig)
    assert len(fig.legends[0].get_texts()) == len(runs)  # one entry per method, not per method × quantity
    for ax in fig.axes:
        assert integer_xticks(ax)
        lo, hi = ax.get_ylim()
        assert lo <= 0 and hi >= 1  # rates from 0 to 1
        assert ax.containers, "few checkpoints: error bars"
    many = lifelong_dir(tmp_path / "many", checkpoints=tuple(range(0, 32, 2)))
    fig = curves_figure(load_metrics(many), spec.title, spec.quantities)
    assert not fig.axes[0].containers and fig.axes[0].collections  # many checkpoints: a shaded band
    fig = forgetting_figure(runs)
    assert legend_is_outside(fig)
    labels = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert labels == ["1–2", "3–4", "5–6"]  # blocks by the edits they hold, whole numbers
    fig = edit_probs_figure(load_edit_probs(out, list(runs)))
    assert len(fig.axes) == len(runs) and legend_is_outside(fig) and integer_xticks(fig.axes[-1])
    for ax in fig.axes:
        assert ax.get_ylim()[0] <= 0 and ax.get_ylim()[1] >= 1


def test_lifelong_final_table_gives_every_share_its_n_and_interval(tmp_path):
    """Issue #13 item 5: a share in the report comes with its n and a 95% interval."""
    from superedit.report.lifelong_report import final_table, load_metrics, write_report
    from superedit.report.plots import wilson

    out = lifelong_dir(tmp_path, edited_subject_facts=5)
    row = final_table(load_metrics(out))[0]  # rome after 6 edits; last block 4 → 6
    assert row["efficacy_last_block_n"] == 2
    lo, hi = wilson(row["efficacy_last_block"], 2)
    assert row["efficacy_last_block_ci"] == f"{lo:.2f}–{hi:.2f}"
    assert row["untouched_retention_n"] == 40 and row["untouched_recall_n"] == 50
    for key in ("efficacy_ci", "untouched_retention_ci", "untouched_recall_ci",
                "untouched_retention_other_subjects_ci", "untouched_retention_edited_subjects_ci"):
        assert isinstance(row[key], str) and "–" in row[key], key
    assert row["paraphrase_all_ci"] is None  # runs saved before the per-edit interval was recorded: none shown
    other = final_table(load_metrics(out))[1]
    lo = other["paraphrase_all"] - 0.1
    assert other["paraphrase_all_ci"] == f"{lo:.2f}–{other['paraphrase_all']:.2f}"
    text = " ".join("".join(parse(write_report(out)).text).split())
    assert "paraphrase 95% interval" in text and "n, last block" in text and "n (facts recalled before)" in text and "n (probe facts)" in text


def test_efficacy_interval_of_a_re_edit_stream_counts_the_latest_edits_only():
    """On a --reedit-facts stream efficacy over all edits is a share of each fact's latest edit
    (``n_live``), so its interval is too: 999 of 1,000, not of the 10,000 edits made."""
    from superedit.report.lifelong_report import final_table
    from superedit.report.plots import wilson

    rec = {"method": "gated", "n_edits": 10000, "n_live": 1000, "efficacy_all": 0.999, "last_block": [9000, 10000]}
    row = final_table({"gated": [rec]})[0]
    lo, hi = wilson(0.999, 1000)
    assert row["efficacy_ci"] == f"{lo:.2f}–{hi:.2f}" == "0.99–1.00"
    plain = final_table({"rome": [{**rec, "n_live": None, "n_edits": 1000}]})[0]
    assert plain["efficacy_ci"] == row["efficacy_ci"]  # without re-edits every edit is scored


def test_no_never_edited_panel_when_the_stream_edits_every_subject():
    """A re-edit stream that edits every person leaves no never-edited subject after its first batch:
    that panel would hold one point at 0 edits, so it is left out; the edited-subjects panel stays."""
    from superedit.report.lifelong_report import knowledge_quantities

    recs = [{"n_edits": 0, "untouched_n_other_subjects": 176, "untouched_n_edited_subjects": 0},
            {"n_edits": 1000, "untouched_n_other_subjects": 0, "untouched_n_edited_subjects": 176}]
    keys = [q.key for q in knowledge_quantities({"gated": recs})]
    assert keys == ["untouched_retention", "untouched_retention_edited_subjects"]


def test_retention_split_only_when_it_differs_from_the_total(tmp_path):
    from superedit.report.lifelong_report import knowledge_quantities, load_metrics

    keys = [q.key for q in knowledge_quantities(load_metrics(lifelong_dir(tmp_path / "a")))]
    assert keys == ["untouched_retention", "all_facts_recall"]  # never-edited == total: drawn once
    keys = [q.key for q in knowledge_quantities(load_metrics(lifelong_dir(tmp_path / "b", edited_subject_facts=5)))]
    assert "untouched_retention_edited_subjects" in keys and "untouched_retention_other_subjects" in keys


def test_superposition_report_from_saved_files(tmp_path):
    from superedit.report.superposition_report import render_plots, write_report

    out = superposition_dir(tmp_path)
    render_plots(out)
    page = write_report(out)
    tags = parse(page)
    assert {"layers", "convergence", "pairs", "layer-0", "layer-1"} <= tags.ids()
    imgs = {p.name for p in assert_images_exist(page, tags)}
    assert {"kde_P.png", "kurtosis_by_layer.png", "m_convergence.png", "heatmap_L0.png", "angles_L1.png"} <= imgs
    assert_nav_targets(tags)
    assert_escaped(page)  # a prompt in the most-superposed pairs


def test_superposition_figures(tmp_path):
    from superedit.report.superposition_report import kde_figure, kurtosis_by_layer_figure, m_convergence_figure

    out = superposition_dir(tmp_path, layers=(0, 1, 2))
    stats = json.loads((out / "stats.json").read_text())
    assert integer_xticks(kurtosis_by_layer_figure(stats["layers"]).axes[0])
    assert legend_is_outside(kde_figure(json.loads((out / "kde.json").read_text())))
    fig = m_convergence_figure(stats["m_convergence"])
    assert legend_is_outside(fig) and list(fig.axes[0].get_xticks()) == [4, 6]


def test_scaling_report(tmp_path):
    from superedit.report.superposition_report import render_scaling

    rows = [{"model": m, "n_params": p, "n_layers": 2, "layer": l, "relative_depth": l / 1, "kurtosis": 2.0 + l,
             "mean_abs": 0.1, "std": 0.1, "frac_abs_gt": 0.1} for m, p in (("a", 1000), ("b", 5000)) for l in (0, 1)]
    (tmp_path / "scaling.json").write_text(json.dumps({
        "config": {"m": 8, "model_dirs": {"a": "models/a", EVIL: "models/b"}},
        "models": [{"model": "a", "n_params": 1000, "n_layers": 2}, {"model": "b", "n_params": 5000, "n_layers": 2}],
        "rows": rows}))
    png, page = render_scaling(tmp_path)
    tags = parse(page)
    assert_images_exist(page, tags)
    assert {"law", "models", "layers", "reports"} <= tags.ids()
    assert "models/a/report.html" in [a.get("href") for a in tags.all("a")]
    assert_escaped(page)


def test_robust_report_from_saved_files(tmp_path):
    from superedit.report.robust_report import metrics_figure, render_plots, write_report

    out = robust_dir(tmp_path)
    render_plots(out)
    page = write_report(out)
    tags = parse(page)
    assert {"accuracy", "tau", "adaptor", "skips", "errors"} <= tags.ids()
    assert {p.name for p in assert_images_exist(page, tags)} == {"metrics.png", "tau_sweep.png"}
    assert_escaped(page)  # a case id in the failed requests
    table = json.loads((out / "table.json").read_text())
    fig = metrics_figure(table["settings"])
    assert legend_is_outside(fig) and fig.axes[0].get_ylim()[0] <= 0 and fig.axes[0].get_ylim()[1] >= 1


def test_keys_report_from_saved_files(tmp_path):
    from superedit.report.keys_report import render_keys_plots, value_norm_figure, write_keys_report

    out = keys_dir(tmp_path)
    render_keys_plots(out)
    page = write_keys_report(out)
    tags = parse(page)
    assert {"similarity", "norms", "similar"} <= tags.ids()
    assert {p.name for p in assert_images_exist(page, tags)} == {"similarity_cos.png", "similarity_whiten.png",
                                                                 "pca_variants.png", "value_norms.png"}
    assert_escaped(page)
    geo = json.loads((out / "geometry.json").read_text())
    assert legend_is_outside(value_norm_figure(geo["value_norms"]))
    (out / "geometry.json").write_text(json.dumps({"layer": 1}))
    with pytest.raises(FileFormatError, match="distributions"):
        write_keys_report(out)


def test_index_links_every_stage(tmp_path):
    from superedit.report.index import find_stages, write_index
    from superedit.report.lifelong_report import write_report as lifelong_report
    from superedit.report.robust_report import render_plots, write_report as robust_report

    lifelong_report(lifelong_dir(tmp_path))
    rob = robust_dir(tmp_path)
    render_plots(rob)
    robust_report(rob)
    edit = tmp_path / "edit-rome"
    edit.mkdir()
    (edit / "summary.json").write_text(json.dumps({"post": {"efficacy_score": 0.75, "case": EVIL},
                                                   "post_ci": {"efficacy_score": [0.5, 1.0]},
                                                   "counts": {"efficacy_score": 4}}))
    write_jsonl(edit / "records.jsonl", [{}])
    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "trace.json").write_text(json.dumps({"summary": {"n_facts": 3}}))
    (trace / "trace_mlp.png").write_bytes((rob / "plots" / "metrics.png").read_bytes())
    (tmp_path / "demo.json").write_text(json.dumps({"stages": {"recall": {"train_recall": 0.97}}}))

    assert [s.path for s in find_stages(tmp_path)] == ["edit-rome", "lifelong", "robust", "trace"]
    page = write_index(tmp_path)
    tags = parse(page)
    hrefs = [a["href"] for a in tags.all("a") if not a["href"].startswith("#")]
    for h in hrefs:
        assert (tmp_path / h).is_file(), h
    assert {"lifelong/report.html", "robust/report.html", "edit-rome/summary.json", "trace/trace.json",
            "trace/trace_mlp.png"} <= set(hrefs)
    assert "lifelong/plots/efficacy.png" not in hrefs  # a stage with a report: its figures are in the report
    assert_nav_targets(tags)
    assert_escaped(page)
    assert "train_recall" in " ".join(tags.text) and "0.970" in " ".join(tags.text)
    assert "0.750 (n 4, 95% CI 0.50–1.00)" in " ".join(tags.text)  # an edit's rate with its n and interval


def test_command_line_records_non_default_options(tmp_path):
    import typer
    from typer.testing import CliRunner

    from superedit.report.provenance import read_command, record_command

    app = typer.Typer()

    @app.command()
    def run(n: int = typer.Option(3, "--n"), out: str = typer.Option(..., "--out"),
            flag: bool = typer.Option(True, "--flag/--no-flag")):
        record_command(out)

    @app.command()
    def other():
        pass

    res = CliRunner().invoke(app, ["run", "--out", str(tmp_path), "--no-flag"])
    assert res.exit_code == 0, res.output
    rec = read_command(tmp_path)
    assert rec["command"] == f"superedit run --out {tmp_path} --no-flag"  # --n left at its default
    assert rec["params"] == {"n": 3, "out": str(tmp_path), "flag": False}
    assert read_command(tmp_path / "nowhere") == {}


def test_page_numbers():
    from superedit.report.page import cell, fmt_num

    assert [fmt_num(v) for v in (None, math.nan, 3, 1376896, 0.12345, 123.456, 12345.6, 3.2e11, 4e-5)] == [
        "–", "–", "3", "1,376,896", "0.123", "123.5", "12,346", "3.2e+11", "4.00e-05"]
    assert cell(88.5, "deg") == "88.5" and cell(4.0, "int") == "4" and cell(EVIL, "text") == EVIL
