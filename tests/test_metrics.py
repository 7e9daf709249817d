"""Editing metrics, the edit/evaluate loop and the ``edit`` / ``eval`` commands on tiny GPT-2 models."""

import json
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from helpers import CORPUS, corpus_cov, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.hparams import FTHParams, ROMEHParams
from superedit.eval.fluency import compute_n_gram_entropy, n_gram_entropy, word_tokenize
from superedit.eval.metrics import evaluate_request, harmonic_mean, summarize, target_nll, token_accuracy

REQ = EditRequest(
    prompt="{} was born in", subject="Anna Berg", target_new="Paris", target_true="Bergen", case_id="anna",
    paraphrase_prompts=["Anna Berg is a pianist from", "The birthplace of Anna Berg is"],
    neighborhood_prompts=["Toko Yasuda was born in", "The Eiffel Tower is located in"],
    neighborhood_answers=["Japan", "Oslo"],
)
FT_FAST = FTHParams(layers=[1], num_steps=3, lr=1e-2, norm_constraint=1e-3)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_adapter("gpt2")


def ids(adapter, word):
    return adapter.tokenizer(" " + word)["input_ids"]


@contextmanager
def boosted(adapter, words, amount=40.0):
    """Add ``amount`` to the logits of every token of ``words`` (a forward hook on the LM head)."""
    bias = torch.zeros(adapter.model.config.vocab_size)
    for w in words:
        bias[ids(adapter, w)] += amount
    h = adapter.lm_head().register_forward_hook(lambda m, i, o: o + bias.to(o.dtype))
    try:
        yield
    finally:
        h.remove()


def down_weights(adapter):
    return {l: adapter.down_weight_param(l).detach().clone() for l in range(adapter.n_layers)}


# ------------------------------------------------------------------------------------- metrics
def test_target_nll_and_accuracy_match_manual_log_softmax(gpt2):
    prompts = ["Anna Berg was born in", "The Eiffel Tower, a famous tower, is located in"]
    targets = ["Oslo", "Paris"]
    got_nll = target_nll(gpt2, prompts, targets)
    got_acc = token_accuracy(gpt2, prompts, targets)
    for p, t, nll, acc in zip(prompts, targets, got_nll, got_acc):
        p_ids = gpt2.tokenizer(p)["input_ids"]
        full = gpt2.tokenizer(p + " " + t)["input_ids"]
        with torch.no_grad():
            logp = F.log_softmax(gpt2.model(torch.tensor([full])).logits[0].double(), -1)
        pos = range(len(p_ids) - 1, len(full) - 1)
        want = -sum(float(logp[q, full[q + 1]]) for q in pos) / len(pos)
        assert nll == pytest.approx(want, rel=1e-4)
        assert acc == pytest.approx(sum(int(logp[q].argmax()) == full[q + 1] for q in pos) / len(pos))


def test_counterfact_scores_flip_with_boosted_logits(gpt2):
    assert not set(ids(gpt2, "Paris")) & set(ids(gpt2, "Bergen")) & set(ids(gpt2, "Japan") + ids(gpt2, "Oslo"))
    pre = evaluate_request(gpt2, REQ)
    with boosted(gpt2, ["Bergen"]):  # the true answer wins everywhere
        true_wins = evaluate_request(gpt2, REQ, pre)
    with boosted(gpt2, ["Paris"]):  # the new answer wins everywhere
        new_wins = evaluate_request(gpt2, REQ, pre)
    assert true_wins["efficacy_score"] == 0.0 and true_wins["paraphrase_score"] == 0.0
    assert true_wins["efficacy_magnitude"] < 0 and true_wins["paraphrase_magnitude"] < 0
    assert new_wins["efficacy_score"] == 1.0 and new_wins["paraphrase_score"] == 1.0
    assert new_wins["efficacy_magnitude"] > 0.5  # P(new) ≈ 1, P(true) ≈ 0
    assert new_wins["efficacy_magnitude"] == pytest.approx(
        math.exp(-new_wins["rewrite_nll_new"]) - math.exp(-new_wins["rewrite_nll_true"]))
    # target_new now beats the neighbourhood answers too: neighbourhood score 0, S = 0
    assert new_wins["neighborhood_score"] == 0.0 and new_wins["neighborhood_magnitude"] < 0
    assert new_wins["score"] == 0.0
    # single-token target_new is the argmax: EasyEdit accuracies are 1, locality drops to 0
    assert len(ids(gpt2, "Paris")) == 1
    assert new_wins["rewrite_acc"] == 1.0 and new_wins["rephrase_acc"] == 1.0
    assert new_wins["locality"] == 0.0
    with boosted(gpt2, ["Japan", "Oslo"], amount=25.0):  # the neighbourhood answers win
        nb = evaluate_request(gpt2, REQ, pre)
    assert nb["neighborhood_score"] == 1.0 and nb["neighborhood_magnitude"] > 0


def test_locality_is_one_and_absent_fields_are_absent(gpt2):
    pre = evaluate_request(gpt2, REQ)
    post = evaluate_request(gpt2, REQ, pre)
    assert "locality" not in pre and post["locality"] == 1.0
    assert post["rewrite_nll_new"] == pre["rewrite_nll_new"]
    assert post["score"] == harmonic_mean([post["efficacy_score"], post["paraphrase_score"],
                                           post["neighborhood_score"]])
    bare = EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris")
    res = evaluate_request(gpt2, bare, evaluate_request(gpt2, bare))
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "locality", "rephrase_acc",
                "rewrite_nll_true", "ngram_entropy"):
        assert key not in res
    assert set(res) >= {"rewrite_nll_new", "rewrite_prob_new", "rewrite_acc"}


def test_fluency_generation_is_seeded(gpt2):
    a = evaluate_request(gpt2, REQ, gen_tokens=8, seed=3)
    b = evaluate_request(gpt2, REQ, gen_tokens=8, seed=3)
    assert a["gen_texts"] == b["gen_texts"] and len(a["gen_texts"]) == 1  # rewrite prompt: no generation prompts
    assert a["gen_texts"][0].startswith("Anna Berg was born in")
    assert a["ngram_entropy"] == pytest.approx(compute_n_gram_entropy(a["gen_texts"][0]))


def test_n_gram_entropy_known_values():
    # "a b a b": bigrams ab, ba, ab -> H2 = h(1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert compute_n_gram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert compute_n_gram_entropy("a b c d e") == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    assert compute_n_gram_entropy("word") == 0.0
    repeated = "the cat sat. " * 20
    varied = " ".join(CORPUS[:6])
    assert compute_n_gram_entropy(repeated) < compute_n_gram_entropy(varied)
    assert n_gram_entropy(["a b a b", "a b c d e"]) == pytest.approx(
        (compute_n_gram_entropy("a b a b") + compute_n_gram_entropy("a b c d e")) / 2)
    assert word_tokenize("Don't stop, John's well-known cat!") == [
        "Do", "n't", "stop", ",", "John", "'s", "well-known", "cat", "!"]


def test_summarize_means_and_rome_score():
    rs = [{"efficacy_score": 1.0, "paraphrase_score": 0.5, "neighborhood_score": 1.0, "score": 0.75},
          {"efficacy_score": 0.0, "paraphrase_score": 1.0, "neighborhood_score": 0.5, "rewrite_acc": 1.0}, None]
    s = summarize(rs)
    assert s["means"]["efficacy_score"] == 0.5 and s["counts"]["rewrite_acc"] == 1
    assert s["means"]["score"] == pytest.approx(harmonic_mean([0.5, 0.75, 0.75]))


# ------------------------------------------------------------------------------------- run_edits
def _requests():
    return [
        REQ,
        EditRequest(prompt="{} is located in", subject="Eiffel Tower", target_new="Oslo", target_true="Paris",
                    case_id="tower"),
        EditRequest(prompt="{} is owned by", subject="Google Trends", target_new="Apple", target_true="Google",
                    case_id="trends"),
    ]


@pytest.fixture
def spy_ft(monkeypatch):
    """Wrap ft_delta: record each call's requests and the edited weight the method saw."""
    import superedit.editing.methods.ft as ft

    calls = []
    original = ft.ft_delta

    def spy(adapter, requests, hparams, stats=None):
        calls.append({"case_ids": [r.case_id for r in requests],
                      "w": adapter.down_weight_param(hparams.layers[0]).detach().clone()})
        if any(r.subject == "Nobody" for r in requests):
            from superedit.errors import SubjectNotFoundError

            raise SubjectNotFoundError("subject 'Nobody' not found")
        return original(adapter, requests, hparams, stats)

    monkeypatch.setattr(ft, "ft_delta", spy)
    return calls


def test_run_edits_independent_reverts_exactly(tmp_path, spy_ft):
    from superedit.editing.run import run_edits
    from superedit.utils.io import read_jsonl

    adapter = tiny_adapter("gpt2")
    before = down_weights(adapter)
    out = tmp_path / "records.jsonl"
    records, summary = run_edits(adapter, _requests(), "ft", FT_FAST, None, out_path=out)
    assert [c["case_ids"] for c in spy_ft] == [["anna"], ["tower"], ["trends"]]
    for c in spy_ft:  # every edit started from the original weights
        assert torch.equal(c["w"], before[1])
    for l, w in before.items():
        assert torch.equal(adapter.down_weight_param(l), w)
    on_disk = read_jsonl(out)
    assert len(on_disk) == len(records) == 3 and [r["case_id"] for r in on_disk] == ["anna", "tower", "trends"]
    r0 = on_disk[0]
    assert r0["error"] is None and r0["layers"] == [1] and r0["mode"] == "independent"
    assert "locality" in r0["post"] and "_neighborhood_argmax" not in r0["post"]
    assert r0["delta_norms"]["1"]["fro"] > 0 and r0["timing"]["edit_s"] > 0
    assert r0["post"]["rewrite_nll_new"] < r0["pre"]["rewrite_nll_new"]  # FT pushed target_new
    assert summary["n_edited"] == 3 and summary["n_failed"] == 0
    assert summary["post"]["efficacy_score"] == pytest.approx(
        sum(r["post"]["efficacy_score"] for r in records) / 3)


def test_run_edits_sequential_keeps_edits_and_batches(spy_ft):
    from superedit.editing.run import run_edits

    adapter = tiny_adapter("gpt2")
    before = down_weights(adapter)
    reqs = _requests() + [EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano", case_id="toko")]
    records, summary, merged = run_edits(adapter, reqs, "ft", FT_FAST, None, batch_size=2, sequential=True,
                                         return_delta=True)
    assert [c["case_ids"] for c in spy_ft] == [["anna", "tower"], ["trends", "toko"]]  # one call per batch
    assert torch.equal(spy_ft[0]["w"], before[1]) and not torch.equal(spy_ft[1]["w"], before[1])
    assert all(r["batch_size"] == 2 for r in records) and [r["batch"] for r in records] == [0, 0, 1, 1]
    # the model now holds both batches' edits; the merged delta is their sum
    total = merged.layers[1].dense(torch.float64)
    got = adapter.down_weight(1).double() - before[1].T.double()  # gpt2 Conv1D: (in, out)
    torch.testing.assert_close(got, total, atol=1e-6, rtol=0)
    assert not torch.equal(adapter.down_weight_param(1), before[1])
    assert summary["sequential"] is True and summary["n_edited"] == 4


def test_failing_request_is_recorded_and_skipped(tmp_path, spy_ft):
    from superedit.editing.run import run_edits
    from superedit.utils.io import read_jsonl

    adapter = tiny_adapter("gpt2")
    before = down_weights(adapter)
    reqs = _requests()
    bad_method = EditRequest(prompt="{} lives in", subject="Nobody", target_new="Paris", case_id="nobody")
    bad_template = EditRequest(prompt="{} works in", subject="Anna Berg", target_new="Paris", case_id="broken")
    object.__setattr__(bad_template, "prompt", "no placeholder here")  # bypasses validation, as raw code could
    out = tmp_path / "r.jsonl"
    records, summary = run_edits(adapter, [reqs[0], bad_method, bad_template, reqs[1]], "ft", FT_FAST, None,
                                 out_path=out)
    by_id = {r["case_id"]: r for r in read_jsonl(out)}
    assert len(by_id) == 4
    assert by_id["nobody"]["error"].startswith("SubjectNotFoundError") and by_id["nobody"]["error_stage"] == "edit"
    assert by_id["nobody"]["pre"] is not None and by_id["nobody"]["post"] is None
    assert by_id["broken"]["error"].startswith("TemplateError") and by_id["broken"]["error_stage"] == "pre_eval"
    assert by_id["anna"]["error"] is None and by_id["tower"]["error"] is None
    assert [c["case_ids"] for c in spy_ft] == [["anna"], ["nobody"], ["tower"]]
    assert summary["n_failed"] == 2 and summary["n_edited"] == 2 and len(summary["errors"]) == 2
    for l, w in before.items():
        assert torch.equal(adapter.down_weight_param(l), w)


def test_rome_edit_flips_efficacy():
    from superedit.editing.run import run_edits

    adapter = tiny_adapter("gpt2")
    layer = 1
    stats = corpus_cov(adapter, [layer])
    # make target_true the answer the unedited model prefers, so the edit has to flip it
    a, b = "Paris", "Bergen"
    nll = target_nll(adapter, [REQ.filled_prompt()] * 2, [a, b])
    new, true = (a, b) if nll[0] > nll[1] else (b, a)
    req = EditRequest(prompt=REQ.prompt, subject=REQ.subject, target_new=new, target_true=true, case_id="flip")
    # a random tiny model has tiny MLP outputs: let v* move far (no decay, no practical clamp)
    hp = ROMEHParams(layers=[layer], v_num_grad_steps=10, n_prefixes=1, context_lengths=[3], kl_factor=0.0,
                     v_weight_decay=0.0, clamp_norm_factor=1e4)
    before = down_weights(adapter)
    records, summary = run_edits(adapter, [req], "rome", hp, stats)
    rec = records[0]
    assert rec["error"] is None
    assert rec["pre"]["efficacy_score"] == 0.0 and rec["post"]["efficacy_score"] == 1.0
    assert rec["post"]["rewrite_nll_new"] < rec["pre"]["rewrite_nll_new"]
    assert rec["values"]["v_delta_norm"] > 0 and rec["delta_norms"][str(layer)]["rank_bound"] == 1
    for l, w in before.items():
        assert torch.equal(adapter.down_weight_param(l), w)


# ------------------------------------------------------------------------------------- CLI
def _save_tiny(tmp_path):
    from helpers import tiny_model

    model, tok = tiny_model("gpt2")
    d = tmp_path / "tiny-gpt2"
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def _counterfact_file(tmp_path):
    recs = [
        {"case_id": 0, "requested_rewrite": {"prompt": "{} was born in", "subject": "Anna Berg",
                                             "target_new": {"str": "Paris"}, "target_true": {"str": "Bergen"}},
         "paraphrase_prompts": ["Anna Berg is a pianist from"],
         "neighborhood_prompts": ["Toko Yasuda was born in"], "generation_prompts": ["Anna Berg works as"]},
        {"case_id": 1, "requested_rewrite": {"prompt": "{} is owned by", "subject": "Google Trends",
                                             "target_new": {"str": "Apple"}, "target_true": {"str": "Google"}},
         "paraphrase_prompts": ["Google Trends belongs to"], "neighborhood_prompts": ["Apple A5 was created by"]},
    ]
    p = tmp_path / "cf.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def _invoke(args):
    from typer.testing import CliRunner

    from superedit.cli import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cli_edit_then_eval_ft(tmp_path):
    model_dir = _save_tiny(tmp_path)
    reqs = _counterfact_file(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS[:6]))
    hp = tmp_path / "ft.yaml"
    hp.write_text("num_steps: 3\nlr: 0.01\nnorm_constraint: 0.001\n")
    out, delta_dir = tmp_path / "run", tmp_path / "delta"
    summary = _invoke(["edit", "--model", str(model_dir), "--method", "ft", "--requests", str(reqs),
                       "--hparams", str(hp), "--layers", "1", "--corpus", str(corpus), "--sequential",
                       "--gen-tokens", "4", "--save-delta", str(delta_dir), "--out", str(out), "--json"])
    assert summary["n_edited"] == 2 and summary["hparams"]["layers"] == [1] and summary["profile"] == "gpt2"
    assert summary["hparams"]["num_steps"] == 3 and "ngram_entropy" in summary["post"]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 and json.loads((out / "summary.json").read_text())["n_edited"] == 2
    assert (delta_dir / "delta.safetensors").is_file()
    ev = _invoke(["eval", "--model", str(model_dir), "--delta", str(delta_dir), "--requests", str(reqs),
                  "--gen-tokens", "0", "--out", str(tmp_path / "ev"), "--json"])
    assert ev["n_edited"] == 2 and ev["delta_layers"] == [1] and "locality" in ev["post"]
    ev_records = [json.loads(line) for line in (tmp_path / "ev" / "records.jsonl").read_text().splitlines()]
    # the first request's pre-edit numbers are those of the unedited model in both commands
    assert ev_records[0]["pre"]["rewrite_nll_new"] == pytest.approx(records[0]["pre"]["rewrite_nll_new"], rel=1e-5)
    # after both sequential edits the last request's post state is exactly the merged delta's
    assert ev_records[1]["post"]["rewrite_nll_new"] == pytest.approx(records[1]["post"]["rewrite_nll_new"], rel=1e-4)


def test_cli_edit_rome_with_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path / "home"))
    model_dir = _save_tiny(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS[:6]))
    hp = tmp_path / "rome.yaml"
    hp.write_text("v_num_grad_steps: 5\nn_prefixes: 1\ncontext_lengths: [3]\n")
    summary = _invoke(["edit", "--model", str(model_dir), "--method", "rome", "--requests",
                       str(_counterfact_file(tmp_path)), "--limit", "1", "--hparams", str(hp), "--layers", "2",
                       "--corpus", str(corpus), "--mom2-tokens", "500", "--gen-tokens", "0",
                       "--out", str(tmp_path / "run"), "--json"])
    assert summary["n_edited"] == 1 and summary["hparams"]["layers"] == [2]
    assert summary["hparams"]["mom2_n_tokens"] == 500 and summary["delta_fro_mean"] > 0


def test_cli_edit_errors_cleanly(tmp_path):
    from typer.testing import CliRunner

    from superedit.cli import app

    model_dir = _save_tiny(tmp_path)
    res = CliRunner().invoke(app, ["edit", "--model", str(model_dir), "--method", "ft", "--json"])
    assert res.exit_code == 2 and "--requests is required" in res.output
    res = CliRunner().invoke(app, ["edit", "--model", str(model_dir), "--method", "rome", "--requests",
                                   str(_counterfact_file(tmp_path)), "--json"])
    assert res.exit_code == 2 and "out of range" in res.output  # gpt2 profile: GPT-2 XL's layer 17


def test_share_ci_is_the_bootstrap_of_the_counts():
    from superedit.eval.metrics import bootstrap_ci, share_ci

    assert share_ci(0.25, 40) == bootstrap_ci([1.0] * 10 + [0.0] * 30)
    assert share_ci(None, 40) is None and share_ci(0.5, 0) is None
    lo, hi = share_ci(0.5, 100)
    assert lo < 0.5 < hi
