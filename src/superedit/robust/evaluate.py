"""Robustness metrics of an edit, with and without the REP adaptor (single-edit protocol).

Every metric is teacher-forced: a query counts as correct when **every** target token is the
argmax of the model's next-token distribution (``TargetScore.hit`` of :mod:`superedit.eval.scoring`).

* ``success``     — the rewrite prompt → ``target_new``;
* ``paraphrase``  — ``request.paraphrase_prompts`` → ``target_new``;
* ``locality``    — neighbourhood prompts: the post-edit argmax tokens (teacher-forced on the
  neighbourhood answers) equal the pre-edit ones;
* ``rephrase_{id,ood}``, ``shuffle_{id,ood}``, ``long_{id,ood}`` — the perturbed queries of
  :mod:`superedit.robust.perturb` → ``target_new``; ``id`` variants are the ones the adaptor was
  trained on, ``ood`` ones it never saw.

Settings per request: ``pre`` (unedited model), ``<method>`` (the edit alone) and ``<method>+rep``
(edit + adaptor at τ), plus a τ sweep of the adaptor. Between requests the weights are restored and
the adaptor removed (independent single edits). A metric with no query for a request has ``n = 0``
and is left out of the averages (the reason is in the record's ``skips``); the table reports
micro-averages: correct queries / queries over all requests.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ..errors import RequestFormatError, SubjectNotFoundError, TemplateError
from ..eval.scoring import score_targets
from ..utils.io import append_jsonl
from ..utils.logs import get_logger
from ..utils.progress import progress
from .adaptor import AdaptorHParams, train_adaptor
from .perturb import KINDS, SPLITS, PerturbationSet

log = get_logger(__name__)

METRICS = ["success", "paraphrase", "locality"] + [f"{k}_{s}" for k in KINDS for s in SPLITS]
REQUEST_ERRORS = (SubjectNotFoundError, TemplateError, RequestFormatError, ValueError, torch.linalg.LinAlgError)


# ------------------------------------------------------------------------------------------ scoring
def query_sets(request, pset: PerturbationSet | None) -> dict[str, list[str]]:
    """Prompts (filled) per metric that answer ``target_new`` (locality is handled apart)."""
    q = {"success": [request.filled_prompt()], "paraphrase": list(request.paraphrase_prompts)}
    for kind in KINDS:
        for split in SPLITS:
            q[f"{kind}_{split}"] = [p.prompt for p in pset.of(kind, split)] if pset is not None else []
    return q


def evaluate_edit(adapter, request, pset: PerturbationSet | None, pre_locality: list[list[int]] | None,
                  batch_size: int = 16, metrics: Sequence[str] | None = None) -> tuple[dict, list[list[int]]]:
    """``({metric: {"n", "correct"}}, locality argmax)`` for the model's current state."""
    wanted = set(metrics or METRICS)
    q = {k: v for k, v in query_sets(request, pset).items() if k in wanted}
    prompts, targets, owner = [], [], []
    for name, ps in q.items():
        prompts += ps
        targets += [request.target_new] * len(ps)
        owner += [name] * len(ps)
    n_rw = len(prompts)
    loc_prompts = list(request.neighborhood_prompts) if "locality" in wanted else []
    prompts += loc_prompts
    targets += list(request.neighborhood_answers)[:len(loc_prompts)]
    scores = score_targets(adapter, prompts, targets, batch_size)
    res = {name: {"n": 0, "correct": 0} for name in q}
    for name, sc in zip(owner, scores[:n_rw]):
        res[name]["n"] += 1
        res[name]["correct"] += int(sc.hit)
    loc = [list(sc.argmax) for sc in scores[n_rw:]]
    if "locality" in wanted:
        res["locality"] = {"n": 0, "correct": 0}
        if pre_locality is not None:
            for a, b in zip(pre_locality, loc):
                res["locality"]["n"] += 1
                res["locality"]["correct"] += int(a == b)
    for r in res.values():
        r["acc"] = r["correct"] / r["n"] if r["n"] else None
    return res, loc


# ------------------------------------------------------------------------------------------ edit plumbing
def edit_directions(adapter, request, method: str, hp, stats, layers: Sequence[int],
                    with_whitener: bool = False) -> tuple[dict, dict, dict]:
    """k* per edited layer (read on the model in its current, edited state) and the unit direction u.

    Methods whose edits are rank one per request with right factor C⁻¹k* (registry ``rank_one ==
    "per_request"``: ROME): u = C⁻¹k*/‖C⁻¹k*‖ (with the method's ridge); others (MEMIT): u = k*/‖k*‖.
    Returns (k*, u, whitener) per layer; the whitener (C with the same ridge, Cholesky-factorised; for
    the whitening-space similarity) only with ``with_whitener``, else {}.
    """
    from ..editing.contexts import context_prefixes
    from ..editing.keys import compute_keys
    from ..editing.methods import get_method
    from ..editing.solve import spd_solve
    from ..stats.whitening import Whitener, with_ridge

    c_inv_direction = get_method(method).rank_one == "per_request"
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    ks = compute_keys(adapter, [request.prompt], [request.subject], list(layers), prefixes, hp.fact_token)
    k_star, dirs, whiteners = {}, {}, {}
    for l in layers:
        k = ks[l][0].to(torch.float64)
        C = None
        if c_inv_direction or with_whitener:
            C = with_ridge(stats.mom2(l).to(k.device, torch.float64), getattr(hp, "mom2_ridge", 0.0) or 0.0)
        u = spd_solve(C, k) if c_inv_direction else k
        if with_whitener:
            whiteners[l] = Whitener(C, layer=l, max_condition=float("inf"))
        k_star[l] = k
        dirs[l] = u / u.norm().clamp_min(1e-30)
    return k_star, dirs, whiteners


def negative_corpus_texts(words: Sequence[str], n_docs: int, words_per_doc: int, seed) -> list[str]:
    """``n_docs`` random spans of corpus words (gate negatives)."""
    import random

    if not words or n_docs <= 0:
        return []
    rng = random.Random(f"superedit-robust-neg:{seed}")
    out = []
    for _ in range(n_docs):
        k = min(words_per_doc, len(words))
        s = rng.randrange(0, len(words) - k + 1)
        out.append(" ".join(words[s:s + k]))
    return out


def check_finished_records(done: Sequence[dict], requests: Sequence) -> None:
    """ValueError unless ``done`` are records of the first ``len(done)`` of ``requests``, in order (each
    naming its request's index and case_id): what :func:`run_robust` may continue from."""
    if len(done) > len(requests):
        raise ValueError(f"{len(done)} finished records for {len(requests)} requests")
    for i, (rec, req) in enumerate(zip(done, requests)):
        if rec.get("index") != i or str(rec.get("case_id")) != str(req.case_id):
            raise ValueError(f"finished record {i} is for request index {rec.get('index')} (case_id "
                             f"{rec.get('case_id')!r}), not {i} ({req.case_id!r}): the requests differ from the run's")


def run_robust(adapter, requests: Sequence, psets: Sequence[PerturbationSet], method: str, hparams, stats,
               adaptor_mode: str = "both", adaptor_hp: AdaptorHParams | None = None,
               tau_sweep: Sequence[float] = (), negative_words: Sequence[str] = (), n_negative_docs: int = 8,
               neighbourhood_negatives: bool = False, out_path=None, save_dir=None, batch_size: int = 16,
               corpus_texts: Sequence[str] = (), done: Sequence[dict] = ()) -> list[dict]:
    """Single-edit protocol over ``requests``; one record per request (appended to ``out_path``).

    ``done``: records of the first ``len(done)`` requests from an earlier, interrupted run with the same
    settings (``superedit robust --resume``); they are kept as they are and those requests skipped. Each
    must name its request's index and case_id, else ValueError (nothing is evaluated)."""
    from ..editing.methods import get_method

    if adaptor_mode not in ("on", "off", "both"):
        raise ValueError(f"--adaptor must be on, off or both (got {adaptor_mode!r})")
    adaptor_hp = adaptor_hp or AdaptorHParams()
    entry = get_method(method)
    entry.require_weight_edits("the robustness evaluation (one delta applied per request)")
    layers = sorted(hparams.layers)
    check_finished_records(done, requests)
    records = list(done)
    todo = list(zip(requests, psets))[len(done):]
    for i, (req, pset) in enumerate(progress(todo, total=len(requests), initial=len(done), desc="robust"),
                                    start=len(done)):
        t0 = time.time()
        rec = {"index": i, "case_id": req.case_id, "subject": req.subject, "prompt": req.prompt,
               "target_new": req.target_new, "method": method, "layers": layers,
               "counts": pset.counts(), "skips": [s.to_dict() for s in pset.skips], "settings": {}}
        try:
            pre, pre_loc = evaluate_edit(adapter, req, pset, None, batch_size)
            pre.pop("locality", None)
            rec["settings"]["pre"] = pre
            delta = entry.fn(adapter, [req], hparams, stats).delta
            delta.apply(adapter)
            try:
                if adaptor_mode in ("off", "both"):
                    rec["settings"][method], _ = evaluate_edit(adapter, req, pset, pre_loc, batch_size)
                adaptor = None
                if adaptor_mode in ("on", "both"):
                    k_star, dirs, whiteners = edit_directions(adapter, req, method, hparams, stats, layers,
                                                              with_whitener=adaptor_hp.similarity == "whitening")
                    negs = negative_corpus_texts(negative_words, n_negative_docs, 64, f"{i}:{req.case_id}")
                    if neighbourhood_negatives:
                        negs += list(req.neighborhood_prompts)
                    adaptor, info = train_adaptor(adapter, req, pset.of(split="id"), layers, k_star, dirs, adaptor_hp,
                                                  negs, meta={"case_id": req.case_id, "method": method},
                                                  whiteners=whiteners, corpus_texts=corpus_texts)
                    rec["adaptor"] = info
                    with adaptor.active(adapter):
                        rec["settings"][f"{method}+rep"], _ = evaluate_edit(adapter, req, pset, pre_loc, batch_size)
                        sweep = []
                        for tau in tau_sweep:
                            adaptor.tau = float(tau)
                            m, _ = evaluate_edit(adapter, req, pset, pre_loc, batch_size)
                            sweep.append({"tau": float(tau), "metrics": m})
                        adaptor.tau = adaptor_hp.tau
                    if sweep:
                        rec["tau_sweep"] = sweep
                if save_dir is not None:
                    from .adaptor import save_edit

                    save_edit(f"{save_dir}/{i:05d}", delta, adaptor)
            finally:
                delta.revert(adapter)
        except REQUEST_ERRORS as exc:
            log.warning("request %s (%s) failed: %s", i, req.case_id, exc)
            rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["seconds"] = round(time.time() - t0, 3)
        records.append(rec)
        if out_path is not None:
            append_jsonl(out_path, rec)
    return records


# ------------------------------------------------------------------------------------------ summaries
def _pool(metric_dicts: Sequence[dict]) -> dict:
    out = {}
    for name in METRICS:
        n = sum(d.get(name, {}).get("n", 0) for d in metric_dicts)
        c = sum(d.get(name, {}).get("correct", 0) for d in metric_dicts)
        edits = sum(1 for d in metric_dicts if d.get(name, {}).get("n", 0) > 0)
        out[name] = {"acc": c / n if n else None, "n": n, "edits": edits}
    return out


def summarize_records(records: Sequence[dict]) -> dict:
    """Micro-averaged table: ``{"settings": {setting: {metric: {acc, n, edits}}}, "tau_sweep": [...], ...}``."""
    ok = [r for r in records if "error" not in r]
    settings: dict[str, list[dict]] = {}
    for r in ok:
        for s, m in r["settings"].items():
            settings.setdefault(s, []).append(m)
    sweep: dict[float, list[dict]] = {}
    for r in ok:
        for row in r.get("tau_sweep", []):
            sweep.setdefault(row["tau"], []).append(row["metrics"])
    skips: dict[str, dict[str, int]] = {}
    for r in records:
        for s in r.get("skips", []):
            skips.setdefault(s["kind"], {}).setdefault(s["reason"], 0)
            skips[s["kind"]][s["reason"]] += 1
    gates = [lay for r in ok for lay in r.get("adaptor", {}).get("layers", {}).values()]

    def gmean(key):
        xs = [g[key] for g in gates if g.get(key) is not None]
        return sum(xs) / len(xs) if xs else None

    return {"n_requests": len(records), "n_ok": len(ok), "n_errors": len(records) - len(ok),
            "errors": [{"index": r["index"], "case_id": r["case_id"], "error": r["error"]} for r in records if "error" in r],
            "settings": {s: _pool(ms) for s, ms in settings.items()},
            "tau_sweep": [{"tau": t, **{k: v["acc"] for k, v in _pool(ms).items()}} for t, ms in sorted(sweep.items())],
            "skips": skips,
            "adaptor": {k: gmean(k) for k in ("loss_start", "loss_end", "gate_orig", "gate_pos_mean", "gate_neg_mean",
                                              "gate_pos_open_frac", "gate_neg_open_frac", "cos_u_before", "cos_u_after")}
            if gates else None}


def table_rows(summary: dict) -> list[dict]:
    """Flat rows (setting, metric, acc, n, edits) for CSV."""
    return [{"setting": s, "metric": m, **v} for s, ms in summary["settings"].items() for m, v in ms.items()]
