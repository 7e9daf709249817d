"""The derived counterfactual stream (`superedit data derive`): every derived request states a fact its
source file states, one request per (subject, relation), new targets from the relation's own objects,
sides disjoint by subject, deterministic, and bad input refused with nothing written."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from helpers import SHARED_DATA
from superedit.cli import app
from superedit.data import load_requests
from superedit.data.derive import derive_stream
from superedit.errors import RequestFormatError

SAMPLE = SHARED_DATA / "counterfact_sample.json"


def _records():
    return json.loads(SAMPLE.read_text())


def _key(rec):
    rw = rec["requested_rewrite"]
    return rw["subject"], rw["relation_id"]


def test_derived_requests_restate_their_source_prompts_with_the_prompts_answer():
    records = _records()
    res = derive_stream(records, seed=0)
    by_case = {str(r["case_id"]): r for r in records}
    derived = [r for r in res.eval_records if "derived_from" in r]
    facts = {_key(r): r["requested_rewrite"]["target_true"]["str"] for r in res.eval_records}
    assert len(derived) > 2 * len(records)  # the point: many more requests than rewrites
    objects = {}
    for r in records:
        rw = r["requested_rewrite"]
        objects.setdefault(rw["relation_id"], set()).update({rw["target_true"]["str"], rw["target_new"]["str"]})
    for rec in derived:
        rw, src = rec["requested_rewrite"], rec["derived_from"]
        source = by_case[src["case_id"]]
        srw = source["requested_rewrite"]
        assert rw["prompt"].replace("{}", rw["subject"]) == src["prompt"]  # the template re-fills the prompt
        key = "neighborhood_prompts" if src["kind"] == "neighbourhood" else "attribute_prompts"
        assert src["prompt"] in source[key]
        answer = srw["target_true"]["str"] if src["kind"] == "neighbourhood" else srw["target_new"]["str"]
        assert rw["target_true"]["str"] == answer
        assert rw["relation_id"] == srw["relation_id"]
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        assert rw["target_new"]["str"] in objects[rw["relation_id"]]
        assert all(rw["subject"] in p for p in rec["paraphrase_prompts"])
        own = {src["prompt"], *rec["paraphrase_prompts"]}
        assert own.isdisjoint(rec["neighborhood_prompts"])  # neighbours are other subjects' prompts
        subs = rec["neighborhood_subjects"]
        assert len(subs) == len(set(subs)) == len(rec["neighborhood_prompts"]) and rw["subject"] not in subs
        assert all(s in p for s, p in zip(subs, rec["neighborhood_prompts"]))
        # each neighbour is a fact of the same relation with the same answer, read from the file
        assert all(facts.get((s, rw["relation_id"])) in (None, rw["target_true"]["str"]) for s in subs)


def test_one_request_per_subject_and_relation_and_the_rewrites_kept_unchanged():
    records = _records()
    res = derive_stream(records, seed=0)
    keys = [_key(r) for r in res.eval_records]
    assert len(keys) == len(set(keys))
    rewrites = [r for r in res.eval_records if "derived_from" not in r]
    assert rewrites == [r for r in records if _key(r) in set(map(_key, rewrites))]
    rep = res.report
    assert rep["n_eval"] == len(res.eval_records) and rep["n_tune"] == 0
    assert sum(rep["per_kind"].values()) == len(res.eval_records)


def test_tuning_side_is_disjoint_by_subject(tmp_path):
    records = _records()
    tune_ids = [r["case_id"] for r in records[:30]]
    res = derive_stream(records, seed=0, tune_case_ids=tune_ids)
    ev = {r["requested_rewrite"]["subject"] for r in res.eval_records}
    tu = {r["requested_rewrite"]["subject"] for r in res.tune_records}
    assert ev and tu and not ev & tu
    tune_rewrites = {r["requested_rewrite"]["subject"] for r in records[:30]}
    assert tune_rewrites <= tu


def test_deterministic_and_independent_of_record_order():
    records = _records()
    a = derive_stream(records, seed=0)
    b = derive_stream(records, seed=0)
    assert a.eval_records == b.eval_records
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    c = derive_stream(shuffled, seed=0)
    per_key = {_key(r): r["requested_rewrite"]["target_new"]["str"] for r in a.eval_records}
    per_key_c = {_key(r): r["requested_rewrite"]["target_new"]["str"] for r in c.eval_records}
    common = set(per_key) & set(per_key_c)
    assert len(common) > 0.9 * len(per_key)  # which duplicate is kept may move; the fact's request does not
    assert all(per_key[k] == per_key_c[k] for k in common)
    d = derive_stream(records, seed=1)
    assert [r["requested_rewrite"]["target_new"] for r in d.eval_records] != \
        [r["requested_rewrite"]["target_new"] for r in a.eval_records]


def test_a_rewrite_is_kept_when_a_derived_prompt_contradicts_it():
    rec = {"case_id": 1, "requested_rewrite": {"prompt": "{} is owned by", "relation_id": "P127", "subject": "Acme",
                                               "target_true": {"str": "Google"}, "target_new": {"str": "Apple"}},
           "neighborhood_prompts": ["Widget is owned by", "Gadget is owned by"],
           "attribute_prompts": ["Acme is owned by", "Gizmo is owned by"]}  # says Acme → Apple
    res = derive_stream([rec])
    assert res.eval_records[0] == rec
    keys = [_key(r) for r in res.eval_records]
    assert keys.count(("Acme", "P127")) == 1 and ("Widget", "P127") in keys and ("Gizmo", "P127") in keys
    assert res.report["dropped"] == {"a rewrite's own subject and relation": 1}


def test_neighbours_the_stream_edits_are_not_scored():
    from superedit.data import EditRequest
    from superedit.lifelong.runner import unedited_neighbours

    def req(subject, neighbours=None):
        meta = {"neighborhood_subjects": neighbours} if neighbours is not None else {}
        return EditRequest(prompt="{} is owned by", subject=subject, target_new="Apple", target_true="Google",
                           relation_id="P127", neighborhood_prompts=[f"{n} is owned by" for n in neighbours or []],
                           neighborhood_answers=["Google"] * len(neighbours or []), meta=meta)

    a, b, c = req("A", ["B", "X", "C"]), req("B", ["A", "Y"]), req("C")
    out = unedited_neighbours([a, b, c], [a, b, c])
    assert out[0].neighborhood_prompts == ["X is owned by"] and out[0].meta["neighborhood_subjects"] == ["X"]
    assert out[1].neighborhood_prompts == ["Y is owned by"] and out[1].neighborhood_answers == ["Google"]
    assert out[2] is c
    other = EditRequest(prompt="{} speaks", subject="X", target_new="French", target_true="English",
                        relation_id="P37")  # X edited under another relation: its P127 answer still holds
    assert unedited_neighbours([a], [a, other])[0].neighborhood_prompts == ["B is owned by", "X is owned by",
                                                                             "C is owned by"]


def test_malformed_records_are_refused():
    with pytest.raises(RequestFormatError, match="record 0"):
        derive_stream([{"case_id": 1, "requested_rewrite": {"prompt": "no slot", "subject": "x"}}])
    with pytest.raises(RequestFormatError, match="list"):
        derive_stream([{"case_id": 1, "requested_rewrite": [{}]}])
    with pytest.raises(RequestFormatError, match="relation_id"):
        derive_stream([{"case_id": 1, "requested_rewrite": {"prompt": "{} is", "subject": "x",
                                                             "target_true": {"str": "a"}, "target_new": {"str": "b"}}}])
    with pytest.raises(RequestFormatError, match="target_new"):
        derive_stream([{"case_id": 1, "requested_rewrite": {"prompt": "{} is", "subject": "x", "relation_id": "P1",
                                                             "target_true": {"str": "a"}}}])


def test_cli_writes_both_sides_that_load_and_refuses_a_foreign_tuning_file(tmp_path):
    records = _records()
    tune = tmp_path / "tune_in.json"
    tune.write_text(json.dumps(records[:20]))
    out = tmp_path / "derived"
    res = CliRunner().invoke(app, ["data", "derive", "--requests", str(SAMPLE), "--tune", str(tune),
                                   "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    ev, tu = load_requests(str(out / "eval.json")), load_requests(str(out / "tune.json"))
    assert len(ev) == summary["n_eval"] > len(records) and len(tu) == summary["n_tune"] > 0
    assert all(r.target_new != r.target_true and r.subject in r.filled_prompt() for r in ev + tu)
    assert json.loads((out / "report.json").read_text())["tune"] == str(tune)

    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps([{**records[0], "case_id": "not-in-file"}]))
    bad = tmp_path / "bad"
    res = CliRunner().invoke(app, ["data", "derive", "--requests", str(SAMPLE), "--tune", str(foreign),
                                   "--out", str(bad)])
    assert res.exit_code == 2 and "not-in-file" in res.output
    assert not bad.exists()
