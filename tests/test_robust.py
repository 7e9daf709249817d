"""REP (keys to robust edits): perturbations, the gated key adaptor, save/load, evaluation and the CLI."""

import json

import pytest
import torch

from helpers import CORPUS, bpe_tokenizer, corpus_cov, sp_tokenizer, saved_model_and_corpus, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.hparams import ROMEHParams
from superedit.robust import perturb
from superedit.robust.adaptor import (AdaptorHParams, KeyAdaptor, RobustAdaptor, TrainingKeys, fit_layer, load_edit,
                                      save_edit, train_adaptor)
from superedit.robust.evaluate import METRICS, run_robust, summarize_records
from superedit.stats.whitening import Whitener

FAST = dict(v_num_grad_steps=3, n_prefixes=1, context_lengths=[3])
REQ = EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris", case_id="a",
                  subject_rephrases=["Ms. Anna Berg", "Berg, Anna", "A. Berg", "Anna B."],
                  paraphrase_prompts=["Anna Berg's birthplace is"],
                  neighborhood_prompts=["Toko Yasuda is from", "The Eiffel Tower is located in"],
                  neighborhood_answers=["Japan", "Paris"])


def logits(adapter, text="Anna Berg was born in Oslo and Toko Yasuda"):
    enc = adapter.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return adapter.model(**enc).logits.clone()


def trained_adaptor(d=24, seed=0):
    torch.manual_seed(seed)
    k_star = torch.randn(d)
    keys = TrainingKeys(k_star, torch.nn.functional.normalize(torch.randn(d), dim=0), k_star + 0.1 * torch.randn(d),
                        k_star + torch.randn(6, d), torch.randn(40, d))
    return fit_layer(keys, AdaptorHParams(num_steps=30, lr=1e-2, rank=4, similarity="u_cosine"))


# ------------------------------------------------------------------------------------------ perturbations
@pytest.mark.parametrize("tok_fn", [bpe_tokenizer, sp_tokenizer])
@pytest.mark.parametrize("subject", ["Anna Berg", "Eiffel Tower", "Danielle Darrieux", "Toko Yasuda"])
def test_shuffles_differ_and_round_trip(tok_fn, subject):
    tok = tok_fn()
    texts, reason = perturb.shuffled_subjects(tok, subject, max_n=10, seed=1)
    assert texts and reason is None and len(texts) <= 10
    assert len(set(texts)) == len(texts)
    orig_forms = {tuple(perturb._ids(tok, lead + subject)) for lead in ("", " ")}
    for t in texts:
        assert t != subject
        ok = False
        for lead in ("", " "):
            ids = perturb._ids(tok, lead + t)
            if tok.decode(ids, clean_up_tokenization_spaces=False) == lead + t and tuple(ids) not in orig_forms:
                assert perturb._ids(tok, tok.decode(ids, clean_up_tokenization_spaces=False)) == ids
                ok = True
        assert ok, t


def test_id_ood_disjoint_and_seeded():
    tok = bpe_tokenizer()
    words = perturb.corpus_words(CORPUS)
    a = perturb.make_perturbations(tok, REQ, words=words, n_long=6, long_words=30, seed=3)
    b = perturb.make_perturbations(tok, REQ, words=words, n_long=6, long_words=30, seed=3)
    c = perturb.make_perturbations(tok, REQ, words=words, n_long=6, long_words=30, seed=4)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    for kind in perturb.KINDS:
        ids = {(p.template, p.subject) for p in a.of(kind, "id")}
        ood = {(p.template, p.subject) for p in a.of(kind, "ood")}
        assert not ids & ood
        assert abs(len(ids) - len(ood)) <= 1
    assert len(a.of("rephrase", "id")) == 2 and len(a.of("long")) == 6
    for p in a.of("long"):
        assert p.prompt.endswith("Anna Berg was born in") and len(p.prompt) > 60


def test_bad_inputs_are_documented_skips():
    tok = sp_tokenizer()
    one = EditRequest(prompt="{} is the capital of", subject="Paris", target_new="Japan")  # one token, no rephrases
    assert len(perturb._ids(tok, "Paris")) == 1
    sets, summary = perturb.build_perturbations(tok, [one, one, REQ], kinds=("rephrase", "shuffle", "long"), words=[])
    assert summary["shuffle"][perturb.SKIP_ONE_TOKEN] == 2
    assert summary["rephrase"][perturb.SKIP_NO_REPHRASES] == 2
    assert summary["long"][perturb.SKIP_NO_CORPUS] == 3
    assert sets[0].of("shuffle") == [] and sets[0].skips
    with pytest.raises(perturb.PerturbError):
        perturb.make_perturbations(tok, REQ, kinds=("typo",))


# ------------------------------------------------------------------------------------------ adaptor
def test_b_zero_at_init_is_identity_and_gate_off_leaves_logits():
    adapter = tiny_adapter("gpt2")
    ref = logits(adapter)
    a = KeyAdaptor(adapter.d_mlp, rank=4)
    assert torch.count_nonzero(a.B) == 0
    k = torch.randn(3, 5, adapter.d_mlp)
    assert torch.equal(a.infer(k, 0.9, force_gate="on"), k)
    rep = RobustAdaptor({1: a, 2: KeyAdaptor(adapter.d_mlp, rank=4, seed=1)}, tau=0.0)
    with rep.active(adapter):
        assert torch.equal(logits(adapter), ref)  # B = 0: identity even with the gate open
    ad, _ = trained_adaptor(adapter.d_mlp)
    assert torch.count_nonzero(ad.B) > 0
    rep = RobustAdaptor({1: ad}, tau=0.0)
    rep.force_gate = "off"
    with rep.active(adapter):
        assert torch.equal(logits(adapter), ref)
    rep.force_gate = "on"
    with rep.active(adapter):
        assert not torch.equal(logits(adapter), ref)  # the same adaptor does act when open


def test_install_remove_restores_model_exactly():
    adapter = tiny_adapter("llama")
    ref = logits(adapter)
    ad, _ = trained_adaptor(adapter.d_mlp)
    rep = RobustAdaptor({0: ad, 2: trained_adaptor(adapter.d_mlp, seed=1)[0]}, tau=0.0)
    rep.force_gate = "on"
    rep.install(adapter)
    assert rep.installed and not torch.equal(logits(adapter), ref)
    with pytest.raises(Exception):
        rep.install(adapter)
    rep.remove()
    assert not rep.installed
    assert torch.equal(logits(adapter), ref)
    for m in adapter.model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_loss_decreases_on_tiny_model_and_gate_separates():
    adapter = tiny_adapter("gpt2")
    stats = corpus_cov(adapter, [1])
    pset = perturb.make_perturbations(adapter.tokenizer, REQ, words=perturb.corpus_words(CORPUS), long_words=30)
    k = torch.randn(adapter.d_mlp, dtype=torch.float64)
    u = torch.linalg.solve(stats.mom2(1), k)
    for similarity in ("u_cosine", "whitening"):
        hp = AdaptorHParams(num_steps=40, lr=5e-3, rank=8, similarity=similarity)
        rep, info = train_adaptor(adapter, REQ, pset.of(split="id"), [1], {1: k}, {1: u / u.norm()}, hp,
                                  negative_texts=CORPUS[:4], whiteners={1: Whitener(stats.mom2(1))})
        lay = info["layers"]["1"]
        assert lay["loss_end"] < lay["loss_start"]
        pulled = "cos_u" if similarity == "u_cosine" else "whitening_cos"
        assert lay[f"{pulled}_after"] > lay[f"{pulled}_before"]
        assert lay["gate_pos_mean"] > lay["gate_neg_mean"]
    assert not any(m._forward_pre_hooks for m in adapter.model.modules())  # training leaves no hooks


def test_save_load_round_trip(tmp_path):
    adapter = tiny_adapter("gpt2")
    stats = corpus_cov(adapter, [1])
    from superedit.editing.methods import get_method

    delta = get_method("rome").fn(adapter, [REQ], ROMEHParams(layers=[1], **FAST), stats).delta
    ad, _ = trained_adaptor(adapter.d_mlp)
    rep = RobustAdaptor({1: ad}, tau=0.3, meta={"case_id": "a"})
    save_edit(tmp_path / "e", delta, rep)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["delta.json", "delta.safetensors",
                                                                 "rep_adaptor.json", "rep_adaptor.safetensors"]
    d2, r2 = load_edit(tmp_path / "e")
    assert r2.tau == 0.3 and r2.meta["case_id"] == "a"
    for name, t in ad.state_dict().items():
        assert torch.equal(t, r2.layers[1].state_dict()[name])
    with delta.applied(adapter), rep.active(adapter):
        a = logits(adapter)
    with d2.applied(adapter), r2.active(adapter):
        b = logits(adapter)
    assert torch.equal(a, b)
    delta.save(tmp_path / "plain")
    assert load_edit(tmp_path / "plain")[1] is None


# ------------------------------------------------------------------------------------------ evaluation + CLI
def test_run_robust_records_and_protocol():
    adapter = tiny_adapter("gpt2")
    stats = corpus_cov(adapter, [1])
    before = {l: adapter.down_weight_param(l).clone() for l in range(adapter.n_layers)}
    words = perturb.corpus_words(CORPUS)
    one = EditRequest(prompt="{} is in", subject="Paris", target_new="Japan", case_id="b")
    reqs = [REQ, one]
    psets = [perturb.make_perturbations(adapter.tokenizer, r, words=words, long_words=20) for r in reqs]
    recs = run_robust(adapter, reqs, psets, "rome", ROMEHParams(layers=[1], **FAST), stats, "both",
                      AdaptorHParams(num_steps=5, lr=1e-2, rank=4), tau_sweep=[0.5, 0.95], negative_words=words)
    for l, w in before.items():
        assert torch.equal(adapter.down_weight_param(l), w)
    assert not any(m._forward_pre_hooks for m in adapter.model.modules())
    assert set(recs[0]["settings"]) == {"pre", "rome", "rome+rep"}
    assert set(recs[0]["settings"]["rome"]) == set(METRICS)
    assert recs[0]["settings"]["rome"]["locality"]["n"] == 2
    assert len(recs[0]["tau_sweep"]) == 2
    summ = summarize_records(recs)
    assert summ["settings"]["rome"]["success"]["n"] == 2
    assert summ["settings"]["rome"]["rephrase_ood"]["n"] == 2  # only REQ has rephrases ...
    assert summ["skips"]["rephrase"][perturb.SKIP_NO_REPHRASES] == 1  # ... and the other is counted, not zero


def cli_world(tmp_path, monkeypatch):
    """A saved tiny model, its corpus, two requests and fast edit settings for the CLI tests."""
    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path / "home"))
    mdir, corpus = saved_model_and_corpus(tmp_path)
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text("\n".join(json.dumps(r.to_dict()) for r in [REQ, EditRequest(
        prompt="{} is owned by", subject="Google Trends", target_new="Apple", case_id="g")]) + "\n")
    hp = tmp_path / "hp.yaml"
    hp.write_text("v_num_grad_steps: 2\nn_prefixes: 1\ncontext_lengths: [3]\nmom2_ridge: 0.01\nmom2_n_tokens: 500\n")
    return mdir, corpus, reqs, hp


def test_cli_micro_end_to_end(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from superedit.cli import app

    mdir, corpus, reqs, hp = cli_world(tmp_path, monkeypatch)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["robust", "--model", str(mdir), "--requests", str(reqs), "--method", "rome",
                                   "--layers", "1", "--corpus", str(corpus), "--hparams", str(hp), "--steps", "3",
                                   "--long-words", "20", "--tau-sweep", "0.5,0.9", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["n_requests"] == 2
    for name in ["records.jsonl", "table.json", "table.csv", "perturbations.jsonl", "report.html",
                 "plots/metrics.png", "plots/tau_sweep.png"]:
        assert (out / name).is_file(), name
    assert len((out / "records.jsonl").read_text().splitlines()) == 2
    assert '<img src="plots/metrics.png"' in (out / "report.html").read_text()
    kout = tmp_path / "keys"
    res = CliRunner().invoke(app, ["keys", "--model", str(mdir), "--requests", str(reqs), "--layer", "1",
                                   "--corpus", str(corpus), "--hparams", str(hp), "--long-words", "20",
                                   "--scan-docs", "6", "--out", str(kout), "--json"])
    assert res.exit_code == 0, res.output
    for name in ["geometry.json", "similar_keys.jsonl", "report.html", "plots/similarity_cos.png",
                 "plots/pca_variants.png", "plots/value_norms.png"]:
        assert (kout / name).is_file(), name
    hits = [json.loads(l) for l in (kout / "similar_keys.jsonl").read_text().splitlines()]
    assert hits and all(h["subject"] not in h["context"] for h in hits)


def test_cli_resume_continues_an_interrupted_run_and_refuses_other_settings(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from superedit.cli import app

    mdir, corpus, reqs, hp = cli_world(tmp_path, monkeypatch)
    out = tmp_path / "out"
    args = ["robust", "--model", str(mdir), "--requests", str(reqs), "--method", "rome", "--layers", "1",
            "--corpus", str(corpus), "--hparams", str(hp), "--steps", "3", "--long-words", "20", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    full = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert [r["index"] for r in full] == [0, 1]

    # a second run into the same folder is refused and leaves it as it was
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "--resume" in res.output
    assert [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()] == full

    # interrupted after the first request, mid-way through writing the second: resume finishes it
    (out / "records.jsonl").write_text(json.dumps(full[0]) + "\n" + json.dumps(full[1])[:40])
    res = CliRunner().invoke(app, args + ["--resume", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["n_requests"] == 2
    again = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert again[0] == full[0]  # kept as it was (its timing too), not recomputed
    assert again[1]["case_id"] == "g" and again[1]["settings"] == full[1]["settings"]

    # other settings are refused by name, and nothing is changed
    before = (out / "records.jsonl").read_text()
    res = CliRunner().invoke(app, args[:-4] + ["--steps", "4", "--long-words", "20", "--out", str(out), "--resume"])
    assert res.exit_code != 0 and "adaptor_hparams" in res.output, res.output
    assert (out / "records.jsonl").read_text() == before


def test_run_robust_refuses_finished_records_of_other_requests():
    adapter = tiny_adapter("gpt2")
    psets = [perturb.make_perturbations(adapter.tokenizer, REQ, words=perturb.corpus_words(CORPUS), long_words=20)]
    with pytest.raises(ValueError, match="requests differ"):
        run_robust(adapter, [REQ], psets, "rome", ROMEHParams(layers=[1], **FAST), None, "off",
                   done=[{"index": 0, "case_id": "other"}])


def test_adaptor_whitening_pull_moves_variants_onto_k_star():
    from superedit.robust.adaptor import TrainingKeys, fit_layer

    g = torch.Generator().manual_seed(4)
    d = 16
    A = torch.randn(d, d, generator=g)
    C = A @ A.T / d + 0.1 * torch.eye(d)
    k_star = torch.randn(d, generator=g)
    pos = 0.5 * k_star + 2.0 * torch.randn(5, d, generator=g)
    keys = TrainingKeys(k_star, k_star / k_star.norm(), k_star.clone(), pos, torch.randn(40, d, generator=g),
                        Whitener(C))
    a, hist = fit_layer(keys, AdaptorHParams(num_steps=60, lr=1e-2, rank=4, similarity="whitening", dropout=0.0))
    before = keys.whitener.cosine(pos, k_star).mean()
    after = keys.whitener.cosine(a.infer(pos, tau=0.0, force_gate="on"), k_star).mean()
    assert after > before + 0.1 and hist[-1]["loss"] < hist[0]["loss"]
    with pytest.raises(Exception, match="similarity"):
        AdaptorHParams(similarity="dot").validate()


def test_rep_profile_for_testbeds_and_missing_whitener_is_clear():
    from superedit.editing.hparams import load_hparams
    from superedit.robust.adaptor import TrainingKeys, fit_layer

    hp = load_hparams(AdaptorHParams, "rep", "testbed-small")
    assert (hp.num_steps, hp.lr, hp.similarity) == (100, 5e-3, "whitening")
    assert load_hparams(AdaptorHParams, "rep", "gpt2").num_steps == 10  # other models: the paper's settings
    keys = TrainingKeys(torch.ones(4), torch.ones(4) / 2, torch.ones(4), torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(Exception, match="needs the layer's covariance"):
        fit_layer(keys, AdaptorHParams(num_steps=1, rank=2))


def test_hard_negatives_are_the_nearest_keys_outside_the_subject():
    """mine_hard_negatives: the n keys closest to k* among positions whose prefix lacks the subject;
    the positions from the subject's first mention on are never taken."""
    from superedit.models import Trace
    from superedit.robust.adaptor import mine_hard_negatives

    adapter = tiny_adapter("gpt2")
    stats = corpus_cov(adapter, [1])
    whitener = Whitener(stats.mom2(1))
    texts = ["Toko Yasuda is from Japan and Anna Berg was born in Oslo", "The Eiffel Tower is located in Paris"]
    enc = adapter.tokenizer([texts[0]], return_tensors="pt", return_offsets_mapping=True)
    offsets = enc.pop("offset_mapping")[0]
    with Trace(adapter, reads=[("key", 1)], stop_after=True) as tr:
        adapter.model(**enc)
    K0 = tr["key", 1][0].float()
    berg_end = [i for i, (a, b) in enumerate(offsets.tolist()) if b == texts[0].index("Anna Berg") + len("Anna Berg")][0]
    k_star = K0[berg_end]  # the subject's own key: it must not come back
    hard = mine_hard_negatives(adapter, texts, 1, k_star, 3, ["Anna Berg"], whitener)
    assert hard.shape == (3, adapter.d_mlp)
    first = texts[0].index("Anna Berg")
    allowed = [K0[i] for i, (a, b) in enumerate(offsets.tolist()) if b <= first]
    enc1 = adapter.tokenizer([texts[1]], return_tensors="pt")
    with Trace(adapter, reads=[("key", 1)], stop_after=True) as tr:
        adapter.model(**enc1)
    allowed = torch.stack(allowed + list(tr["key", 1][0].float()))
    sims = whitener.cosine(allowed, k_star)
    best = allowed[torch.argsort(sims, descending=True)[:3]]
    assert torch.allclose(hard, best, atol=1e-5)
    assert not any(torch.allclose(h, k_star, atol=1e-6) for h in hard)
    assert mine_hard_negatives(adapter, texts, 1, k_star, 0, ["Anna Berg"]).shape == (0, adapter.d_mlp)
    # in train_adaptor they join the gate negatives, and the gate learns to reject them
    pset = perturb.make_perturbations(adapter.tokenizer, REQ, words=perturb.corpus_words(CORPUS), long_words=30)
    hp = AdaptorHParams(num_steps=40, lr=5e-3, rank=8, n_hard_negatives=8)
    _, info = train_adaptor(adapter, REQ, pset.of(split="id"), [1], {1: k_star.double()},
                            {1: torch.nn.functional.normalize(whitener.solve(k_star), dim=0)}, hp,
                            negative_texts=CORPUS[:2], whiteners={1: whitener}, corpus_texts=CORPUS)
    lay = info["layers"]["1"]
    assert lay["n_hard_negatives"] == 8 and lay["gate_hard_open_frac"] is not None
    with pytest.raises(Exception, match="n_hard_negatives"):
        AdaptorHParams(n_hard_negatives=-1).validate()


def test_text_keys_prefix_free_count():
    """Tokens count as 'prefix free' while they end before the first mention of any excluded string."""
    from superedit.robust.corpus_keys import TextKeys, iter_text_keys

    tk = TextKeys(0, "xx Anna Berg yy", [0, 1, 2, 3], [(0, 2), (2, 7), (7, 12), (12, 15)], torch.zeros(4, 2))
    assert tk.prefix_free_count(["Anna Berg"]) == 1  # "Anna" is part of the mention, not before it
    assert tk.prefix_free_count(["zz", ""]) == 4 and tk.prefix_free_count(["yy", "Berg"]) == 2
    adapter = tiny_adapter("gpt2")
    got = list(iter_text_keys(adapter, CORPUS[:3], 1, batch_size=2))
    assert [g.index for g in got] == [0, 1, 2]
    assert all(len(g.spans) == len(g.token_index) == g.keys.shape[0] and g.keys.shape[1] == adapter.d_mlp for g in got)
