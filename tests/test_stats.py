"""Key covariance statistics: correctness against a direct computation, padding, cache, I/O, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import saved_tiny_model, tiny_adapter
from superedit.errors import StatsError
from superedit.models import Trace
from superedit.stats import (Corpus, KeyCovariance, StatsKey, collect_covariances,
                             collect_covariances_per_layer_full_pass, corpus_for_model)

TEXTS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Danielle Darrieux's mother tongue is French, and she lived in Paris for many years.",
    "Anna Berg was born in Oslo. Anna Berg works as a pianist in Bergen!",
    "Toko Yasuda plays the guitar; Toko Yasuda is from Japan.",
    "The the the repeated words, words, words: punctuation (and brackets) matter.",
    "Apple A5 was created by Apple. Google Trends is owned by Google.",
    "Paris France Oslo Bergen Japan guitar pianist capital tongue words.",
    "Google Apple Paris: the tower, the guitar and the pianist.",
] * 3
FAMS = ["gpt2", "llama"]


def _double(family):
    a = tiny_adapter(family)
    a.model.double()
    return a


def _direct(adapter, texts, layer, n_tokens, max_length):
    """Keys via Trace, one unpadded sequence at a time, with the documented token selection."""
    keys, left = [], n_tokens
    for t in texts:
        ids = adapter.tokenizer(t, truncation=True, max_length=max_length)["input_ids"][:left]
        if not ids or left <= 0:
            continue
        left -= len(ids)
        with torch.no_grad(), Trace(adapter, reads=[("key", layer)]) as tr:
            adapter.model(input_ids=torch.tensor([ids]))
        keys.append(tr["key", layer][0].to(torch.float64))
        if left <= 0:
            break
    k = torch.cat(keys)
    return k.T @ k / k.shape[0], k.mean(0), k.shape[0]


@pytest.mark.parametrize("family", FAMS)
def test_mom2_equals_direct_computation(family, tmp_path):
    a = _double(family)
    covs = collect_covariances(a, [1, 3], TEXTS, n_tokens=251, max_length=12, batch_tokens=50, cache_dir=tmp_path)
    for layer in (1, 3):
        mom2, mean, n = _direct(a, TEXTS, layer, 251, 12)
        cov = covs[layer]
        assert cov.count == n == 251
        assert cov.mom2.dtype == torch.float64 and cov.mom2.shape == (a.d_mlp, a.d_mlp)
        assert torch.allclose(cov.mom2, mom2, atol=1e-10, rtol=0)
        assert torch.allclose(cov.mean, mean, atol=1e-10, rtol=0)
        assert torch.allclose(cov.matrix(), cov.matrix().T, atol=1e-12)


@pytest.mark.parametrize("family", FAMS)
def test_one_pass_equals_per_layer_reference(family, tmp_path):
    a = tiny_adapter(family)
    fast = collect_covariances(a, [0, 2, 3], TEXTS, 300, max_length=16, batch_tokens=64, use_cache=False)
    slow = collect_covariances_per_layer_full_pass(a, [0, 2, 3], TEXTS, 300, max_length=16, batch_tokens=64)
    for layer in (0, 2, 3):
        assert fast[layer].key == slow[layer].key
        assert fast[layer].count == slow[layer].count == 300
        assert torch.allclose(fast[layer].mom2, slow[layer].mom2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", FAMS)
def test_pad_tokens_excluded(family):
    a = _double(family)
    kw = dict(n_tokens=200, max_length=14, use_cache=False)
    right = collect_covariances(a, [2], TEXTS, batch_tokens=80, padding_side="right", **kw)[2]
    left = collect_covariances(a, [2], TEXTS, batch_tokens=80, padding_side="left", **kw)[2]
    unpadded = collect_covariances(a, [2], TEXTS, batch_tokens=1, **kw)[2]  # one sequence per batch
    for other in (left, unpadded):
        assert other.count == right.count == 200
        assert torch.allclose(other.mom2, right.mom2, atol=1e-10, rtol=0)


def test_cache_hits_and_invalidation(tmp_path, monkeypatch):
    a = tiny_adapter("gpt2")
    kw = dict(max_length=16, batch_tokens=64, cache_dir=tmp_path)
    first = collect_covariances(a, [1, 2], TEXTS, 200, **kw)
    assert not any(c.cache_hit for c in first.values())
    assert all(c.path.exists() and c.path.name == c.key.digest() + ".safetensors" for c in first.values())

    def boom(*args, **kwargs):
        raise AssertionError("forward pass on a cache hit")

    monkeypatch.setattr(a.model, "forward", boom)
    second = collect_covariances(a, [2, 1], TEXTS, 200, **kw)
    assert all(c.cache_hit for c in second.values())
    for l in (1, 2):
        assert torch.equal(second[l].mom2, first[l].mom2) and second[l].count == first[l].count
    # every change of the key needs a forward pass
    with pytest.raises(AssertionError, match="forward pass"):
        collect_covariances(a, [1], TEXTS[:-1] + [TEXTS[-1] + "!"], 200, **kw)  # corpus text
    with pytest.raises(AssertionError, match="forward pass"):
        collect_covariances(a, [1], TEXTS, 201, **kw)  # n_tokens
    with pytest.raises(AssertionError, match="forward pass"):
        collect_covariances(a, [3], TEXTS, 200, **kw)  # layer
    with pytest.raises(AssertionError, match="forward pass"):
        collect_covariances(a, [1], TEXTS, 200, **{**kw, "max_length": 15})  # max_length
    with pytest.raises(AssertionError, match="forward pass"):
        collect_covariances(a, [1], TEXTS, 200, **kw, recompute=True)
    monkeypatch.undo()

    # new revision of the weights: recomputed, different file, old file untouched
    b = tiny_adapter("gpt2", seed=1)
    b.revision = "test-v2"
    mixed = collect_covariances(b, [1], TEXTS, 200, **kw)
    assert not mixed[1].cache_hit and mixed[1].path != first[1].path
    assert not torch.allclose(mixed[1].mom2, first[1].mom2)
    # partial hit: cached layers load, only the missing one is computed (in one pass)
    calls = []
    orig = a.model.forward
    monkeypatch.setattr(a.model, "forward", lambda *args, **kw_: calls.append(1) or orig(*args, **kw_))
    part = collect_covariances(a, [1, 2, 3], TEXTS, 200, **kw)
    assert [part[l].cache_hit for l in (1, 2, 3)] == [True, True, False]
    assert len(calls) >= 1
    monkeypatch.undo()
    ref = collect_covariances(a, [3], TEXTS, 200, max_length=16, batch_tokens=64, use_cache=False)[3]
    assert torch.equal(part[3].mom2, ref.mom2)


def test_key_fields_change_digest():
    a = tiny_adapter("gpt2")
    c = Corpus(TEXTS)
    base = StatsKey.for_layer(a, 1, c, 100, 16)
    assert base.digest() == StatsKey.for_layer(a, 1, Corpus(list(TEXTS)), 100, 16).digest()
    variants = [StatsKey.for_layer(a, 2, c, 100, 16), StatsKey.for_layer(a, 1, c, 101, 16),
                StatsKey.for_layer(a, 1, c, 100, 17), StatsKey.for_layer(a, 1, Corpus(TEXTS[1:]), 100, 16)]
    a.revision = "other"
    variants.append(StatsKey.for_layer(a, 1, c, 100, 16))
    a.model.half()
    variants.append(StatsKey.for_layer(a, 1, c, 100, 16))
    digests = {base.digest()} | {v.digest() for v in variants}
    assert len(digests) == len(variants) + 1
    assert StatsKey.from_dict(json.loads(json.dumps(base.to_dict()))) == base


def test_save_load_round_trip(tmp_path):
    a = tiny_adapter("llama")
    cov = collect_covariances(a, [2], TEXTS, 150, max_length=16, use_cache=False)[2]
    path = cov.save(tmp_path / "sub")
    assert path.exists() and path.with_suffix(".json").exists()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    back = KeyCovariance.load(path)
    assert back.key == cov.key and back.count == cov.count and back.cache_hit
    assert torch.equal(back.mom2, cov.mom2) and torch.equal(back.mean, cov.mean)
    assert back.mom2.dtype == torch.float64
    assert back.matrix(dtype=torch.float32).dtype == torch.float32
    with open(path, "rb") as fh:
        assert b"pickle" not in fh.read(200)
    assert back.trace() == pytest.approx(float(torch.trace(cov.mom2)))
    assert back.condition_number() >= 1.0
    ident = KeyCovariance(cov.key, torch.eye(4, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 8]),
                          torch.zeros(4, dtype=torch.float64), 10)
    assert ident.condition_number() == pytest.approx(8.0)
    with pytest.raises(StatsError, match="does not exist"):
        KeyCovariance.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(StatsError, match="cannot read"):
        KeyCovariance.load(bad)


def test_corrupt_cache_file_is_recomputed(tmp_path):
    a = tiny_adapter("gpt2")
    cov = collect_covariances(a, [1], TEXTS, 100, max_length=16, cache_dir=tmp_path)[1]
    cov.path.write_bytes(b"garbage")
    again = collect_covariances(a, [1], TEXTS, 100, max_length=16, cache_dir=tmp_path)[1]
    assert not again.cache_hit and torch.equal(again.mom2, cov.mom2)


def test_small_corpus_uses_all_tokens(tmp_path):
    a = tiny_adapter("gpt2")
    cov = collect_covariances(a, [0], ["short text here.", "another one"], 10_000, use_cache=False)[0]
    n = sum(len(a.tokenizer(t)["input_ids"]) for t in ["short text here.", "another one"])
    assert cov.count == n < 10_000


# ----- corpus ------------------------------------------------------------------------------------
def test_corpus_formats(tmp_path):
    para = tmp_path / "para.txt"
    para.write_text("first doc\nstill first\n\n  \nsecond doc\n\n\nthird\n", encoding="utf-8")
    assert Corpus.from_path(para).texts == ["first doc\nstill first", "second doc", "third"]
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\n\nthree", encoding="utf-8")  # has a blank line → paragraphs
    assert Corpus.from_path(lines).texts == ["one\ntwo", "three"]
    lines.write_text("one\ntwo\nthree\n", encoding="utf-8")  # no blank line → one doc per line
    assert Corpus.from_path(lines).texts == ["one", "two", "three"]
    jl = tmp_path / "d" / "a.jsonl"
    jl.parent.mkdir()
    jl.write_text('{"text": "alpha"}\n\n{"text": "beta", "x": 1}\n"gamma"\n', encoding="utf-8")
    assert Corpus.from_path(jl).texts == ["alpha", "beta", "gamma"]
    js = tmp_path / "d" / "b.json"
    js.write_text(json.dumps([{"body": "delta"}, {"body": "eps"}]), encoding="utf-8")
    assert Corpus.from_path(js, field="body").texts == ["delta", "eps"]
    with pytest.raises(StatsError, match="no field 'text'"):
        Corpus.from_path(js)
    (tmp_path / "d" / "c.txt").write_text("zeta\n", encoding="utf-8")
    (tmp_path / "d" / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    js.write_text(json.dumps({"texts": ["delta"]}), encoding="utf-8")
    d = Corpus.from_path(tmp_path / "d")
    assert d.texts == ["alpha", "beta", "gamma", "delta", "zeta"]
    # fingerprint: content and order of the documents actually used
    assert Corpus(["a", "b"]).fingerprint() == Corpus([" a ", "b", ""]).fingerprint()
    assert Corpus(["a", "b"]).fingerprint() != Corpus(["b", "a"]).fingerprint()
    assert Corpus(["ab"]).fingerprint() != Corpus(["a", "b"]).fingerprint()
    assert Corpus.coerce(d) is d and Corpus.coerce(["x"]).texts == ["x"]


def test_bad_inputs(tmp_path):
    a = tiny_adapter("gpt2")
    with pytest.raises(StatsError, match="does not exist"):
        collect_covariances(a, [0], tmp_path / "missing.txt", 100, use_cache=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(StatsError, match="empty"):
        collect_covariances(a, [0], empty, 100, use_cache=False)
    with pytest.raises(StatsError, match="empty"):
        Corpus([])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(StatsError, match="no .txt"):
        Corpus.from_path(tmp_path / "emptydir")
    with pytest.raises(StatsError, match=r"out of range.*0\.\.3"):
        collect_covariances(a, [1, 4], TEXTS, 100, use_cache=False)
    with pytest.raises(StatsError, match="out of range"):
        collect_covariances(a, [-1], TEXTS, 100, use_cache=False)
    with pytest.raises(StatsError, match="n_tokens"):
        collect_covariances(a, [0], TEXTS, 0, use_cache=False)
    with pytest.raises(StatsError, match="positions"):
        collect_covariances(a, [0], TEXTS, 10, max_length=1000, use_cache=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(StatsError, match="line 2"):
        Corpus.from_path(bad)


def test_corpus_for_model(tmp_path, monkeypatch):
    import superedit.testbed.access as tb

    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(StatsError, match="--corpus is required"):
        corpus_for_model(plain)
    import superedit.stats.sampled as sampled

    monkeypatch.setattr(sampled, "sampled_corpus", lambda adapter: Corpus.from_texts(["sampled from", adapter.source]))
    assert corpus_for_model(tiny_adapter("gpt2")).texts == ["sampled from", "tiny-gpt2-0"]
    bed = tmp_path / "bed"
    bed.mkdir()
    (bed / "testbed.json").write_text("{}", encoding="utf-8")
    monkeypatch.setattr(tb, "testbed_corpus", lambda d: [f"doc of {d.name}", "second"])
    assert corpus_for_model(bed).texts == ["doc of bed", "second"]
    assert corpus_for_model(str(bed)).texts == ["doc of bed", "second"]


# ----- CLI ---------------------------------------------------------------------------------------
def test_cli_stats(tmp_path):
    from typer.testing import CliRunner

    from superedit.cli import app

    model_dir = saved_tiny_model(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    args = ["stats", "--model", str(model_dir), "--layers", "1,3", "--corpus", str(corpus), "--tokens", "200",
            "--max-length", "16", "--cache-dir", str(tmp_path / "cache"), "--json"]
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["layer"] for r in out["layers"]] == [1, 3]
    for r in out["layers"]:
        assert r["count"] == 200 and not r["cache_hit"] and r["trace"] > 0
        assert (tmp_path / "cache").joinpath(r["path"].split("/")[-1]).exists()
    out2 = json.loads(runner.invoke(app, args).stdout.strip().splitlines()[-1])
    assert all(r["cache_hit"] for r in out2["layers"])
    assert [r["path"] for r in out2["layers"]] == [r["path"] for r in out["layers"]]
    human = runner.invoke(app, args[:-1] + ["--layers", "all"])
    assert human.exit_code == 0 and "layer   2  miss" in human.stderr and "layer   1  hit" in human.stderr
    # clean errors, exit 2
    bad = runner.invoke(app, ["stats", "--model", str(model_dir), "--layers", "9", "--corpus", str(corpus), "--json"])
    assert bad.exit_code == 2 and "out of range" in bad.stdout
    missing = runner.invoke(app, ["stats", "--model", str(model_dir), "--corpus", str(tmp_path / "no.txt"), "--json"])
    assert missing.exit_code == 2 and "does not exist" in json.loads(missing.stdout.strip().splitlines()[-1])["error"]


def test_model_sampled_corpus_is_seeded_and_cached(tmp_path, monkeypatch):
    from superedit.stats.sampled import SamplingSettings, sample_documents, sampled_corpus

    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path))
    a = tiny_adapter("llama")
    small = SamplingSettings(n_docs=5, doc_tokens=6, batch_size=2)
    first = sampled_corpus(a, small)
    files = list((tmp_path / "corpora").glob("sampled-*.jsonl"))
    assert len(files) == 1 and len(first.texts) == 5
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert sample_documents(a, small) == first.texts  # same seed, same text; the global RNG untouched
    assert torch.equal(torch.get_rng_state(), state)
    assert sampled_corpus(a, small).fingerprint() == first.fingerprint()  # read back from the cache
    other = sampled_corpus(a, SamplingSettings(n_docs=5, doc_tokens=6, batch_size=2, seed=1))
    assert other.texts != first.texts and len(list((tmp_path / "corpora").glob("*.jsonl"))) == 2
    with pytest.raises(StatsError, match="doc_tokens"):
        sample_documents(a, SamplingSettings(doc_tokens=0))
    # an interrupted run (only batch 0 written) resumes to the same text as an uninterrupted one
    import json

    partial = tmp_path / "p.jsonl"
    partial.write_text(json.dumps({"batch": 0, "texts": first.texts[:2]}) + "\n")
    assert sample_documents(a, small, partial) == first.texts
    assert len(partial.read_text().splitlines()) == 3


def test_shipped_corpus_is_used_only_for_its_model_and_settings(tmp_path, monkeypatch):
    import hashlib
    import json

    import superedit.stats.sampled as sampled
    from superedit.models.pretrained import PROVENANCE_FILE
    from superedit.stats.sampled import SamplingSettings, sampled_corpus

    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path / "home"))
    a = tiny_adapter("gpt2")
    model_dir = tmp_path / "m"
    a.model.save_pretrained(model_dir)
    (model_dir / PROVENANCE_FILE).write_text(json.dumps({"gguf_sha256": "ab" * 32}))
    a.model.config._name_or_path = str(model_dir)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    body = '{"text": "shipped document one"}\n{"text": "shipped document two"}\n'
    (shipped / "c.jsonl").write_text(body)
    settings = SamplingSettings(n_docs=2, doc_tokens=3, batch_size=2)
    meta = {"file": "c.jsonl", "model_gguf_sha256": "ab" * 32, "settings": dict(settings.__dict__),
            "sha256": hashlib.sha256(body.encode()).hexdigest()}
    (shipped / "c.json").write_text(json.dumps(meta))
    monkeypatch.setattr(sampled, "SHIPPED", shipped)
    assert sampled_corpus(a, settings).texts == ["shipped document one", "shipped document two"]
    other = sampled_corpus(a, SamplingSettings(n_docs=2, doc_tokens=3, batch_size=2, seed=5))  # other settings: sampled
    assert other.texts != ["shipped document one", "shipped document two"]
    (shipped / "c.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))  # a damaged copy is never used
    assert sampled.shipped_corpus(a, settings) is None


def test_cli_stats_until_converged(tmp_path):
    """--until-converged: the rows carry the convergence record, the matrix is cached under its own key
    (a fixed-budget run of the same budget misses), and bad settings are a clean exit 2."""
    from typer.testing import CliRunner

    from superedit.cli import app

    model_dir = saved_tiny_model(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    base = ["stats", "--model", str(model_dir), "--layers", "2", "--corpus", str(corpus), "--tokens", "300",
            "--max-length", "16", "--cache-dir", str(tmp_path / "cache"), "--json"]
    runner = CliRunner()
    res = runner.invoke(app, base + ["--until-converged", "--tol", "0.5", "--first-check", "64", "--probes", "4"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout.strip().splitlines()[-1])["layers"][0]
    assert isinstance(row["converged"], bool) and row["checkpoints"][-1]["tokens"] == row["count"]
    assert KeyCovariance.load(row["path"]).convergence["checkpoints"] == row["checkpoints"]
    plain = json.loads(runner.invoke(app, base).stdout.strip().splitlines()[-1])["layers"][0]
    assert not plain["cache_hit"] and plain["path"] != row["path"] and "converged" not in plain
    bad = runner.invoke(app, base + ["--until-converged", "--tol", "-1"])
    assert bad.exit_code == 2 and "tol" in json.loads(bad.stdout.strip().splitlines()[-1])["error"]


@pytest.mark.parametrize("d,blocks", [(10, 4), (7, 3), (16, 1), (5, 8)])
def test_upper_gram_update_equals_the_full_product(d, blocks):
    """The block-upper-triangular Σ k kᵀ update, completed by the mirror, is kᵀk over every batch."""
    from superedit.stats.covariance import symmetrize_from_upper_, upper_gram_update_

    g = torch.Generator().manual_seed(d)
    M, want = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    for n in (3, 11, 1):
        k = torch.randn(n, d, generator=g, dtype=torch.float64)
        upper_gram_update_(M, k, blocks)
        want += k.T @ k
        symmetrize_from_upper_(M)  # a read mid-way (a convergence check) changes nothing after
    assert torch.allclose(M, want, rtol=1e-13, atol=1e-13)
    assert torch.equal(M, M.T)
