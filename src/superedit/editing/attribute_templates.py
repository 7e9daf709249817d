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

ATTRIBUTE_TEMPLATES: tuple[str, ...] = (
    "{} holds the citizenship of",
    "{} was born in the city of",
    "{} passed away in",
    "The first language of {} is",
    "By profession, {} is a",
    "{} can be found in the country of",
    "{} lies on the continent of",
    "{} was developed by",
    "{} is manufactured by",
    "{} has its headquarters in",
    "{} is a member of the",
    "In {}, people speak",
    "{} was first broadcast on",
    "{} is best known for",
    "The religion of {} is",
    "The musical style of {} is",
)
