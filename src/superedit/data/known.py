"""Which facts a model actually knows, and seeded tuning / evaluation splits.

Editing a fact the model never knew measures nothing: "post efficacy" is then a comparison of two
answers the model did not hold, and a drop in neighbourhood scores cannot be told from noise. So
real-model figures are taken on the records a model knows, decided by one documented rule on the
request's own prompt (``prompt`` filled with ``subject``), teacher-forced through
:func:`superedit.eval.scoring.score_targets`:

* ``top1`` (default): the model's greedy next token after the prompt is the first token of
  ``target_true`` ("ranked first"; ROME's ``known_1000`` used the same greedy criterion).
* ``margin``: log P(target_true | prompt) − log P(target_new | prompt) ≥ ``margin`` (whole targets,
  sum of token log-probabilities; nats). A looser rule for small models: the model prefers the true
  object to the counterfactual one by a factor e^margin.

A record without ``target_true`` is never "known". :func:`split_known` shuffles with a fixed seed and
cuts off a tuning part; hyperparameters are chosen on it and figures reported on the rest only.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

from ..errors import SupereditError

RULES = ("top1", "margin")


@dataclass(frozen=True)
class KnownVerdict:
    """What the model does with one request's true and new objects."""

    index: int  #: position in the request list
    case_id: str | int | None
    relation_id: str | None
    logprob_true: float | None  #: log P(target_true | prompt), None without target_true
    logprob_new: float
    true_first_is_top1: bool  #: greedy next token == first token of target_true
    known: bool

    def to_dict(self) -> dict:
        return asdict(self)


def judge_known(adapter, requests: Sequence, rule: str = "top1", margin: float = 1.0,
                batch_size: int = 32) -> list[KnownVerdict]:
    """One :class:`KnownVerdict` per request under ``rule`` (see the module docstring)."""
    from ..eval.scoring import score_targets

    if rule not in RULES:
        raise SupereditError(f"--rule {rule!r}: choose one of {', '.join(RULES)}")
    if rule == "margin" and not margin >= 0:
        raise SupereditError(f"--margin must be ≥ 0 nats (got {margin})")
    prompts = [r.filled_prompt() for r in requests]
    with_true = [i for i, r in enumerate(requests) if r.target_true]
    true_scores = dict(zip(with_true, score_targets(adapter, [prompts[i] for i in with_true],
                                                     [requests[i].target_true for i in with_true], batch_size)))
    new_scores = score_targets(adapter, prompts, [r.target_new for r in requests], batch_size)
    out = []
    for i, req in enumerate(requests):
        t = true_scores.get(i)
        top1 = bool(t is not None and t.argmax[0] == t.target_ids[0])
        if t is None:
            known = False
        elif rule == "top1":
            known = top1
        else:
            known = t.logprob - new_scores[i].logprob >= margin
        out.append(KnownVerdict(i, req.case_id, req.relation_id, None if t is None else t.logprob,
                                new_scores[i].logprob, top1, known))
    return out


def known_report(verdicts: Sequence[KnownVerdict], rule: str, margin: float) -> dict:
    """Counts and shares kept, overall and per relation."""
    n = len(verdicts)
    kept = sum(v.known for v in verdicts)
    per_rel: dict[str, Counter] = {}
    for v in verdicts:
        c = per_rel.setdefault(str(v.relation_id), Counter())
        c["total"] += 1
        c["known"] += int(v.known)
    return {"rule": rule, "margin": margin if rule == "margin" else None, "n_records": n, "n_known": kept,
            "share_known": kept / n if n else 0.0,
            "share_top1": sum(v.true_first_is_top1 for v in verdicts) / n if n else 0.0,
            "per_relation": {r: dict(c) for r, c in sorted(per_rel.items())}}


def split_known(items: Sequence, tune_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(tuning, evaluation): a seeded shuffle, the first ``round(tune_fraction · n)`` items to tuning.

    Both parts keep the input order among themselves, so a split is stable under re-runs."""
    if not 0.0 <= tune_fraction < 1.0:
        raise SupereditError(f"--tune-fraction must be in [0, 1) (got {tune_fraction})")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_tune = round(tune_fraction * len(items))
    tune_idx = sorted(order[:n_tune])
    eval_idx = sorted(order[n_tune:])
    return [items[i] for i in tune_idx], [items[i] for i in eval_idx]
