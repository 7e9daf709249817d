"""Tests for superedit.data: EditRequest, dataset loaders, sampling (fast, no torch)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

try:
    import superedit  # noqa: F401
except ImportError:  # running without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from superedit.data import (
    EditRequest,
    counterfactual_requests_from_facts,
    detect_format,
    load_requests,
    sample_requests,
    save_requests_jsonl,
)
from superedit.errors import RequestFormatError, SupereditError

from helpers import SHARED_DATA as DATA  # noqa: E402
CF = DATA / "counterfact_sample.json"
EE_CF = DATA / "easyedit_counterfact_sample.json"
EE_ZSRE = DATA / "easyedit_zsre_sample.json"

needs_samples = pytest.mark.skipif(not CF.exists(), reason=f"dataset samples not found under {DATA}")


def _write(path: Path, records, jsonl: bool = False) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def _assert_error(exc_info, *parts: str) -> None:
    msg = str(exc_info.value)
    for part in parts:
        assert part in msg, f"{part!r} not in error message: {msg}"


def _req(**kw) -> EditRequest:
    base = dict(prompt="{} is owned by", subject="Google Trends", target_new="Seoul", target_true="Google")
    base.update(kw)
    return EditRequest(**base)


# --------------------------------------------------------------------------- fixtures
ZSRE_MEND = [
    {
        "subject": "Watts Humphrey",
        "src": "What university did Watts Humphrey attend?",
        "pred": "Trinity College",
        "rephrase": "What university did Watts Humphrey take part in?",
        "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
        "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?",
    },
    {
        "subject": "Ramalinaceae",
        "src": "Which family does Ramalinaceae belong to?",
        "pred": "Lecanorales",
        "rephrase": "What family are Ramalinaceae?",
        "alt": "Lecideaceae",
        "answers": ["Lecanorales"],
        "loc": "nq question: types of skiing in the winter olympics 2018",
        "loc_ans": "Downhill",
        "cond": "Lecanorales >> Lecideaceae || Which family does Ramalinaceae belong to?",
    },
]

MQUAKE = [
    {
        "case_id": 1,
        "requested_rewrite": [
            {
                "prompt": "{} is a citizen of",
                "relation_id": "P27",
                "target_new": {"str": "Croatia", "id": "Q224"},
                "target_true": {"str": "United States of America", "id": "Q30"},
                "subject": "Ellie Kemper",
                "question": "What is the country of citizenship of Ellie Kemper?",
            },
            {
                "prompt": "The head of state of {} is",
                "relation_id": "P35",
                "target_new": {"str": "Andrej Plenković", "id": "Q1"},
                "target_true": {"str": "Kolinda Grabar-Kitarović", "id": "Q2"},
                "subject": "Croatia",
                "question": "Who is the head of state of Croatia?",
            },
        ],
        "questions": [
            "Who is the head of state of the country where Ellie Kemper holds citizenship?",
            "What is the name of the current head of state of Ellie Kemper's country?",
        ],
        "answer": "Joe Biden",
        "answer_alias": ["Biden"],
        "new_answer": "Andrej Plenković",
        "new_answer_alias": ["Plenković"],
        "single_hops": [],
        "new_single_hops": [],
    },
    {
        "case_id": 2,
        "requested_rewrite": [
            {
                "prompt": "{} was created by",
                "relation_id": "P170",
                "target_new": {"str": "Jim Henson", "id": "Q3"},
                "target_true": {"str": "Matt Groening", "id": "Q4"},
                "subject": "The Simpsons",
                "question": "Who created The Simpsons?",
            }
        ],
        "questions": ["Who is the spouse of the creator of The Simpsons?"],
        "answer": "Agnes",
        "answer_alias": [],
        "new_answer": "Jane Henson",
        "new_answer_alias": [],
        "single_hops": [],
        "new_single_hops": [],
    },
]


# --------------------------------------------------------------------------- EditRequest
def test_request_normalises_and_fills():
    r = _req(target_new="  Seoul ", neighborhood_prompts=["a by", "b by"], neighborhood_answers=["Google"])
    assert r.target_new == "Seoul"
    assert r.filled_prompt() == "Google Trends is owned by"
    assert r.neighborhood_answers == ["Google", "Google"]
    assert r.target_true == "Google"
    assert EditRequest(prompt="{}", subject="x", target_new="y", target_true="  ").target_true is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.subject = "other"  # type: ignore[misc]
    assert hash(r) == hash(_req(neighborhood_prompts=["a by", "b by"], neighborhood_answers=["Google"]))


def test_request_filled_prompt_ignores_other_braces():
    r = EditRequest(prompt="{} uses {x} and", subject="S", target_new="T")
    assert r.filled_prompt() == "S uses {x} and"


@pytest.mark.parametrize(
    "kw, fld",
    [
        (dict(prompt="Google Trends is owned by"), "prompt"),
        (dict(prompt="{} and {} are owned by"), "prompt"),
        (dict(subject="  "), "subject"),
        (dict(target_new=""), "target_new"),
        (dict(neighborhood_prompts=["a", "b", "c"], neighborhood_answers=["x", "y"]), "neighborhood_answers"),
        (dict(attribute_prompts=["a", "b"], attribute_answers=[]), "attribute_answers"),
        (dict(paraphrase_prompts=["ok", 3.5, {"bad": 1}]), "paraphrase_prompts[2]"),
    ],
)
def test_request_validation_errors(kw, fld):
    with pytest.raises(RequestFormatError) as ei:
        _req(source="my.json#7", **kw)
    _assert_error(ei, "my.json", "#7", f"'{fld}'")
    assert isinstance(ei.value, SupereditError)


def test_request_dict_round_trip():
    r = _req(paraphrase_prompts=["p"], case_id="c1", relation_id="P127", source="x.json#3", meta={"k": [1]})
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert EditRequest.from_dict(d) == r
    with pytest.raises(RequestFormatError) as ei:
        EditRequest.from_dict({**d, "bogus": 1})
    _assert_error(ei, "bogus")
    with pytest.raises(RequestFormatError) as ei:
        EditRequest.from_dict({k: v for k, v in d.items() if k != "subject"})
    _assert_error(ei, "'subject'", "missing")


# --------------------------------------------------------------------------- real samples
@needs_samples
def test_counterfact_sample():
    reqs = load_requests(CF)
    assert len(reqs) == 100
    r = reqs[0]
    assert (r.case_id, r.subject, r.prompt) == (19640, "Google Trends", "{} is owned by")
    assert (r.target_new, r.target_true, r.relation_id) == ("Seoul", "Google", "P127")
    assert r.filled_prompt() == "Google Trends is owned by"
    assert len(r.paraphrase_prompts) == 2 and r.paraphrase_prompts[0].endswith("Google Trends owner")
    assert len(r.neighborhood_prompts) == 10 and r.neighborhood_answers == ["Google"] * 10
    assert r.neighborhood_prompts[0] == "Cloud Datalab, by"
    assert len(r.attribute_prompts) == 10 and r.attribute_answers == ["Seoul"] * 10
    assert len(r.generation_prompts) == 10
    assert r.source.endswith("counterfact_sample.json#0")
    assert r.meta["pararel_idx"] == 17462
    last = reqs[-1]
    assert (last.case_id, last.subject, last.target_new, last.target_true) == (10443, "Portugal", "Rome", "Lisbon")
    assert last.prompt == "{}'s capital city,"
    assert all(q.prompt.count("{}") == 1 for q in reqs)


@needs_samples
def test_easyedit_counterfact_sample():
    reqs = load_requests(EE_CF)
    assert len(reqs) == 50
    r = reqs[0]
    assert (r.case_id, r.subject, r.prompt) == (3, "Apple A5", "{} was created by")
    assert (r.target_new, r.target_true) == ("Google", "Apple")
    assert len(r.paraphrase_prompts) == 3
    assert len(r.neighborhood_prompts) == 10 and r.neighborhood_answers == ["Apple"] * 10
    assert len(r.subject_rephrases) == 10 and r.subject_rephrases[0] == "A5 chip from Apple"
    # record 46 has one blank rephrase_prompt: it is skipped and recorded in meta
    raw = json.loads(EE_CF.read_text())[46]
    assert len(reqs[46].paraphrase_prompts) == len(raw["rephrase_prompt"]) - 1
    assert reqs[46].meta["dropped_blank"] == {"rephrase_prompt": [7]}
    for q, rec in zip(reqs, json.loads(EE_CF.read_text())):
        assert q.filled_prompt() == rec["prompt"].strip()


@needs_samples
def test_easyedit_zsre_sample():
    reqs = load_requests(EE_ZSRE)
    assert len(reqs) == 50
    r = reqs[0]
    assert (r.case_id, r.subject) == (108, "Farhad Piroutpour")
    assert r.prompt == "In what city was {} born in?"
    assert (r.target_new, r.target_true) == ("Tiraspol", "Tehran")
    assert r.paraphrase_prompts == []  # rephrase_prompt is null
    assert r.neighborhood_prompts == ["nq question: who is john snow on game of thrones"]
    assert r.neighborhood_answers == ["Kit Harington"]
    assert reqs[18].target_new == "species"  # stored as " species" in the file: stripped
    assert all(detect_format(rec) == "easyedit" for rec in json.loads(EE_ZSRE.read_text())[:3])


@needs_samples
def test_detect_format_real_samples():
    assert detect_format(json.loads(CF.read_text())[0]) == "counterfact"
    assert detect_format(json.loads(EE_CF.read_text())[0]) == "easyedit"


# --------------------------------------------------------------------------- fixture formats
def test_zsre_mend(tmp_path):
    path = _write(tmp_path / "zsre_eval.json", ZSRE_MEND)
    assert detect_format(ZSRE_MEND[0]) == "zsre"
    reqs = load_requests(path)
    assert len(reqs) == 2
    r = reqs[0]
    assert r.prompt == "What university did {} attend?"
    assert (r.subject, r.target_new, r.target_true) == (
        "Watts Humphrey", "University of Michigan", "Illinois Institute of Technology")
    assert r.paraphrase_prompts == ["What university did Watts Humphrey take part in?"]
    assert r.neighborhood_prompts == ["nq question: who played desmond doss father in hacksaw ridge"]
    assert r.neighborhood_answers == ["Hugo Weaving"]
    assert r.case_id == 0 and r.meta["pred"] == "Trinity College" and "cond" in r.meta
    # also as JSONL and with the explicit alias
    jl = _write(tmp_path / "zsre.jsonl", ZSRE_MEND, jsonl=True)
    assert load_requests(jl, fmt="mend") == [dataclasses.replace(q, source=q.source.replace(
        str(path), str(jl))) for q in reqs]


def test_mquake(tmp_path):
    path = _write(tmp_path / "MQuAKE-CF-3k.json", MQUAKE)
    assert detect_format(MQUAKE[0]) == "mquake"
    reqs = load_requests(path)
    assert len(reqs) == 3
    a, b, c = reqs
    assert (a.case_id, b.case_id, c.case_id) == ("1:0", "1:1", "2:0")
    assert a.meta["group_case_id"] == 1 and c.meta["group_case_id"] == 2
    assert (a.subject, a.target_new, a.target_true) == ("Ellie Kemper", "Croatia", "United States of America")
    assert b.prompt == "The head of state of {} is" and b.relation_id == "P35"
    assert a.paraphrase_prompts == ["What is the country of citizenship of Ellie Kemper?"]
    assert a.meta["new_answer"] == "Andrej Plenković" and len(a.meta["questions"]) == 2
    assert a.source == b.source == f"{path}#0" and c.source == f"{path}#1"
    assert len(load_requests(path, limit=2)) == 2


def test_counterfact_with_rewrite_list_is_counterfact(tmp_path):
    rec = {
        "case_id": 5,
        "requested_rewrite": [{"prompt": "{} plays", "subject": "X", "target_new": {"str": "piano"},
                               "target_true": {"str": "guitar"}}],
        "paraphrase_prompts": ["Q. X plays"],
        "neighborhood_prompts": ["Y plays"],
    }
    assert detect_format(rec) == "counterfact"
    (r,) = load_requests(_write(tmp_path / "cf.json", [rec]))
    assert r.case_id == "5:0" and r.paraphrase_prompts == ["Q. X plays"]
    assert r.neighborhood_answers == ["guitar"]


def test_easyedit_variants(tmp_path):
    recs = [
        {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
         "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux spoke",
         "locality_prompt": "The mother tongue of Thomas Joannes Stieltjes is", "locality_ground_truth": "Dutch"},
        {"prompt": "Q Q is Q", "subject": "Q", "target_new": ["A"], "ground_truth": ["B", "C"],
         "locality": {"Relation_Specificity": {"prompt": ["p1", "p2"], "ground_truth": ["g1", "g2"]}}},
    ]
    r1, r2 = load_requests(_write(tmp_path / "ee.json", recs))
    assert r1.prompt == "The mother tongue of {} is" and r1.target_true == "French"
    assert r1.paraphrase_prompts == ["Danielle Darrieux spoke"]
    assert r1.neighborhood_answers == ["Dutch"] and r1.case_id == 0
    assert r2.prompt == "{} Q is Q"  # first occurrence only
    assert (r2.target_new, r2.target_true) == ("A", "B")
    assert r2.neighborhood_prompts == ["p1", "p2"] and r2.neighborhood_answers == ["g1", "g2"]


# --------------------------------------------------------------------------- round trip / detection
@needs_samples
def test_jsonl_round_trip(tmp_path):
    reqs = load_requests(CF, limit=5) + load_requests(EE_ZSRE, limit=3)
    out = tmp_path / "sub" / "requests.jsonl"
    save_requests_jsonl(out, reqs)
    assert len(out.read_text().splitlines()) == 8
    assert detect_format(json.loads(out.read_text().splitlines()[0])) == "superedit"
    back = load_requests(out)
    assert back == reqs  # provenance (source) is preserved
    assert load_requests(out, fmt="superedit", limit=2) == reqs[:2]


def test_round_trip_without_samples(tmp_path):
    reqs = [_req(case_id=i, neighborhood_prompts=["n by"], neighborhood_answers=["Google"]) for i in range(3)]
    out = tmp_path / "r.jsonl"
    save_requests_jsonl(out, reqs)
    back = load_requests(out)
    # requests saved without provenance get the file position as their source
    assert back == [dataclasses.replace(r, source=f"{out}#{i}") for i, r in enumerate(reqs)]
    with pytest.raises(TypeError):
        save_requests_jsonl(out, [{"prompt": "x"}])


@needs_samples
def test_format_override(tmp_path):
    # a CounterFact file read as EasyEdit fails on the EasyEdit fields
    with pytest.raises(RequestFormatError) as ei:
        load_requests(CF, fmt="easyedit")
    _assert_error(ei, "counterfact_sample.json", "#0", "'prompt'")
    assert len(load_requests(CF, fmt="counterfact", limit=3)) == 3
    with pytest.raises(RequestFormatError) as ei:
        load_requests(CF, fmt="nonsense")
    _assert_error(ei, "nonsense", "counterfact")


def test_override_forces_format(tmp_path):
    # first record looks like EasyEdit but fmt="zsre" forces MEND field names
    path = _write(tmp_path / "z.json", [{"prompt": "A b", "subject": "A", "target_new": "c", "src": "A d?",
                                         "alt": "e"}])
    assert detect_format(json.loads(path.read_text())[0]) == "zsre"
    (r,) = load_requests(path, fmt="easyedit")
    assert r.prompt == "{} b" and r.target_new == "c"
    (r,) = load_requests(path, fmt="zsre")
    assert r.prompt == "{} d?" and r.target_new == "e"


def test_limit(tmp_path):
    recs = ZSRE_MEND * 5
    path = _write(tmp_path / "z.json", recs)
    assert len(load_requests(path)) == 10
    assert len(load_requests(path, limit=3)) == 3
    assert load_requests(path, limit=0) == []
    with pytest.raises(RequestFormatError):
        load_requests(path, limit=-1)
    # limit stops before a broken later record
    broken = _write(tmp_path / "b.json", ZSRE_MEND + [{"src": "x", "subject": "y"}])
    assert len(load_requests(broken, limit=2)) == 2


# --------------------------------------------------------------------------- broken inputs
def _cf_record(**rewrite):
    rr = {"prompt": "{} is owned by", "subject": "Google Trends", "relation_id": "P127",
          "target_new": {"str": "Seoul", "id": "Q1"}, "target_true": {"str": "Google", "id": "Q2"}}
    rr.update(rewrite)
    return {"case_id": 9, "requested_rewrite": {k: v for k, v in rr.items() if v is not None},
            "paraphrase_prompts": [], "neighborhood_prompts": ["X, by"], "attribute_prompts": [],
            "generation_prompts": []}


def test_broken_records(tmp_path):
    good = _cf_record()
    cases = [
        ("cf_nosubj.json", [good, good, _cf_record(subject=None)], "#2", "requested_rewrite.subject"),
        ("cf_notemplate.json", [good, _cf_record(prompt="Google Trends is owned by")], "#1",
         "requested_rewrite.prompt"),
        ("cf_two.json", [_cf_record(prompt="{} and {} own")], "#0", "requested_rewrite.prompt"),
        ("cf_emptytarget.json", [good, _cf_record(target_new={"str": " ", "id": "Q"})], "#1",
         "requested_rewrite.target_new"),
        ("ee_notin.json",
         [{"prompt": "Apple A5 was created by", "subject": "Apple A5", "target_new": "Google"},
          {"prompt": "Apple A6 was created by", "subject": "Apple A5", "target_new": "Google"}], "#1", "subject"),
        ("ee_mismatch.json",
         [{"prompt": "S is", "subject": "S", "target_new": "T", "locality_prompt": ["a", "b", "c"],
           "locality_ground_truth": ["x", "y"]}], "#0", "locality_ground_truth"),
        ("ee_nosubject.json", [{"prompt": "S is", "subject": "S", "target_new": "T"},
                               {"prompt": "S is", "target_new": "T", "subject": None}], "#1", "subject"),
        ("zsre_notin.json", [ZSRE_MEND[0], {**ZSRE_MEND[1], "subject": "Nope"}], "#1", "subject"),
        ("zsre_noalt.json", [{k: v for k, v in ZSRE_MEND[0].items() if k != "alt"}], "#0", "alt"),
    ]
    for name, recs, idx, fld in cases:
        with pytest.raises(RequestFormatError) as ei:
            load_requests(_write(tmp_path / name, recs))
        _assert_error(ei, name, idx, f"'{fld}'")


def test_broken_jsonl_and_superedit(tmp_path):
    good = _req().to_dict()
    bad = {**good, "neighborhood_prompts": ["a", "b", "c"], "neighborhood_answers": ["x", "y"]}
    path = _write(tmp_path / "mine.jsonl", [good, bad], jsonl=True)
    with pytest.raises(RequestFormatError) as ei:
        load_requests(path)
    _assert_error(ei, "mine.jsonl", "#1", "'neighborhood_answers'")
    # invalid JSON line
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(RequestFormatError) as ei:
        load_requests(path)
    _assert_error(ei, "mine.jsonl", "#1", "line 2")


def test_unknown_format_and_missing_file(tmp_path):
    path = _write(tmp_path / "weird.json", [{"foo": 1, "bar": 2}])
    with pytest.raises(RequestFormatError) as ei:
        load_requests(path)
    _assert_error(ei, "weird.json", "#0", "foo", "fmt=")
    with pytest.raises(RequestFormatError) as ei:
        load_requests(tmp_path / "nope.json")
    _assert_error(ei, "nope.json", "not found")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(RequestFormatError, match="no records"):
        load_requests(tmp_path / "empty.json")
    _write(tmp_path / "notdict.json", [["a"]])
    with pytest.raises(RequestFormatError) as ei:
        load_requests(tmp_path / "notdict.json", fmt="zsre")
    _assert_error(ei, "notdict.json", "#0")


def test_skip_invalid(tmp_path):
    path = _write(tmp_path / "z.json", [ZSRE_MEND[0], {**ZSRE_MEND[1], "subject": "Nope"}, ZSRE_MEND[1]])
    reqs = load_requests(path, skip_invalid=True)
    assert [r.source for r in reqs] == [f"{path}#0", f"{path}#2"]


# --------------------------------------------------------------------------- sampling
def test_sample_requests_deterministic():
    reqs = [_req(case_id=i) for i in range(50)]
    a = sample_requests(reqs, 10, seed=0)
    assert a == sample_requests(reqs, 10, seed=0)
    assert a != sample_requests(reqs, 10, seed=1)
    assert [r.case_id for r in a] == sorted(r.case_id for r in a)  # original order
    assert set(r.case_id for r in a) <= set(r.case_id for r in sample_requests(reqs, 20, seed=0))
    assert sample_requests(reqs, None, seed=0) == reqs
    assert len(sample_requests(reqs, 500, seed=0)) == 50
    assert sample_requests(reqs, 0, seed=0) == []
    with pytest.raises(ValueError):
        sample_requests(reqs, -1, seed=0)


def _facts():
    countries = ["France", "Spain", "Italy", "Germany", "Poland"]
    capitals = ["Paris", "Madrid", "Rome", "Berlin", "Warsaw"]
    facts = []
    for i, (c, cap) in enumerate(zip(countries, capitals)):
        facts.append({
            "subject": c, "relation": "capital", "template": "The capital of {} is",
            "object": cap, "paraphrase_templates": ["{}'s capital city is", "In {}, the capital is"],
            "neighbours": [(countries[(i + 1) % 5], capitals[(i + 1) % 5]),
                           [countries[(i + 2) % 5], capitals[(i + 2) % 5]]],
            "aliases": [f"the country {c}"],
        })
    langs = {"Anna": "French", "Ben": "French", "Carl": "German"}
    for s, o in langs.items():
        facts.append({"subject": s, "relation": "speaks", "template": "{} speaks", "object": o,
                      "paraphrase_templates": [], "neighbours": [], "aliases": []})
    facts.append({"subject": "Solo", "relation": "lonely", "template": "{} is", "object": "alone",
                  "paraphrase_templates": [], "neighbours": [], "aliases": []})
    return facts


def test_counterfactual_requests_from_facts():
    facts = _facts()
    a = counterfactual_requests_from_facts(facts, 5, seed=3)
    assert a == counterfactual_requests_from_facts(facts, 5, seed=3)
    assert len(a) == 5
    everything = counterfactual_requests_from_facts(facts, None, seed=3)
    assert len(everything) == 8  # "Solo" has no other object in its relation
    by_subject = {r.subject: r for r in everything}
    for r in a:  # target of a fact does not depend on n
        assert r == by_subject[r.subject]
    for seed in range(20):
        for r in counterfactual_requests_from_facts(facts, None, seed=seed):
            assert r.target_new != r.target_true
            fact = next(f for f in facts if f["subject"] == r.subject)
            same_rel = {f["object"] for f in facts if f["relation"] == fact["relation"]}
            assert r.target_new in same_rel
            assert r.target_true == fact["object"]
    fr = by_subject["France"]
    assert fr.prompt == "The capital of {} is" and fr.relation_id == "capital"
    assert fr.paraphrase_prompts == ["France's capital city is", "In France, the capital is"]
    assert fr.neighborhood_prompts == ["The capital of Spain is", "The capital of Italy is"]
    assert fr.neighborhood_answers == ["Madrid", "Rome"]
    assert fr.subject_rephrases == ["the country France"]
    assert all(ans == fr.target_new for ans in fr.attribute_answers)
    assert by_subject["Anna"].target_new == "German"  # only other object of 'speaks'
    targets = {seed: counterfactual_requests_from_facts(facts, None, seed=seed)[0].target_new for seed in range(10)}
    assert len(set(targets.values())) > 1  # the seed matters


def test_counterfactual_bad_fact():
    with pytest.raises(RequestFormatError) as ei:
        counterfactual_requests_from_facts([{"subject": "A", "relation": "r", "object": "o"}], 1, seed=0)
    _assert_error(ei, "facts, record #0", "'template'")
    with pytest.raises(ValueError):
        counterfactual_requests_from_facts(_facts()[-1:], 1, seed=0)
