"""Knowledge-editing metrics as in the literature, teacher-forced and batched.

Every score reduces over the one teacher-forced scorer, :func:`superedit.eval.scoring.score_targets`
(``prompt + " " + target`` rows; per target token its log-probability and the argmax prediction). All
rows of all requests go through one scorer call (:func:`evaluate_requests`); :func:`evaluate_request`
is a list of one, and the lifelong runner's :func:`batch_evaluate` is the same call with a cap on
neighbourhood prompts and an argmax success rule for requests without ``target_true``.

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

Generation-based (``greedy_tokens > 0``; :mod:`superedit.eval.generation`): greedy continuations of the
rewrite, paraphrase and neighbourhood prompts; ``gen_efficacy`` / ``gen_paraphrase`` = the new object
is said and the old one is not; ``gen_neighborhood`` = a neighbour still says its own answer and not
the new object. Teacher forcing overstates what an edited model says; these report what it says.

Summaries (:func:`summarize`) give each mean with its n and a 95% percentile bootstrap interval over
requests (``ci``), so a reader can tell variance from a difference.

Absent inputs never produce zeros: a metric whose inputs the request lacks is simply not in the
result dict.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..errors import RequestFormatError
from .scoring import TargetScore, score_targets

#: Keys of :func:`evaluate_request` results that are averaged in summaries (scalars in [0, 1] or real).
SCALAR_METRICS = (
    "rewrite_nll_new", "rewrite_nll_true", "rewrite_prob_new", "rewrite_prob_true",
    "efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
    "neighborhood_score", "neighborhood_magnitude", "score",
    "rewrite_acc", "rephrase_acc", "locality", "neighborhood_acc", "ngram_entropy",
    "gen_efficacy", "gen_paraphrase", "gen_neighborhood",
)
#: Internal key: pre-edit argmax tokens of each neighbourhood answer (used for locality).
NEIGHBOR_ARGMAX = "_neighborhood_argmax"


def target_nll(adapter, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[float]:
    """Mean token NLL of each target after its prompt (``prompt + " " + target``, teacher-forced)."""
    return [r.nll for r in score_targets(adapter, prompts, targets, batch_size)]


def token_accuracy(adapter, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[float]:
    """EasyEdit's teacher-forced token accuracy of each target after its prompt."""
    return [r.accuracy for r in score_targets(adapter, prompts, targets, batch_size)]


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


def _request_rows(request, max_neighbours: int | None, paraphrases: bool) -> list[tuple[str, str, str]]:
    """The (part, prompt, target) rows one request is scored on (see the module docstring)."""
    rewrite = request.filled_prompt()
    new, true = request.target_new, request.target_true
    para = list(request.paraphrase_prompts) if paraphrases else []
    neigh = list(request.neighborhood_prompts)
    neigh_ans = list(request.neighborhood_answers)
    if len(neigh_ans) != len(neigh):
        raise RequestFormatError(f"request {request.case_id!r}: {len(neigh)} neighbourhood prompts but "
                                 f"{len(neigh_ans)} answers; give one answer per neighbourhood prompt")
    if max_neighbours is not None:
        neigh, neigh_ans = neigh[:max_neighbours], neigh_ans[:max_neighbours]
    rows = [("rw_new", rewrite, new)]
    if true is not None:
        rows.append(("rw_true", rewrite, true))
    rows += [("para_new", p, new) for p in para]
    if true is not None:
        rows += [("para_true", p, true) for p in para]
    rows += [("nb_ans", p, a) for p, a in zip(neigh, neigh_ans)]
    rows += [("nb_new", p, new) for p in neigh]
    return rows


def _reduce_request(get: dict[str, list[TargetScore]], pre: dict | None, success_by_argmax: bool) -> dict:
    """The metrics of one request from its rows' scores (``get[part]``, in prompt order)."""
    res: dict = {}
    rw_new = get["rw_new"][0]
    res["rewrite_nll_new"] = rw_new.nll
    res["rewrite_prob_new"] = rw_new.prob
    res["rewrite_acc"] = rw_new.accuracy
    if get.get("rw_true"):
        rw_true = get["rw_true"][0]
        res["rewrite_nll_true"] = rw_true.nll
        res["rewrite_prob_true"] = rw_true.prob
        res["efficacy_score"] = float(rw_new.nll < rw_true.nll)
        res["efficacy_magnitude"] = rw_new.prob - rw_true.prob
    elif success_by_argmax:
        res["efficacy_score"] = float(rw_new.hit)
    if get.get("para_new"):
        res["rephrase_acc"] = _mean([r.accuracy for r in get["para_new"]])
        if get.get("para_true"):
            pairs = list(zip(get["para_new"], get["para_true"]))
            res["paraphrase_score"] = _mean([float(a.nll < b.nll) for a, b in pairs])
            res["paraphrase_magnitude"] = _mean([a.prob - b.prob for a, b in pairs])
        elif success_by_argmax:
            res["paraphrase_score"] = _mean([float(a.hit) for a in get["para_new"]])
    if get.get("nb_ans"):
        pairs = list(zip(get["nb_ans"], get["nb_new"]))
        res["neighborhood_score"] = _mean([float(a.nll < b.nll) for a, b in pairs])
        res["neighborhood_magnitude"] = _mean([a.prob - b.prob for a, b in pairs])
        res["neighborhood_acc"] = _mean([a.accuracy for a, _ in pairs])
        res[NEIGHBOR_ARGMAX] = [list(a.argmax) for a, _ in pairs]
        if pre is not None and pre.get(NEIGHBOR_ARGMAX) is not None:
            res["locality"] = locality_from_argmax(pre[NEIGHBOR_ARGMAX], res[NEIGHBOR_ARGMAX])
    if all(k in res for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")):
        res["score"] = harmonic_mean([res["efficacy_score"], res["paraphrase_score"], res["neighborhood_score"]])
    return res


def evaluate_requests(adapter, requests: Sequence, pres: Sequence[dict | None] | None = None, *,
                      max_neighbours: int | None = None, paraphrases: bool = True, success_by_argmax: bool = False,
                      batch_size: int = 32) -> list[dict]:
    """:func:`evaluate_request`'s teacher-forced metrics for many requests from ONE scorer call.

    Args:
        pres: per request, its pre-edit result (for locality) or None.
        max_neighbours: score only the first this many neighbourhood prompts (None: all; 0: none).
        paraphrases: score the paraphrase prompts.
        success_by_argmax: for a request without ``target_true``, efficacy/paraphrase scores are
            1 when every ``target_new`` token is the argmax (the lifelong runner's rule); off, they are
            absent (their CounterFact definition needs ``target_true``).
    """
    requests = list(requests)
    pres = list(pres) if pres is not None else [None] * len(requests)
    if len(pres) != len(requests):
        raise ValueError(f"{len(requests)} requests but {len(pres)} pre-edit results")
    plans = [_request_rows(r, max_neighbours, paraphrases) for r in requests]
    flat = [row for plan in plans for row in plan]
    scores = score_targets(adapter, [p for _, p, _ in flat], [t for _, _, t in flat], batch_size)
    out, at = [], 0
    for plan, pre in zip(plans, pres):
        get: dict[str, list[TargetScore]] = {}
        for (part, _, _), sc in zip(plan, scores[at:at + len(plan)]):
            get.setdefault(part, []).append(sc)
        at += len(plan)
        out.append(_reduce_request(get, pre, success_by_argmax))
    return out


def evaluate_request(adapter, request, pre: dict | None = None, *, gen_tokens: int = 0, seed: int = 0,
                     batch_size: int = 32, greedy_tokens: int = 0, max_neighbours: int | None = None) -> dict:
    """Every applicable metric for one :class:`~superedit.data.EditRequest` (see the module docstring).

    Call it once before the edit (``pre = evaluate_request(adapter, req)``) and once after with
    ``pre=pre``: locality is only computed when ``pre`` is given. ``gen_tokens > 0`` also samples
    that many tokens per generation prompt (or the rewrite prompt when the request has none) and
    reports ROME's ``ngram_entropy`` plus the texts (``gen_texts``). ``greedy_tokens > 0`` adds the
    generation-based scores (``gen_efficacy``, ``gen_paraphrase``, ``gen_neighborhood``; texts under
    ``greedy_texts``) over the first ``max_neighbours`` neighbourhood prompts (None: all).

    Keys starting with ``_`` are internal (the pre-edit argmax for locality).
    """
    from .fluency import generate_texts, n_gram_entropy

    res = evaluate_requests(adapter, [request], [pre], batch_size=batch_size, max_neighbours=max_neighbours)[0]
    if greedy_tokens and greedy_tokens > 0:
        from .generation import generation_scores

        g = generation_scores(adapter, request, greedy_tokens, max_neighbours, batch_size)
        res["greedy_texts"] = g.pop("gen_texts")
        res.update({k: v for k, v in g.items() if v is not None})
    if gen_tokens and gen_tokens > 0:
        prompts = list(request.generation_prompts) or [request.filled_prompt()]
        texts = generate_texts(adapter, prompts, gen_tokens, seed=seed)
        res["ngram_entropy"] = n_gram_entropy(texts)
        res["gen_texts"] = texts
    return res


def batch_evaluate(adapter, requests: Sequence, max_neighbours: int = 5, paraphrases: bool = True,
                   batch_size: int = 64) -> list[dict]:
    """The lifelong runner's per-request scores: :func:`evaluate_requests` with the first
    ``max_neighbours`` neighbourhood prompts and ``success_by_argmax`` (requests without
    ``target_true`` still get an efficacy/paraphrase success)."""
    return evaluate_requests(adapter, requests, max_neighbours=max_neighbours, paraphrases=paraphrases,
                             success_by_argmax=True, batch_size=batch_size)


def public(metrics: dict | None) -> dict | None:
    """``metrics`` without the internal ``_``-keys (for records)."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def summarize(results: Sequence[dict | None]) -> dict:
    """Means of every scalar metric over the results that have it, plus counts and ROME's S.

    Returns ``{"means": {metric: mean}, "counts": {metric: n}, "ci": {metric: [low, high]}}``;
    ``means["score"]`` is the harmonic mean of the mean efficacy, paraphrase and neighbourhood scores
    (ROME's S) when all three exist; ``ci`` is the 95% percentile bootstrap interval of each mean over
    requests (:func:`bootstrap_ci`, 1,000 resamples, seeded).
    """
    means, counts, cis = {}, {}, {}
    present = [r for r in results if r]
    for key in SCALAR_METRICS:
        if key == "score":
            continue
        vals = [r[key] for r in present if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                and math.isfinite(r[key])]
        if vals:
            means[key] = _mean(vals)
            counts[key] = len(vals)
            cis[key] = bootstrap_ci(vals)
    parts = ("efficacy_score", "paraphrase_score", "neighborhood_score")
    if all(k in means for k in parts):
        means["score"] = harmonic_mean([means[k] for k in parts])
        counts["score"] = min(counts[k] for k in parts)
    return {"means": means, "counts": counts, "ci": cis}


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling the values with replacement)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1.0 - level) / 2
    return [float(np.quantile(means, a)), float(np.quantile(means, 1 - a))]


def share_ci(value: float | None, n: int | None, **kw) -> list[float] | None:
    """Bootstrap interval of a share ``value`` of ``n`` independent 0/1 items, when only the share and the
    count were saved: the percentile bootstrap of a mean of 0/1 values depends on their counts only, so
    it is :func:`bootstrap_ci` of ``round(value·n)`` ones and the rest zeros. None without a value or n."""
    if value is None or not n:
        return None
    k = round(value * n)
    return bootstrap_ci([1.0] * k + [0.0] * (n - k), **kw)
