"""The shared "edit + evaluate" loop behind ``superedit edit`` (and anything that runs many edits).

For each batch of requests:

1. check each request (template, subject tokens) and evaluate it *before* the edit (``pre``);
   a request that fails here is recorded with its error and left out of the batch;
2. independent edits (the default): ``method.fn(adapter, batch, hparams, stats).delta`` — one call per
   batch, so ``batch_size > 1`` is MEMIT-style batch editing (ROME applies the batch's requests one
   after another inside the call) — applied, then reverted after step 3;
   sequential edits (``sequential=True``): ``Ledger.step`` (the one sequential loop, the same as
   ``superedit lifelong``'s), which carries the method's state (D4S sums, AlphaEdit's earlier keys)
   from batch to batch and keeps every edit; later batches' ``pre`` is the state right before their edit;
3. evaluate each request again (``post``, with locality against ``pre``);
4. write one JSONL record per request (``out_path``, appended and fsynced as it goes).

Methods are pure (they restore the weights they touch) and ``WeightDelta.apply`` checks everything
before writing, so a batch whose method call fails leaves the model as it was: its requests are
recorded with the error and skipped. Errors that are not about a request (missing statistics, bad
hyperparameters, out-of-range layers) stop the run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import RequestFormatError, SubjectNotFoundError, TemplateError
from ..eval.metrics import evaluate_request, public, summarize
from ..models import encode_prompts
from ..utils.io import append_jsonl
from ..utils.logs import get_logger
from ..utils.progress import progress
from .delta import WeightDelta

log = get_logger(__name__)

#: Errors that concern one request (or one batch): recorded, the run goes on.
REQUEST_ERRORS = (SubjectNotFoundError, TemplateError, RequestFormatError, ValueError, torch.linalg.LinAlgError)

#: delta.meta keys that are not copied into each record's ``method_info``.
_META_SKIP = {"model", "hparams", "requests", "timings"}


def delta_norms(delta: WeightDelta) -> dict[int, dict[str, float]]:
    """Cheap per-layer norms: Frobenius (from the factors when low rank), max |ΔW|, rank bound."""
    out = {}
    for layer, d in delta.layers.items():
        if d.low_rank:
            L, R = d.left.to(torch.float64), d.right.to(torch.float64)
            fro = float(torch.sqrt(torch.clamp(((L.T @ L) * (R.T @ R)).sum(), min=0.0)))
            out[layer] = {"fro": fro, "rank_bound": int(d.rank_bound)}
        else:
            dense = d.dense_.to(torch.float64)
            out[layer] = {"fro": float(dense.norm()), "max_abs": float(dense.abs().max()),
                          "rank_bound": int(min(dense.shape))}
    return out


def _accumulate(acc: dict | None, delta: WeightDelta) -> dict:
    """Running sum ``{"layers", "meta", "n"}`` of deltas (no copies of the model's weights kept)."""
    if acc is None:
        acc = {"layers": {}, "meta": {k: delta.meta[k] for k in ("model", "hparams") if k in delta.meta}, "n": 0}
    for l, ld in delta.layers.items():
        acc["layers"][l] = acc["layers"][l] + ld if l in acc["layers"] else ld
    acc["n"] += 1
    return acc


def _finish_merge(acc: dict | None, method: str, meta: dict | None) -> WeightDelta | None:
    if acc is None:
        return None
    return WeightDelta(acc["layers"], method, {**acc["meta"], "merged_from": acc["n"], **(meta or {})})


def _request_info(req) -> dict:
    return {"prompt": req.prompt, "subject": req.subject, "target_new": req.target_new,
            "target_true": req.target_true, "source": req.source}


def _check_request(adapter, req) -> None:
    """Raise the request's error early (template, subject tokens)."""
    encode_prompts(adapter.tokenizer, [req.prompt], [req.subject])


def _error_record(base: dict, exc: BaseException, stage: str, pre: dict | None = None) -> dict:
    return {**base, "pre": public(pre), "post": None, "error": f"{type(exc).__name__}: {exc}", "error_stage": stage}


def run_edits(adapter, requests: Sequence, method: str, hparams, stats=None, batch_size: int = 1,
              sequential: bool = False, out_path: str | Path | None = None, *, gen_tokens: int = 0,
              eval_seed: int = 0, eval_batch_size: int = 32, return_delta: bool = False, ledger=None,
              greedy_tokens: int = 0):
    """Edit and evaluate ``requests``; see the module docstring.

    Args:
        adapter: the model (left as found when ``sequential=False``; with all edits applied otherwise).
        requests: :class:`~superedit.data.EditRequest` list.
        method: a registry name (``rome``, ``memit``, ``ft``, ``d4s``, ``alphaedit``).
        hparams: the method's hyperparameters.
        stats: covariance source (``FixedCovariance``/``CorpusCovariance``; None for ``ft``).
        batch_size: requests per method call.
        sequential: keep each batch's edit (lifelong editing) instead of reverting it, through ``ledger``.
        out_path: JSONL file that receives one record per request as soon as it is done.
        gen_tokens: tokens sampled per generation prompt for ``ngram_entropy`` (0: no fluency).
        eval_seed: seed of those samples (the same pre and post).
        eval_batch_size: rows per teacher-forced forward pass.
        greedy_tokens: tokens of greedy continuation for the generation-based scores (0: none).
        return_delta: also return the merged delta of all successful batches (or None); sequential: the
            ledger's total W − W₀.
        ledger: (sequential) the :class:`~superedit.lifelong.ledger.Ledger` the edits go through, created
            on this adapter's weights (default: one in a temporary directory, deleted at the end).

    Returns:
        ``(records, summary)`` or, with ``return_delta``, ``(records, summary, merged_delta)``.
    """
    from .methods import get_method

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1 (got {batch_size})")
    entry = get_method(method)
    if not sequential:
        entry.require_weight_edits("independent editing (each batch's delta applied and reverted)")
    fn = entry.fn
    tmp_ledger = None
    if sequential and ledger is None:
        import tempfile

        from ..lifelong.ledger import Ledger

        tmp_ledger = tempfile.TemporaryDirectory(prefix="superedit-ledger-")
        ledger = Ledger.create(Path(tmp_ledger.name) / "ledger", adapter, method, hparams)
    if sequential:
        if ledger.method != method:
            raise ValueError(f"the ledger is a {ledger.method!r} ledger, not {method!r}")
        ledger.apply_to(adapter)
    mode = "sequential" if sequential else "independent"
    records: list[dict] = []
    acc = None  # running merged delta (return_delta)
    eval_kw = dict(gen_tokens=gen_tokens, seed=eval_seed, batch_size=eval_batch_size, greedy_tokens=greedy_tokens)
    t_start = time.perf_counter()

    def emit(rec: dict) -> None:
        records.append(rec)
        if out_path is not None:
            append_jsonl(out_path, rec)

    batches = [list(range(s, min(s + batch_size, len(requests)))) for s in range(0, len(requests), batch_size)]
    for b_idx, idxs in enumerate(progress(batches, total=len(batches), desc=f"edit ({method})")):
        ok: list[tuple[int, Any, dict, float]] = []  # (index, request, pre, pre_seconds)
        for i in idxs:
            req = requests[i]
            base = {"case_id": req.case_id, "index": i, "method": method, "mode": mode, "batch": b_idx,
                    "request": _request_info(req)}
            t0 = time.perf_counter()
            try:
                _check_request(adapter, req)
                pre = evaluate_request(adapter, req, None, **eval_kw)
            except REQUEST_ERRORS as exc:
                log.warning("request %s (#%d) skipped: %s", req.case_id, i, exc)
                emit(_error_record(base, exc, "pre_eval"))
                continue
            ok.append((i, req, pre, time.perf_counter() - t0))
        if not ok:
            continue
        batch = [r for _, r, _, _ in ok]
        t0 = time.perf_counter()
        try:
            if sequential:  # the edit is committed and applied to the model by the ledger
                delta = ledger.step(adapter, batch, stats)[1].delta
            else:
                delta = fn(adapter, batch, hparams, stats).delta
        except REQUEST_ERRORS as exc:
            log.warning("batch %d (%d requests) failed in %s: %s", b_idx, len(batch), method, exc)
            for i, req, pre, _ in ok:
                base = {"case_id": req.case_id, "index": i, "method": method, "mode": mode, "batch": b_idx,
                        "request": _request_info(req)}
                emit(_error_record(base, exc, "edit", pre))
            continue
        t_edit = time.perf_counter() - t0
        norms = delta_norms(delta)
        summaries = delta.meta.get("requests") or []
        info = {k: v for k, v in delta.meta.items() if k not in _META_SKIP}
        if not sequential:
            delta.apply(adapter)
        try:
            for j, (i, req, pre, t_pre) in enumerate(ok):
                base = {"case_id": req.case_id, "index": i, "method": method, "mode": mode, "batch": b_idx,
                        "batch_size": len(batch), "request": _request_info(req), "layers": sorted(delta.layers)}
                t1 = time.perf_counter()
                try:
                    post = evaluate_request(adapter, req, pre, **eval_kw)
                except REQUEST_ERRORS as exc:
                    emit(_error_record(base, exc, "post_eval", pre))
                    continue
                values = summaries[j] if j < len(summaries) else None
                timing = {"pre_eval_s": t_pre, "edit_s": t_edit, "edit_s_per_request": t_edit / len(batch),
                          "post_eval_s": time.perf_counter() - t1}
                timing.update(delta.meta.get("timings") or {})
                emit({**base, "pre": public(pre), "post": public(post), "values": values,
                      "method_info": info or None, "delta_norms": {str(l): n for l, n in norms.items()},
                      "timing": timing, "error": None})
        finally:
            if not sequential:
                delta.revert(adapter)
        if return_delta and not sequential:
            acc = _accumulate(acc, delta)

    summary = summarize_records(records, method=method, batch_size=batch_size, sequential=sequential)
    summary["time_total_s"] = time.perf_counter() - t_start
    if return_delta:
        meta = {"mode": mode, "batch_size": batch_size,
                "case_ids": [r["case_id"] for r in records if not r.get("error")]}
        if sequential:
            merged = ledger.delta() if ledger.edits else None
            if merged is not None:
                merged.meta.update(meta, hparams=ledger.info["hparams"])
                if tmp_ledger is not None:
                    merged.meta.pop("ledger", None)
        else:
            merged = _finish_merge(acc, method, meta)
    if tmp_ledger is not None:
        tmp_ledger.cleanup()
    if return_delta:
        return records, summary, merged
    return records, summary


def summarize_records(records: Sequence[dict], **extra) -> dict:
    """Means of every metric pre/post (with counts), ROME's S, errors, delta norms and timings."""
    done = [r for r in records if not r.get("error")]
    failed = [r for r in records if r.get("error")]
    pre = summarize([r.get("pre") for r in done])
    post = summarize([r.get("post") for r in done])
    out: dict[str, Any] = {**extra, "n_requests": len(records), "n_edited": len(done), "n_failed": len(failed),
                           "pre": pre["means"], "post": post["means"], "counts": post["counts"],
                           "pre_ci": pre["ci"], "post_ci": post["ci"]}
    fro = [sum(n["fro"] ** 2 for n in r["delta_norms"].values()) ** 0.5 for r in done if r.get("delta_norms")]
    if fro:
        out["delta_fro_mean"] = sum(fro) / len(fro)
    for key in ("edit_s_per_request", "pre_eval_s", "post_eval_s"):
        vals = [r["timing"][key] for r in done if r.get("timing") and key in r["timing"]]
        if vals:
            out[f"{key}_mean"] = sum(vals) / len(vals)
    if failed:
        out["errors"] = [{"case_id": r.get("case_id"), "index": r.get("index"), "stage": r.get("error_stage"),
                          "error": r["error"]} for r in failed[:20]]
    return out


def evaluate_delta(adapter, requests: Sequence, delta: WeightDelta, out_path: str | Path | None = None, *,
                   gen_tokens: int = 0, eval_seed: int = 0, eval_batch_size: int = 32,
                   greedy_tokens: int = 0) -> tuple[list[dict], dict]:
    """Evaluate a saved delta: ``pre`` without it, ``post`` with it applied (all requests at once).

    The model is left as found. Returns ``(records, summary)``; records go to ``out_path`` as they come.
    """
    eval_kw = dict(gen_tokens=gen_tokens, seed=eval_seed, batch_size=eval_batch_size, greedy_tokens=greedy_tokens)
    t_start = time.perf_counter()
    pres: dict[int, dict] = {}
    records: list[dict] = []
    base_of = {}
    for i, req in enumerate(requests):
        base_of[i] = {"case_id": req.case_id, "index": i, "method": delta.method, "mode": "saved_delta",
                      "request": _request_info(req), "layers": sorted(delta.layers)}
    errors: dict[int, dict] = {}
    for i, req in enumerate(progress(requests, total=len(requests), desc="eval (pre)")):
        try:
            pres[i] = evaluate_request(adapter, req, None, **eval_kw)
        except REQUEST_ERRORS as exc:
            errors[i] = _error_record(base_of[i], exc, "pre_eval")
    posts: dict[int, dict] = {}
    with delta.applied(adapter):
        for i, req in enumerate(progress(requests, total=len(requests), desc="eval (post)")):
            if i in errors:
                continue
            try:
                posts[i] = evaluate_request(adapter, req, pres[i], **eval_kw)
            except REQUEST_ERRORS as exc:
                errors[i] = _error_record(base_of[i], exc, "post_eval", pres[i])
    for i in range(len(requests)):
        rec = errors.get(i) or {**base_of[i], "pre": public(pres[i]), "post": public(posts[i]), "error": None}
        records.append(rec)
        if out_path is not None:
            append_jsonl(out_path, rec)
    summary = summarize_records(records, method=delta.method, mode="saved_delta")
    summary["time_total_s"] = time.perf_counter() - t_start
    return records, summary
