"""Knowledge-editing metrics as in the literature, teacher-forced and batched.

All scores come from one teacher-forced forward pass over ``prompt + " " + target`` rows built by
:func:`superedit.models.encode_prompt_target`; ``logits[p]`` at the positions before each target
token give its log-probability and the argmax prediction.

CounterFact (ROME, Meng et al. 2022; ``experiments/summarize.py``)
    For a prompt and two answers, compare the mean per-token NLL of each answer.
    * efficacy_score     = [NLL(new) < NLL(true)] on the rewrite prompt.
    * paraphrase_score   = mean over paraphrase prompts of [NLL(new) < NLL(true)].
    * neighborhood_score = mean over neighbourhood prompts of [NLL(answer) < NLL(new)], ``answer``
      the prompt's own (true) answer, the counterpart being ``target_new``.
    * magnitudes (ROME's ``*_diff``): with P = exp(−mean token NLL), i.e. the geometric mean of the
      per-token probabilities, efficacy/paraphrase_magnitude = P(new) − P(true) and
      neighborhood_magnitude = P(answer) − P(new). The mean-token form (not the product over tokens)
      is ROME's choice; it makes answers of different token lengths comparable.
    * score (S) = harmonic mean of efficacy, paraphrase and neighbourhood scores. Per request it uses
      that request's three scores; a run's S (``summarize``) is the harmonic mean of the three
      *means*, as in ROME's tables.
    Needs ``target_true`` (efficacy/paraphrase) — without it these keys are absent.

zsRE / EasyEdit (``easyeditor/evaluate``)
    * rewrite_acc   = fraction of target_new tokens that are the argmax, teacher-forced on the
      rewrite prompt.
    * rephrase_acc  = the same on the paraphrase prompts (mean over prompts).
    * locality      = mean over neighbourhood prompts of the fraction of the answer positions where the
      post-edit argmax equals the pre-edit argmax, teacher-forced on the neighbourhood answer
      (EasyEdit's ``compute_locality_quality`` + ``np.mean(np.equal(pre, post))``). Needs the
      pre-edit evaluation: ``post = evaluate_request(adapter, req, pre=pre)``.
    * neighborhood_acc = token accuracy of the neighbourhood answers (absolute, not relative to pre).

Fluency (ROME): ``ngram_entropy`` of sampled continuations, see :mod:`superedit.eval.fluency`.

Absent inputs never produce zeros: a metric whose inputs the request lacks is simply not in the
result dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..models import encode_prompt_target

#: Keys of :func:`evaluate_request` results that are averaged in summaries (scalars in [0, 1] or real).
SCALAR_METRICS = (
    "rewrite_nll_new", "rewrite_nll_true", "rewrite_prob_new", "rewrite_prob_true",
    "efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
    "neighborhood_score", "neighborhood_magnitude", "score",
    "rewrite_acc", "rephrase_acc", "locality", "neighborhood_acc", "ngram_entropy",
)
#: Internal key: pre-edit argmax tokens of each neighbourhood answer (used for locality).
NEIGHBOR_ARGMAX = "_neighborhood_argmax"


@dataclass
class TeacherForced:
    """Per-row teacher-forced results for one (prompt, target) pair."""

    target_ids: list[int]
    logprobs: list[float]  #: log P(target token | prompt, previous target tokens)
    argmax: list[int]  #: the model's argmax at each target position

    @property
    def nll(self) -> float:
        """Mean token NLL of the target."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        """exp(−mean token NLL): the geometric mean of the target's token probabilities."""
        return math.exp(-self.nll)

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens that are the argmax."""
        return sum(int(a == t) for a, t in zip(self.argmax, self.target_ids)) / len(self.target_ids)


@torch.no_grad()
def teacher_forced(adapter, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[TeacherForced]:
    """One :class:`TeacherForced` per (prompt, target), in ``batch_size`` forward passes."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    out: list[TeacherForced] = []
    for s in range(0, len(prompts), batch_size):
        b = encode_prompt_target(adapter.tokenizer, list(prompts[s:s + batch_size]), list(targets[s:s + batch_size]),
                                 device=adapter.device)
        logits = adapter.model(**b.model_inputs()).logits
        for r, (pos, ids) in enumerate(zip(b.target_positions, b.target_ids)):
            logp = F.log_softmax(logits[r, pos].float(), dim=-1)
            idx = torch.tensor(ids, device=logp.device)
            lp = logp.gather(-1, idx[:, None])[:, 0]
            out.append(TeacherForced(list(ids), lp.tolist(), logp.argmax(-1).tolist()))
    return out


def target_nll(adapter, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[float]:
    """Mean token NLL of each target after its prompt (``prompt + " " + target``, teacher-forced)."""
    return [r.nll for r in teacher_forced(adapter, prompts, targets, batch_size)]


def token_accuracy(adapter, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[float]:
    """EasyEdit's teacher-forced token accuracy of each target after its prompt."""
    return [r.accuracy for r in teacher_forced(adapter, prompts, targets, batch_size)]


def argmax_tokens(adapter, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[list[int]]:
    """The argmax predictions at the target positions (teacher-forced on the target)."""
    return [r.argmax for r in teacher_forced(adapter, prompts, targets, batch_size)]


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (ROME's S)."""
    if not values:
        raise ValueError("harmonic_mean of nothing")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def locality_from_argmax(pre: Sequence[Sequence[int]], post: Sequence[Sequence[int]]) -> float:
    """Mean over prompts of the fraction of answer positions whose argmax is unchanged."""
    if len(pre) != len(post) or not pre:
        raise ValueError(f"locality needs the same non-empty prompts pre and post ({len(pre)} vs {len(post)})")
    fr = []
    for a, b in zip(pre, post):
        if len(a) != len(b):
            raise ValueError("pre/post argmax lists differ in length; were the same neighbourhood answers used?")
        fr.append(sum(int(x == y) for x, y in zip(a, b)) / len(a))
    return sum(fr) / len(fr)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def evaluate_request(adapter, request, pre: dict | None = None, *, gen_tokens: int = 0, seed: int = 0,
                     batch_size: int = 32) -> dict:
    """Every applicable metric for one :class:`~superedit.data.EditRequest` (see the module docstring).

    Call it once before the edit (``pre = evaluate_request(adapter, req)``) and once after with
    ``pre=pre``: locality is only computed when ``pre`` is given. ``gen_tokens > 0`` also samples
    that many tokens per generation prompt (or the rewrite prompt when the request has none) and
    reports ROME's ``ngram_entropy`` plus the texts (``gen_texts``).

    Keys starting with ``_`` are internal (the pre-edit argmax for locality).
    """
    from .fluency import generate_texts, n_gram_entropy

    rewrite = request.filled_prompt()
    new, true = request.target_new, request.target_true
    para = list(request.paraphrase_prompts)
    neigh = list(request.neighborhood_prompts)
    neigh_ans = list(request.neighborhood_answers)
    if len(neigh_ans) != len(neigh):
        raise ValueError(f"request {request.case_id!r}: {len(neigh)} neighbourhood prompts but {len(neigh_ans)} answers")

    # one flat batch of (prompt, target) rows; slices name them
    rows: list[tuple[str, str]] = []
    slices: dict[str, slice] = {}

    def add(name, pairs):
        slices[name] = slice(len(rows), len(rows) + len(pairs))
        rows.extend(pairs)

    add("rw_new", [(rewrite, new)])
    if true is not None:
        add("rw_true", [(rewrite, true)])
    if para:
        add("para_new", [(p, new) for p in para])
        if true is not None:
            add("para_true", [(p, true) for p in para])
    if neigh:
        add("nb_ans", list(zip(neigh, neigh_ans)))
        add("nb_new", [(p, new) for p in neigh])
    tf = teacher_forced(adapter, [p for p, _ in rows], [t for _, t in rows], batch_size)
    get = {name: tf[sl] for name, sl in slices.items()}

    res: dict = {}
    rw_new = get["rw_new"][0]
    res["rewrite_nll_new"] = rw_new.nll
    res["rewrite_prob_new"] = rw_new.prob
    res["rewrite_acc"] = rw_new.accuracy
    if "rw_true" in get:
        rw_true = get["rw_true"][0]
        res["rewrite_nll_true"] = rw_true.nll
        res["rewrite_prob_true"] = rw_true.prob
        res["efficacy_score"] = float(rw_new.nll < rw_true.nll)
        res["efficacy_magnitude"] = rw_new.prob - rw_true.prob
    if "para_new" in get:
        res["rephrase_acc"] = _mean([r.accuracy for r in get["para_new"]])
        if "para_true" in get:
            pairs = list(zip(get["para_new"], get["para_true"]))
            res["paraphrase_score"] = _mean([float(a.nll < b.nll) for a, b in pairs])
            res["paraphrase_magnitude"] = _mean([a.prob - b.prob for a, b in pairs])
    if "nb_ans" in get:
        pairs = list(zip(get["nb_ans"], get["nb_new"]))
        res["neighborhood_score"] = _mean([float(a.nll < b.nll) for a, b in pairs])
        res["neighborhood_magnitude"] = _mean([a.prob - b.prob for a, b in pairs])
        res["neighborhood_acc"] = _mean([a.accuracy for a, _ in pairs])
        res[NEIGHBOR_ARGMAX] = [a.argmax for a, _ in pairs]
        if pre is not None and pre.get(NEIGHBOR_ARGMAX) is not None:
            res["locality"] = locality_from_argmax(pre[NEIGHBOR_ARGMAX], res[NEIGHBOR_ARGMAX])
    if all(k in res for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")):
        res["score"] = harmonic_mean([res["efficacy_score"], res["paraphrase_score"], res["neighborhood_score"]])
    if gen_tokens and gen_tokens > 0:
        prompts = list(request.generation_prompts) or [rewrite]
        texts = generate_texts(adapter, prompts, gen_tokens, seed=seed)
        res["ngram_entropy"] = n_gram_entropy(texts)
        res["gen_texts"] = texts
    return res


def public(metrics: dict | None) -> dict | None:
    """``metrics`` without the internal ``_``-keys (for records)."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def summarize(results: Sequence[dict | None]) -> dict:
    """Means of every scalar metric over the results that have it, plus counts and ROME's S.

    Returns ``{"means": {metric: mean}, "counts": {metric: n}}``; ``means["score"]`` is the harmonic
    mean of the mean efficacy, paraphrase and neighbourhood scores (ROME's S) when all three exist.
    """
    means, counts = {}, {}
    present = [r for r in results if r]
    for key in SCALAR_METRICS:
        if key == "score":
            continue
        vals = [r[key] for r in present if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                and math.isfinite(r[key])]
        if vals:
            means[key] = _mean(vals)
            counts[key] = len(vals)
    parts = ("efficacy_score", "paraphrase_score", "neighborhood_score")
    if all(k in means for k in parts):
        means["score"] = harmonic_mean([means[k] for k in parts])
        counts["score"] = min(counts[k] for k in parts)
    return {"means": means, "counts": counts}
