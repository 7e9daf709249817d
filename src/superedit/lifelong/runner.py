"""Sequential (lifelong) editing runs: many methods, one seeded edit stream, resumable, with checkpoints.

``run_lifelong`` edits a fresh copy of the model per method over the SAME stream of requests, batch by
batch, never reverting anything: rome/memit/ft/alphaedit add each increment on top, d4s sets the total
delta kept in its running sums. Every method's run goes through a :class:`~superedit.lifelong.ledger.Ledger`
in ``OUT/<method>/ledger``, so it is crash-safe and resumable: with ``resume=True`` each method continues
after its last committed edit (nothing is lost, nothing applied twice).

Files (all appended/written atomically)::

    OUT/run.json                 the run's configuration (methods, sizes, hparams)
    OUT/stream.jsonl             the edit stream (requests in order)
    OUT/probe.json               the fixed probe: untouched true facts (+ base-model recall), texts, the
                                 general-ability items (lifelong.probe)
    OUT/metrics.jsonl            one record per (method, checkpoint)           ← the report reads this
    OUT/<method>/edit_probs.jsonl  per checkpoint: P(target_new) of every edit right after it and now
                                 (now: None for an edit a re-edit of its fact has overwritten)
    OUT/<method>/steps.jsonl     per batch: value norms, edit time, P(new)/P(true) right after the edit,
                                 each edited layer's L1 after it and the L1 the batch added
    OUT/<method>/ledger/         the ledger
    OUT/summary.json             final figures per method and each method's collapse horizon

A checkpoint (n = 0, every ``eval_every`` edits, and the end) records: efficacy/paraphrase/neighbourhood
success (CounterFact rule: mean-token NLL(new) < NLL(true)) over all edits so far and over the last
block; per block of ``block_size`` edits the degree of forgetting (success right after the edit minus
success now); when the stream edits a fact again (:mod:`superedit.lifelong.reedits`), these are over
the ``n_live`` live edits only, each fact's latest edit so far (an overwritten target is not expected to
hold; without re-edits every edit is live; ``efficacy_vs_previous_target`` over the ``n_live_reedits``
live re-edits: the new target preferred to the one it overwrote); recall and retention of the untouched probe facts
(teacher-forced ``fact_recall``); perplexity of held-out text; on a testbed the recall of every fact;
L1 (‖W‖₁/numel) and Frobenius norms of each edited layer and of its delta; the norms of the inserted
values; and for single-layer rank-one methods the measured interference
(:mod:`superedit.lifelong.interference`); and ``ability``:
every general-ability metric with its n (:class:`superedit.eval.ability.GeneralAbility`: perplexity,
fluency, known-fact multiple choice, MQD T/F and MC on unedited tuples, lm-eval tasks available offline).
At the end the collapse horizon of each method (:mod:`superedit.lifelong.horizon`) goes into the summary.
All evaluation is batched (many prompts per forward pass).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..editing.hparams import HParamsError
from ..errors import SupereditError
from ..eval.metrics import batch_evaluate, bootstrap_ci
from ..eval.scoring import fact_recall
from ..utils.io import append_jsonl, read_jsonl, write_json_atomic, write_jsonl_atomic
from ..utils.logs import get_logger
from ..utils.progress import progress
from .horizon import DEFAULT_THRESHOLD, horizons
from .probe import Probe, measure_probe, requests_probe, restrict_ability, retention_by_subject, testbed_probe
from .reedits import live_positions, previous_target_requests

log = get_logger(__name__)
F64 = torch.float64
RUN_FORMAT = "superedit-lifelong/1"
#: metric fields that differ between otherwise identical runs (timings)
TIMING_FIELDS = ("edit_s", "eval_s", "time_s", "timestamp")

__all__ = ["run_lifelong", "Probe", "testbed_probe", "requests_probe", "retention_by_subject", "TIMING_FIELDS",
           "COMPACT_KEYS"]


def _after_commit(method: str, n_done: int) -> None:
    """Called right after each committed batch (tests patch it to simulate a crash)."""


# ------------------------------------------------------------------------------------ evaluation
# Every score here reduces over the one teacher-forced scorer (superedit.eval.scoring):
# batch_evaluate = eval.metrics.evaluate_requests with the runner's options, and (lifelong.probe) fact_recall,
# perplexity and the general-ability set.
def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------------------------ the run
def _req_key(r) -> tuple:
    d = r if isinstance(r, dict) else r.to_dict()
    return (d.get("prompt"), d.get("subject"), d.get("target_new"))


def _checkpoint_due(n: int, prev: int, total: int, every: int) -> bool:
    return n == 0 or n == total or (every > 0 and n // every > prev // every)


def run_lifelong(adapter_factory: Callable[[], Any], requests: Sequence, methods: Sequence[str],
                 hparams_by_method: dict, stats, edits: int | None = None, batch_size: int = 1,
                 eval_every: int = 50, out_dir: str | Path = "runs/lifelong", probe: Probe | None = None,
                 resume: bool = False, *, seed: int = 0, horizon_threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Run every method over the first ``edits`` requests; see the module docstring.

    Args:
        adapter_factory: returns a FRESH base model (ModelAdapter) each call (one per method).
        requests: the edit stream, in order (the caller shuffles with its seed).
        methods: registry names (rome, memit, ft, d4s, alphaedit).
        hparams_by_method: method → hparams object.
        stats: covariance source (E[kkᵀ] of the base model) for the methods that need it.
        edits: how many requests of the stream to apply (default: all).
        batch_size: requests per method call.
        eval_every: checkpoint every this many edits (and at 0 and at the end).
        out_dir: output directory.
        probe: untouched facts / texts (default: empty probe: no retention/perplexity figures).
        resume: continue the runs found in ``out_dir`` (required when it already holds one).
        horizon_threshold: efficacy over all edits / untouched retention below which a method has
            collapsed (:mod:`superedit.lifelong.horizon`).

    Returns a summary: the final checkpoint's scalar figures per method, the collapse horizon of every
    method in ``metrics.jsonl`` (``horizon``, with its ``horizon_threshold``) and the file paths.
    """
    from ..editing.methods import get_method

    out = Path(out_dir)
    stream = list(requests)[: edits if edits is not None else None]
    if not stream:
        raise SupereditError("no edit requests for the lifelong run (empty request list or --edits 0)")
    if batch_size < 1 or eval_every < 1:
        raise SupereditError(f"--batch-size and --eval-every must be ≥ 1 (got {batch_size}, {eval_every})")
    for m in methods:
        get_method(m)
        if m not in hparams_by_method:
            raise SupereditError(f"no hyperparameters for method {m!r}")
    probe = probe or Probe()
    if not 0.0 < horizon_threshold <= 1.0:
        raise SupereditError(f"horizon threshold must be in (0, 1] (got {horizon_threshold})")
    run_file = out / "run.json"
    config = {"format": RUN_FORMAT, "edits": len(stream), "batch_size": batch_size, "eval_every": eval_every,
              "block_size": probe.block_size, "seed": seed}
    longer = False  # lengthening a finished run (a larger --edits on --resume)
    if run_file.exists():
        if not resume:
            raise SupereditError(f"{out} already holds a lifelong run; pass --resume to continue it, or choose "
                                 "another --out directory")
        old = json.loads(run_file.read_text())
        # a longer --edits lengthens a run: its stream so far must be the head of the longer one
        longer = isinstance(old.get("edits"), int) and len(stream) > old["edits"]
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v and not (k == "edits" and longer)}
        if diff:
            raise SupereditError(f"{run_file}: cannot resume with different settings {diff} (old, new); "
                                 "use the original options (a longer --edits may lengthen a run) or another "
                                 "--out directory")
        saved = read_jsonl(out / "stream.jsonl")
        # the saved stream may already be the longer one (stopped between the two files of a lengthening)
        if ([_req_key(r) for r in saved] != [_req_key(r) for r in stream[:len(saved)]]
                or len(saved) not in (old.get("edits"), len(stream))):
            raise SupereditError(f"{out / 'stream.jsonl'}: the edit stream differs from the requests given now "
                                 "(other --requests/--seed/--stream-order?); resume with the original ones")
        if longer:
            _check_probe_for_longer_stream(out / "probe.json", stream[old["edits"]:])
        methods_all = list(dict.fromkeys(old.get("methods", []) + list(methods)))
    else:
        methods_all = list(methods)
        write_jsonl_atomic(out / "stream.jsonl", [r.to_dict() for r in stream])
    probe_file = out / "probe.json"
    saved_probe = Probe.from_dict(json.loads(probe_file.read_text())) if probe_file.exists() else None
    if saved_probe is not None and probe.facts:
        same = [(f["prompt"], f["target"]) for f in saved_probe.facts] == [(f["prompt"], f["target"]) for f in probe.facts]
        if longer and not same:  # a lengthened run keeps its probe (checked against the new edits above)
            log.warning("%s: lengthened with the retention probe it started with (%d facts); the probe the options "
                        "give now differs from it and is not used", probe_file, len(saved_probe.facts))
        elif not same:
            raise SupereditError(f"{probe_file}: the retention probe differs from the one this run started with "
                                 "(other --probe-requests/--probe-n/--requests?); resume with the original options")
    if longer:  # every check passed: the run's stream becomes the longer one
        log.info("lengthening %s from %d to %d edits", out, old["edits"], len(stream))
        write_jsonl_atomic(out / "stream.jsonl", [r.to_dict() for r in stream])
    config.update({"methods": methods_all, "hparams": {m: hparams_by_method[m].to_dict() for m in methods},
                   "probe": {"facts": len(probe.facts), "texts": len(probe.texts), "all_facts": len(probe.all_facts),
                             "source": probe.source}})
    if run_file.exists():
        config["hparams"] = {**json.loads(run_file.read_text()).get("hparams", {}), **config["hparams"]}
    write_json_atomic(run_file, config)

    if saved_probe is not None:
        probe = saved_probe
    else:  # questions about tuples the stream edits measure the edits, not general ability
        restrict_ability(probe, stream)
    # statistics of the BASE model, before any method touches weights
    if stats is not None:
        for m in methods:
            if get_method(m).needs_stats:
                for l in hparams_by_method[m].layers:
                    stats.mom2(l)

    results = {}
    for m in methods:
        results[m] = _run_method(m, adapter_factory, hparams_by_method[m], stats, stream, batch_size, eval_every,
                                 out, probe, probe_file, resume)
        probe = Probe.from_dict(json.loads(probe_file.read_text())) if probe_file.exists() else probe
    summary = {"out_dir": str(out), "metrics": str(out / "metrics.jsonl"), "n_edits": len(stream),
               "batch_size": batch_size, "eval_every": eval_every, "methods": results,
               "horizon_threshold": horizon_threshold,
               "horizon": horizons(read_jsonl(out / "metrics.jsonl"), horizon_threshold)}
    write_json_atomic(out / "summary.json", summary)
    return summary


def _check_probe_for_longer_stream(probe_file: Path, new_edits) -> None:
    """A lengthened run keeps the probe it started with (a probe rebuilt for the longer stream would differ
    from it); refuse if that probe's untouched facts or ability questions are about a (subject, relation)
    the new edits rewrite: they would measure the edits, not retention or ability."""
    if not probe_file.exists():
        return
    saved = Probe.from_dict(json.loads(probe_file.read_text()))
    keys = {(r.subject, r.relation_id or r.prompt) for r in new_edits}
    prompts = {r.filled_prompt() for r in new_edits}
    touched = [f for f in saved.facts
               if f.get("prompt") in prompts or (f.get("subject"), f.get("relation") or f.get("template")) in keys]
    before = sum(len(v) for v in (saved.ability or {}).get("choices", {}).values())
    restrict_ability(saved, new_edits)
    dropped = before - sum(len(v) for v in (saved.ability or {}).get("choices", {}).values())
    if touched or dropped:
        raise SupereditError(f"{probe_file}: the new edits rewrite {len(touched)} of the retention probe's facts and "
                             f"{dropped} of its ability questions (e.g. {touched[0]['prompt'] if touched else ''!r}), "
                             "so this run cannot be lengthened; start the longer run in another --out directory")


def _supersede_old_final(method: str, recorded: dict[int, dict], led, total: int, eval_every: int,
                         metrics_path: Path) -> None:
    """A run lengthened past its last checkpoint: that checkpoint is re-recorded with ``final`` false (the
    last record of a checkpoint wins, :func:`superedit.report.lifelong_report.load_metrics`), and, where
    the longer run's schedule would not have made it, it is kept in the curves but not used as the start of
    the next "last block", so every later checkpoint reads as in an uninterrupted run of the longer length."""
    start, scheduled = 0, {0}
    for e in led.edits:
        end = start + len(e["requests"])
        if _checkpoint_due(end, start, total, eval_every):
            scheduled.add(end)
        start = end
    for n in [k for k, r in recorded.items() if r.get("final") and k < total]:
        recorded[n] = {**recorded[n], "final": False}
        append_jsonl(metrics_path, recorded[n])
        log.info("%s: checkpoint at %d edits is no longer the last (run lengthened to %d)", method, n, total)
        if n not in scheduled:
            del recorded[n]


def _steps_by_start(path: Path) -> dict[int, dict]:
    """steps.jsonl merged per batch start (a batch redone after a crash: the later fields win)."""
    out: dict[int, dict] = {}
    if path.exists():
        for r in read_jsonl(path):
            out.setdefault(int(r["start"]), {}).update(r)
    return out


def _run_method(method: str, adapter_factory, hp, stats, stream, batch_size, eval_every, out: Path,
                probe: Probe, probe_file: Path, resume: bool) -> dict:
    from ..editing.methods import get_method
    from ..utils.seed import seed_everything
    from .interference import InterferenceTracker, method_covariance
    from .ledger import Ledger

    mdir = out / method
    ldir = mdir / "ledger"
    metrics_path = out / "metrics.jsonl"
    steps_path = mdir / "steps.jsonl"
    total = len(stream)
    recorded = {}
    if metrics_path.exists():
        recorded = {int(r["n_edits"]): r for r in read_jsonl(metrics_path) if r.get("method") == method}
    led = Ledger.open(ldir) if (ldir / "ledger.json").exists() else None
    if led is not None:
        if not resume:
            raise SupereditError(f"{ldir}: a ledger exists already; pass --resume or choose another --out directory")
        if led.method != method:
            raise SupereditError(f"{ldir}: this ledger is a {led.method!r} run, not {method!r}")
        made_with = _with_defaults(hp, led.info["hparams"])
        if made_with != hp.to_dict():
            diff = sorted(k for k in set(made_with) | set(hp.to_dict()) if made_with.get(k) != hp.to_dict().get(k))
            raise SupereditError(f"{ldir}: the ledger was made with other {method} hyperparameters (fields {diff}); "
                                 "resume with the original ones or choose another --out directory")
        n_led = sum(len(e["requests"]) for e in led.edits)
        if n_led == total and total in recorded:
            log.info("%s: complete (%d edits), skipped", method, total)
            return _compact(recorded[total])
    seed_everything(int(getattr(hp, "seed", 0) or 0))
    adapter = adapter_factory()
    if probe.facts and probe.base_hits is None:  # the base model's recall of the probe (fresh weights)
        probe.base_hits = fact_recall(adapter, [f["prompt"] for f in probe.facts],
                                      [f["target"] for f in probe.facts], probe.eval_batch_size)
        write_json_atomic(probe_file, probe.to_dict())
    elif not probe_file.exists():
        write_json_atomic(probe_file, probe.to_dict())
    if led is None:
        led = Ledger.create(ldir, adapter, method, hp)
    led.apply_to(adapter)
    base = {l: w.detach().to(F64).clone() for l, w in led.base_weights(adapter).items()}
    if any(e["status"] != "applied" for e in led.edits):
        raise SupereditError(f"{ldir}: some edits were undone (superedit ledger undo); a lifelong run only "
                             "continues ledgers whose edits are all applied — start another --out directory")
    n_done = sum(len(e["requests"]) for e in led.edits)
    done_reqs = [r for e in led.edits for r in e["requests"]]
    if [_req_key(r) for r in done_reqs] != [_req_key(r) for r in stream[:n_done]]:
        raise SupereditError(f"{ldir}: the ledger's edits are not a prefix of this run's edit stream")
    _supersede_old_final(method, recorded, led, total, eval_every, metrics_path)
    entry = get_method(method)

    # ----- measured interference (single-layer rank-one methods)
    tracker = None
    if stats is not None and entry.rank_one_edits(hp, batch_size):  # the identity's premise (registry capability)
        layer = hp.layers[0]
        pk = None
        facts = [f for f in probe.facts if f.get("template") and f.get("subject")][: probe.interference_keys]
        if facts:
            from ..editing.keys import keys_at

            pk = keys_at(adapter, [f["template"] for f in facts], [f["subject"] for f in facts], [layer],
                         getattr(hp, "fact_token", "subject_last"))[layer]
        tracker = InterferenceTracker(layer, method_covariance(hp, stats.mom2(layer)), base[layer], pk,
                                      probe.interference_keys)
        _replay_tracker(tracker, led, base[layer], adapter.down_weight(layer).dtype)

    steps = _steps_by_start(steps_path)
    # a batch committed just before a crash may lack its "right after the edit" probabilities
    for e_start, e in _ledger_batches(led):
        if e_start not in steps or "prob_new" not in steps[e_start]:
            if e_start + len(e["requests"]) != n_done:
                raise SupereditError(f"{steps_path}: no record for the edits starting at #{e_start}; the run "
                                     "directory is incomplete (start another --out directory)")
            _record_probs(adapter, stream[e_start:n_done], e_start, e["index"], steps_path, steps, probe)

    bar = progress(total=total, desc=f"lifelong {method}", initial=n_done)
    last_eff = None
    w_prev = {l: adapter.down_weight(l).detach().to(F64).clone() for l in led.layers}
    try:
        prev = n_done - (len(led.edits[-1]["requests"]) if led.edits else 0)
        if _checkpoint_due(n_done, prev, total, eval_every) and n_done not in recorded:
            recorded[n_done] = _checkpoint(method, adapter, led, hp, stream, n_done, recorded, steps, base, probe,
                                           tracker, out)
        while n_done < total:
            batch = stream[n_done:n_done + batch_size]
            start = n_done
            t0 = time.perf_counter()

            def log_values(result, start=start, batch=batch, t0=t0):
                values = result.meta.get("requests") or []
                rec = {"start": start, "end": start + len(batch), "edit_s": time.perf_counter() - t0,
                       "v_target_norm": [v.get("v_target_norm") for v in values],
                       "v_delta_norm": [v.get("v_delta_norm") for v in values],
                       "v_init_norm": [v.get("v_init_norm") for v in values]}
                append_jsonl(steps_path, rec)  # before the commit: a redone batch overwrites it
                steps.setdefault(start, {}).update(rec)

            index, result = led.step(adapter, batch, stats, before_commit=log_values)
            n_done += len(batch)
            if tracker is not None:
                ld = result.delta.layers[tracker.layer]
                tracker.add_increment(ld.left, ld.right, adapter.down_weight(tracker.layer))
            _after_commit(method, n_done)
            w_prev = _record_weights(adapter, led.layers, w_prev, base, start, len(batch), steps_path, steps)
            probs = _record_probs(adapter, batch, start, index, steps_path, steps, probe)
            last_eff = _mean(probs["success"])
            bar.update(len(batch))
            if _checkpoint_due(n_done, start, total, eval_every) and n_done not in recorded:
                recorded[n_done] = _checkpoint(method, adapter, led, hp, stream, n_done, recorded, steps, base,
                                               probe, tracker, out)
                last_eff = recorded[n_done].get("efficacy_all")
            bar.set_postfix({"method": method, "eff": f"{last_eff:.2f}" if last_eff is not None else "-"})
    finally:
        bar.close()
    return _compact(recorded[total])


def _ledger_batches(led):
    start = 0
    for e in led.edits:
        yield start, e
        start += len(e["requests"])


def _replay_tracker(tracker, led, W0: torch.Tensor, dtype: torch.dtype) -> None:
    """Rebuild the tracker from the ledger's per-edit files (resume): same sums, same weights."""
    from safetensors.torch import load_file

    l = tracker.layer
    D = torch.zeros_like(W0, dtype=F64)
    for e in led.edits:
        data = load_file(str(led.dir / e["file"]))
        left, right = data[f"layer.{l}.left"], data[f"layer.{l}.right"]
        D = D + left.to(F64) @ right.to(F64).T
        W_after = (W0.to(F64) + D).to(dtype)  # what Ledger.apply_to puts into the model
        tracker.add_increment(left, right, W_after)


def _record_weights(adapter, layers, w_prev: dict, base: dict, start: int, n: int, steps_path, steps) -> dict:
    """Per batch: each edited layer's L1 (‖W‖₁/numel) after it, that relative to W₀, and what the batch
    changed (``step_delta_l1`` = ‖W − W_prev‖₁/numel; ``step_w_l1_change`` = L1 after − L1 before).
    Returns the weights after the batch (the next batch's W_prev)."""
    now = {l: adapter.down_weight(l).detach().to(F64).clone() for l in layers}
    rec = {"start": start, "end": start + n, "w_l1": {}, "w_l1_rel": {}, "step_delta_l1": {},
           "step_w_l1_change": {}}
    for l in layers:
        W, P = now[l], w_prev[l].to(now[l].device)
        l1, l1_prev, l1_base = float(W.abs().mean()), float(P.abs().mean()), float(base[l].abs().mean())
        rec["w_l1"][str(l)] = l1
        rec["w_l1_rel"][str(l)] = l1 / l1_base if l1_base else None
        rec["step_delta_l1"][str(l)] = float((W - P).abs().mean())
        rec["step_w_l1_change"][str(l)] = l1 - l1_prev
    append_jsonl(steps_path, rec)
    steps.setdefault(start, {}).update(rec)
    return now


def _record_probs(adapter, batch, start, index, steps_path, steps, probe) -> dict:
    res = batch_evaluate(adapter, batch, max_neighbours=0, paraphrases=False, batch_size=probe.eval_batch_size)
    rec = {"start": start, "end": start + len(batch), "ledger_index": index,
           "prob_new": [r["rewrite_prob_new"] for r in res], "prob_true": [r.get("rewrite_prob_true") for r in res],
           "success": [r["efficacy_score"] for r in res]}
    append_jsonl(steps_path, rec)
    steps.setdefault(start, {}).update(rec)
    return rec


def unedited_neighbours(requests: Sequence, stream: Sequence) -> list:
    """``requests`` with every neighbourhood prompt about a (subject, relation) that ``stream`` edits left out.

    Only requests that name their neighbours' subjects (``meta["neighborhood_subjects"]``, one per prompt,
    as ``superedit data derive`` writes them) can be filtered; the others are returned as they are. A
    neighbour the stream edits is expected to change, so its old answer no longer tests specificity; the
    same neighbours are left out at every checkpoint, so the figures of a run stay comparable."""
    from dataclasses import replace

    edited = {r.fact_key for r in stream}
    out = []
    for r in requests:
        subjects = (r.meta or {}).get("neighborhood_subjects")
        if not subjects or len(subjects) != len(r.neighborhood_prompts):
            out.append(r)
            continue
        keep = [i for i, s in enumerate(subjects) if (s, r.fact_key[1]) not in edited]
        if len(keep) == len(subjects):
            out.append(r)
            continue
        out.append(replace(r, neighborhood_prompts=[r.neighborhood_prompts[i] for i in keep],
                           neighborhood_answers=[r.neighborhood_answers[i] for i in keep],
                           meta={**r.meta, "neighborhood_subjects": [subjects[i] for i in keep]}))
    return out


def _per_edit(steps: dict, n: int, key: str) -> list:
    out = [None] * n
    for s, r in steps.items():
        vals = r.get(key) or []
        for i, v in enumerate(vals):
            if s + i < n:
                out[s + i] = v
    return out


def _checkpoint(method, adapter, led, hp, stream, n, recorded, steps, base, probe, tracker, out: Path) -> dict:
    t0 = time.perf_counter()
    prev = max([k for k in recorded if k < n], default=0)
    # live edits: each fact's latest edit so far (every position, unless the stream re-edits facts)
    live = live_positions(stream, n)
    rec: dict[str, Any] = {"method": method, "n_edits": n, "n_live": len(live), "n_batches": len(led.edits),
                           "final": n == len(stream), "last_block": [prev, n], "layers_edited": list(led.layers)}
    done = unedited_neighbours([stream[i] for i in live], stream)
    res = batch_evaluate(adapter, done, probe.max_neighbours, True, probe.eval_batch_size) if n else []
    last = [res[j] for j, i in enumerate(live) if i >= prev]  # the live edits of the last block
    for key, name in (("efficacy_score", "efficacy"), ("paraphrase_score", "paraphrase"),
                      ("neighborhood_score", "neighborhood"), ("efficacy_magnitude", "efficacy_magnitude")):
        rec[f"{name}_all"] = _mean([r.get(key) for r in res])
        rec[f"{name}_last_block"] = _mean([r.get(key) for r in last])
    reedited, against_previous = previous_target_requests(done)
    if reedited:  # live re-edits: does the model prefer the new target to the one it overwrote?
        prev_res = batch_evaluate(adapter, against_previous, 0, False, probe.eval_batch_size)
        rec["n_live_reedits"] = len(reedited)
        rec["efficacy_vs_previous_target"] = _mean([r.get("efficacy_score") for r in prev_res])
    for key, name in (("paraphrase_score", "paraphrase"), ("neighborhood_score", "neighborhood")):
        vals = [r[key] for r in res if r.get(key) is not None]  # per-edit shares: a bootstrap over the edits
        rec[f"{name}_all_n"] = len(vals)
        rec[f"{name}_all_ci"] = bootstrap_ci(vals) if vals else None
    parts = [rec["efficacy_all"], rec["paraphrase_all"], rec["neighborhood_all"]]
    if all(p is not None for p in parts):
        from ..eval.metrics import harmonic_mean

        rec["score_all"] = harmonic_mean(parts)
    # per position (None where a later edit of the same fact overwrote it)
    now_success: list = [None] * n
    now_new: list = [None] * n
    now_true: list = [None] * n
    for i, r in zip(live, res):
        now_success[i], now_new[i], now_true[i] = r["efficacy_score"], r["rewrite_prob_new"], r.get("rewrite_prob_true")
    at_edit = _per_edit(steps, n, "success")
    live_set = set(live)
    at_edit_live = [v if i in live_set else None for i, v in enumerate(at_edit)]  # forgetting: live edits only
    bs = probe.block_size
    blocks = []
    for b0 in range(0, n, bs):
        b1 = min(n, b0 + bs)
        a, c = _mean(at_edit_live[b0:b1]), _mean(now_success[b0:b1])
        blocks.append({"block": b0 // bs, "start": b0, "end": b1, "complete": b1 - b0 == bs,
                       "efficacy_at_edit": a, "efficacy_now": c,
                       "forgetting": (a - c) if a is not None and c is not None else None})
    rec["forgetting_blocks"] = blocks
    rec["forgetting_mean"] = _mean([b["forgetting"] for b in blocks])
    rec["efficacy_at_edit_all"] = _mean(at_edit)
    # untouched facts, all facts, perplexity and general ability (lifelong.probe)
    rec.update(measure_probe(adapter, probe, {r.subject for r in done}))
    # weights
    layers = {}
    for l in led.layers:
        W = adapter.down_weight(l).detach().to(F64)
        W0 = base[l].to(W.device)
        D = W - W0
        w0_l1, w0_fro = float(W0.abs().mean()), float(W0.norm())
        layers[str(l)] = {"w_l1": float(W.abs().mean()), "w_fro": float(W.norm()),
                          "w_l1_rel": float(W.abs().mean()) / w0_l1 if w0_l1 else None,
                          "w_fro_rel": float(W.norm()) / w0_fro if w0_fro else None,
                          "delta_l1": float(D.abs().mean()), "delta_fro": float(D.norm())}
    rec["layers"] = layers
    rec["w_l1_rel_mean"] = _mean([v["w_l1_rel"] for v in layers.values()])
    rec["delta_fro_total"] = math.sqrt(sum(v["delta_fro"] ** 2 for v in layers.values()))
    for key in ("v_target_norm", "v_delta_norm", "v_init_norm"):
        vals = _per_edit(steps, n, key)
        rec[f"{key}_all"] = _mean(vals)
        rec[f"{key}_last_block"] = _mean(vals[prev:n])
    if tracker is not None:
        rec["interference"] = tracker.check(adapter.down_weight(tracker.layer))
    rec["edit_s"] = sum(float(s.get("edit_s") or 0.0) for s in steps.values() if int(s["start"]) < n)
    rec["eval_s"] = time.perf_counter() - t0
    rec["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    append_jsonl(out / "metrics.jsonl", rec)
    append_jsonl(out / method / "edit_probs.jsonl", {
        "method": method, "n_edits": n, "prob_new_at_edit": _per_edit(steps, n, "prob_new"),
        "prob_true_at_edit": _per_edit(steps, n, "prob_true"),
        "prob_new_now": now_new, "prob_true_now": now_true, "success_at_edit": at_edit, "success_now": now_success})
    log.info("%s @ %d edits: efficacy %.3f (last block %.3f), paraphrase %s, untouched retention %s, ppl %s",
             method, n, rec["efficacy_all"] or 0.0, rec["efficacy_last_block"] or 0.0,
             _fmt(rec.get("paraphrase_all")), _fmt(rec.get("untouched_retention")), _fmt(rec.get("perplexity")))
    return rec


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


COMPACT_KEYS = ("n_edits", "efficacy_all", "efficacy_last_block", "paraphrase_all", "neighborhood_all", "score_all",
                "forgetting_mean", "untouched_recall", "untouched_retention", "untouched_retention_other_subjects",
                "untouched_retention_edited_subjects", "all_facts_recall", "perplexity",
                "w_l1_rel_mean", "delta_fro_total", "v_target_norm_all", "edit_s")


def ability_fields(rec: dict) -> dict:
    """``ability_<metric>`` → value for every scalar general-ability metric of a checkpoint record
    (lm-eval tasks: ``ability_lm_eval_<task>_<metric>``; skipped tasks are left out)."""
    out = {}
    for name, m in (rec.get("ability") or {}).items():
        if name == "lm_eval":
            for task, r in m.items():
                out.update({f"ability_lm_eval_{task}_{k}": v for k, v in r.items() if k != "n" and k != "skipped"})
        elif isinstance(m, dict) and "value" in m:
            out[f"ability_{name}"] = m["value"]
    return out


def _compact(rec: dict) -> dict:
    out = {k: rec.get(k) for k in COMPACT_KEYS if k in rec}
    out.update(ability_fields(rec))
    inter = rec.get("interference") or {}
    for s in ("o", "e"):
        if s in inter:
            out[f"interference_{s}_rel_error"] = inter[s]["rel_error"]
            out[f"interference_{s}_top5_share"] = inter[s]["top5_share"]
    return out


def _with_defaults(hp, recorded: dict) -> dict:
    """A ledger's recorded hyperparameters with the fields added to ``hp``'s class since then at their
    defaults (each new field's default keeps the behaviour from before it existed), so a run started
    before a field was added still resumes; as recorded where they no longer validate."""
    try:
        return type(hp).from_dict(recorded).to_dict()
    except HParamsError:  # a field removed or changed since: compare as recorded (and refuse)
        return dict(recorded)

