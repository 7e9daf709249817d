"""Re-edit streams: a lifelong stream longer than the number of distinct facts.

A testbed's synthetic world has a few thousand facts at most, so a stream of 10,000 sequential edits
has to edit facts again. :func:`reedit_stream` builds such a stream from the ordered candidate requests
(``superedit lifelong --reedit-facts K``): round 0 is the first ``K`` distinct facts as they are; every
later round goes over the same ``K`` facts in the same order and gives each a NEW target, a seeded
draw among the objects of its relation other than its true object and the target it holds now.

Once a fact is re-edited, its earlier target is no longer expected to hold: :func:`live_positions`
picks, at a checkpoint after ``n`` edits, each fact's latest edit among the first ``n`` (the "live"
edits); the runner scores efficacy, paraphrase and forgetting over those. A stream that edits every
fact once has every position live.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Sequence

from ..errors import SupereditError
from ..utils.logs import get_logger

log = get_logger(__name__)

__all__ = ["reedit_stream", "live_positions", "previous_target_requests", "REEDIT_ROUND", "PREVIOUS_TARGET"]

#: ``EditRequest.meta`` key of a re-edit: its round (1, 2, ...); round-0 requests are the candidates as given
REEDIT_ROUND = "reedit_round"
#: ``EditRequest.meta`` key of a re-edit: the target the fact held before it (the one it overwrites)
PREVIOUS_TARGET = "reedit_previous_target"


def _relation(r) -> str:
    """The relation a request's new target is drawn within: ``relation_id``, the template standing in for a
    missing one (as in ``EditRequest.fact_key``)."""
    return r.fact_key[1]


def reedit_stream(requests: Sequence, k: int, n_edits: int, seed: int) -> list:
    """``n_edits`` requests over ``k`` facts: the first ``k`` distinct facts, then rounds of re-edits.

    Args:
        requests: the ordered candidate ``EditRequest`` list (``superedit lifelong``'s seeded shuffle and
            ``--stream-order``). Its first ``k`` distinct facts (``fact_key``: subject, relation) form round
            0, each by its first request; every request's ``target_new`` and ``target_true`` make up the
            objects a re-edit of the same relation can draw.
        k: number of distinct facts (≥ 1).
        n_edits: length of the stream (≥ 1); rounds repeat until it is reached (round ``r`` fills
            positions ``r·k .. r·k + k − 1``). With ``n_edits ≤ k`` there are no re-edits.
        seed: the run's seed; round ``r``'s target of a fact is drawn by
            ``random.Random(f"lifelong-reedit:{seed}:{r}:{subject}|{relation}")``, so the stream does not
            depend on anything else (same seed, same candidates → same stream).

    Returns the stream: the round-0 requests unchanged, then per round a copy of each fact's round-0
    request with ``target_new`` replaced, ``meta["reedit_round"] = r``, and no attribute prompts (those
    are other subjects whose true answer is the round-0 target). Prompts, paraphrases, neighbourhood
    prompts and ``target_true`` are kept, so efficacy is still scored against the true object.

    Raises SupereditError for ``k < 1`` or ``n_edits < 1``, for fewer than ``k`` distinct facts among
    ``requests``, and when re-edits are needed and a chosen fact's relation has no object other than the
    fact's true object and its current target.
    """
    if k < 1:
        raise SupereditError(f"--reedit-facts must be ≥ 1 to build a re-edit stream (got {k}); 0 turns re-edits off")
    if n_edits < 1:
        raise SupereditError(f"--edits must be ≥ 1 (got {n_edits})")
    facts: list = []
    seen: set = set()
    for r in requests:
        if r.fact_key in seen:
            continue
        seen.add(r.fact_key)
        if len(facts) < k:
            facts.append(r)
    if len(facts) < k:
        raise SupereditError(f"--reedit-facts {k}: the candidate requests hold only {len(seen)} distinct facts "
                             f"(subject, relation); give --reedit-facts {len(seen)} or less, or pass --requests "
                             "with more facts")
    stream = list(facts[:n_edits])
    if n_edits <= k:
        return stream
    objects: dict[str, set[str]] = {}
    for r in requests:
        objects.setdefault(_relation(r), set()).update(t for t in (r.target_new, r.target_true) if t)
    pools = {}
    for f in facts:  # the pool always holds the fact's current target: ≥ 2 objects besides the true one
        rel = _relation(f)
        pool = sorted(objects[rel] - {f.target_true})
        if len(pool) < 2:
            raise SupereditError(f"--reedit-facts: relation {rel!r} has no object to re-edit "
                                 f"{f.subject!r} to besides its true object {f.target_true!r} and its target "
                                 f"{f.target_new!r} (objects of that relation among the requests: "
                                 f"{sorted(objects[rel])}); give --requests with more objects of the relation, "
                                 "or --edits ≤ --reedit-facts")
        pools[f.fact_key] = pool
    current = {f.fact_key: f.target_new for f in facts}
    rnd = 0
    while len(stream) < n_edits:
        rnd += 1
        for f in facts[: n_edits - len(stream)]:
            key = f.fact_key
            choices = [o for o in pools[key] if o != current[key]]
            new = random.Random(f"lifelong-reedit:{seed}:{rnd}:{f.subject}|{key[1]}").choice(choices)
            stream.append(replace(f, target_new=new, attribute_prompts=[], attribute_answers=[],
                                  meta={**f.meta, REEDIT_ROUND: rnd, PREVIOUS_TARGET: current[key]}))
            current[key] = new
    log.info("re-edit stream: %d facts, %d edits (%d rounds after the first)", k, len(stream), rnd)
    return stream


def live_positions(stream: Sequence, n: int) -> list[int]:
    """Positions (ascending) among ``stream[:n]`` of each fact's latest edit: the targets the model is
    expected to hold after ``n`` edits. An edit overwritten by a later one of the same ``fact_key`` is not
    live. ``range(n)`` exactly when the first ``n`` requests are all distinct facts."""
    last: dict = {}
    for i, r in enumerate(stream[:n]):
        last[r.fact_key] = i
    return sorted(last.values())


def previous_target_requests(requests: Sequence) -> tuple[list[int], list]:
    """For the re-edits among ``requests`` (those with ``meta[PREVIOUS_TARGET]``): their indices and the
    same requests with ``target_true`` set to the target they overwrote, with no paraphrase, neighbourhood
    or attribute prompts. Scored with the CounterFact rule, such a request says whether the model now
    prefers the new target to the OLD one (efficacy against the true object cannot: the old target may
    still beat the new one while both beat the true object)."""
    idx, out = [], []
    for i, r in enumerate(requests):
        prev = (r.meta or {}).get(PREVIOUS_TARGET)
        if prev:
            idx.append(i)
            out.append(replace(r, target_true=prev, paraphrase_prompts=[], neighborhood_prompts=[],
                               neighborhood_answers=[], attribute_prompts=[], attribute_answers=[]))
    return idx, out
