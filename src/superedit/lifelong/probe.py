"""What a lifelong run measures at each checkpoint besides the edits: the fixed probe and its measurement.

A :class:`Probe` is built once per run (``OUT/probe.json``) and never changes: untouched true facts
for retention, held-out text for perplexity, on a testbed every trained fact, and the general-ability
probe set (:class:`superedit.eval.ability.GeneralAbility`: perplexity, fluency, known-fact multiple
choice, MQD T/F and MC items on unedited tuples, optional lm-eval tasks) restricted to tuples the
stream never edits. :func:`measure_probe` measures it on a model: every figure reduces over the one
teacher-forced scorer (:mod:`superedit.eval.scoring`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..utils.logs import get_logger

log = get_logger(__name__)

__all__ = ["Probe", "testbed_probe", "requests_probe", "retention_by_subject", "measure_probe",
           "restrict_ability"]


@dataclass
class Probe:
    """What each checkpoint measures besides the edits themselves (fixed for the whole run).

    facts: untouched true facts ``{"prompt", "target", "template", "subject", "relation"}`` (never edited).
    texts: held-out text for perplexity.
    all_facts: (testbed) every trained fact ``{"prompt", "target"}`` for the recall of all facts.
    base_hits: the base model's ``fact_recall`` on ``facts`` (filled in by the runner).
    ability: a :class:`~superedit.eval.ability.GeneralAbility` as a dict (None: no general-ability figures).
    lm_eval_tasks: lm-evaluation-harness tasks measured with the ability (skipped unless available offline).
    lm_eval_include: a folder of extra lm-eval task YAMLs (``superedit data lm-eval-task`` writes one).
    """

    facts: list[dict] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    all_facts: list[dict] = field(default_factory=list)
    base_hits: list[bool] | None = None
    max_neighbours: int = 5
    eval_batch_size: int = 64
    interference_keys: int = 50
    block_size: int = 100
    source: str = ""
    ability: dict | None = None
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_include: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Probe":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def testbed_probe(model_dir: str | Path, stream: Sequence, n: int = 200, seed: int = 0, n_texts: int = 40,
                  n_questions: int = 100) -> Probe:
    """Probe of a testbed: ``n`` true facts whose subject (failing that: subject+relation) is not edited,
    held-out biographies (fresh phrasings) for perplexity, every fact (first training template), and the
    general-ability set (known-fact questions with distractors among each relation's objects)."""
    from ..eval.ability import GeneralAbility
    from ..testbed import load_world

    world = load_world(model_dir)
    edited_subjects = {r.subject for r in stream}
    edited_pairs = {(r.subject, r.relation_id) for r in stream}
    prompts = world.prompts("train", max_templates=1)
    free = [p for p in prompts if p.subject not in edited_subjects]
    pairs = [p for p in prompts if p.subject in edited_subjects and (p.subject, p.relation) not in edited_pairs]
    rng = random.Random(f"lifelong-probe:{seed}")
    rng.shuffle(free)
    rng.shuffle(pairs)
    chosen = (free + pairs)[:n]
    if len(free) < n:
        log.info("probe: only %d facts of unedited subjects; %d more from edited subjects' other relations",
                 len(free), len(chosen) - len(free))
    facts = [{"prompt": p.prompt, "target": p.target, "template": p.template, "subject": p.subject,
              "relation": p.relation} for p in chosen]
    docs = world.training_documents(random.Random(f"lifelong-ppl:{seed}"), filler_prob=0.0)[:n_texts]
    all_facts = [{"prompt": p.prompt, "target": p.target} for p in prompts]
    pool = [{"relation": p.relation, "target": p.target} for p in prompts]
    ability = GeneralAbility.build(texts=docs, facts=facts, pool_facts=pool, n_questions=n_questions, seed=seed)
    return Probe(facts=facts, texts=docs, all_facts=all_facts, source=f"testbed:{model_dir}",
                 ability=ability.to_dict())


def requests_probe(heldout: Sequence, texts: Sequence[str] = (), n: int = 200, n_questions: int = 100,
                   seed: int = 0) -> Probe:
    """Probe from held-out requests of the same dataset (their TRUE facts, never edited); the ability set
    asks about those facts (distractors: the held-out requests' true and new objects of the same relation)
    and takes MQD's T/F and MC items when the requests are MQD's."""
    from ..eval.ability import GeneralAbility

    facts = [{"prompt": r.filled_prompt(), "target": r.target_true, "template": r.prompt, "subject": r.subject,
              "relation": r.relation_id}
             for r in heldout if r.target_true][:n]
    if not texts:  # fall back to the true statements themselves
        texts = [f"{f['prompt']} {f['target']}." for f in facts]
    pool = [{"relation": r.relation_id, "target": t} for r in heldout for t in (r.target_true, r.target_new) if t]
    mqd = [r for r in heldout if (r.meta or {}).get("question_type") in ("tf", "mc")]
    ability = GeneralAbility.build(texts=list(texts), facts=facts, pool_facts=pool,
                                   mqd_requests=mqd, n_questions=n_questions, seed=seed)
    return Probe(facts=facts, texts=list(texts), source="requests", ability=ability.to_dict())


def restrict_ability(probe: Probe, stream: Sequence) -> None:
    """Drop the ability's choice items about a ``(subject, relation)`` tuple the stream edits (in place)."""
    if not probe.ability:
        return
    edited = {f"{r.subject}|{r.relation_id}" for r in stream}
    choices = probe.ability.get("choices") or {}
    kept = {k: [c for c in v if c.get("source") not in edited] for k, v in choices.items()}
    dropped = sum(len(v) for v in choices.values()) - sum(len(v) for v in kept.values())
    if dropped:
        log.info("ability: %d question(s) about edited (subject, relation) tuples left out", dropped)
    probe.ability["choices"] = {k: v for k, v in kept.items() if v}


def retention_by_subject(hits: Sequence[bool], base_hits: Sequence[bool], facts: Sequence[dict],
                         edited: set[str]) -> dict:
    """Untouched-fact retention split by whether the fact's subject has been edited so far.

    A probe fact of an edited subject ("Anna Berg studied at", after an edit of "Anna Berg plays
    the") is read from the same key as the edit; the subject's value at that key carries all its
    facts, so an edit that rewrites it can change them without any interference between keys.
    Facts of never-edited subjects are touched only through interference. Returns
    ``untouched_retention_{edited_subjects,other_subjects}`` (None when a part is empty) and
    ``untouched_n_*``, counted over the facts the base model recalled."""
    out: dict[str, Any] = {}
    for part, want in (("edited_subjects", True), ("other_subjects", False)):
        sel = [h for h, b, f in zip(hits, base_hits, facts) if b and f.get("subject") and (f["subject"] in edited) == want]
        out[f"untouched_retention_{part}"] = sum(sel) / len(sel) if sel else None
        out[f"untouched_n_{part}"] = len(sel)
    return out


def measure_probe(adapter, probe: Probe, edited_subjects: set[str]) -> dict:
    """The probe's checkpoint fields: untouched recall/retention (split by subject), all-facts recall,
    perplexity and ``ability`` (every general-ability metric with its n)."""
    from ..eval.ability import GeneralAbility
    from ..eval.scoring import fact_recall, perplexity

    rec: dict[str, Any] = {}
    hits = None
    if probe.facts:
        hits = fact_recall(adapter, [f["prompt"] for f in probe.facts], [f["target"] for f in probe.facts],
                           probe.eval_batch_size)
        rec["untouched_recall"] = sum(hits) / len(hits)
        if probe.base_hits:
            kept = [h for h, b in zip(hits, probe.base_hits) if b]
            rec["untouched_retention"] = sum(kept) / len(kept) if kept else None
            rec["untouched_base_recall"] = sum(probe.base_hits) / len(probe.base_hits)
            # a probe fact of an edited subject shares that subject's key with the edit (its value
            # carries all the subject's facts): retention there and on never-edited subjects differ
            rec.update(retention_by_subject(hits, probe.base_hits, probe.facts, edited_subjects))
        rec["untouched_n"] = len(hits)
    if probe.all_facts:
        all_hits = fact_recall(adapter, [f["prompt"] for f in probe.all_facts],
                               [f["target"] for f in probe.all_facts], probe.eval_batch_size)
        rec["all_facts_recall"] = sum(all_hits) / len(all_hits)
    if probe.ability is not None:
        ability = GeneralAbility.from_dict({**probe.ability, "batch_size": probe.eval_batch_size,
                                            "lm_eval_tasks": list(probe.lm_eval_tasks),
                                            "lm_eval_include": probe.lm_eval_include})
        # the ability's facts are the probe's (built together): their recall is measured once, above
        same_facts = hits is not None and [(f["prompt"], f["target"]) for f in ability.facts] == [
            (f["prompt"], f["target"]) for f in probe.facts]
        if same_facts and probe.base_hits is not None:
            ability.base_hits = list(probe.base_hits)
        elif ability.facts and ability.base_hits is None:
            ability.facts = []  # no baseline to measure retention against
        rec["ability"] = ability.measure(adapter, known_hits=hits if same_facts else None)
        ppl = rec["ability"].get("perplexity", {}).get("value")
        if ppl is not None:
            rec["perplexity"] = ppl
    if "perplexity" not in rec and probe.texts:
        rec["perplexity"] = perplexity(adapter, probe.texts)
    return rec
