"""General ability (eval/ability.py): choice items, builders, measure, lm-eval plumbing, lifelong checkpoints."""

import os
import sys
import types

import pytest

from helpers import CORPUS, corpus_cov, tiny_adapter
from superedit.data import EditRequest
from superedit.data.mqd import build_mqd, parse_atomic_line
from superedit.errors import UsageError
from superedit.eval.ability import (ChoiceItem, GeneralAbility, choice_accuracy, known_fact_questions,
                                    mqd_choice_items, object_pools, run_lm_eval, write_lm_eval_task)
from superedit.eval.scoring import perplexity, score_targets

FACTS = [{"prompt": f"{s} plays the", "target": o, "subject": s, "relation": "instrument"}
         for s, o in [("Anna Berg", "piano"), ("Toko Yasuda", "guitar"), ("Jon Moss", "violin"),
                      ("Eve Lang", "drums"), ("Ida Holm", "cello")]]
FACTS += [{"prompt": "Paris is the capital of", "target": "France", "subject": "Paris", "relation": "capital"},
          {"prompt": "Oslo is the capital of", "target": "Norway", "subject": "Oslo", "relation": "capital"}]

ATOMIC = [
    "PersonX bakes bread @@ xNeed\tto buy flour| to heat the oven",
    "PersonX goes swimming @@ xNeed\tto find a pool| to pack a towel",
    "PersonX writes a letter @@ xNeed\tto get paper| a pen",
    "PersonX calls a friend @@ xNeed\tget the phone",
    "PersonX wins the race @@ xReact\thappy| proud",
    "PersonX misses the bus @@ xReact\tannoyed| late",
    "PersonX finds a coin @@ xReact\tlucky",
    "PersonX breaks a glass @@ xReact\tsorry| clumsy",
]


@pytest.fixture(scope="module")
def adapter():
    return tiny_adapter("gpt2")


def _mqd():
    tuples = [parse_atomic_line(t, i + 1) for i, t in enumerate(ATOMIC)]
    return build_mqd(tuples, per_type=8, seed=0).requests


def test_known_fact_questions_hold_the_true_object_once_among_same_relation_distractors():
    pools = object_pools(FACTS)
    qs = known_fact_questions(FACTS, pools, seed=3)
    # the capital relation has only one other object: too few distractors, no question
    assert len(qs) == 5 and all("|instrument" in q.source for q in qs)
    for q, f in zip(qs, FACTS):
        assert len(q.choices) == 4 and len(set(q.choices)) == 4
        assert q.choices[q.answer] == f["target"] and q.choices.count(f["target"]) == 1
        assert set(q.choices) <= set(pools["instrument"])
        assert q.source == f"{f['subject']}|instrument"
    assert known_fact_questions(FACTS, pools, seed=3) == qs  # seeded
    assert known_fact_questions(FACTS, pools, n=2, seed=3) == qs[:2]


def test_choice_item_rejects_bad_answer_and_single_choice():
    with pytest.raises(UsageError, match="answer index 2"):
        ChoiceItem("p", ("a", "b"), 2)
    with pytest.raises(UsageError, match="at least 2 choices"):
        ChoiceItem("p", ("a",), 0)


def test_choice_accuracy_is_the_argmax_of_the_scorers_logprob_and_ignores_option_order(adapter):
    items = known_fact_questions(FACTS, object_pools(FACTS), seed=0)
    res = choice_accuracy(adapter, items, batch_size=3)
    expected = 0
    for it in items:  # one item at a time, straight from the scorer
        lp = [s.logprob for s in score_targets(adapter, [it.prompt] * len(it.choices), list(it.choices))]
        expected += int(max(range(len(lp)), key=lp.__getitem__) == it.answer)
    assert res["n"] == len(items) and res["chance"] == pytest.approx(0.25)
    assert res["accuracy"] == pytest.approx(expected / len(items))
    rolled = [ChoiceItem(it.prompt, it.choices[1:] + it.choices[:1], (it.answer - 1) % 4) for it in items]
    assert choice_accuracy(adapter, rolled)["accuracy"] == res["accuracy"]
    assert choice_accuracy(adapter, [])["n"] == 0


def test_mqd_items_answer_with_the_label_or_letter_and_skip_edited_tuples():
    reqs = _mqd()
    items = mqd_choice_items(reqs["tf"] + reqs["mc"] + reqs["dg"])
    assert len(items["mqd_tf"]) == len(reqs["tf"]) and len(items["mqd_mc"]) == len(reqs["mc"])
    for it, r in zip(items["mqd_tf"], reqs["tf"]):
        assert it.choices == ("yes", "no") and it.choices[it.answer] == r.meta["label"]
    for it, r in zip(items["mqd_mc"], reqs["mc"]):
        assert it.choices[it.answer] == "abcd"[r.meta["answer_index"]]
    edited = reqs["dg"][:2]  # editing a tuple's generation request removes its T/F and MC items
    kept = mqd_choice_items(reqs["tf"] + reqs["mc"], edited)
    gone = {(e.subject, e.relation_id) for e in edited}
    for name in ("mqd_tf", "mqd_mc"):
        assert all(tuple(it.source.split("|")) not in gone for it in kept[name])
        assert len(kept[name]) == len(items[name]) - sum(
            (r.subject, r.relation_id) in gone for r in reqs[name[-2:]])


def test_measure_reports_every_part_with_its_n_and_a_baseline_of_full_retention(adapter):
    # (MQD's long prompts do not fit the tiny model's 64 positions: their items are checked above)
    ab = GeneralAbility.build(texts=CORPUS[:5], facts=FACTS, fluency_tokens=6, n_fluency=3).baseline(adapter)
    res = ab.measure(adapter)
    assert set(res) == {"perplexity", "fluency", "known_retention", "known_mc"}
    assert res["perplexity"]["value"] == pytest.approx(perplexity(adapter, CORPUS[:5]))
    assert res["perplexity"]["n"] == 5 and res["fluency"]["n"] == 3
    assert res["known_retention"]["n_facts"] == len(FACTS)
    assert res["known_retention"]["n"] == sum(ab.base_hits)
    if ab.base_hits and any(ab.base_hits):  # the unedited model keeps everything it recalled
        assert res["known_retention"]["value"] == 1.0
    assert res["known_mc"]["n"] == 5 and res["known_mc"]["chance"] == 0.25
    # saved and loaded, the same items give the same figures (fluency: same seed, same samples)
    again = GeneralAbility.from_dict(ab.to_dict()).measure(adapter)
    assert again == res
    # retention is the share of the base model's hits still recalled (hits given: not measured again)
    ab.base_hits = [True, True, True, False, False, True, False]
    kept = ab.measure(adapter, known_hits=[True, False, True, True, False, False, False])["known_retention"]
    assert (kept["value"], kept["n"], kept["recall"]) == (0.5, 4, 3 / 7)


def test_base_hits_must_match_the_facts():
    with pytest.raises(UsageError, match="base_hits has 1 entries for 2 facts"):
        GeneralAbility(facts=FACTS[:2], base_hits=[True])


def test_lm_eval_missing_is_a_reported_skip(adapter, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as when it is not installed
    res = run_lm_eval(adapter, ["hellaswag", "arc_easy"])
    assert set(res) == {"hellaswag", "arc_easy"}
    assert all("not installed" in r["skipped"] for r in res.values())
    assert run_lm_eval(adapter, []) == {}


def test_lm_eval_runs_offline_on_the_in_memory_model_and_skips_unavailable_tasks(adapter, monkeypatch):
    seen = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size, device):
            seen["model"], seen["tokenizer"] = pretrained, tokenizer

    def simple_evaluate(model, tasks, limit, log_samples, bootstrap_iters, task_manager):
        seen.setdefault("offline", []).append(os.environ.get("HF_DATASETS_OFFLINE"))
        if tasks == ["missing"]:
            raise ConnectionError("Couldn't reach 'missing' on the Hub (offline mode is enabled)")
        return {"results": {tasks[0]: {"alias": tasks[0], "acc,none": 0.5, "acc_stderr,none": "N/A"}},
                "n-samples": {tasks[0]: {"original": 10, "effective": 4}}}

    pkg = types.ModuleType("lm_eval")
    pkg.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", pkg)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    res = run_lm_eval(adapter, ["piqa", "missing"], limit=4)
    assert seen["model"] is adapter.model and seen["tokenizer"] is adapter.tokenizer
    assert seen["offline"] == ["1", "1"] and "HF_DATASETS_OFFLINE" not in os.environ  # restored
    assert res["piqa"] == {"acc": 0.5, "n": 4}  # lm-eval's default filter ",none" dropped from the name
    assert "ConnectionError" in res["missing"]["skipped"]


def test_write_lm_eval_task_files_and_bad_names(tmp_path):
    import json

    items = known_fact_questions(FACTS, object_pools(FACTS), seed=0)
    yaml = write_lm_eval_task(items, tmp_path, "probe_known_mc")
    rows = [json.loads(line) for line in (tmp_path / "probe_known_mc.jsonl").read_text().splitlines()]
    assert [(r["prompt"], tuple(r["choices"]), r["answer"]) for r in rows] == [
        (c.prompt, tuple(x.strip() for x in c.choices), c.answer) for c in items]
    text = yaml.read_text()
    assert "task: probe_known_mc" in text and "output_type: multiple_choice" in text
    assert str((tmp_path / "probe_known_mc.jsonl").resolve()) in text
    for bad in ["", "Probe", "1probe", "pro-be", "a b"]:
        with pytest.raises(UsageError, match="task name"):
            write_lm_eval_task(items, tmp_path / "bad", bad)
    with pytest.raises(UsageError, match="no items"):
        write_lm_eval_task([], tmp_path / "bad", "empty")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_lm_eval_runs_a_local_task_and_agrees_with_superedits_choice_scorer(adapter, tmp_path):
    """The real lm-evaluation-harness (optional extra superedit[ability]) on a task written by
    write_lm_eval_task: offline, on the in-memory model; its acc is superedit's choice accuracy."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'superedit[ability]')")
    objects = ["piano", "guitar", "violin", "drums", "cello", "France", "Norway"]
    items = []
    for i, f in enumerate(FACTS * 2):  # the true object at every position in turn
        others = [o for o in objects if o != f["target"]][i % 3:][:3]
        items.append(ChoiceItem(f["prompt"], tuple(others[:i % 4] + [f["target"]] + others[i % 4:]), i % 4))
    write_lm_eval_task(items, tmp_path, "probe_known_mc")
    res = run_lm_eval(adapter, ["probe_known_mc", "no_such_task_here"], include_path=str(tmp_path), batch_size=4)
    ours = choice_accuracy(adapter, items, 4)
    assert res["probe_known_mc"]["n"] == len(items) == ours["n"]
    assert res["probe_known_mc"]["acc"] == pytest.approx(ours["accuracy"], abs=1e-12)
    assert "skipped" in res["no_such_task_here"]


def test_lifelong_checkpoints_record_ability_and_summary_has_horizons(tmp_path):
    from superedit.editing.hparams import ROMEHParams
    from superedit.lifelong.horizon import horizons
    from superedit.lifelong.runner import Probe, run_lifelong
    from superedit.utils.io import read_jsonl

    reqs = [EditRequest(prompt="{} plays the", subject=f["subject"], target_new="trumpet", target_true=f["target"],
                        relation_id="instrument", case_id=i) for i, f in enumerate(FACTS[:2])]
    probe_facts = [dict(f, template="{} plays the") for f in FACTS]
    ability = GeneralAbility.build(texts=CORPUS[:4], facts=probe_facts, fluency_tokens=4, n_fluency=2)
    probe = Probe(facts=probe_facts, texts=CORPUS[:4], ability=ability.to_dict(), max_neighbours=0)
    hp = ROMEHParams(layers=[1], v_num_grad_steps=3, n_prefixes=1, context_lengths=[3])
    stats = corpus_cov(tiny_adapter("gpt2"), [1])
    summary = run_lifelong(lambda: tiny_adapter("gpt2"), reqs, ["rome"], {"rome": hp}, stats, edits=2,
                           eval_every=1, out_dir=tmp_path / "run", probe=probe)
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["n_edits"] for r in recs] == [0, 1, 2]
    for r in recs:
        ab = r["ability"]
        # the two edited (subject, relation) tuples' questions are left out: 5 - 2 instrument questions
        assert ab["known_mc"]["n"] == 3
        assert ab["perplexity"]["value"] == r["perplexity"]
        assert ab["known_retention"]["value"] == r["untouched_retention"]
    assert summary["horizon"] == horizons(recs, 0.8)
    assert summary["methods"]["rome"]["ability_known_mc"] == recs[-1]["ability"]["known_mc"]["value"]


def test_requests_probe_asks_mqd_items_only_about_tuples_the_stream_never_edits():
    from superedit.lifelong.probe import requests_probe, restrict_ability

    reqs = _mqd()
    stream = reqs["dg"][:3]  # edits of three tuples' generation objective
    heldout = reqs["tf"] + reqs["mc"]
    probe = requests_probe(heldout, n=50)
    before = {k: len(v) for k, v in probe.ability["choices"].items()}
    assert before["mqd_tf"] == len(reqs["tf"]) and before["mqd_mc"] == len(reqs["mc"])
    restrict_ability(probe, stream)
    edited = {f"{r.subject}|{r.relation_id}" for r in stream}
    kept = probe.ability["choices"]
    assert not any(c["source"] in edited for items in kept.values() for c in items)
    assert sum(len(v) for v in kept.values()) < sum(before.values())  # some were about edited tuples
    for name, qtype in (("mqd_tf", "tf"), ("mqd_mc", "mc")):
        assert len(kept.get(name, [])) == sum(f"{r.subject}|{r.relation_id}" not in edited for r in reqs[qtype])
