"""The known-facts filter: each rule against its definition, the split, and the command."""

from __future__ import annotations

import json

import pytest

from helpers import SHARED_DATA, saved_tiny_model, tiny_adapter
from superedit.data import EditRequest
from superedit.data.known import judge_known, known_report, split_known
from superedit.errors import SupereditError
from superedit.eval.scoring import score_targets


def _requests():
    subjects = ["Anna Berg", "Toko Yasuda", "Apple", "Google", "Paris", "Danielle Darrieux"]
    out = [EditRequest(prompt="{} was born in", subject=s, target_new=new, target_true=true, case_id=i,
                       relation_id="P19" if i % 2 else "P27")
           for i, (s, new, true) in enumerate(zip(subjects, ["Oslo", "Japan", "France", "Bergen", "Paris", "guitar"],
                                                  ["Paris", "the", "Oslo", "words", "Apple", "French"]))]
    out.append(EditRequest(prompt="{} plays the", subject="Anna Berg", target_new="guitar", case_id=99))
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rules_match_their_definitions(family):
    a = tiny_adapter(family)
    reqs = _requests()
    top1 = judge_known(a, reqs, "top1")
    margin = judge_known(a, reqs, "margin", margin=0.5)
    for req, t, m in zip(reqs, top1, margin):
        if req.target_true is None:
            assert not t.known and not m.known and t.logprob_true is None
            continue
        s_true, s_new = score_targets(a, [req.filled_prompt()] * 2, [req.target_true, req.target_new])
        assert t.known == (s_true.argmax[0] == s_true.target_ids[0])
        assert m.known == (s_true.logprob - s_new.logprob >= 0.5)
        assert t.logprob_true == pytest.approx(s_true.logprob, abs=1e-5)
    rep = known_report(margin, "margin", 0.5)
    assert rep["n_records"] == len(reqs) and rep["n_known"] == sum(v.known for v in margin)
    assert sum(r["total"] for r in rep["per_relation"].values()) == len(reqs)


def test_bad_rule_and_margin_are_user_errors():
    a = tiny_adapter("gpt2")
    with pytest.raises(SupereditError, match="rule"):
        judge_known(a, _requests(), "best")
    with pytest.raises(SupereditError, match="margin"):
        judge_known(a, _requests(), "margin", margin=-1)


def test_split_is_seeded_disjoint_and_complete():
    items = list(range(50))
    tune, ev = split_known(items, 0.3, seed=4)
    assert len(tune) == 15 and sorted(tune + ev) == items and not set(tune) & set(ev)
    assert split_known(items, 0.3, seed=4) == (tune, ev)
    assert split_known(items, 0.3, seed=5) != (tune, ev)
    with pytest.raises(SupereditError, match="tune-fraction"):
        split_known(items, 1.0)


def test_known_command_writes_unchanged_records(tmp_path):
    from typer.testing import CliRunner

    from superedit.cli import app

    model_dir = saved_tiny_model(tmp_path / "m")
    src = SHARED_DATA / "counterfact_sample.json"
    if not src.is_file():
        pytest.skip(f"shared data missing: {src}")
    records = json.loads(src.read_text())[:12]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    res = CliRunner().invoke(app, ["data", "known", "--model", str(model_dir), "--requests", str(data), "--rule",
                                   "margin", "--margin", "0", "--out", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    known = json.loads((tmp_path / "out" / "known.json").read_text())
    tune = json.loads((tmp_path / "out" / "tune.json").read_text())
    ev = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert rep["n_known"] == len(known) and len(tune) + len(ev) == len(known)
    assert all(r in records for r in known)  # unchanged records of the input
    bad = CliRunner().invoke(app, ["data", "known", "--model", str(model_dir), "--requests", str(data), "--rule",
                                   "nope", "--out", str(tmp_path / "o2"), "--json"])
    assert bad.exit_code == 2 and "rule" in bad.stdout and not (tmp_path / "o2").exists()


def test_known_command_exclude_holds_out_a_probe_file(tmp_path):
    """--exclude FILE: no record with a subject and relation in FILE is judged or written."""
    from typer.testing import CliRunner

    from superedit.cli import app

    model_dir = saved_tiny_model(tmp_path / "m")
    records = json.loads((SHARED_DATA / "counterfact_sample.json").read_text())[:12]
    data, held = tmp_path / "cf.json", tmp_path / "held.json"
    data.write_text(json.dumps(records))
    held.write_text(json.dumps(records[:5]))
    res = CliRunner().invoke(app, ["data", "known", "--model", str(model_dir), "--requests", str(data), "--rule",
                                   "margin", "--margin", "0", "--exclude", str(held), "--tune-fraction", "0",
                                   "--out", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    known = json.loads((tmp_path / "out" / "known.json").read_text())
    assert rep["n_excluded"] == 5 and rep["n_records"] == 7
    assert all(r in records[5:] for r in known)
    judged = [json.loads(l)["case_id"] for l in (tmp_path / "out" / "verdicts.jsonl").read_text().splitlines()]
    assert judged == [r["case_id"] for r in records[5:]]
