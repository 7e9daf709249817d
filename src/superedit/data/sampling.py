"""Deterministic subsets of requests, and counterfactual requests from a fact world.

Randomness comes only from ``random.Random`` seeded with ints or strings (string seeds
are hashed with SHA-512 by Python, so results do not depend on PYTHONHASHSEED), and
every set is sorted before sampling, so the same inputs and seed give the same output
on every run and machine.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

from superedit.data.requests import EditRequest, request_error
from superedit.errors import RequestFormatError, UsageError

__all__ = ["sample_requests", "counterfactual_requests_from_facts"]


def _check_n(n: Any) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise UsageError(f"n must be a non-negative integer or None, got {n!r}")


def sample_requests(requests: Sequence[EditRequest], n: int | None, seed: int) -> list[EditRequest]:
    """A deterministic subset of ``n`` requests, in their original order.

    The subset is the first ``n`` indices of a seeded permutation, so for a fixed seed a
    smaller sample is contained in a larger one. ``n=None`` or ``n >= len(requests)``
    returns all requests (a new list; a warning is logged when ``n`` is larger).
    """
    _check_n(n)
    items = list(requests)
    if n is None or n >= len(items):
        if n is not None and n > len(items):
            from superedit.utils.logs import get_logger

            get_logger(__name__).warning("asked for %d requests but only %d exist; using all", n, len(items))
        return items
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


def _fact_str(fact: Mapping[str, Any], key: str, where: str, required: bool = True) -> str | None:
    value = fact.get(key)
    if value is None:
        if required:
            raise request_error(where, key, "is missing", f"Every fact needs '{key}'.")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise request_error(where, key, f"must be a string, got {type(value).__name__}", "")
    value = str(value).strip()
    if required and not value:
        raise request_error(where, key, "is empty", f"Give a non-empty '{key}'.")
    return value


def _pairs(value: Any, where: str) -> list[tuple[str, str]]:
    out = []
    for i, item in enumerate(value or []):
        if isinstance(item, Mapping):
            s, o = item.get("subject"), item.get("object")
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            s, o = item
        else:
            raise request_error(
                where, f"neighbours[{i}]", "must be a (subject, object) pair",
                "Give neighbours as [[subject, object], ...].",
            )
        if not isinstance(s, str) or not isinstance(o, str) or not s.strip() or not o.strip():
            raise request_error(where, f"neighbours[{i}]", "must hold two non-empty strings", "")
        out.append((s.strip(), o.strip()))
    return out


def _same(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def counterfactual_requests_from_facts(
    facts: Sequence[Mapping[str, Any]],
    n: int | None,
    seed: int,
    *,
    source: str = "facts",
    max_attribute_prompts: int = 10,
) -> list[EditRequest]:
    """Turn true facts into CounterFact-style counterfactual edit requests.

    Each fact is a dict ``{subject, relation, template, object, paraphrase_templates,
    neighbours: [(subject, object), ...], aliases}`` (templates contain ``{}``).
    For the ``n`` facts chosen with ``seed`` (see :func:`sample_requests` for the
    selection rule; ``None`` takes all):

    * ``target_new``: another object of the same relation (from the other facts and the
      neighbours), drawn with a per-fact seed, never equal (case-insensitively) to the
      true object or one of the subject's aliases. Facts whose relation has no other
      object are not eligible.
    * ``target_true``: the true object; ``prompt``: the fact's ``template``.
    * ``paraphrase_prompts``: the held-out ``paraphrase_templates`` filled with the subject.
    * ``neighborhood_prompts``: ``template`` filled with each neighbour's subject, answered
      by the neighbour's object.
    * ``attribute_prompts``: ``template`` filled with up to ``max_attribute_prompts``
      other subjects whose true object is ``target_new`` (answer ``target_new``).
    * ``subject_rephrases``: the aliases; ``relation_id``: the relation;
      ``case_id``: the fact's ``id`` if it has one, else its index;
      ``source``: ``"<source>#<index>"``.

    The target of a fact does not depend on ``n``, so smaller samples are prefixes of
    larger ones (as sets). Raises RequestFormatError for a malformed fact and
    ValueError when no fact has an alternative object.
    """
    _check_n(n)
    parsed = []
    by_relation: dict[str, set[str]] = {}
    subjects_by_object: dict[tuple[str, str], set[str]] = {}
    for idx, fact in enumerate(facts):
        where = f"{source}#{idx}"
        if not isinstance(fact, Mapping):
            raise request_error(where, "<fact>", f"must be a dict, got {type(fact).__name__}", "")
        subject = _fact_str(fact, "subject", where)
        relation = _fact_str(fact, "relation", where)
        template = _fact_str(fact, "template", where)
        obj = _fact_str(fact, "object", where)
        paraphrases = [str(t) for t in (fact.get("paraphrase_templates") or [])]
        aliases = [str(a).strip() for a in (fact.get("aliases") or []) if str(a).strip()]
        neighbours = _pairs(fact.get("neighbours"), where)
        parsed.append((idx, fact, subject, relation, template, obj, paraphrases, aliases, neighbours))
        by_relation.setdefault(relation, set()).add(obj)
        subjects_by_object.setdefault((relation, obj), set()).add(subject)
        for ns, no in neighbours:
            by_relation[relation].add(no)
            subjects_by_object.setdefault((relation, no), set()).add(ns)

    eligible = []
    for rec in parsed:
        _, _, subject, relation, _, obj, _, aliases, _ = rec
        banned = [obj, subject] + aliases
        cands = sorted(o for o in by_relation[relation] if not any(_same(o, b) for b in banned))
        if cands:
            eligible.append((rec, cands))
    if not eligible:
        raise UsageError(
            "no fact has another object of the same relation to use as target_new; "
            "give at least two distinct objects per relation"
        )
    if n is not None and n < len(eligible):
        order = list(range(len(eligible)))
        random.Random(seed).shuffle(order)
        chosen = [eligible[i] for i in sorted(order[:n])]
    else:
        chosen = eligible

    out = []
    for (idx, fact, subject, relation, template, obj, paraphrases, aliases, neighbours), cands in chosen:
        where = f"{source}#{idx}"
        rng = random.Random(f"{seed}:{idx}:{subject}")
        target_new = rng.choice(cands)
        fill = lambda t, s: t.replace("{}", s, 1)  # noqa: E731
        nb = [(s, o) for s, o in neighbours if not _same(s, subject)]
        attr_subjects = sorted(
            s for s in subjects_by_object.get((relation, target_new), set()) if not _same(s, subject)
        )
        if len(attr_subjects) > max_attribute_prompts:
            attr_subjects = sorted(rng.sample(attr_subjects, max_attribute_prompts))
        for k, t in enumerate(paraphrases):
            if t.count("{}") != 1:
                raise request_error(
                    where, f"paraphrase_templates[{k}]", f"must contain exactly one '{{}}' (got {t!r})", "",
                )
        try:
            req = EditRequest(
                prompt=template,
                subject=subject,
                target_new=target_new,
                target_true=obj,
                paraphrase_prompts=[fill(t, subject) for t in paraphrases],
                neighborhood_prompts=[fill(template, s) for s, _ in nb],
                neighborhood_answers=[o for _, o in nb],
                attribute_prompts=[fill(template, s) for s in attr_subjects],
                attribute_answers=[target_new] * len(attr_subjects),
                subject_rephrases=[a for a in aliases if not _same(a, subject)],
                case_id=fact.get("id", idx),
                relation_id=relation,
                source=where,
                # the neighbours' subjects, one per prompt: a lifelong run leaves out those it edits itself
                # on this relation (lifelong.runner.unedited_neighbours), as for derived CounterFact requests
                meta={"neighborhood_subjects": [s for s, _ in nb]},
            )
        except RequestFormatError as exc:
            if getattr(exc, "field", None) == "prompt":
                raise request_error(where, "template", exc.problem, exc.hint) from None  # type: ignore[attr-defined]
            raise
        out.append(req)
    return out
