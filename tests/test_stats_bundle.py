"""Shareable statistics bundles: export → import round trip, self-description, refusals that change nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import tiny_adapter
from superedit.errors import StatsError
from superedit.stats import collect_covariances
from superedit.stats.bundle import BUNDLE_FORMAT, export_bundle, import_bundle, read_bundle

TEXTS = ["Anna Berg was born in Oslo.", "The Eiffel Tower is located in Paris.", "Toko Yasuda plays the guitar."] * 8
LAYERS = [1, 3]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny GPT-2 saved to a directory, its covariances cached at layers 1 and 3, and their bundle."""
    from superedit.models import load_model

    root = tmp_path_factory.mktemp("bundle")
    a = tiny_adapter("gpt2")
    a.model.save_pretrained(root / "model")
    a.tokenizer.save_pretrained(root / "model")
    adapter = load_model(str(root / "model"))
    covs = collect_covariances(adapter, LAYERS, TEXTS, 150, max_length=16, cache_dir=root / "cache")
    out = export_bundle(adapter, LAYERS, root / "c.safetensors", cache_dir=root / "cache")
    return root, adapter, covs, out


def test_round_trip_fills_the_cache_of_another_machine(saved, tmp_path):
    root, adapter, covs, out = saved
    result = import_bundle(out["path"], adapter, cache_dir=tmp_path / "other")
    assert [e["status"] for e in result["entries"]] == ["imported", "imported"]
    again = collect_covariances(adapter, LAYERS, TEXTS, 150, max_length=16, cache_dir=tmp_path / "other")
    for l in LAYERS:
        assert again[l].cache_hit and again[l].key == covs[l].key and again[l].count == covs[l].count
        assert torch.equal(again[l].mom2, covs[l].mom2) and torch.equal(again[l].mean, covs[l].mean)
    assert all(e["status"] == "present" for e in import_bundle(out["path"], adapter, tmp_path / "other")["entries"])


def test_bundle_describes_itself(saved):
    root, adapter, covs, out = saved
    from safetensors import safe_open

    with safe_open(out["path"], framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == BUNDLE_FORMAT and meta["superedit_version"]
    model = json.loads(meta["model"])
    assert model["d_mlp"] == adapter.d_mlp and model["revision"] == adapter.revision
    entries = json.loads(meta["entries"])
    assert [e["key"]["layer"] for e in entries] == LAYERS
    for e, l in zip(entries, LAYERS):
        assert e["key"] == covs[l].key.to_dict()  # the full cache key: model identity, corpus, tokens, dtype
        assert set(e["sha256"]) == {"mom2", "mean"} and e["count"] == covs[l].count
    assert len(out["sha256"]) == 64


def test_a_moved_model_directory_imports_under_its_new_path(saved, tmp_path):
    """Same weights elsewhere (another machine's path): the content fingerprint matches, the key is
    rewritten to the new source, and the cache is hit from there."""
    from superedit.models import load_model

    root, adapter, covs, out = saved
    shutil.copytree(root / "model", tmp_path / "moved")
    moved = load_model(str(tmp_path / "moved"))
    assert moved.revision == adapter.revision and moved.source != adapter.source
    import_bundle(out["path"], moved, cache_dir=tmp_path / "c")
    hit = collect_covariances(moved, LAYERS, TEXTS, 150, max_length=16, cache_dir=tmp_path / "c")
    assert all(hit[l].cache_hit and torch.equal(hit[l].mom2, covs[l].mom2) for l in LAYERS)


@pytest.mark.parametrize("change,field", [("family", "family"), ("tokenizer", "tokenizer_hash"),
                                          ("weights", "revision"), ("dtype", "model_dtype")])
def test_import_refuses_another_model_and_writes_nothing(saved, tmp_path, change, field):
    from superedit.models import load_model

    root, adapter, covs, out = saved
    if change == "family":
        other = tiny_adapter("llama")
    else:
        other = load_model(str(root / "model"), dtype=torch.float64 if change == "dtype" else None)
        if change == "tokenizer":
            other.tokenizer.add_tokens(["<extra>"])
        if change == "weights":
            other.revision = "local-0000000000000000"
    with pytest.raises(StatsError, match=field) as ei:
        import_bundle(out["path"], other, cache_dir=tmp_path / "c")
    assert "c.safetensors" in str(ei.value)
    assert not (tmp_path / "c").exists()


def test_damaged_or_foreign_files_are_refused(saved, tmp_path):
    root, adapter, covs, out = saved
    data = bytearray((root / "c.safetensors").read_bytes())
    data[-9] ^= 0x01  # one bit of the last tensor's payload
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(StatsError, match="sha256"):
        read_bundle(bad)
    with pytest.raises(StatsError, match="not a superedit statistics bundle"):
        read_bundle(covs[1].path)  # a cache file is not a bundle
    (tmp_path / "cut.safetensors").write_bytes(bytes(data[:200]))
    with pytest.raises(StatsError, match="cannot read"):
        read_bundle(tmp_path / "cut.safetensors")
    with pytest.raises(StatsError, match="does not exist"):
        read_bundle(tmp_path / "none.safetensors")
    assert not (tmp_path / "c").exists()


def test_export_refuses_missing_layers_naming_the_command(saved, tmp_path):
    root, adapter, covs, out = saved
    with pytest.raises(StatsError, match=r"layer\(s\) \[2\].*superedit stats --model"):
        export_bundle(adapter, [1, 2], tmp_path / "x.safetensors", cache_dir=root / "cache")
    with pytest.raises(StatsError, match="--tokens 999"):
        export_bundle(adapter, [1], tmp_path / "x.safetensors", cache_dir=root / "cache", n_tokens=999)
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_export_import(saved, tmp_path):
    from typer.testing import CliRunner

    from superedit.cli import app

    root, adapter, covs, out = saved
    runner = CliRunner()
    res = runner.invoke(app, ["stats", "export", "--model", str(root / "model"), "--layers", "1,3", "--out",
                              str(tmp_path / "b.safetensors"), "--cache-dir", str(root / "cache"), "--json"])
    assert res.exit_code == 0, res.output
    exported = json.loads(res.stdout.strip().splitlines()[-1])
    assert [e["layer"] for e in exported["entries"]] == LAYERS
    res = runner.invoke(app, ["stats", "import", str(tmp_path / "b.safetensors"), "--model", str(root / "model"),
                              "--cache-dir", str(tmp_path / "c"), "--json"])
    assert res.exit_code == 0, res.output
    imported = json.loads(res.stdout.strip().splitlines()[-1])
    assert imported["sha256"] == exported["sha256"]
    assert [e["status"] for e in imported["entries"]] == ["imported", "imported"]
    bad = runner.invoke(app, ["stats", "import", str(tmp_path / "none.safetensors"), "--model", str(root / "model"),
                              "--json"])
    assert bad.exit_code == 2 and "does not exist" in json.loads(bad.stdout.strip().splitlines()[-1])["error"]
