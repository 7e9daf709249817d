"""The D4S degradation study on MQD (issue #16 item 3): does a higher editing-objective perplexity mean
more damage from sequential editing?

For each MQD question type (true/false, multiple-choice, direct generation) the same number of requests
is drawn (seeded) and edited in sequence by every method through :func:`superedit.lifelong.runner.run_lifelong`
(no editing loop of its own), with ONE probe shared by the three types so that their general-ability
figures are comparable. Before editing, each request's objective perplexity under the unedited model
is measured (:func:`superedit.eval.objective.objective_perplexities`).

Files (``run_mqd_study``)::

    OUT/study.json                 configuration: types, n per type, methods, seed, model
    OUT/<type>/objective_ppl.jsonl the stream's objective PPL under the unedited model (stream order)
    OUT/<type>/...                 one lifelong run (metrics.jsonl, <method>/steps.jsonl, ledgers)

:func:`summarize_mqd_study` reads those files only and returns, per (type, method), the objective PPL,
the L1 growth of the edited layers, editing success and general ability before/after (95% bootstrap
intervals), the per-edit records (objective PPL, the L1 that edit added, success right after it), and
Spearman correlations between log objective PPL and the per-edit L1 increase with bootstrap intervals
over edits (pooled over types and within each type). Rendering (tables, figures) is the caller's.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..utils.logs import get_logger

log = get_logger(__name__)

__all__ = ["STUDY_FORMAT", "ABILITY_METRICS", "study_streams", "study_probe", "run_mqd_study",
           "summarize_mqd_study", "per_edit_records", "correlations", "bootstrap_spearman"]

STUDY_FORMAT = "superedit-mqd-study/1"
#: general-ability metrics summarised (accuracies/retention get a bootstrap interval over their items)
ABILITY_METRICS = ("perplexity", "fluency", "known_retention", "known_mc", "mqd_tf", "mqd_mc")
_SHARES = ("known_retention", "known_mc", "mqd_tf", "mqd_mc")


# ------------------------------------------------------------------------------------------ running
def study_streams(requests_by_type: Mapping[str, Sequence], n: int, seed: int = 0) -> dict[str, list]:
    """Per type, ``n`` requests (:func:`superedit.data.sample_requests` with ``seed``) in a seeded order.
    Every type gets the same ``n``; a type with fewer requests is an error."""
    from ..data import sample_requests
    from ..errors import UsageError

    out = {}
    for q, reqs in requests_by_type.items():
        if len(reqs) < n:
            raise UsageError(f"MQD type {q!r} has {len(reqs)} requests, fewer than --n {n}")
        chosen = sample_requests(list(reqs), n, seed)
        random.Random(f"superedit-mqd-study:{seed}:{q}").shuffle(chosen)
        out[q] = chosen
    return out


def study_probe(*, testbed_dir=None, texts: Sequence[str] = (), known: Sequence = (), mqd_pool: Sequence = (),
                edited: Sequence = (), probe_n: int = 200, n_questions: int = 100, seed: int = 0,
                stream: Sequence = ()):
    """ONE probe for every type's run: on a testbed its own probe (held-out biographies for perplexity,
    trained facts for retention and multiple choice), otherwise ``texts`` for perplexity and the ``known``
    requests' true facts; plus MQD's T/F and MC items (``mqd_pool``) on tuples no stream edits (``edited``).
    ``stream``: testbed requests among the edits (their subjects' facts are left out of the testbed probe)."""
    from ..eval.ability import GeneralAbility, mqd_choice_items
    from ..lifelong.probe import Probe, requests_probe, testbed_probe

    if testbed_dir is not None:
        probe = testbed_probe(testbed_dir, list(stream), probe_n, seed, n_questions=n_questions)
    elif known:
        probe = requests_probe(list(known), list(texts), probe_n, n_questions, seed)
    else:
        probe = Probe(texts=list(texts), source="texts",
                      ability=GeneralAbility.build(texts=list(texts), seed=seed).to_dict())
    items = mqd_choice_items(mqd_pool, edited, n_questions)
    choices = dict(probe.ability.get("choices") or {})
    choices.update({k: [c.to_dict() for c in v] for k, v in items.items() if v})
    probe.ability["choices"] = choices
    return probe


def run_mqd_study(adapter_factory: Callable[[], Any], streams: Mapping[str, Sequence], methods: Sequence[str],
                  hparams_by_method: Mapping, stats, probe, out_dir: str | Path, eval_every: int,
                  resume: bool = False, seed: int = 0, config: Mapping | None = None) -> dict:
    """Objective PPL of every stream under a fresh (unedited) model, then one lifelong run per type in
    ``OUT/<type>`` with the same methods, hyperparameters, covariance and probe. Returns
    ``{type: run_lifelong's summary}``."""
    from ..eval.objective import objective_perplexities
    from ..lifelong.runner import run_lifelong
    from ..utils.io import write_json_atomic, write_jsonl_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "study.json", {"format": STUDY_FORMAT, "types": list(streams),
                                          "n_per_type": {q: len(s) for q, s in streams.items()},
                                          "methods": list(methods), "eval_every": eval_every, "seed": seed,
                                          **dict(config or {})})
    adapter = adapter_factory()
    for q, stream in streams.items():
        path = out / q / "objective_ppl.jsonl"
        if not path.exists():
            (out / q).mkdir(parents=True, exist_ok=True)
            write_jsonl_atomic(path, [r.to_dict() for r in objective_perplexities(adapter, list(stream))])
    del adapter
    summaries = {}
    for q, stream in streams.items():
        log.info("MQD study: type %s, %d edits × %s", q, len(stream), ",".join(methods))
        summaries[q] = run_lifelong(adapter_factory, list(stream), list(methods), dict(hparams_by_method), stats,
                                    len(stream), 1, eval_every, out / q, copy.deepcopy(probe), resume, seed=seed)
    return summaries


# ------------------------------------------------------------------------------------------ statistics
def _ranks(x):
    from scipy.stats import rankdata

    return rankdata(x)


def bootstrap_spearman(x: Sequence[float], y: Sequence[float], n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95, control: Sequence[float] | None = None) -> dict:
    """Spearman ρ of paired values and its percentile bootstrap interval (pairs resampled with
    replacement; resamples where a side is constant are dropped). With ``control`` (z), the partial
    rank correlation ρ_xy·z = (ρ_xy − ρ_xz ρ_yz) / √((1 − ρ_xz²)(1 − ρ_yz²)), e.g. an edit's objective
    PPL against the L1 it added with its position in the stream held fixed. ``{"rho", "ci", "n"}``; ρ is
    None for fewer than 3 (4 with a control) complete tuples or a constant side."""
    import numpy as np

    zs = control if control is not None else [0.0] * len(x)
    rows = [(float(a), float(b), float(c)) for a, b, c in zip(x, y, zs)
            if a is not None and b is not None and c is not None
            and math.isfinite(a) and math.isfinite(b) and math.isfinite(c)]
    n = len(rows)
    if n < (4 if control is not None else 3):
        return {"rho": None, "ci": None, "n": n}
    X, Y, Z = (np.array([r[k] for r in rows]) for k in range(3))

    def corr(ra, rb):
        sa, sb = ra.std(), rb.std()
        if sa == 0 or sb == 0:
            return None
        return float(((ra - ra.mean()) * (rb - rb.mean())).mean() / (sa * sb))

    def rho(a, b, c):
        ra, rb = _ranks(a), _ranks(b)
        r_ab = corr(ra, rb)
        if control is None or r_ab is None:
            return r_ab
        rc = _ranks(c)
        r_ac, r_bc = corr(ra, rc), corr(rb, rc)
        if r_ac is None or r_bc is None:
            return None
        den = math.sqrt(max((1 - r_ac ** 2) * (1 - r_bc ** 2), 0.0))
        return (r_ab - r_ac * r_bc) / den if den > 0 else None

    r = rho(X, Y, Z)
    if r is None:
        return {"rho": None, "ci": None, "n": n}
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        b = rho(X[idx], Y[idx], Z[idx])
        if b is not None:
            boots.append(b)
    a = (1.0 - level) / 2
    ci = [float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))] if boots else None
    return {"rho": r, "ci": ci, "n": n}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _mean_ci(xs) -> dict:
    from ..eval.metrics import bootstrap_ci

    xs = [float(x) for x in xs if x is not None and math.isfinite(x)]
    return {"mean": _mean(xs), "ci": bootstrap_ci(xs) if xs else None, "n": len(xs)}


# ------------------------------------------------------------------------------------------ summary
def per_edit_records(objective_rows: Sequence[Mapping], steps: Mapping[int, Mapping], qtype: str,
                     method: str) -> list[dict]:
    """One record per edit (batch size 1): its objective PPL (``log10_ppl``, ``nll``, ``n_tokens``), the
    L1 it added to the edited layers relative to their base L1 (``inc_l1_rel``: mean over layers of
    ‖ΔW_step‖₁/‖W₀‖₁; ``l1_change_rel``: (‖W‖₁ after − before)/‖W₀‖₁), L1 after it (``w_l1_rel``) and
    success / P(new) right after it (``log10_ppl_after_edit`` = −log₁₀ P(new), P = exp(−mean token NLL)).
    ``steps``: steps.jsonl merged by batch start."""
    out = []
    for i, row in enumerate(objective_rows):
        s = steps.get(i) or {}
        rec = {"type": qtype, "method": method, "i": i, "case_id": row.get("case_id"),
               "relation": row.get("relation"), "n_tokens": row.get("n_tokens"), "nll": row.get("nll"),
               "log10_ppl": row["nll"] / math.log(10) if row.get("nll") is not None else None}
        w_rel, inc, chg, w = s.get("w_l1_rel") or {}, s.get("step_delta_l1") or {}, s.get("step_w_l1_change") or {}, \
            s.get("w_l1") or {}
        base = {l: w[l] / w_rel[l] for l in w if w_rel.get(l)}
        rec["inc_l1_rel"] = _mean([inc[l] / base[l] for l in inc if l in base]) if base else None
        rec["l1_change_rel"] = _mean([chg[l] / base[l] for l in chg if l in base]) if base else None
        rec["w_l1_rel"] = _mean(list(w_rel.values())) if w_rel else None
        succ, pn = s.get("success") or [None], s.get("prob_new") or [None]
        rec["success_at_edit"] = succ[0]
        rec["prob_new_at_edit"] = pn[0]
        # prob = exp(−mean token NLL) = 1/PPL: the objective's PPL right after its own edit
        rec["log10_ppl_after_edit"] = -math.log10(pn[0]) if pn[0] else None
        out.append(rec)
    return out


def correlations(records: Sequence[Mapping], x: str = "log10_ppl", ys: Sequence[str] = ("inc_l1_rel", "l1_change_rel"),
                 n_boot: int = 2000, seed: int = 0, control: str | None = "i") -> dict:
    """Spearman ρ (bootstrap CI over edits) of ``x`` against each of ``ys``, per method pooled over the
    types (``"<method>|all"``) and within each type (``"<method>|<type>"``); with ``control`` also the
    partial ρ holding that field fixed (``"<y>|<control>"``; default the edit's position in its stream,
    since later edits land on an already grown layer)."""
    out: dict[str, dict] = {}
    methods = sorted({r["method"] for r in records})
    types = list(dict.fromkeys(r["type"] for r in records))
    for m in methods:
        for q in ["all"] + types:
            sel = [r for r in records if r["method"] == m and (q == "all" or r["type"] == q)]
            out[f"{m}|{q}"] = {y: bootstrap_spearman([r.get(x) for r in sel], [r.get(y) for r in sel], n_boot, seed)
                               for y in ys}
            if control:
                out[f"{m}|{q}"].update({f"{y}|{control}": bootstrap_spearman(
                    [r.get(x) for r in sel], [r.get(y) for r in sel], n_boot, seed,
                    control=[r.get(control) for r in sel]) for y in ys})
    return out


def _ability(rec: Mapping) -> dict:
    from ..eval.metrics import share_ci

    out = {}
    for name in ABILITY_METRICS:
        m = (rec.get("ability") or {}).get(name)
        if isinstance(m, dict) and m.get("value") is not None:
            out[name] = {"value": m["value"], "n": m.get("n")}
            if name in _SHARES:
                out[name]["ci"] = share_ci(m["value"], m.get("n"))
    return out


def summarize_mqd_study(out_dir: str | Path, n_boot: int = 2000, seed: int = 0) -> dict:
    """Read a study directory (:func:`run_mqd_study`) and return ``{"rows", "per_edit", "correlations",
    "type_level", "config"}`` (see the module docstring). Reads saved files only."""
    import json

    from ..lifelong.runner import _steps_by_start
    from ..utils.io import read_jsonl

    out = Path(out_dir)
    config = json.loads((out / "study.json").read_text(encoding="utf-8"))
    rows, per_edit = [], []
    for q in config["types"]:
        obj = list(read_jsonl(out / q / "objective_ppl.jsonl"))
        metrics = list(read_jsonl(out / q / "metrics.jsonl")) if (out / q / "metrics.jsonl").exists() else []
        for m in config["methods"]:
            recs = sorted((r for r in metrics if r["method"] == m), key=lambda r: r["n_edits"])
            if not recs:
                continue
            first, last = recs[0], recs[-1]
            edits = per_edit_records(obj[: last["n_edits"]], _steps_by_start(out / q / m / "steps.jsonl"), q, m)
            per_edit += edits
            probs = [json.loads(line) for line in (out / q / m / "edit_probs.jsonl").read_text().splitlines()]
            final_probs = [p for p in probs if p["n_edits"] == last["n_edits"]]
            success_now = final_probs[-1]["success_now"] if final_probs else []
            log10 = [e["log10_ppl"] for e in edits]
            before, after = _ability(first), _ability(last)
            rows.append({
                "type": q, "method": m, "n_edits": last["n_edits"],
                "objective_log10_ppl": _mean_ci(log10),
                "objective_ppl_median": _median([10 ** v for v in log10 if v is not None]),
                "objective_ppl_mean": _mean([10 ** v for v in log10 if v is not None]),
                "objective_log10_ppl_after_edit": _mean_ci([e["log10_ppl_after_edit"] for e in edits]),
                "w_l1_rel_final": last.get("w_l1_rel_mean"),
                "l1_growth_final": (last["w_l1_rel_mean"] - 1.0) if last.get("w_l1_rel_mean") is not None else None,
                "inc_l1_rel": _mean_ci([e["inc_l1_rel"] for e in edits]),
                "l1_change_rel": _mean_ci([e["l1_change_rel"] for e in edits]),
                "efficacy_at_edit": _mean_ci([e["success_at_edit"] for e in edits]),
                "efficacy_final": _mean_ci(success_now),
                "ability_before": before, "ability_after": after,
                "perplexity_ratio": (after["perplexity"]["value"] / before["perplexity"]["value"]
                                     if "perplexity" in after and "perplexity" in before else None),
                "checkpoints": [{"n_edits": r["n_edits"], "w_l1_rel_mean": r.get("w_l1_rel_mean"),
                                 "efficacy_all": r.get("efficacy_all"),
                                 **{k: v["value"] for k, v in _ability(r).items()}} for r in recs],
            })
    # the type-level relation: 3 points per method (reported, too few for an interval)
    type_level = {}
    for m in config["methods"]:
        sel = [r for r in rows if r["method"] == m]
        if len(sel) >= 3:
            xs = [r["objective_log10_ppl"]["mean"] for r in sel]
            type_level[m] = {
                "n_types": len(sel),
                "rho_l1_growth": bootstrap_spearman(xs, [r["l1_growth_final"] for r in sel], 0)["rho"],
                "rho_perplexity_ratio": bootstrap_spearman(xs, [r["perplexity_ratio"] for r in sel], 0)["rho"],
            }
    return {"config": config, "rows": rows, "per_edit": per_edit,
            "correlations": correlations(per_edit, n_boot=n_boot, seed=seed), "type_level": type_level}


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    k = len(xs) // 2
    return xs[k] if len(xs) % 2 else (xs[k - 1] + xs[k]) / 2
