"""The Multi-Question Dataset builder (ATOMIC -> true/false, multiple-choice, direct-generation requests)
and the editing-objective perplexity."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from superedit.cli import app
from superedit.data import load_requests
from superedit.data.mqd import (FILE_NAMES, LETTERS, QUESTION_TYPES, AtomicFormatError, build_mqd, clean_tail,
                                read_atomic, write_mqd)
from superedit.data.mqd_templates import RELATION_QUESTIONS
from superedit.errors import SupereditError, UsageError

from helpers import SHARED_DATA, tiny_adapter

ATOMIC = SHARED_DATA / "atomic2020_sample.tsv"
needs_atomic = pytest.mark.skipif(not ATOMIC.is_file(), reason=f"shared ATOMIC sample missing: {ATOMIC}")

#: a small ATOMIC-format file: 3 relations, enough other heads for every question type
SMALL = "\n".join([
    "PersonX calls PersonY ambulance @@ xNeed\tget the phone| none| to see PersonY is hurt.",
    "PersonX bakes bread @@ xNeed\tto buy flour| to heat the oven",
    "PersonX goes swimming @@ xNeed\tto find a pool| to pack a towel",
    "PersonX writes a letter @@ xNeed\tto get paper| a pen",
    "PersonX loses the game @@ xNeed\tnone",
    "PersonX wins the race @@ xReact\thappy| proud",
    "PersonX misses the bus @@ xReact\tannoyed| late",
    "PersonX finds a coin @@ xReact\tlucky",
    "PersonX breaks a glass @@ xReact\tsorry| Clumsy",
    "",
    "hammer @@ ObjectUse\tdrive nails| break a window",
    "spoon @@ ObjectUse\tstir soup",
    "umbrella @@ ObjectUse\tstay dry| block the sun",
    "pillow @@ ObjectUse\tsleep on| throw at a friend",
]) + "\n"


def _tails_by_key(tuples) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for t in tuples:
        out.setdefault((t.head.lower(), t.relation), set()).update(x.lower() for x in t.tails)
    return out


@pytest.fixture(scope="module")
def shared():
    if not ATOMIC.is_file():
        pytest.skip(f"shared ATOMIC sample missing: {ATOMIC}")
    tuples = read_atomic(ATOMIC)
    return tuples, build_mqd(tuples, seed=0, source_name=ATOMIC.name)


@pytest.fixture()
def small_file(tmp_path):
    path = tmp_path / "atomic_small.tsv"
    path.write_text(SMALL, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ parsing
def test_templates_have_one_subject_slot_for_every_atomic2020_relation():
    assert len(RELATION_QUESTIONS) == 23
    for rel, q in RELATION_QUESTIONS.items():
        assert q.question.count("{}") == 1, rel


def test_clean_tail_drops_none_and_trailing_full_stop():
    assert clean_tail("  to see   PersonY is hurt. ") == "to see PersonY is hurt"
    assert clean_tail("none") is None and clean_tail(" NONE ") is None and clean_tail("  ") is None
    assert clean_tail("a {} b") is None
    assert clean_tail("wait...") == "wait..."


def test_read_atomic_parses_heads_relations_and_tails(small_file):
    tuples = read_atomic(small_file)
    assert len(tuples) == 13  # the blank line is skipped
    first = tuples[0]
    assert (first.line, first.head, first.relation) == (1, "PersonX calls PersonY ambulance", "xNeed")
    assert first.tails == ("get the phone", "to see PersonY is hurt")
    assert tuples[4].tails == ()  # only "none"
    assert tuples[-1].line == 14


@pytest.mark.parametrize("line, words", [
    ("PersonX eats @@ xNeed get food", ["found 1", "tab-separated"]),
    ("PersonX eats xNeed\tget food", ["'@@'"]),
    ("PersonX eats @@ xNeed @@ xWant\tget food", ["'@@'"]),
    (" @@ xNeed\tget food", ["head", "empty"]),
    ("PersonX eats @@ \tget food", ["relation", "empty"]),
    ("PersonX eats @@ xHungry\tget food", ["unknown relation 'xHungry'", "mqd_templates.py"]),
    ("PersonX eats {} @@ xNeed\tget food", ["'{}'"]),
    ("PersonX eats @@ xNeed\tget food\textra", ["found 3"]),
])
def test_malformed_lines_raise_an_error_naming_file_and_line(tmp_path, line, words):
    path = tmp_path / "bad.tsv"
    path.write_text(SMALL.splitlines()[0] + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(AtomicFormatError) as exc:
        read_atomic(path)
    msg = str(exc.value)
    assert isinstance(exc.value, SupereditError)
    assert f"{path}, line 3" in msg
    for w in words:
        assert w in msg


def test_missing_or_empty_file_is_a_clear_error(tmp_path):
    with pytest.raises(AtomicFormatError, match="no such file"):
        read_atomic(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_text("\n\n", encoding="utf-8")
    with pytest.raises(AtomicFormatError, match="holds no tuples"):
        read_atomic(tmp_path / "empty.tsv")


def test_per_type_must_be_positive(small_file):
    with pytest.raises(UsageError, match="--per-type"):
        build_mqd(read_atomic(small_file), per_type=0)


# ------------------------------------------------------------------------------------------ building
def test_small_file_builds_every_type_with_checked_objectives(small_file):
    tuples = read_atomic(small_file)
    truth = _tails_by_key(tuples)
    ds = build_mqd(tuples, per_type=100, seed=3, source_name="small")
    # 12 tuples with a tail; every relation has other heads, so nothing is skipped
    assert {q: len(ds.requests[q]) for q in QUESTION_TYPES} == {"tf": 12, "mc": 12, "dg": 12}
    for r in ds.requests["dg"]:
        assert r.target_new.lower() in truth[(r.subject.lower(), r.relation_id)]
        assert r.target_true.lower() not in truth[(r.subject.lower(), r.relation_id)]
        assert r.filled_prompt().startswith("Question: ") and r.filled_prompt().endswith("Answer:")
        assert r.subject in r.filled_prompt()


def test_relation_without_other_heads_is_skipped_for_tf_and_mc_only(tmp_path):
    path = tmp_path / "one.tsv"
    path.write_text(SMALL + "terrorist @@ Desires\tviolence\n", encoding="utf-8")
    ds = build_mqd(read_atomic(path), seed=0)
    assert [r.relation_id for r in ds.requests["dg"]].count("Desires") == 1
    desires = next(r for r in ds.requests["dg"] if r.relation_id == "Desires")
    assert desires.target_new == "violence" and desires.target_true is None
    for q in ("tf", "mc"):
        assert "Desires" not in {r.relation_id for r in ds.requests[q]}
        assert ds.report["types"][q]["skipped_too_few_distractors"] == 1


@needs_atomic
def test_shared_sample_gives_at_least_1000_requests_per_type(shared):
    _, ds = shared
    for q in QUESTION_TYPES:
        assert len(ds.requests[q]) >= 1000
        assert ds.report["types"][q]["n"] == len(ds.requests[q])
        assert sum(ds.report["types"][q]["per_relation"].values()) == len(ds.requests[q])
        assert len({r.case_id for r in ds.requests[q]}) == len(ds.requests[q])
    # every relation of the sample's usable tuples reaches direct generation
    assert len(ds.report["types"]["dg"]["per_relation"]) == 23


@needs_atomic
def test_true_false_is_balanced_and_labels_match_the_shown_tail(shared):
    tuples, ds = shared
    truth = _tails_by_key(tuples)
    tf = ds.requests["tf"]
    yes = [r for r in tf if r.target_new == "yes"]
    no = [r for r in tf if r.target_new == "no"]
    assert len(yes) + len(no) == len(tf) and abs(len(yes) - len(no)) <= 1
    for rel, (n_yes, n_no) in ds.report["types"]["tf"]["yes_no_per_relation"].items():
        assert abs(n_yes - n_no) <= 1, rel
    for r in tf:
        own = truth[(r.subject.lower(), r.relation_id)]
        shown = r.meta["shown_tail"]
        assert f"Proposed answer: {shown}." in r.prompt
        assert (shown.lower() in own) == (r.target_new == "yes")
        assert r.target_true == ("no" if r.target_new == "yes" else "yes")


@needs_atomic
def test_multiple_choice_holds_the_answer_once_and_the_letter_points_at_it(shared):
    tuples, ds = shared
    truth = _tails_by_key(tuples)
    for r in ds.requests["mc"]:
        options = r.meta["options"]
        own = truth[(r.subject.lower(), r.relation_id)]
        assert len(options) == 4 and len({o.lower() for o in options}) == 4
        assert sum(o.lower() in own for o in options) == 1
        assert options.count(r.meta["true_tail"]) == 1
        assert options[LETTERS.index(r.target_new)] == r.meta["true_tail"]
        assert r.target_true in LETTERS and r.target_true != r.target_new
        for letter, option in zip(LETTERS, options):
            assert f"({letter}) {option}" in r.prompt
    letters = ds.report["types"]["mc"]["objectives"]
    assert set(letters) == set(LETTERS) and min(letters.values()) > 0.2 * len(ds.requests["mc"])


@needs_atomic
def test_every_request_round_trips_through_save_and_load(shared, tmp_path):
    _, ds = shared
    report = write_mqd(ds, tmp_path, atomic_path=ATOMIC)
    for q in QUESTION_TYPES:
        loaded = load_requests(tmp_path / FILE_NAMES[q])
        assert [r.to_dict() for r in loaded] == [r.to_dict() for r in ds.requests[q]]
    everything = load_requests(tmp_path / report["files"]["all"])
    assert len(everything) == sum(len(ds.requests[q]) for q in QUESTION_TYPES)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["types"]["tf"]["n"] == len(ds.requests["tf"]) and len(saved["atomic_sha256"]) == 64


def test_same_seed_same_files_other_seed_other_files(small_file, tmp_path):
    tuples = read_atomic(small_file)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_mqd(build_mqd(tuples, seed=seed, source_name="small"), tmp_path / name)
    for q in QUESTION_TYPES:
        a, b, c = ((tmp_path / d / FILE_NAMES[q]).read_bytes() for d in "abc")
        assert a == b
    assert any((tmp_path / "a" / FILE_NAMES[q]).read_bytes() != (tmp_path / "c" / FILE_NAMES[q]).read_bytes()
               for q in QUESTION_TYPES)


@needs_atomic
def test_shared_sample_is_deterministic_per_seed(shared):
    tuples, ds = shared
    again = build_mqd(tuples, seed=0, source_name=ATOMIC.name)
    other = build_mqd(tuples, seed=1, source_name=ATOMIC.name)
    for q in QUESTION_TYPES:
        assert [r.to_dict() for r in again.requests[q]] == [r.to_dict() for r in ds.requests[q]]
        assert [r.to_dict() for r in other.requests[q]] != [r.to_dict() for r in ds.requests[q]]


def test_mqd_command_writes_files_and_counts(small_file, tmp_path):
    out = tmp_path / "mqd"
    res = CliRunner().invoke(app, ["data", "mqd", "--atomic", str(small_file), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["requests"] == {"tf": 12, "mc": 12, "dg": 12}
    assert result["tf_yes_no"] == [6, 6]
    for q in QUESTION_TYPES:
        assert len(load_requests(out / FILE_NAMES[q])) == 12


def test_mqd_command_bad_line_exits_2_without_output(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("PersonX eats @@ xHungry\tfood\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["data", "mqd", "--atomic", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "line 1" in res.output and "xHungry" in res.output
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ perplexity
def test_objective_ppl_is_exp_mean_nll_of_score_targets(small_file):
    from superedit.eval.objective import objective_perplexities, summarize_perplexities
    from superedit.eval.scoring import score_targets

    adapter = tiny_adapter("gpt2")
    ds = build_mqd(read_atomic(small_file), seed=0)
    tok = adapter.tokenizer  # the tiny model has 128 positions: keep the rows that fit
    reqs = [r for q in QUESTION_TYPES for r in ds.requests[q]
            if len(tok(r.filled_prompt() + " " + r.target_new)["input_ids"]) <= 128]
    assert {r.meta["question_type"] for r in reqs} >= {"tf", "dg"}
    rows = objective_perplexities(adapter, reqs, batch_size=5)
    scores = score_targets(adapter, [r.filled_prompt() for r in reqs], [r.target_new for r in reqs])
    assert len(rows) == len(reqs)
    for row, req, s in zip(rows, reqs, scores):
        assert row.question_type == req.meta["question_type"] and row.objective == req.target_new
        assert row.n_tokens == len(s.logprobs)
        assert row.ppl == pytest.approx(math.exp(-sum(s.logprobs) / len(s.logprobs)), rel=1e-4)
        assert row.ppl >= 1.0
    summary = summarize_perplexities(rows)
    assert set(summary) == {r.meta["question_type"] for r in reqs}
    for q, s in summary.items():
        vals = sorted(r.ppl for r in rows if r.question_type == q)
        assert s["n"] == len(vals) and s["mean"] == pytest.approx(sum(vals) / len(vals))
        assert s["min"] <= s["q25"] <= s["median"] <= s["q75"] <= s["max"]
        mid = len(vals) // 2
        assert s["median"] == pytest.approx(vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2)
        assert s["mean_log_ppl"] == pytest.approx(sum(math.log(v) for v in vals) / len(vals))


def test_objective_ppl_command_on_the_testbed(small_file, tmp_path):
    mqd_dir = tmp_path / "mqd"
    write_mqd(build_mqd(read_atomic(small_file), seed=0), mqd_dir)
    out = tmp_path / "ppl"
    res = CliRunner().invoke(app, ["data", "objective-ppl", "--model", "builtin", "--requests",
                                   str(mqd_dir / "mqd.jsonl"), "--per-type", "4", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert {q: result["per_type"][q]["n"] for q in QUESTION_TYPES} == {"tf": 4, "mc": 4, "dg": 4}
    rows = [json.loads(line) for line in (out / "objective_ppl.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["ppl"] == pytest.approx(math.exp(r["nll"])) for r in rows)
    assert (out / "ppl_hist.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["per_type_summary"]["tf"]["n"] == 4
