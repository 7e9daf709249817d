"""Lifelong runner (checkpoints, resume), the interference identity, the report, the ledger CLI."""

import json

import pytest
import torch

from helpers import CORPUS, assert_close_tree, strip_timings, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.hparams import D4SHParams, ROMEHParams
from superedit.lifelong import runner as runner_mod
from superedit.lifelong.runner import Probe, run_lifelong
from superedit.utils.io import read_jsonl
from helpers import corpus_cov

F64 = torch.float64
FAST = dict(v_num_grad_steps=4, n_prefixes=1, context_lengths=[3])
FACTS = [("{} was born in", "Anna Berg", "Paris", "Oslo"), ("{} is located in", "Eiffel Tower", "Oslo", "Paris"),
         ("{} plays the", "Toko Yasuda", "piano", "guitar"), ("{} was created by", "Apple A5", "Google", "Apple"),
         ("{} is owned by", "Google Trends", "Apple", "Google"),
         ("{}'s mother tongue is", "Danielle Darrieux", "Japan", "French")]
REQS = [EditRequest(prompt=p, subject=s, target_new=n, target_true=t,
                    paraphrase_prompts=[f"In short, {p.replace('{}', s)}"],
                    neighborhood_prompts=["The Eiffel Tower is located in" if s != "Eiffel Tower" else "Anna Berg was born in"],
                    neighborhood_answers=["Paris" if s != "Eiffel Tower" else "Oslo"], case_id=i)
        for i, (p, s, n, t) in enumerate(FACTS)]
PROBE_FACTS = [{"prompt": "The Eiffel Tower is located in", "target": "Paris", "template": "The {} is located in",
                "subject": "Eiffel Tower"},
               {"prompt": "Toko Yasuda is from", "target": "Japan", "template": "{} is from", "subject": "Toko Yasuda"},
               {"prompt": "Google Trends is owned by", "target": "Google", "template": "{} is owned by",
                "subject": "Google Trends"}]
CHECKPOINT_KEYS = {"method", "n_edits", "efficacy_all", "efficacy_last_block", "paraphrase_all",
                   "paraphrase_last_block", "neighborhood_all", "forgetting_blocks", "forgetting_mean",
                   "untouched_recall", "untouched_retention", "perplexity", "layers", "w_l1_rel_mean",
                   "delta_fro_total", "v_target_norm_all", "v_delta_norm_last_block", "edit_s", "eval_s"}


def probe():
    return Probe(facts=[dict(f) for f in PROBE_FACTS], texts=CORPUS[:6], block_size=2)


@pytest.fixture(scope="module")
def world():
    stats = corpus_cov(tiny_adapter("gpt2"), [1, 2])
    hps = {"rome": ROMEHParams(layers=[1], **FAST),
           "d4s": D4SHParams(layers=[1, 2], mom2_update_weight=10.0, **FAST)}
    return stats, hps


def factory():
    return tiny_adapter("gpt2")


@pytest.fixture(scope="module")
def full_run(world, tmp_path_factory):
    stats, hps = world
    out = tmp_path_factory.mktemp("lifelong") / "full"
    summary = run_lifelong(factory, REQS, ["rome", "d4s"], hps, stats, edits=6, batch_size=1, eval_every=2,
                           out_dir=out, probe=probe())
    return out, summary


def test_lifelong_run_checkpoints_and_report(full_run):
    out, summary = full_run
    recs = read_jsonl(out / "metrics.jsonl")
    assert [(r["method"], r["n_edits"]) for r in recs] == [(m, n) for m in ("rome", "d4s") for n in (0, 2, 4, 6)]
    for r in recs:
        assert CHECKPOINT_KEYS <= set(r), CHECKPOINT_KEYS - set(r)
        if r["n_edits"]:
            assert 0.0 <= r["efficacy_all"] <= 1.0 and r["last_block"] == [r["n_edits"] - 2, r["n_edits"]]
            assert r["perplexity"] > 1.0 and r["untouched_n"] == 3
            assert set(r["layers"]) == ({"1"} if r["method"] == "rome" else {"1", "2"})
            assert r["layers"]["1"]["delta_fro"] > 0 and r["v_target_norm_all"] > 0
            assert len(r["forgetting_blocks"]) == r["n_edits"] // 2
            for name in ("paraphrase", "neighborhood"):  # per-edit shares → a bootstrap interval over the edits
                lo, hi = r[f"{name}_all_ci"]
                assert r[f"{name}_all_n"] == r["n_edits"] and lo <= r[f"{name}_all"] <= hi
    final = {r["method"]: r for r in recs if r["final"]}
    assert final["rome"]["efficacy_all"] >= 0.5 and final["d4s"]["efficacy_all"] >= 0.5
    assert "interference" in final["rome"] and "interference" not in final["d4s"]
    probs = read_jsonl(out / "rome" / "edit_probs.jsonl")
    assert [p["n_edits"] for p in probs] == [0, 2, 4, 6] and len(probs[-1]["prob_new_at_edit"]) == 6
    assert all(p is not None for p in probs[-1]["prob_new_at_edit"])
    assert not (out / "report.html").exists()  # the library computes; the command renders
    from superedit.report.lifelong_report import write_report

    html = write_report(out).read_text()
    assert html.count('<img src="plots/') >= 6 and "rome" in html and "d4s" in html
    assert summary["methods"]["rome"]["n_edits"] == 6


def test_retention_split_by_edited_subject(full_run):
    from superedit.lifelong.runner import retention_by_subject

    facts = [{"subject": "A"}, {"subject": "A"}, {"subject": "B"}, {"subject": "C"}, {"subject": ""}]
    got = retention_by_subject([True, False, True, False, True], [True, True, True, False, True], facts, {"A"})
    assert got == {"untouched_retention_edited_subjects": 0.5, "untouched_n_edited_subjects": 2,
                   "untouched_retention_other_subjects": 1.0, "untouched_n_other_subjects": 1}
    assert retention_by_subject([], [], [], set())["untouched_retention_other_subjects"] is None
    out, _ = full_run  # every checkpoint records the split, over the facts the base model recalled
    base = json.loads((out / "probe.json").read_text())["base_hits"]
    for r in read_jsonl(out / "metrics.jsonl"):
        assert r["untouched_n_edited_subjects"] + r["untouched_n_other_subjects"] == sum(base)


def test_subject_rounds_stream_order():
    from superedit.commands.lifelong import subject_rounds

    reqs = [EditRequest(prompt="{} x", subject=s, target_new="n", case_id=i) for i, s in enumerate("AABCBA")]
    out = subject_rounds(reqs)
    assert [r.subject for r in out] == ["A", "B", "C", "A", "B", "A"]
    assert [r.case_id for r in out] == [0, 2, 3, 1, 4, 5]  # stable within a round


def test_stream_order_is_validated(tmp_path):
    from superedit.commands.lifelong import load_stream
    from superedit.errors import SupereditError

    f = tmp_path / "reqs.jsonl"
    f.write_text("\n".join(json.dumps(r.to_dict()) for r in REQS) + "\n")
    with pytest.raises(SupereditError, match="--stream-order"):
        load_stream(str(f), "superedit", None, 0, tmp_path / "out", False, "random")
    a = load_stream(str(f), "superedit", None, 0, tmp_path / "out", False, "shuffled")
    b = load_stream(str(f), "superedit", None, 0, tmp_path / "out", False, "subject-rounds")
    assert sorted(r.case_id for r in a) == sorted(r.case_id for r in b) == list(range(len(REQS)))


def test_interference_identity_rome(full_run):
    out, _ = full_run
    inter = [r["interference"] for r in read_jsonl(out / "metrics.jsonl") if r["method"] == "rome" and r["n_edits"]]
    for it in inter:
        assert it["o"]["rel_error"] < 1e-4 and it["o"]["n_keys"] == 3
        assert it["o"]["meas_shift_mean"] > 0
    assert inter[-1]["e"]["rel_error"] < 1e-4 and inter[-1]["e"]["edits"]
    for it in inter:
        if it["n_edits"] <= 5:  # the top-5 terms are all the terms: they explain the whole shift
            assert abs(it["o"]["top5_share"] - 1.0) < 1e-6
    assert inter[0]["n_edits"] == 2 and inter[-1]["n_edits"] == 6


def test_interference_tracker_keys_and_deltas(world):
    """k̂ = C·u is the edit's key k* (read independently), δ = v − W_{i−1}k*, and Σ p δ = (W − W₀)kⱼ."""
    from superedit.editing.contexts import context_prefixes
    from superedit.editing.keys import compute_keys, keys_at
    from superedit.editing.methods import get_method
    from superedit.lifelong.interference import InterferenceTracker

    stats, hps = world
    hp = hps["rome"]
    a = tiny_adapter("gpt2")
    W0 = a.down_weight(1).detach().clone()
    probe_keys = keys_at(a, [f["template"] for f in PROBE_FACTS], [f["subject"] for f in PROBE_FACTS], [1])[1]
    tr = InterferenceTracker(1, stats.mom2(1), W0, probe_keys)
    prefixes = context_prefixes(a, hp.context_lengths, hp.n_prefixes, hp.seed)
    for req in REQS[:4]:
        k = compute_keys(a, [req.prompt], [req.subject], [1], prefixes)[1][0].double()
        W_prev = a.down_weight(1).detach().double().clone()
        d = get_method("rome").fn(a, [req], hp, stats).delta.layers[1]
        a.add_to_down_weight(1, d.dense(F64))
        tr.add_increment(d.left, d.right, a.down_weight(1))
        k_hat = tr.keys[-1]
        assert float((k_hat - k).norm() / k.norm()) < 1e-4
        v = a.down_weight(1).double() @ k  # ROME inserts v* exactly at k*
        assert float((tr.deltas[-1] - (v - W_prev @ k)).norm() / tr.deltas[-1].norm()) < 1e-3
    res = tr.check(a.down_weight(1))
    assert res["o"]["rel_error"] < 1e-4 and res["e"]["rel_error"] < 1e-4
    meas = (a.down_weight(1).double() - W0.double()) @ probe_keys.double().T
    assert float(meas.norm()) > 0


def test_resume_after_interruption_matches(world, full_run, tmp_path, monkeypatch):
    stats, hps = world
    out_full, _ = full_run
    out = tmp_path / "resumed"

    def crash(method, n_done):
        if method == "d4s" and n_done == 3:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(runner_mod, "_after_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        run_lifelong(factory, REQS, ["rome", "d4s"], hps, stats, edits=6, batch_size=1, eval_every=2, out_dir=out,
                     probe=probe())
    monkeypatch.undo()
    from superedit.errors import SupereditError

    with pytest.raises(SupereditError, match="--resume"):
        run_lifelong(factory, REQS, ["rome", "d4s"], hps, stats, edits=6, batch_size=1, eval_every=2, out_dir=out,
                     probe=probe())
    run_lifelong(factory, REQS, ["rome", "d4s"], hps, stats, edits=6, batch_size=1, eval_every=2, out_dir=out,
                 probe=probe(), resume=True)
    a = [strip_timings(r) for r in read_jsonl(out_full / "metrics.jsonl")]
    b = [strip_timings(r) for r in read_jsonl(out / "metrics.jsonl")]
    assert [(r["method"], r["n_edits"]) for r in b] == [(r["method"], r["n_edits"]) for r in a]
    assert_close_tree(a, b)
    from superedit.lifelong.ledger import Ledger

    for m in ("rome", "d4s"):
        la, lb = Ledger.open(out_full / m / "ledger"), Ledger.open(out / m / "ledger")
        assert len(lb.edits) == 6  # nothing applied twice
        for l in la.layers:
            assert torch.equal(la.total_delta(l), lb.total_delta(l))  # bit-exact resume (tests/test_resume.py)


def test_a_longer_edits_lengthens_a_finished_run_to_the_same_figures(world, tmp_path):
    """3 edits lengthened to 6 (checkpoints every 2): every checkpoint of the uninterrupted 6-edit run, the
    same figures (last blocks included); the old last checkpoint stays in the curves, no longer final."""
    from superedit.errors import SupereditError

    stats, hps = world

    def run(out, edits, requests=REQS, facts=PROBE_FACTS[:2], **kw):  # the third probe fact is edit #5's
        return run_lifelong(factory, requests, ["rome", "d4s"], hps, stats, edits=edits, batch_size=1, eval_every=2,
                            out_dir=out, probe=Probe(facts=[dict(f) for f in facts], texts=CORPUS[:6], block_size=2),
                            **kw)

    run(tmp_path / "full", 6)
    out = tmp_path / "lengthened"
    run(out, 3)
    with pytest.raises(SupereditError, match="different settings"):  # fewer edits than the run holds
        run(out, 2, resume=True)
    with pytest.raises(SupereditError, match="stream differs"):  # a longer stream with another head
        run(out, 6, requests=REQS[::-1], resume=True)
    touched = tmp_path / "touched"  # a run whose probe holds a fact a later edit rewrites
    run(touched, 3, facts=PROBE_FACTS)
    with pytest.raises(SupereditError, match="rewrite 1 of the retention probe's facts"):
        run(touched, 6, facts=PROBE_FACTS, resume=True)
    assert len(read_jsonl(touched / "stream.jsonl")) == 3 and json.loads((touched / "run.json").read_text())["edits"] == 3

    run(out, 6, resume=True)
    assert len(read_jsonl(out / "stream.jsonl")) == 6 and json.loads((out / "run.json").read_text())["edits"] == 6
    from superedit.lifelong.horizon import records_by_method

    full, longer = (records_by_method(read_jsonl(d / "metrics.jsonl")) for d in (tmp_path / "full", out))
    for m in ("rome", "d4s"):
        assert [r["n_edits"] for r in longer[m]] == [0, 2, 3, 4, 6]
        assert [r["final"] for r in longer[m]] == [False, False, False, False, True]
        assert longer[m][3]["last_block"] == [2, 4]  # as in the uninterrupted run, not [3, 4]
        assert_close_tree([strip_timings(r) for r in full[m]],
                          [strip_timings(r) for r in longer[m] if r["n_edits"] != 3])


def test_ledger_cli_show_undo_export(full_run, tmp_path):
    from typer.testing import CliRunner

    from superedit.cli import app
    from superedit.editing.delta import WeightDelta

    out, _ = full_run
    src = out / "rome" / "ledger"
    import shutil

    led_dir = tmp_path / "ledger"
    shutil.copytree(src, led_dir)
    cli = CliRunner()
    res = cli.invoke(app, ["ledger", "show", "--ledger", str(led_dir), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["method"] == "rome" and info["active"] == list(range(6)) and info["delta_norms"]["1"]["fro"] > 0
    res = cli.invoke(app, ["ledger", "undo", "--ledger", str(led_dir), "--index", "2", "--json"])
    assert res.exit_code == 2 and "only the last applied edit" in res.output
    res = cli.invoke(app, ["ledger", "undo", "--ledger", str(led_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["active"] == list(range(5))
    res = cli.invoke(app, ["ledger", "export", "--ledger", str(led_dir), "--out", str(tmp_path / "exp"), "--json"])
    assert res.exit_code == 0, res.output
    d = WeightDelta.load(tmp_path / "exp")
    from superedit.lifelong.ledger import Ledger

    led = Ledger.open(led_dir)
    assert torch.allclose(d.layers[1].dense(F64), led.total_delta(1))
    assert json.loads((tmp_path / "exp" / "edits.json").read_text())["edits"][5]["status"] == "undone"


def test_a_ledger_from_before_a_new_field_resumes_and_a_changed_one_does_not():
    """``--resume`` compares the ledger's recorded hyperparameters with the fields added since filled in at
    their defaults (which keep the old behaviour); a changed value or a field that no longer exists still
    differs, so the run is refused."""
    hp = ROMEHParams(layers=[1], **FAST)
    old = {k: v for k, v in hp.to_dict().items() if k not in ("preserve_factor", "preserve_other_kinds")}
    assert runner_mod._with_defaults(hp, old) == hp.to_dict()
    changed = {**old, "v_lr": hp.v_lr * 2}
    assert runner_mod._with_defaults(hp, changed) != hp.to_dict()
    gone = {**hp.to_dict(), "a_removed_field": 1}
    assert runner_mod._with_defaults(hp, gone) == gone != hp.to_dict()
