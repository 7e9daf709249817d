"""Prompts that ask a model about a subject's OTHER attributes, for v*'s preservation term.

An edit of (subject, relation) writes one value change at the subject's token; every other question
about that subject reads the same token, so the change can move those answers too (measured on
SmolLM2: docs/results/lifelong.md, "what an edit does to its subject's other facts").
:func:`superedit.editing.values.optimize_values` with ``preserve_factor`` > 0 keeps the model's
next-token distribution after each of these prompts (filled with the request's subject) as it was.

Written for superedit in plain English, one per common kind of encyclopaedic attribute (people,
places, organisations, works, products); a prompt that does not fit a subject's kind still has a
distribution to keep. They are deliberately NOT CounterFact's or ParaRel's templates, which the
evaluation's neighbourhood and retention prompts use.
"""

from __future__ import annotations

#: (template, kind of its answer). The kind lets a request leave out the prompts whose answer is of its
#: own kind (``preserve_other_kinds``): for a citizenship edit, "{} holds the citizenship of" is the
#: edited question and "{} can be found in the country of" a near-synonym of it; keeping their answers
#: would fight the edit. None: no kind (never left out).
ATTRIBUTE_PROMPTS: tuple[tuple[str, str | None], ...] = (
    ("{} holds the citizenship of", "country"),
    ("{} was born in the city of", "city"),
    ("{} passed away in", "city"),
    ("The first language of {} is", "language"),
    ("By profession, {} is a", "profession"),
    ("{} can be found in the country of", "country"),
    ("{} lies on the continent of", "continent"),
    ("{} was developed by", "organisation"),
    ("{} is manufactured by", "organisation"),
    ("{} has its headquarters in", "city"),
    ("{} is a member of the", "organisation"),
    ("In {}, people speak", "language"),
    ("{} was first broadcast on", "organisation"),
    ("{} is best known for", None),
    ("The religion of {} is", "religion"),
    ("The musical style of {} is", "genre"),
)
ATTRIBUTE_TEMPLATES: tuple[str, ...] = tuple(t for t, _ in ATTRIBUTE_PROMPTS)

#: Kind of the answer of Wikidata properties (the relation ids CounterFact and MQuAKE requests carry; zsRE
#: records carry none), for the same purpose. A relation id not listed here (a testbed's, a user's) leaves
#: nothing out.
RELATION_KINDS: dict[str, str] = {
    **dict.fromkeys(("P17", "P27", "P495", "P1001"), "country"),
    **dict.fromkeys(("P19", "P20", "P36", "P159", "P190", "P276", "P740", "P937"), "city"),
    **dict.fromkeys(("P37", "P103", "P364", "P407", "P1412"), "language"),
    **dict.fromkeys(("P108", "P127", "P176", "P178", "P264", "P449", "P463", "P749"), "organisation"),
    "P30": "continent",
    "P106": "profession",
    "P136": "genre",
    "P140": "religion",
}


def kind_of(template: str) -> str | None:
    """The answer kind of one of superedit's own attribute templates (None for any other template)."""
    return _KIND_BY_TEMPLATE.get(template)


def templates_for(templates: list[str] | tuple[str, ...], relation: str | None) -> list[str]:
    """``templates`` without those whose answer is of ``relation``'s kind (all of them where the relation
    or a template has no known kind)."""
    kind = RELATION_KINDS.get(relation or "")
    if kind is None:
        return list(templates)
    return [t for t in templates if kind_of(t) != kind]


_KIND_BY_TEMPLATE: dict[str, str | None] = dict(ATTRIBUTE_PROMPTS)
