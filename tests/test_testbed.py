"""Testbed: deterministic world, held-out text, micro build, builtin resolution, dataset worlds."""

from __future__ import annotations

import json
import random

import pytest

from superedit.errors import SupereditError
from superedit.testbed.world import World

from helpers import SHARED_DATA as DATA  # noqa: E402


def test_world_deterministic_and_seed_dependent():
    a, b, c = World.generate(0, 200), World.generate(0, 200), World.generate(1, 200)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    assert [s.name for s in a.subjects] != [s.name for s in c.subjects]
    # a smaller world of the same seed is a prefix of the larger one
    small = World.generate(0, 50)
    assert [s.to_dict() for s in small.subjects] == [s.to_dict() for s in a.subjects[:50]]
    # round trip
    assert World.from_dict(json.loads(json.dumps(a.to_dict()))).to_dict() == a.to_dict()
    # same seed, same training documents
    assert a.training_documents(random.Random(3)) == b.training_documents(random.Random(3))


def test_world_structure():
    w = World.generate(0, 300)
    assert len(w.relations) >= 8
    firsts = {s.first for s in w.subjects}
    lasts = {s.last for s in w.subjects}
    assert len(firsts) <= 40 and len(lasts) <= 40
    # neither name part alone identifies a subject
    assert max(sum(s.first == f for s in w.subjects) for f in firsts) > 1
    assert min(sum(s.last == l for s in w.subjects) for l in lasts) > 1
    assert len({s.name for s in w.subjects}) == len(w.subjects)
    for r in w.relations:
        assert r.heldout_templates and len(r.train_templates) >= 2
        assert all(t.count("{}") == 1 and not t.endswith(" ") for t in r.train_templates + r.heldout_templates)
        assert not set(r.train_templates) & set(r.heldout_templates)
    s = w.subjects[0]
    for rid, obj in s.facts.items():
        nb = w.neighbours(s.name, rid)
        assert s.name not in nb and all(w.subject(n).facts[rid] == obj for n in nb)
    assert len(s.aliases) >= 3 and w.filler
    assert w.prompts("train") and w.prompts("heldout")


def test_heldout_templates_and_aliases_not_in_training_text():
    w = World.generate(0, 150)
    text = "\n".join(list(w.corpus(n_passes=2)) + list(w.corpus(n_passes=1, seed=1, record_prob=1.0)))
    for r in w.relations:
        for t in r.heldout_templates:
            for s in w.subjects:
                assert t.format(s.name) not in text
            for pron in ("She", "He", "Her", "His"):  # nor with a pronoun for the subject
                assert t.replace("{}'s", pron).replace("{}", pron) not in text
    for s in w.subjects:
        for a in s.aliases:
            assert a not in text, a


def test_dataset_worlds_parse_both_formats():
    cf = World.from_dataset_file(DATA / "counterfact_sample.json")
    assert len(cf.subjects) >= 50 and cf.relations
    s = cf.subjects[0]
    assert s.facts and all("{}" in t for r in cf.relations for t in r.train_templates)
    held = cf.prompts("heldout")
    assert held and all(p.prompt for p in held)
    train_text = "\n".join(cf.corpus(n_passes=1))
    assert held[0].prompt not in train_text

    ee = World.from_dataset_file(DATA / "easyedit_counterfact_sample.json")
    assert len(ee.subjects) >= 20
    n_loc = sum(len(r["locality_prompt"]) for r in json.loads((DATA / "easyedit_counterfact_sample.json").read_text()))
    assert len([st for st in ee.statements if st.split == "train"]) < 0.5 * n_loc  # most became facts
    assert any(s.aliases for s in ee.subjects)
    assert ee.prompts("train") and ee.prompts("heldout")
    rec = json.loads((DATA / "easyedit_counterfact_sample.json").read_text())[0]
    subj = ee.subject(rec["subject"])
    assert rec["target_true"] in subj.facts.values()
    # round trip through JSON
    assert World.from_dict(json.loads(json.dumps(ee.to_dict()))).to_dict() == ee.to_dict()


def test_counterfact_neighbourhood_prompts_become_facts_of_their_subjects():
    """CounterFact's neighbourhood/attribute prompts are read as relation templates + subject."""
    records = json.loads((DATA / "counterfact_sample.json").read_text())
    cf = World.from_dataset_file(DATA / "counterfact_sample.json")
    n_other = sum(len(r["neighborhood_prompts"]) + len(r["attribute_prompts"]) for r in records)
    literal = [st for st in cf.statements if st.split == "train"]
    assert len(literal) < 0.05 * n_other  # nearly all were recognised
    rec = records[0]
    rw = rec["requested_rewrite"]
    facts = {(s.name, rid): obj for s in cf.subjects for rid, obj in s.facts.items()}
    for prompt in rec["neighborhood_prompts"]:
        hits = [(s, t) for r in cf.relations if r.id == rw["relation_id"] for t in r.train_templates
                for s in [n for n, rid in facts if rid == r.id] if t.format(s) == prompt]
        if hits:  # this prompt is the fact (subject, relation) -> the record's true object
            assert facts[(hits[0][0], rw["relation_id"])] == rw["target_true"]["str"]
    # every induced template keeps the relation's fixed text around one subject slot
    assert all(t.count("{}") == 1 and t.replace("{}", "").strip() for r in cf.relations for t in r.train_templates)


def test_every_new_object_is_an_answer_of_its_relation():
    """Each (relation, target_new) pair that no fact of the file covers gets synthetic anchor
    subjects, so the world's model knows the new object as an answer of that relation."""
    recs = json.loads((DATA / "easyedit_counterfact_sample.json").read_text())
    ee = World.from_dataset_file(DATA / "easyedit_counterfact_sample.json")
    by_name = {s.name: s for s in ee.subjects}
    real = {r["subject"] for r in recs}
    for r in recs:
        (rid, _), = by_name[r["subject"]].facts.items()
        owners = [s.name for s in ee.subjects if s.facts.get(rid) == r["target_new"]]
        assert owners, (r["subject"], r["target_new"])
    anchors = [s for s in ee.subjects if s.name not in real and s.first]
    assert anchors and all(len(s.facts) == 1 and not s.aliases for s in anchors)
    # anchor names share no word with any dataset subject or alias (no false bottleneck matches)
    words = {w for s in ee.subjects if s not in anchors for n in [s.name, *s.aliases] for w in n.split()}
    assert not any(set(s.name.split()) & words for s in anchors)
    # the CounterFact sample needs none: its attribute prompts already name subjects of every new object
    cf = World.from_dataset_file(DATA / "counterfact_sample.json")
    assert not [s for s in cf.subjects if s.first]
    # deterministic per seed
    assert World.from_dataset_file(DATA / "easyedit_counterfact_sample.json").to_dict() == ee.to_dict()


def test_new_object_without_a_relation_gets_mentions(tmp_path):
    """A record whose prompt has no template (subject not in it) has no relation to anchor its new
    object in; the object still appears in subject-free mention sentences, never evaluated."""
    import random

    p = tmp_path / "ee.json"
    p.write_text(json.dumps([
        {"subject": "Quux", "prompt": "The gadget was made by", "target_new": "Zorblatt", "target_true": "Acme"},
        {"subject": "Foo Bar", "prompt": "Foo Bar was made by", "target_new": "Acme", "target_true": "Initech"},
    ]))
    w = World.from_dataset_file(p)
    mentions = [st for st in w.statements if st.kind == "mention"]
    assert {st.target for st in mentions} == {"Zorblatt"}
    assert all(not st.subject and not st.relation for st in mentions)
    assert " Zorblatt." in " ".join(w.training_documents(random.Random(0)))
    assert not any(pr.prompt in {st.prompt for st in mentions} for pr in w.prompts("train"))
    # the templated record's new object got anchor subjects of its relation
    assert any(s.facts.get("{} was made by") == "Acme" for s in w.subjects if s.name != "Foo Bar")


def test_induced_templates_need_support():
    from superedit.testbed.world import induce_templates

    templates = {"P1": {"{} is owned by"}}
    prompts = [("P1", "Gmail is owned by"), ("P1", "Gmail, by"), ("P1", "Maps, by"), ("P1", "Maps Studio is new")]
    parsed = induce_templates(templates, prompts, {"Maps"})
    assert parsed[("P1", "Gmail, by")] == ("Gmail", "{}, by")  # learned from two prompts
    assert ("P1", "Maps Studio is new") not in parsed  # one prompt is not enough evidence
    assert templates["P1"] == {"{} is owned by", "{}, by"}


def test_bad_dataset_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(SupereditError, match="bad.json"):
        World.from_dataset_file(p)


def test_unknown_size_error(monkeypatch, tmp_path):
    from superedit.testbed import build_testbed, resolve_builtin

    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path))
    with pytest.raises(SupereditError, match="micro.*small"):
        resolve_builtin("builtin:huge")
    with pytest.raises(SupereditError, match="valid sizes"):
        build_testbed("huge", tmp_path / "x")


def test_micro_testbed_builds_and_recalls(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from superedit.eval.scoring import fact_recall
    from superedit.models import ModelAdapter
    from superedit.testbed import load_world, read_testbed_meta, resolve_builtin

    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path))
    d = resolve_builtin("builtin:micro")
    assert d == tmp_path / "testbeds" / "micro-0"
    for f in ("config.json", "model.safetensors", "testbed.json", "tokenizer.json"):
        assert (d / f).exists()
    assert resolve_builtin("builtin:micro") == d  # cached, no rebuild
    meta = read_testbed_meta(d)
    assert meta["size"] == "micro" and "superedit testbed build" in meta["build_command"]
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    w = load_world(d)
    ps = w.prompts("train")
    hits = fact_recall(ModelAdapter(model, tok), [p.prompt for p in ps], [p.target for p in ps])
    rate = sum(hits) / len(hits)
    assert 0.0 <= rate <= 1.0
    # chance: always answering a relation's most frequent object
    from collections import Counter

    majority = sum(Counter(s.facts[r.id] for s in w.subjects).most_common(1)[0][1]
                   for r in w.relations) / len(w.facts())
    assert rate > majority + 0.2, (rate, majority)
    assert abs(rate - meta["figures"]["recall"]) < 0.05


def test_builtin_default_is_shipped_and_loads():
    import torch
    from transformers import AutoModelForCausalLM

    from superedit.testbed import DEFAULT_SIZE, SHIPPED_DIR, read_testbed_meta, resolve_builtin

    d = resolve_builtin("builtin")
    assert d == SHIPPED_DIR
    assert resolve_builtin(f"builtin:{DEFAULT_SIZE}") == SHIPPED_DIR
    total = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    assert total <= 10 * 1024 * 1024
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    meta = read_testbed_meta(d)
    assert meta["size"] == DEFAULT_SIZE
    assert meta["figures"]["recall"] >= 0.9


def test_relations_sharing_a_template_are_merged():
    from superedit.testbed.world import _merge_relations

    canon = _merge_relations({"a": {"{} by", "{} made"}, "b": {"{} made", "{} built"}, "c": {"{} built"},
                              "d": {"{} sings"}})
    assert canon == {"a": "a", "b": "a", "c": "a", "d": "d"}


def test_wide_world_has_distinct_people_with_two_facts_each():
    """The 'wide' size: invented surnames (one per person, none shared) and 2 relations per person."""
    from superedit.testbed.build import make_world
    from superedit.testbed.world import LAST_NAMES, invented_surnames

    w = make_world("wide")
    assert len(w.subjects) == 1300 and all(len(s.facts) == 2 for s in w.subjects)
    lasts = [s.last for s in w.subjects]
    assert len(set(lasts)) == len(lasts) and not set(lasts) & set(LAST_NAMES)
    assert invented_surnames(50, seed=1) == invented_surnames(50, seed=1) != invented_surnames(50, seed=2)
    # the relations drawn differ between people, and every relation is used
    assert len({tuple(sorted(s.facts)) for s in w.subjects}) > 20
    assert {rid for s in w.subjects for rid in s.facts} == {r.id for r in w.relations}
    # the shared world of the other sizes is unchanged by these options
    small = make_world("small")
    assert len(small.subjects) == 150 and all(len(s.facts) == len(small.relations) for s in small.subjects)


def test_wide_testbed_uses_the_small_hparams_profile(tmp_path):
    """wide shares small's architecture, so its packaged hparams profile is testbed-small (not the
    dataclass defaults, which are GPT-2 XL's)."""
    from superedit.commands.common import hparams_profile

    for size, want in (("wide", "testbed-small"), ("base", "testbed-base"), ("small", "testbed-small")):
        d = tmp_path / size
        d.mkdir()
        (d / "testbed.json").write_text(json.dumps({"format": "superedit-testbed/1", "size": size}))
        assert hparams_profile(None, d) == want


def test_same_build_command_gives_bit_identical_weights(tmp_path):
    """Same size, seed and thread count (tests run on 1 thread) → the same weights, bit for bit."""
    import torch
    from safetensors.torch import load_file

    from superedit.testbed.build import build_testbed

    a = build_testbed("micro", tmp_path / "a", seed=3, epochs=2)
    b = build_testbed("micro", tmp_path / "b", seed=3, epochs=2)
    c = build_testbed("micro", tmp_path / "c", seed=4, epochs=2)
    wa, wb, wc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if wa[k].shape == wc[k].shape)
