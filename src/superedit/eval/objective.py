"""Editing-objective perplexity: how unexpected the answer an edit writes is to the unedited model.

The D4S study (Huang et al., NeurIPS 2024) measures, for every request of its Multi-Question Dataset,
the perplexity of the editing objective under the model before editing, and finds it orders the
question types by the damage their edits do (the paper's means: direct generation 12.3,
multiple-choice 43.3, true/false 297.4). For a request with prompt ``p`` (subject filled in) and
objective tokens ``y₁ … y_T`` (``" " + target_new``, the package's one target encoding):

    NLL = −(1/T) Σ_t log P(y_t | p, y_<t),        PPL = exp(NLL)

teacher-forced through :func:`superedit.eval.scoring.score_targets`; ``PPL`` is the reciprocal of
the geometric mean of the objective's token probabilities (1 when the model is certain of it).

:func:`summarize_perplexities` groups the per-request values by question type (``meta
["question_type"]``, ``"untyped"`` without one) and gives n, the arithmetic mean (the paper's
reduction, as far as its text says), median, quartiles, extremes, the mean of log PPL and the
token-pooled PPL ``exp(Σ NLL·T / Σ T)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

__all__ = ["ObjectivePerplexity", "PAPER_MEAN_PPL", "question_type_of", "objective_perplexities",
           "summarize_perplexities"]

#: the D4S study's mean editing-objective PPL per MQD question type (its own model, not ours)
PAPER_MEAN_PPL = {"dg": 12.3, "mc": 43.3, "tf": 297.4}


@dataclass(frozen=True)
class ObjectivePerplexity:
    """The objective's perplexity for one request."""

    index: int  #: position in the request list
    case_id: str | int | None
    question_type: str
    relation: str | None
    objective: str  #: the request's target_new
    n_tokens: int  #: T, the objective's token count
    nll: float  #: mean token NLL (nats)
    ppl: float  #: exp(nll)

    def to_dict(self) -> dict:
        return asdict(self)


def question_type_of(request) -> str:
    """The MQD question type in ``request.meta`` (``tf`` / ``mc`` / ``dg``), or ``"untyped"``."""
    meta = request.meta or {}
    return str(meta.get("question_type") or "untyped")


def objective_perplexities(adapter, requests: Sequence, batch_size: int = 32) -> list[ObjectivePerplexity]:
    """One :class:`ObjectivePerplexity` per request (input order), under the model as it is now."""
    from .scoring import score_targets

    scores = score_targets(adapter, [r.filled_prompt() for r in requests], [r.target_new for r in requests],
                           batch_size)
    return [ObjectivePerplexity(i, r.case_id, question_type_of(r), r.relation_id, r.target_new,
                                len(s.target_ids), s.nll, math.exp(s.nll))
            for i, (r, s) in enumerate(zip(requests, scores))]


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a sorted, non-empty list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def summarize_perplexities(rows: Sequence[ObjectivePerplexity]) -> dict[str, dict]:
    """Per question type (sorted): n, mean, median, q25, q75, min, max, mean_log_ppl, pooled_ppl,
    mean_tokens."""
    groups: dict[str, list[ObjectivePerplexity]] = {}
    for row in rows:
        groups.setdefault(row.question_type, []).append(row)
    out: dict[str, dict] = {}
    for qtype in sorted(groups):
        group = groups[qtype]
        ppl = sorted(r.ppl for r in group)
        tokens = sum(r.n_tokens for r in group)
        out[qtype] = {
            "n": len(group),
            "mean": sum(ppl) / len(ppl),
            "median": _quantile(ppl, 0.5),
            "q25": _quantile(ppl, 0.25),
            "q75": _quantile(ppl, 0.75),
            "min": ppl[0],
            "max": ppl[-1],
            "mean_log_ppl": sum(r.nll for r in group) / len(group),
            "pooled_ppl": math.exp(sum(r.nll * r.n_tokens for r in group) / tokens),
            "mean_tokens": tokens / len(group),
        }
    return out
