"""A long counterfactual stream with real-world subjects, derived from a CounterFact file.

A CounterFact record names one rewrite (subject, relation, true object → new object) and lists two
kinds of prompts about *other* subjects of the same relation: neighbourhood prompts, whose answer is
the record's true object ("Cloud Datalab, by" → Google), and attribute prompts, whose answer is the
record's new object. Each such prompt is a true fact of its own subject, but only the rewrite prompt
marks where the subject is. :func:`~superedit.testbed.world.induce_templates` (the reading the
CounterFact testbed is built from) recovers the subject and the relation's template; every fact read
this way becomes a request of its own:

- prompt: the recovered template, subject: the recovered subject, target_true: the prompt's answer;
- target_new: another object of the same relation, drawn with a seed from the objects the file names
  for that relation (keyed by subject and relation, so a request does not depend on file order);
- paraphrase prompts: the relation's other templates filled with the subject (clean ParaRel
  templates, unlike CounterFact's own paraphrases, which start with an unrelated sentence);
- neighbourhood prompts: one prompt each of up to 10 other subjects of the same relation and true
  object, with those subjects in ``neighborhood_subjects``. Most of them are requests of the stream
  themselves; a lifelong run scores only the neighbours whose subject (with that relation) it never
  edits (:func:`superedit.lifelong.runner.unedited_neighbours`), since an edited neighbour's old
  answer is no longer a test of specificity.

The file's own rewrites are kept as they are (records need ``relation_id``). One request per
(subject, relation): a derived fact read with two different answers is dropped (the file contradicts
itself), and so is a derived fact about a rewrite's own subject and relation. Whether the model *knows* each fact is a separate step
(``superedit data known``), as for any dataset file.

Tuning and evaluation stay disjoint by subject: with ``tune_case_ids`` the rewrites of those records
are the tuning side's, and so is every fact about their subjects or about a subject that only those
records mention; all other facts are the evaluation side's. No subject occurs on both sides.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..errors import RequestFormatError

__all__ = ["DerivedStream", "derive_stream"]

MAX_PARAPHRASES = 2
MAX_NEIGHBOURS = 10


@dataclass
class DerivedStream:
    """The derived requests (CounterFact records) of each side and what was read, kept and dropped."""

    eval_records: list[dict] = field(default_factory=list)
    tune_records: list[dict] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def _str(x: Any) -> str:
    return str(x.get("str", "")) if isinstance(x, dict) else ("" if x is None else str(x))


def _rewrite(rec: dict, i: int, source: str) -> dict:
    rw = rec.get("requested_rewrite")
    if isinstance(rw, list):
        raise RequestFormatError(f"{source}: record {i}: requested_rewrite is a list (MQuAKE-style); "
                                 "derive a stream from single-rewrite CounterFact records")
    if not isinstance(rw, dict) or "{}" not in str(rw.get("prompt", "")) or not rw.get("subject"):
        raise RequestFormatError(f"{source}: record {i}: requested_rewrite needs a 'prompt' containing '{{}}' "
                                 "and a 'subject' (CounterFact format)")
    if not _str(rw.get("target_true")) or not _str(rw.get("target_new")):
        raise RequestFormatError(f"{source}: record {i}: requested_rewrite needs target_true.str and target_new.str")
    return rw


def derive_stream(records: Sequence[dict], seed: int = 0, tune_case_ids: Iterable = (),
                  source: str = "records") -> DerivedStream:
    """Every fact CounterFact ``records`` state about any subject, as requests (module doc).

    Returns the records of both sides in a fixed order (the file's rewrites first, then derived facts in
    file order) and a report: counts per kind, per relation, prompts read and not read, and every drop
    with its reason."""
    from ..testbed.world import induce_templates

    tune_ids = {str(c) for c in tune_case_ids}
    templates: dict[str, set[str]] = defaultdict(set)
    subjects: set[str] = set()
    objects: dict[str, dict[str, Any]] = defaultdict(dict)  # relation -> object str -> id (or None)
    facts: list[dict] = []  # one per fact read, in file order
    prompts: list[tuple[str, str]] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise RequestFormatError(f"{source}: record {i} is a {type(rec).__name__}, not an object")
        rw = _rewrite(rec, i, source)
        if not rw.get("relation_id"):
            raise RequestFormatError(f"{source}: record {i}: requested_rewrite.relation_id is missing; derive needs "
                                     "it to group facts by relation (one request per subject and relation)")
        rid = str(rw["relation_id"])
        case = str(rec.get("case_id", i))
        side = "tune" if case in tune_ids else "eval"
        templates[rid].add(rw["prompt"])
        subjects.add(rw["subject"])
        for key in ("target_true", "target_new"):
            objects[rid].setdefault(_str(rw[key]), rw[key].get("id") if isinstance(rw[key], dict) else None)
        facts.append({"kind": "rewrite", "case": case, "side": side, "relation": rid, "record": rec})
        for kind, key, obj in (("neighbourhood", "neighborhood_prompts", _str(rw["target_true"])),
                               ("attribute", "attribute_prompts", _str(rw["target_new"]))):
            for p in rec.get(key) or []:
                p = _str(p)
                if p:
                    prompts.append((rid, p))
                    facts.append({"kind": kind, "case": case, "side": side, "relation": rid, "prompt": p,
                                  "object": obj})
    parsed = induce_templates(templates, prompts, subjects)

    dropped: Counter = Counter()
    # (subject, relation) -> set of answers read anywhere, and the sides it occurs on
    answers: dict[tuple[str, str], set[str]] = defaultdict(set)
    rewrite_keys: set[tuple[str, str]] = set()
    for f in facts:
        if f["kind"] == "rewrite":
            rw = f["record"]["requested_rewrite"]
            f["subject"], f["template"], f["object"] = rw["subject"], rw["prompt"], _str(rw["target_true"])
            rewrite_keys.add((f["subject"], f["relation"]))
        else:
            hit = parsed.get((f["relation"], f["prompt"]))
            if hit is None:
                dropped["prompt matches no induced template"] += 1
                f["skip"] = True
                continue
            f["subject"], f["template"] = hit
        answers[(f["subject"], f["relation"])].add(f["object"])
    # every fact of a subject on one side: tuning if the subject is a tuning rewrite's or only tuning
    # records mention it, evaluation otherwise
    read = [f for f in facts if not f.get("skip")]
    tune_rewrites = {f["subject"] for f in read if f["kind"] == "rewrite" and f["side"] == "tune"}
    eval_mentions = {f["subject"] for f in read if f["side"] == "eval"}
    for f in read:
        if f["kind"] != "rewrite":
            s = f["subject"]
            f["side"] = "tune" if s in tune_rewrites or s not in eval_mentions else "eval"
    # neighbourhood prompts of a derived request: other subjects' prompts with its relation and answer
    by_answer: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for f in facts:
        if not f.get("skip"):
            by_answer[(f["relation"], f["object"])].append((f["subject"], f["template"]))

    out: dict[str, list[dict]] = {"eval": [], "tune": []}
    seen: set[tuple[str, str]] = set()
    kinds: Counter = Counter()
    per_relation: Counter = Counter()
    for f in facts:
        if f.get("skip"):
            continue
        key = (f["subject"], f["relation"])
        if f["kind"] != "rewrite" and key in rewrite_keys:
            dropped["a rewrite's own subject and relation"] += 1
            continue
        if f["kind"] != "rewrite" and len(answers[key]) > 1:
            dropped["the file gives this subject and relation two answers"] += 1
            continue
        if key in seen:
            dropped["duplicate of a fact already taken"] += 1
            continue
        if f["kind"] == "rewrite" and f["side"] == "eval" and f["subject"] in tune_rewrites:
            dropped["an evaluation rewrite of a tuning rewrite's subject"] += 1
            continue
        seen.add(key)
        if f["kind"] == "rewrite":
            rec = f["record"]
        else:
            rec = _derived_record(f, objects[f["relation"]], templates[f["relation"]], by_answer, seed)
            if rec is None:
                dropped["the relation has no other object for target_new"] += 1
                continue
        out[f["side"]].append(rec)
        kinds[f["kind"]] += 1
        per_relation[f["relation"]] += 1
    report = {
        "format": "superedit-derived-stream/1", "seed": seed, "n_source_records": len(records),
        "n_prompts": len(set(prompts)), "n_prompts_read": len(parsed),
        "n_eval": len(out["eval"]), "n_tune": len(out["tune"]),
        "per_kind": dict(sorted(kinds.items())), "per_relation": dict(sorted(per_relation.items())),
        "dropped": dict(sorted(dropped.items())),
        "templates_per_relation": {r: len(t) for r, t in sorted(templates.items())},
    }
    return DerivedStream(out["eval"], out["tune"], report)


def _derived_record(f: dict, objects: dict[str, Any], templates: set[str],
                    by_answer: dict[tuple[str, str], list[tuple[str, str]]], seed: int) -> dict | None:
    subject, rid, true = f["subject"], f["relation"], f["object"]
    choices = sorted(o for o in objects if o and o != true)
    if not choices:
        return None
    rng = random.Random(f"derive:{seed}:{rid}:{subject}")
    new = rng.choice(choices)
    others = sorted(t for t in templates if t != f["template"])
    paraphrases = [t.replace("{}", subject) for t in rng.sample(others, min(MAX_PARAPHRASES, len(others)))]
    by_subject: dict[str, list[str]] = defaultdict(list)  # one prompt per neighbouring subject
    for s, t in by_answer[(rid, true)]:
        if s != subject:
            by_subject[s].append(t.replace("{}", s))
    chosen = rng.sample(sorted(by_subject), min(MAX_NEIGHBOURS, len(by_subject)))
    pairs = [(rng.choice(sorted(set(by_subject[s]))), s) for s in chosen]

    def obj(s):
        return {"str": s, "id": objects.get(s)} if objects.get(s) is not None else {"str": s}

    return {
        "case_id": f"{f['case']}:{f['kind'][0]}:{subject}",
        "requested_rewrite": {"prompt": f["template"], "relation_id": rid, "subject": subject,
                              "target_new": obj(new), "target_true": obj(true)},
        "paraphrase_prompts": paraphrases,
        "neighborhood_prompts": [p for p, _ in pairs],
        "neighborhood_subjects": [s for _, s in pairs],
        "attribute_prompts": [],
        "generation_prompts": [],
        "derived_from": {"case_id": f["case"], "kind": f["kind"], "prompt": f["prompt"]},
    }
