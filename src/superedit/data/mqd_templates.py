"""Readable questions for ATOMIC-2020's relations, written by hand (one per relation).

ATOMIC names its relations with abbreviations (``xNeed``: what PersonX needs before the event,
``oReact``: how the others feel after it, ``isFilledBy``: what fills the blank ``___`` in the head,
...). The Multi-Question Dataset (:mod:`superedit.data.mqd`) wraps each head event in the question of
its relation, so every question type asks the same thing in plain English. Each question has exactly
one ``{}`` where the head (the edit's subject) goes, and its answer is a tail of the relation:

    "What does PersonX need to do before {}?"  +  "PersonX calls PersonY ambulance"  ->  "get the phone"

The table covers the 23 relations of ATOMIC-2020 (Hwang et al. 2021): 9 social-interaction relations
about PersonX (``x…``) and the others (``o…``), 7 event-centred ones and 7 physical-entity ones. A
relation not in the table is an error naming the relation; add a question here to support it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RelationQuestion", "RELATION_QUESTIONS"]


@dataclass(frozen=True)
class RelationQuestion:
    """The question asked for one relation and what the relation means."""

    question: str  #: exactly one ``{}`` where the head event / entity goes
    meaning: str  #: one line, for reports and docs


RELATION_QUESTIONS: dict[str, RelationQuestion] = {
    # social interaction: PersonX's side
    "xNeed": RelationQuestion("What does PersonX need to do before {}?",
                              "what PersonX needs to do before the event"),
    "xIntent": RelationQuestion("Why does PersonX do this: {}?",
                                "PersonX's intention behind the event"),
    "xAttr": RelationQuestion("How would you describe PersonX, given that {}?",
                              "how PersonX is seen, given the event"),
    "xEffect": RelationQuestion("What happens to PersonX as a result when {}?",
                                "the effect of the event on PersonX"),
    "xReact": RelationQuestion("How does PersonX feel after {}?",
                               "PersonX's feeling after the event"),
    "xWant": RelationQuestion("What does PersonX want to do after {}?",
                              "what PersonX wants after the event"),
    # social interaction: the others' side
    "oEffect": RelationQuestion("What happens to the others as a result when {}?",
                                "the effect of the event on the others"),
    "oReact": RelationQuestion("How do the others feel after {}?",
                               "the others' feeling after the event"),
    "oWant": RelationQuestion("What do the others want to do after {}?",
                              "what the others want after the event"),
    # event-centred
    "isAfter": RelationQuestion("What happened before this: {}?",
                                "an event the head follows"),
    "isBefore": RelationQuestion("What happens after this: {}?",
                                 "an event that follows the head"),
    "HasSubEvent": RelationQuestion("What happens as part of the event: {}?",
                                    "a step of the event"),
    "HinderedBy": RelationQuestion("What could prevent this: {}?",
                                   "what can hinder the event"),
    "Causes": RelationQuestion("What does {} cause?",
                               "what the head causes"),
    "xReason": RelationQuestion("Why would someone {}?",
                                "the reason for the event"),
    "isFilledBy": RelationQuestion("What fills the blank in: {}?",
                                   "a filler of the blank ___ in the head"),
    # physical entities
    "ObjectUse": RelationQuestion("What can {} be used for?",
                                  "a use of the object"),
    "AtLocation": RelationQuestion("Where would you find {}?",
                                   "where the thing is found"),
    "MadeUpOf": RelationQuestion("What is {} made up of?",
                                 "a part or material of the thing"),
    "HasProperty": RelationQuestion("What property does {} have?",
                                    "a property of the thing"),
    "CapableOf": RelationQuestion("What is {} capable of?",
                                  "what the thing or agent can do"),
    "Desires": RelationQuestion("What does {} desire?",
                                "what the agent desires"),
    "NotDesires": RelationQuestion("What does {} not desire?",
                                   "what the agent does not desire"),
}
