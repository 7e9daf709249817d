"""The MQD degradation study (issue #16 item 3): its statistics on synthetic records, and a tiny end-to-end
run (per-step L1 in steps.jsonl, the summary read back from the files)."""

from __future__ import annotations

import math

import pytest

from helpers import CORPUS, corpus_cov, tiny_adapter
from superedit.analysis.mqd_study import (bootstrap_spearman, correlations, per_edit_records, run_mqd_study,
                                          study_probe, study_streams, summarize_mqd_study)
from superedit.data import EditRequest
from superedit.editing.hparams import ROMEHParams
from superedit.errors import UsageError

FAST = dict(v_num_grad_steps=4, n_prefixes=1, context_lengths=[3])


def test_bootstrap_spearman_on_synthetic_pairs():
    x = list(range(20))
    up = bootstrap_spearman(x, [v ** 3 for v in x], n_boot=200)
    assert up["rho"] == pytest.approx(1.0) and up["ci"] == pytest.approx([1.0, 1.0]) and up["n"] == 20
    down = bootstrap_spearman(x, [-v for v in x], n_boot=200)
    assert down["rho"] == pytest.approx(-1.0)
    noisy = bootstrap_spearman(x, [v + (7 if v % 2 else -7) for v in x], n_boot=500)
    lo, hi = noisy["ci"]
    assert 0 < noisy["rho"] < 1 and lo <= noisy["rho"] <= hi and hi - lo > 0.05
    # None/non-finite pairs are dropped; too few pairs or a constant side give no ρ
    assert bootstrap_spearman([1, None, 3, float("nan"), 5, 6], [1, 2, 3, 4, 5, 7], n_boot=50)["n"] == 4
    assert bootstrap_spearman([1, 2], [1, 2])["rho"] is None
    assert bootstrap_spearman([1, 2, 3, 4], [5, 5, 5, 5])["rho"] is None
    # partial ρ: x and y both follow z (an edit's position) with independent wiggles → raw ρ high, partial ≈ 0
    z = list(range(40))
    xs = [v + 6 * ((v * 7) % 5) for v in z]
    ys = [v + 6 * ((v * 3) % 4) for v in z]
    raw, part = bootstrap_spearman(xs, ys, n_boot=200), bootstrap_spearman(xs, ys, n_boot=200, control=z)
    assert raw["rho"] > 0.6 and abs(part["rho"]) < raw["rho"] - 0.3 and part["n"] == 40
    assert bootstrap_spearman(z, ys, control=z)["rho"] is None  # x is z itself: no partial correlation


def test_per_edit_records_and_correlations_from_synthetic_steps():
    objective = [{"case_id": f"tf-{i}", "relation": "xNeed", "n_tokens": 1, "nll": math.log(10) * (i + 1)}
                 for i in range(4)]
    # layer "3": base L1 2.0; each edit adds 0.1·(i+1) to ‖W‖₁/numel and changes 0.2·(i+1)
    steps, l1 = {}, 2.0
    for i in range(4):
        before, l1 = l1, l1 + 0.1 * (i + 1)
        steps[i] = {"start": i, "end": i + 1, "w_l1": {"3": l1}, "w_l1_rel": {"3": l1 / 2.0},
                    "step_delta_l1": {"3": 0.2 * (i + 1)}, "step_w_l1_change": {"3": l1 - before},
                    "success": [float(i % 2)], "prob_new": [0.5]}
    recs = per_edit_records(objective, steps, "tf", "rome")
    assert [r["log10_ppl"] for r in recs] == pytest.approx([1, 2, 3, 4])
    assert [r["inc_l1_rel"] for r in recs] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert [r["l1_change_rel"] for r in recs] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert [r["success_at_edit"] for r in recs] == [0.0, 1.0, 0.0, 1.0]
    assert recs[0]["log10_ppl_after_edit"] == pytest.approx(-math.log10(0.5))
    # a missing step record (a crash between commit and record) leaves the edit's L1 as None
    assert per_edit_records(objective[:1], {}, "tf", "rome")[0]["inc_l1_rel"] is None
    other = [dict(r, type="dg", inc_l1_rel=-r["inc_l1_rel"]) for r in recs]
    c = correlations(recs + other, n_boot=100)
    assert set(c) == {"rome|all", "rome|tf", "rome|dg"}
    assert c["rome|tf"]["inc_l1_rel"]["rho"] == pytest.approx(1.0)
    assert c["rome|dg"]["inc_l1_rel"]["rho"] == pytest.approx(-1.0)
    assert c["rome|all"]["inc_l1_rel"]["n"] == 8
    assert {"inc_l1_rel|i", "l1_change_rel|i"} <= set(c["rome|all"])


def _mqd_request(qtype, i, subject):
    target = {"tf": ("yes", "no"), "mc": ("a", "b"), "dg": ("Paris", "Oslo")}[qtype]
    return EditRequest(prompt="Question: where does {} live? Answer:", subject=subject, target_new=target[i % 2],
                       target_true=target[(i + 1) % 2], case_id=f"{qtype}-{i}", relation_id="AtLocation",
                       meta={"question_type": qtype})


def test_tiny_study_end_to_end(tmp_path):
    names = ["Anna Berg", "Toko Yasuda", "Google Trends", "Eiffel Tower", "Danielle Darrieux"]
    pools = {q: [_mqd_request(q, i, s) for i, s in enumerate(names)] for q in ("tf", "dg")}
    streams = study_streams(pools, 2, seed=0)
    assert {q: len(s) for q, s in streams.items()} == {"tf": 2, "dg": 2}
    assert streams == study_streams(pools, 2, seed=0)  # seeded
    with pytest.raises(UsageError):
        study_streams(pools, 9)
    edited = [r for s in streams.values() for r in s]
    probe = study_probe(texts=CORPUS[:4], mqd_pool=[r for q in pools for r in pools[q]], edited=edited)
    tf_items = probe.ability["choices"]["mqd_tf"]
    assert tf_items and not {c["source"] for c in tf_items} & {f"{r.subject}|{r.relation_id}" for r in edited}
    hps = {"rome": ROMEHParams(layers=[1], **FAST)}
    out = tmp_path / "study"
    stats = corpus_cov(tiny_adapter("gpt2"), [1])
    run_mqd_study(lambda: tiny_adapter("gpt2"), streams, ["rome"], hps, stats, probe, out, eval_every=1)
    from superedit.utils.io import read_jsonl

    steps = [r for r in read_jsonl(out / "tf" / "rome" / "steps.jsonl") if "w_l1" in r]
    assert [r["start"] for r in steps] == [0, 1]
    assert all(r["step_delta_l1"]["1"] > 0 and r["w_l1_rel"]["1"] > 0 for r in steps)
    res = summarize_mqd_study(out, n_boot=50)
    assert [(r["type"], r["method"], r["n_edits"]) for r in res["rows"]] == [("tf", "rome", 2), ("dg", "rome", 2)]
    row = res["rows"][0]
    assert row["w_l1_rel_final"] == pytest.approx(steps[-1]["w_l1_rel"]["1"])
    assert row["inc_l1_rel"]["n"] == 2 and row["perplexity_ratio"] > 0
    assert "mqd_tf" in row["ability_before"] and len(row["checkpoints"]) == 3
    assert len(res["per_edit"]) == 4 and set(res["correlations"]) == {"rome|all", "rome|tf", "rome|dg"}
