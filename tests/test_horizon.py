"""Collapse horizon (lifelong/horizon.py) on synthetic metrics.jsonl, and its figure/table in the report."""

import json

import pytest

from superedit.errors import UsageError
from superedit.lifelong.horizon import collapse_horizon, horizons, records_by_method


def rec(method, n, eff, ret):
    return {"method": method, "n_edits": n, "efficacy_all": eff, "untouched_retention": ret}


RECORDS = [
    # rome: efficacy falls below 0.8 at 30 (retention still fine)
    rec("rome", 0, None, 1.0), rec("rome", 10, 1.0, 0.95), rec("rome", 20, 0.9, 0.85), rec("rome", 30, 0.7, 0.82),
    rec("rome", 40, 0.5, 0.4),
    # memit: retention falls first, at 20
    rec("memit", 0, None, 1.0), rec("memit", 10, 0.95, 0.9), rec("memit", 20, 0.9, 0.79), rec("memit", 30, 0.85, 0.6),
    rec("memit", 40, 0.8, 0.5),
    # alphaedit: never below (0.8 exactly is not below)
    rec("alphaedit", 0, None, 1.0), rec("alphaedit", 20, 0.85, 0.8), rec("alphaedit", 40, 0.82, None),
]


def test_first_checkpoint_below_threshold_with_its_bracket():
    hz = horizons(RECORDS)
    assert hz["rome"] == {"reached": True, "n_edits": 30, "within": 40, "last_ok": 20, "metric": "efficacy_all",
                          "value": 0.7, "threshold": 0.8, "checkpoints": 5}
    assert (hz["memit"]["n_edits"], hz["memit"]["metric"], hz["memit"]["last_ok"]) == (20, "untouched_retention", 10)


def test_not_reached_within_the_run_is_a_reported_outcome():
    h = horizons(RECORDS)["alphaedit"]
    assert h["reached"] is False and h["n_edits"] is None and h["within"] == 40 and h["last_ok"] == 40


def test_threshold_order_and_missing_values():
    shuffled = list(reversed(RECORDS))
    assert horizons(shuffled) == horizons(RECORDS)
    # a higher bar ends earlier; a missing value (None, NaN) is never a crossing
    assert horizons(RECORDS, 0.96)["rome"]["n_edits"] == 10
    assert collapse_horizon([rec("x", 0, None, None), rec("x", 5, float("nan"), None)])["reached"] is False
    # both below at once: the first of the keys is named
    assert collapse_horizon([rec("x", 5, 0.1, 0.1)])["metric"] == "efficacy_all"
    assert collapse_horizon([rec("x", 5, 0.1, 0.9)], keys=("untouched_retention",))["reached"] is False
    with pytest.raises(UsageError, match=r"threshold must be in \(0, 1\]"):
        collapse_horizon(RECORDS[:2], threshold=0.0)
    with pytest.raises(UsageError, match="no checkpoint records"):
        collapse_horizon([])


def test_a_checkpoint_recorded_twice_counts_once_the_last_wins():
    recs = [rec("m", 10, 0.5, 1.0), rec("m", 10, 0.9, 1.0), rec("m", 20, 0.9, 1.0)]
    assert records_by_method(recs)["m"][0]["efficacy_all"] == 0.9
    assert horizons(recs)["m"]["reached"] is False


def _run_dir(tmp_path, threshold=None):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    if threshold is not None:
        (out / "summary.json").write_text(json.dumps({"horizon_threshold": threshold}))
    return out


def test_report_draws_solid_and_hatched_bars_and_a_table(tmp_path):
    from superedit.report.lifelong_report import horizon_figure, horizon_table, run_horizons, write_report

    out = _run_dir(tmp_path)
    hz = run_horizons(out)
    assert hz == horizons(RECORDS)
    fig = horizon_figure(hz)
    bars = [p for p in fig.axes[0].patches]
    assert [round(b.get_width()) for b in bars] == [30, 20, 40]
    assert [bool(b.get_hatch()) for b in bars] == [False, False, True]  # "> N": hatched
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[2] == "> 40 (not reached)" and texts[0].startswith("30 (efficacy 0.70")
    table = horizon_table(hz)
    assert [r["horizon"] for r in table.rows] == ["30", "20", "> 40"]
    assert [r["bracket"] for r in table.rows] == ["20 → 30", "10 → 20", "–"]
    assert horizon_figure({}) is None and horizon_table({}) is None
    html = write_report(out).read_text()
    assert "Collapse horizon" in html and "&gt; 40" in html and (out / "plots" / "horizon.png").is_file()


def test_report_reads_the_runs_threshold(tmp_path):
    from superedit.report.lifelong_report import run_horizons

    hz = run_horizons(_run_dir(tmp_path, threshold=0.5))
    assert hz["rome"]["n_edits"] == 40 and hz["memit"]["reached"] is False
    assert {h["threshold"] for h in hz.values()} == {0.5}
