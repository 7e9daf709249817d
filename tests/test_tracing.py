"""Causal tracing, category averaging, the state-swap test, heatmaps and `superedit trace`."""

import json

import pytest
import torch

from helpers import tiny_adapter, tiny_model
from superedit.analysis import (
    CATEGORIES, Fact, TraceResult, as_fact, average_by_category, category_positions, default_window, pair_facts,
    restored_probs, state_swap, summarize_traces, trace_fact, trace_fact_kinds, window_layers,
)
from superedit.errors import RequestFormatError, SubjectNotFoundError, TemplateError

FACT = {"prompt": "{} was born in", "subject": "Anna Berg", "target": "Oslo"}
END_SUBJECTS = ["Anna Berg", "Toko Yasuda", "Danielle Darrieux", "Apple", "Google Trends", "Paris", "Oslo", "Bergen"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add contention on a shared machine (100x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    return tiny_adapter(request.param)


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_restoring_every_state_gives_clean_probability(tiny):
    n = tiny.n_layers
    T = len(restored_probs(tiny, FACT, [], samples=1)["tokens"])
    sets = [
        [("resid", n - 1, t) for t in range(T)],  # the last block output everywhere
        [("resid", 0, t) for t in range(T)],  # the first block output everywhere
        [("resid", l, t) for l in range(n) for t in range(T)],
    ]
    r = restored_probs(tiny, FACT, sets, noise_scale=10.0, samples=3, seed=1)
    assert abs(r["p_corrupt"] - r["p_clean"]) > 1e-6  # the noise does something
    for p in r["probs"]:
        assert p == pytest.approx(r["p_clean"], rel=1e-4, abs=1e-7)
    first, last = r["subject_span"]
    assert 0 <= first <= last < T


def test_noise_zero_means_corrupt_equals_clean(tiny):
    r = trace_fact(tiny, FACT, kind="mlp", noise_scale=0.0, samples=2)
    assert r.p_corrupt == pytest.approx(r.p_clean, rel=1e-4)
    torch.testing.assert_close(r.scores, torch.full_like(r.scores, r.p_clean), rtol=1e-4, atol=1e-7)


def test_trace_grid_shape_determinism_and_no_leftover_hooks(tiny):
    before = _n_hooks(tiny.model)
    res = trace_fact_kinds(tiny, FACT, ("resid", "mlp", "attn"), noise_scale=3.0, samples=3, seed=0)
    assert _n_hooks(tiny.model) == before
    again = trace_fact(tiny, FACT, kind="resid", samples=3, seed=0)
    other = trace_fact(tiny, FACT, kind="resid", samples=3, seed=5)
    for kind, r in res.items():
        assert r.scores.shape == (tiny.n_layers, len(r.tokens))
        assert r.window == default_window(kind, tiny.n_layers)
        assert r.target_id == tiny.tokenizer(" Oslo", add_special_tokens=False)["input_ids"][0]
        assert r.indirect_effect.shape == r.scores.shape
        json.dumps(r.to_dict())
    torch.testing.assert_close(again.scores, res["resid"].scores)
    assert other.p_corrupt != res["resid"].p_corrupt
    with pytest.raises(IndexError):  # a failing run leaves no hook behind either
        restored_probs(tiny, FACT, [[("resid", 0, 99)]], samples=2)
    assert _n_hooks(tiny.model) == before


def test_target_none_traces_the_top_prediction(tiny):
    r = trace_fact(tiny, {"prompt": "{} was born in", "subject": "Anna Berg"}, kind="resid", samples=2)
    enc = tiny.tokenizer("Anna Berg was born in", return_tensors="pt")
    top = int(tiny.model(**enc).logits[0, -1].argmax())
    assert r.target_id == top and r.p_clean > 0


def test_windows():
    assert default_window("resid", 48) == 1
    assert default_window("mlp", 48) == 10 and default_window("attn", 28) == 6 and default_window("mlp", 6) == 1
    assert window_layers(0, 10, 48) == list(range(0, 5))
    assert window_layers(20, 10, 48) == list(range(15, 25))
    assert window_layers(47, 10, 48) == list(range(42, 48))
    assert window_layers(3, 1, 6) == [3]


def test_category_positions_and_averaging_on_a_hand_made_grid():
    # tokens: 0 prefix | 1 2 3 subject | 4 first subsequent | 5 6 further | 7 last
    assert category_positions(1, 3, 8) == {
        "first subject token": [1], "middle subject tokens": [2], "last subject token": [3],
        "first subsequent token": [4], "further tokens": [5, 6], "last token": [7]}
    grid = torch.arange(16, dtype=torch.float32).view(2, 8)  # layer l, token t -> 8 l + t
    avg = average_by_category(grid, 1, 3)
    assert avg["first subject token"].tolist() == [1, 9]
    assert avg["middle subject tokens"].tolist() == [2, 10]
    assert avg["last subject token"].tolist() == [3, 11]
    assert avg["first subsequent token"].tolist() == [4, 12]
    assert avg["further tokens"].tolist() == [5.5, 13.5]
    assert avg["last token"].tolist() == [7, 15]
    # single-token subject at the end of the prompt: no middle, no subsequent, no further tokens
    end = average_by_category(grid[:, :4], 3, 3)
    assert end["middle subject tokens"] is None and end["first subsequent token"] is None
    assert end["further tokens"] is None and end["last token"].tolist() == [3, 11]


def _fake(scores, span, p_clean=0.5, p_corrupt=0.1, kind="mlp"):
    scores = torch.tensor(scores, dtype=torch.float32)
    return TraceResult(kind, 1, scores, p_clean, p_corrupt, ["t"] * scores.shape[1], span, "p", "{} p", "s", "o",
                       0, 1.0, 1, 0)


def test_summarize_traces_peaks_and_criterion():
    # 6 layers x 5 tokens, subject = tokens 1..2; peak IE at the last subject token, layer 1
    base = torch.full((6, 5), 0.1)
    base[1, 2] = 0.4  # IE 0.3 = 0.6 x clean
    base[4, 4] = 0.2
    a = _fake(base.tolist(), (1, 2))
    b = _fake((base * 0 + 0.1).tolist(), (1, 2))  # no effect anywhere
    s = summarize_traces([a, b])
    assert s["n_facts"] == 2 and s["mean_p_clean"] == pytest.approx(0.5)
    ls = s["categories"]["last subject token"]
    assert ls["n_facts"] == 2 and ls["mean_ie"][1] == pytest.approx(0.15)
    assert ls["mean_ie_over_clean"][1] == pytest.approx(0.3)
    assert s["categories"]["middle subject tokens"]["n_facts"] == 0
    assert s["peak"]["category"] == "last subject token" and s["peak"]["layer"] == 1
    assert s["last_subject_peak"]["layer"] == 1
    assert s["criterion"]["met"] and s["criterion"]["global_peak_at_last_subject"]
    late = base.clone()
    late[1, 2], late[5, 2] = 0.1, 0.4  # peak in the last layer: not early-middle
    assert not summarize_traces([_fake(late.tolist(), (1, 2))])["criterion"]["met"]
    weak = torch.full((6, 5), 0.1)
    weak[1, 2] = 0.12  # IE 0.02 < 0.1 x 0.5
    assert not summarize_traces([_fake(weak.tolist(), (1, 2))])["criterion"]["met"]
    with pytest.raises(ValueError):
        summarize_traces([a, _fake(base.tolist(), (1, 2), kind="attn")])


def _end_facts():
    return [Fact("The person is {}", s) for s in END_SUBJECTS]


def test_swap_with_itself_keeps_the_answer(tiny):
    facts = _end_facts()[:3] + [Fact("{} was born in", "Anna Berg")]
    before = _n_hooks(tiny.model)
    sw = state_swap(tiny, facts, pairs=[(i, i) for i in range(len(facts))])
    assert _n_hooks(tiny.model) == before
    assert sw.n_pairs == 4 and sw.layers == list(range(tiny.n_layers))
    assert sw.keep_rate == [1.0] * tiny.n_layers and sw.transfer_rate == [1.0] * tiny.n_layers


def test_swap_at_last_layer_and_last_token_transfers_exactly(tiny):
    facts = _end_facts()  # the subject ends the prompt: last subject token = last token
    sw = state_swap(tiny, facts, seed=3)
    assert sw.n_pairs >= 2
    assert sw.transfer_rate[-1] == 1.0 and sw.keep_rate[-1] == 0.0
    assert sw.best_layer is not None and sw.best_transfer_rate == 1.0
    for p in sw.pairs:
        assert p["template"] == "The person is {}" and p["recipient_subject"] != p["donor_subject"]
        assert p["recipient_answer"] != p["donor_answer"]
    assert state_swap(tiny, facts, seed=3).pairs == sw.pairs  # seeded, deterministic
    json.dumps(sw.to_dict())


def test_pairing_rules():
    facts = [Fact("{} a", "x"), Fact("{} a", "y"), Fact("{} a", "z"), Fact("{} b", "w"), Fact("{} a", "x2")]
    answers = [1, 1, 2, 3, 2]
    pairs = pair_facts(facts, answers, seed=0)
    assert pairs == pair_facts(facts, answers, seed=0)
    for r, d in pairs:
        assert facts[r].prompt == facts[d].prompt and answers[r] != answers[d]
    assert 3 not in {i for pr in pairs for i in pr}  # alone with its template
    assert len(pair_facts(facts, answers, seed=0, max_pairs=2)) == 2


def test_bad_input_is_clear(tiny):
    with pytest.raises(TemplateError, match="no '\\{\\}'.*replace the subject"):
        as_fact({"prompt": "Anna Berg was born in", "subject": "Anna Berg", "target": "Oslo"})
    with pytest.raises(SubjectNotFoundError, match="does not occur"):
        as_fact({"prompt": "He was born in", "subject": "Anna Berg"})
    with pytest.raises(TemplateError, match="exactly one"):
        as_fact({"prompt": "{} and {}", "subject": "Anna Berg"})
    with pytest.raises(RequestFormatError, match="missing"):
        as_fact({"prompt": "{} was born in"}, "facts.json#3")
    with pytest.raises(RequestFormatError, match="facts.json#3"):
        as_fact({"prompt": "{} x", "subject": "A", "target": 5}, "facts.json#3")
    with pytest.raises(ValueError, match="unknown tracing kind"):
        trace_fact(tiny, FACT, kind="mlpp")
    req = type("Req", (), {"prompt": "{} was born in", "subject": "Anna Berg", "target_new": "Rome",
                           "target_true": "Oslo"})()
    assert as_fact(req) == Fact("{} was born in", "Anna Berg", "Oslo")  # the true fact is traced


def test_heatmap_is_written(tmp_path):
    from superedit.report.plots import trace_heatmap

    grid = torch.rand(4, 6)
    path = trace_heatmap(grid.T, ["a", " b", " c", " d", " e", " f"], tmp_path / "h.png", kind="mlp",
                         highlight=[1, 2])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    avg = [[0.1] * 4, [None] * 4, [0.3] * 4, [0.0] * 4, [0.05] * 4, [0.2] * 4]  # an empty category
    trace_heatmap(avg, list(CATEGORIES), tmp_path / "avg.png", kind="attn")
    assert (tmp_path / "avg.png").stat().st_size > 1000
    with pytest.raises(ValueError):
        trace_heatmap(grid, ["a"], tmp_path / "bad.png")


# ----------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gpt2")
    model, tok = tiny_model("gpt2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _invoke(args):
    from typer.testing import CliRunner

    from superedit.cli import app

    return CliRunner().invoke(app, args)


def test_cli_single_fact(model_dir, tmp_path):
    out = tmp_path / "run"
    res = _invoke(["trace", "--model", str(model_dir), "--prompt", "{} was born in", "--subject", "Anna Berg",
                   "--target", "Oslo", "--samples", "2", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n_facts"] == 1 and summary["kinds"] == ["resid", "mlp", "attn"]
    for k in ("resid", "mlp", "attn"):
        assert (out / f"trace_{k}.png").stat().st_size > 1000
    data = json.loads((out / "trace.json").read_text())
    tr = data["facts"][0]["traces"]["mlp"]
    assert len(tr["scores"]) == 4 and len(tr["scores"][0]) == len(tr["tokens"])
    assert data["config"]["samples"] == 2 and "criterion" in data["summary"]["mlp"]


def test_cli_requests_file_with_swap(model_dir, tmp_path):
    facts = [{"prompt": "The person is {}", "subject": s, "target": "x"} for s in END_SUBJECTS[:5]]
    facts.append({"prompt": "{} was born in", "subject": "Anna Berg", "target": "Oslo"})
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    out = tmp_path / "run"
    res = _invoke(["trace", "--model", str(model_dir), "--requests", str(path), "--kinds", "mlp,resid",
                   "--samples", "2", "--window", "2", "--swap", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n_facts"] == 6 and summary["windows"] == {"mlp": 2, "resid": 1}
    assert summary["swap"]["n_pairs"] >= 2 and summary["swap"]["transfer_rate"][-1] == 1.0
    assert (out / "trace_mlp_avg.png").exists() and (out / "trace_resid_avg.png").exists()
    assert (out / "swap.png").exists()
    data = json.loads((out / "trace.json").read_text())
    assert set(data["summary"]["mlp"]["categories"]) == set(CATEGORIES)
    assert len(data["facts"]) == 6 and data["swap"]["best_layer"] is not None


def test_cli_bad_input_exits_2(model_dir, tmp_path):
    res = _invoke(["trace", "--model", str(model_dir), "--prompt", "Anna Berg was born in", "--subject", "Anna Berg",
                   "--out", str(tmp_path / "x"), "--json"])
    assert res.exit_code == 2
    assert "{}" in json.loads(res.stdout.strip().splitlines()[-1])["error"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "{} was born in", "subject": "Anna Berg"},
                               {"prompt": "no slot", "subject": "Q"}]))
    res = _invoke(["trace", "--model", str(model_dir), "--requests", str(bad), "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "bad.json#1" in res.output
    res = _invoke(["trace", "--model", str(model_dir), "--out", str(tmp_path / "z")])
    assert res.exit_code == 2 and "--requests" in res.output
    assert not (tmp_path / "x").exists()


def test_testbed_world_facts(model_dir, tmp_path):
    world_mod = pytest.importorskip("superedit.testbed.world")
    from superedit.analysis.trace_study import load_facts

    d = tmp_path / "tb"
    d.mkdir()
    for f in model_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    world = world_mod.World.generate(seed=0, n_subjects=6)
    (d / "testbed.json").write_text(json.dumps({"world": world.to_dict()}))
    facts = load_facts(model=str(d), n=5, seed=0)
    assert len(facts) == 5 and facts == load_facts(model=str(d), n=5, seed=0)
    for f in facts:
        assert "{}" in f.prompt and f.target and f.subject in [s.name for s in world.subjects]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
def test_noise_is_sized_to_the_embedding_module_output(family):
    """The noise is added to the embedding module's output, so its std is that output's: Gemma's module
    scales the rows by √d_model (the noise was 25× too weak on Gemma-3-270M); plain embeddings keep the
    matrix std exactly."""
    from superedit.analysis import embedding_noise_std

    a = tiny_adapter(family)
    w = a.embedding().weight.detach().float()
    got = embedding_noise_std(a)
    if family == "gemma3_text":
        assert got == pytest.approx(float(w.std()) * a.model.config.hidden_size ** 0.5, rel=1e-3)
    else:
        assert got == float(w.std())


def test_locate_warns_when_the_noise_does_not_corrupt(caplog):
    import logging

    from superedit.analysis.locate import summarise_locate

    recs = [{"p_clean": 0.5, "p_corrupt": 0.45, "windows": {}, "layers": [0], "ie": {"mlp": {"last token": [0.0]}}}]
    with caplog.at_level(logging.WARNING, logger="superedit"):
        summ = summarise_locate(recs)
    assert "barely corrupts" in summ["warning"] and "barely corrupts" in caplog.text
    recs[0]["p_corrupt"] = 0.05
    assert "warning" not in summarise_locate(recs)
