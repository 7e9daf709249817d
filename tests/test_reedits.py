"""Re-edit streams (``superedit lifelong --reedit-facts K``) and checkpoints scored over the live edits."""

import gc
import json

import pytest

from helpers import CORPUS, assert_close_tree, strip_timings, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.hparams import FTHParams
from superedit.errors import SupereditError
from superedit.lifelong import runner as runner_mod
from superedit.lifelong.reedits import (PREVIOUS_TARGET, REEDIT_ROUND, live_positions, previous_target_requests,
                                       reedit_stream)
from superedit.lifelong.runner import Probe, run_lifelong
from superedit.utils.io import read_jsonl

CITIES = ["Paris", "Oslo", "Bergen", "Rome"]
INSTRUMENTS = ["piano", "guitar", "violin"]


def _req(subject, prompt, rel, new, true, i, **kw):
    return EditRequest(prompt=prompt, subject=subject, target_new=new, target_true=true, relation_id=rel, case_id=i,
                       paraphrase_prompts=[f"In short, {prompt.replace('{}', subject)}"],
                       neighborhood_prompts=["The Eiffel Tower is located in"], neighborhood_answers=["Paris"], **kw)


def candidates():
    """Five facts on two relations (cities: 4 objects, instruments: 3), then a second request of a chosen fact."""
    return [_req("Anna Berg", "{} was born in", "city", "Paris", "Oslo", 0,
                 attribute_prompts=["Toko Yasuda lives in"], attribute_answers=["Paris"]),
            _req("Toko Yasuda", "{} plays the", "instrument", "piano", "guitar", 1),
            _req("Eiffel Tower", "{} is located in", "city", "Oslo", "Paris", 2),
            _req("Apple A5", "{} was made in", "city", "Bergen", "Rome", 3),
            _req("Anna Berg", "{} was born in", "city", "Rome", "Oslo", 4),  # Anna Berg's city again: skipped
            _req("Danielle Darrieux", "{} plays the", "instrument", "violin", "piano", 5)]


# ------------------------------------------------------------------------------------ the builder
def test_reedit_stream_rounds_over_k_facts():
    reqs = candidates()
    s = reedit_stream(reqs, 3, 11, seed=0)
    assert len(s) == 11
    assert s[:3] == reqs[:3]  # round 0: the first K distinct facts as they are
    keys = [r.fact_key for r in s[:3]]
    assert len(set(keys)) == 3
    objects = {"city": set(CITIES), "instrument": set(INSTRUMENTS)}
    for i, r in enumerate(s):
        assert r.fact_key == keys[i % 3]  # every round: the same facts in the same order
        assert (r.meta or {}).get(REEDIT_ROUND, 0) == i // 3  # rounds in order
        assert r.target_new != r.target_true and r.target_new in objects[r.relation_id]
        if i >= 3:
            before = s[i - 3]
            assert r.target_new != before.target_new  # a NEW target: not the one the fact holds
            # the same request otherwise: prompts, paraphrases, neighbourhood, true object
            for f in ("prompt", "subject", "target_true", "paraphrase_prompts", "neighborhood_prompts",
                      "neighborhood_answers", "relation_id", "case_id"):
                assert getattr(r, f) == getattr(s[i % 3], f), f
            assert r.attribute_prompts == [] and r.attribute_answers == []  # they were about the old target
            assert r.meta[PREVIOUS_TARGET] == before.target_new  # the target this re-edit overwrites
    assert [r.meta.get(REEDIT_ROUND) for r in s[9:]] == [3, 3]  # a partial last round
    # deterministic for a seed (fresh objects, separate calls), and the seed matters
    again = reedit_stream(candidates(), 3, 11, seed=0)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in s]
    others = [reedit_stream(candidates(), 3, 11, seed=k) for k in range(1, 6)]
    assert any([r.target_new for r in o] != [r.target_new for r in s] for o in others)
    # the instrument relation has 3 objects: a re-edit of a fact whose true object is one of them alternates
    toko = [r.target_new for r in s if r.subject == "Toko Yasuda"]
    assert toko == ["piano", "violin", "piano", "violin"]


def test_reedit_stream_without_reedits_and_duplicates():
    reqs = candidates()
    assert reedit_stream(reqs, 5, 2, seed=0) == reqs[:2]  # --edits ≤ K: no re-edit
    s = reedit_stream(reqs, 5, 5, seed=0)  # Anna Berg's second city request is not a fact of its own
    assert [r.case_id for r in s] == [0, 1, 2, 3, 5]


def test_reedit_stream_errors():
    reqs = candidates()
    with pytest.raises(SupereditError, match=r"--reedit-facts 6: .* only 5 distinct facts .* --reedit-facts 5"):
        reedit_stream(reqs, 6, 20, seed=0)
    for k in (0, -1):
        with pytest.raises(SupereditError, match="--reedit-facts must be ≥ 1"):
            reedit_stream(reqs, k, 20, seed=0)
    with pytest.raises(SupereditError, match="--edits"):
        reedit_stream(reqs, 2, 0, seed=0)
    # a relation whose only objects are the fact's true object and its target: nothing to re-edit it to
    lonely = [_req("Tim Cook", "{} speaks", "language", "French", "English", 9), *reqs]
    with pytest.raises(SupereditError, match=r"relation 'language' has no object to re-edit 'Tim Cook'"):
        reedit_stream(lonely, 2, 4, seed=0)
    assert len(reedit_stream(lonely, 2, 2, seed=0)) == 2  # without re-edits nothing needs another object


def test_a_saved_reedit_stream_is_resumed_as_it_is():
    """--resume without --requests (not a testbed) reads OUT/stream.jsonl back: it is the stream, checked."""
    from superedit.commands.lifelong import reedit_or_saved

    saved = reedit_stream(candidates(), 3, 8, seed=0)
    assert reedit_or_saved(saved, 3, 8, 0, saved=True) == saved
    assert reedit_or_saved(candidates(), 3, 8, 0, saved=False) == saved
    with pytest.raises(SupereditError, match="--reedit-facts 4: the saved stream of this run edits 3 distinct facts"):
        reedit_or_saved(saved, 4, 8, 0, saved=True)


# ------------------------------------------------------------------------------------ live edits
def test_live_positions_keep_each_facts_latest_edit():
    def r(subject, rel, new):
        return EditRequest(prompt="{} x", subject=subject, target_new=new, relation_id=rel)

    stream = [r("A", "p", "1"), r("B", "p", "1"), r("A", "p", "2"), r("A", "q", "1"), r("B", "p", "3"),
              r("C", "p", "1")]
    assert live_positions(stream, 6) == [2, 3, 4, 5]
    assert live_positions(stream, 4) == [1, 2, 3]
    assert live_positions(stream, 2) == [0, 1] and live_positions(stream, 0) == []
    distinct = [r(s, "p", "1") for s in "ABCD"]
    assert live_positions(distinct, 3) == [0, 1, 2]  # every position live without re-edits
    # no relation id: the template is the relation (EditRequest.fact_key)
    nor = [EditRequest(prompt=p, subject="A", target_new=t) for p, t in (("{} x", "1"), ("{} y", "1"), ("{} x", "2"))]
    assert live_positions(nor, 3) == [1, 2]


# ------------------------------------------------------------------------------------ the runner
FT = FTHParams(layers=[1], num_steps=4, lr=0.05, norm_constraint=0.0)


def _run(out, stream, eval_every):
    probe = Probe(texts=CORPUS[:3], block_size=2)
    run_lifelong(lambda: tiny_adapter("gpt2"), stream, ["ft"], {"ft": FT}, None, edits=len(stream), batch_size=1,
                 eval_every=eval_every, out_dir=out, probe=probe)
    return {r["n_edits"]: r for r in read_jsonl(out / "metrics.jsonl")}, \
        {p["n_edits"]: p for p in read_jsonl(out / "ft" / "edit_probs.jsonl")}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def test_checkpoints_score_live_edits_only(tmp_path):
    from superedit.eval.metrics import batch_evaluate
    from superedit.lifelong.ledger import Ledger

    stream = reedit_stream(candidates(), 3, 7, seed=0)  # A B C A' B' C' A''
    recs, probs = _run(tmp_path / "run", stream, 3)
    assert sorted(recs) == [0, 3, 6, 7]
    assert {n: r["n_live"] for n, r in recs.items()} == {0: 0, 3: 3, 6: 3, 7: 3}
    p = probs[7]
    live = [4, 5, 6]  # B', C', A''
    assert [i for i, v in enumerate(p["success_now"]) if v is not None] == live
    assert [i for i, v in enumerate(p["prob_new_now"]) if v is not None] == live
    assert len(p["success_at_edit"]) == 7 and all(v is not None for v in p["success_at_edit"])
    final = recs[7]
    assert final["efficacy_all"] == pytest.approx(_mean(p["success_now"]))
    assert final["last_block"] == [6, 7] and final["efficacy_last_block"] == p["success_now"][6]
    blocks = final["forgetting_blocks"]  # block size 2: [0,2) and [2,4) hold no live edit any more
    for b in blocks[:2]:
        assert b["efficacy_at_edit"] is None and b["efficacy_now"] is None and b["forgetting"] is None
    assert blocks[2]["efficacy_at_edit"] == pytest.approx(_mean(p["success_at_edit"][4:6]))
    assert blocks[2]["efficacy_now"] == pytest.approx(_mean(p["success_now"][4:6]))
    assert blocks[3]["efficacy_at_edit"] == p["success_at_edit"][6]
    assert final["forgetting_mean"] == pytest.approx(_mean([b["forgetting"] for b in blocks[2:]]))
    assert final["efficacy_at_edit_all"] == pytest.approx(_mean(p["success_at_edit"]))  # every edit, at its time
    # independently: the final model scored on the live requests gives the checkpoint's figures
    a = Ledger.open(tmp_path / "run" / "ft" / "ledger").apply_to(tiny_adapter("gpt2"))
    res = batch_evaluate(a, [stream[i] for i in live], max_neighbours=5)
    assert final["efficacy_all"] == pytest.approx(_mean([r["efficacy_score"] for r in res]))
    assert final["paraphrase_all"] == pytest.approx(_mean([r["paraphrase_score"] for r in res]))
    assert final["paraphrase_all_n"] == 3
    # the live re-edits (all three here) against the target each overwrote, scored independently
    idx, against = previous_target_requests([stream[i] for i in live])
    assert idx == [0, 1, 2] and [r.target_true for r in against] == [stream[i - 3].target_new for i in live]
    prev = batch_evaluate(a, against, max_neighbours=0, paraphrases=False)
    assert final["n_live_reedits"] == 3
    assert final["efficacy_vs_previous_target"] == pytest.approx(_mean([r["efficacy_score"] for r in prev]))
    assert "efficacy_vs_previous_target" not in recs[3]  # no re-edit yet at 3 edits


def test_without_reedits_every_edit_is_live(tmp_path):
    stream = candidates()[:4]  # four distinct facts
    recs, probs = _run(tmp_path / "run", stream, 2)
    for n, r in recs.items():
        assert r["n_live"] == n
        assert "n_live_reedits" not in r and "efficacy_vs_previous_target" not in r
        p = probs[n]
        assert all(v is not None for v in p["success_now"]) and len(p["success_now"]) == n
        if n:  # the figures over all edits, as without live selection
            prev = r["last_block"][0]
            assert r["efficacy_all"] == _mean(p["success_now"])
            assert r["efficacy_last_block"] == _mean(p["success_now"][prev:n])
            for b in r["forgetting_blocks"]:
                assert b["efficacy_at_edit"] == _mean(p["success_at_edit"][b["start"]:b["end"]])
                assert b["efficacy_now"] == _mean(p["success_now"][b["start"]:b["end"]])


# ------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro testbed trained for 2 epochs (seconds): its world and requests are what matter here."""
    from superedit.testbed.build import build_testbed

    root = tmp_path_factory.mktemp("reedit-micro")
    hp = root / "ft.yaml"
    hp.write_text("layers: [1]\nnum_steps: 3\nlr: 0.05\nnorm_constraint: 0.0\n")
    return build_testbed("micro", root / "micro", seed=0, epochs=2), hp


def _lifelong(micro, out, *extra):
    from typer.testing import CliRunner

    from superedit.cli import app

    mdir, hp = micro
    return CliRunner().invoke(app, ["lifelong", "--model", str(mdir), "--methods", "ft", "--hparams", str(hp),
                                    "--probe-n", "10", "--block-size", "3", "--no-report", "--out", str(out),
                                    "--json", *extra])


def test_cli_reedit_stream_checkpoints_and_resume(micro, tmp_path, monkeypatch):
    from superedit.commands.lifelong import load_stream
    from superedit.lifelong.ledger import Ledger

    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path / "home"))
    args = ["--edits", "8", "--reedit-facts", "3", "--eval-every", "3"]
    out = tmp_path / "full"
    res = _lifelong(micro, out, *args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["n_edits"] == 8
    saved = read_jsonl(out / "stream.jsonl")  # the whole re-edit stream, as the builder makes it
    expected = reedit_stream(load_stream(None, "auto", micro[0], 0, tmp_path / "unused", False), 3, 8, 0)
    assert saved == [r.to_dict() for r in expected]
    assert [r["meta"].get(REEDIT_ROUND, 0) for r in saved] == [0, 0, 0, 1, 1, 1, 2, 2]
    recs = {r["n_edits"]: r for r in read_jsonl(out / "metrics.jsonl")}
    assert {n: r["n_live"] for n, r in recs.items()} == {0: 0, 3: 3, 6: 3, 8: 3}
    p = read_jsonl(out / "ft" / "edit_probs.jsonl")[-1]
    assert [i for i, v in enumerate(p["success_now"]) if v is not None] == [5, 6, 7]
    assert recs[8]["efficacy_all"] == pytest.approx(_mean(p["success_now"]))
    assert recs[8]["efficacy_last_block"] == pytest.approx(_mean(p["success_now"][6:8]))
    # the retention probe and the ability items leave out the K facts' subjects (testbed probe)
    probe = json.loads((out / "probe.json").read_text())
    edited = {r["subject"] for r in saved}
    assert len(edited) == 3 and probe["facts"] and not edited & {f["subject"] for f in probe["facts"]}

    # interrupted after the 5th edit (a re-edit), then --resume: the saved stream is continued exactly
    part = tmp_path / "part"

    def crash(method, n_done):
        if n_done == 5:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(runner_mod, "_after_commit", crash)
    res = _lifelong(micro, part, *args)
    assert isinstance(res.exception, RuntimeError)
    del res  # its traceback holds the crashed run's ledger (and so its writer lock)
    gc.collect()
    monkeypatch.undo()
    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path / "home"))
    assert len(Ledger.open(part / "ft" / "ledger").edits) == 5
    res = _lifelong(micro, part, *args, "--resume")
    assert res.exit_code == 0, res.output
    led = Ledger.open(part / "ft" / "ledger")
    assert [r for e in led.edits for r in e["requests"]] == saved
    a = [strip_timings(r) for r in read_jsonl(out / "metrics.jsonl")]
    b = [strip_timings(r) for r in read_jsonl(part / "metrics.jsonl")]
    assert [r["n_edits"] for r in b] == [0, 3, 6, 8]
    assert_close_tree(a, b)  # the same checkpoints as the uninterrupted run
    # another K on resume: the stream differs from the saved one
    res = _lifelong(micro, part, "--edits", "8", "--reedit-facts", "4", "--eval-every", "3", "--resume")
    assert res.exit_code == 2 and "stream" in res.output


def test_cli_reedit_facts_zero_keeps_every_edit_live(micro, tmp_path, monkeypatch):
    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path / "home"))
    out = tmp_path / "plain"
    res = _lifelong(micro, out, "--edits", "4", "--eval-every", "2", "--reedit-facts", "0")
    assert res.exit_code == 0, res.output
    stream = read_jsonl(out / "stream.jsonl")
    assert len(stream) == 4 and not any(REEDIT_ROUND in r["meta"] for r in stream)
    for r in read_jsonl(out / "metrics.jsonl"):
        assert r["n_live"] == r["n_edits"]


def test_cli_reedit_facts_bad_input(micro, tmp_path, monkeypatch):
    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path / "home"))
    for extra, msg in ((["--reedit-facts", "-1"], "--reedit-facts must be ≥ 0"),
                       (["--reedit-facts", "3", "--batch-size", "4"], "--batch-size 4 > --reedit-facts 3"),
                       (["--reedit-facts", "1000"], "only 240 distinct facts")):
        out = tmp_path / "bad"
        res = _lifelong(micro, out, "--edits", "2000", *extra)
        assert res.exit_code == 2, res.output
        assert msg in " ".join(res.output.split()), res.output
        assert not out.exists()  # bad input writes nothing
