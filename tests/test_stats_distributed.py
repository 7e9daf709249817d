"""Distributed key statistics (torchrun, 2 gloo processes on loopback) and the convergence stop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from helpers import CORPUS, tiny_adapter
from superedit.errors import StatsError
from superedit.models import load_model
from superedit.stats import KeyCovariance, StatsKey, collect_covariances
from superedit.stats.covariance import ConvergenceStop
from superedit.stats.distributed import Shard

TEXTS = [f"{t} Number {i} of the list, item {i * 7 % 13}." for i, t in enumerate(CORPUS)]
LAYERS = [1, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    a = tiny_adapter("gpt2")
    a.model.save_pretrained(root / "model")
    a.tokenizer.save_pretrained(root / "model")
    (root / "corpus.txt").write_text("\n".join(TEXTS) + "\n")
    return root


def _torchrun(root, cache, extra=(), layers="1,3"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUPEREDIT_NO_PROGRESS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "SUPEREDIT_HOME": str(root / "home")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "superedit.stats.distributed",
           "--model", str(root / "model"), "--corpus", str(root / "corpus.txt"), "--layers", layers,
           "--tokens", "1500", "--max-length", "24", "--batch-tokens", "96", "--device", "cpu",
           "--cache-dir", str(cache), "--json", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone renders
    return json.loads(lines[0])


def _reference(root, layers=LAYERS, **kw):
    a = load_model(str(root / "model"), device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: same kernels, same keys
    try:
        return a, collect_covariances(a, layers, str(root / "corpus.txt"), 1500, max_length=24, batch_tokens=96,
                                      **{"use_cache": False, **kw})
    finally:
        torch.set_num_threads(threads)


def test_two_processes_equal_one_process(saved_model, tmp_path):
    """torchrun --nproc-per-node 2 (gloo): the cached matrices equal one process's to 1e-10 (the float64
    sums are added in another order, so not bit for bit), under the same cache key. Layer 0 is in the
    cache already: rank 0 reads it and broadcasts it, the others compute only layers 1 and 3."""
    _, cached = _reference(saved_model, layers=[0], use_cache=True, cache_dir=tmp_path / "cache")
    out = _torchrun(saved_model, tmp_path / "cache", layers="0,1,3")
    assert out["world_size"] == 2
    assert [(r["layer"], r["cache_hit"]) for r in out["layers"]] == [(0, True), (1, False), (3, False)]
    assert out["layers"][0]["path"] == str(cached[0].path)
    _, ref = _reference(saved_model)
    for row in out["layers"][1:]:
        layer = row["layer"]
        got = KeyCovariance.load(row["path"])
        assert got.key == ref[layer].key
        assert got.count == ref[layer].count == 1500
        scale = float(ref[layer].mom2.abs().max())
        assert float((got.mom2 - ref[layer].mom2).abs().max()) <= 1e-10 * scale
        assert float((got.mean - ref[layer].mean).abs().max()) <= 1e-10 * max(1.0, float(ref[layer].mean.abs().max()))


def test_two_processes_convergence_stop_equals_one_process(saved_model, tmp_path):
    """The same with a convergence stop: same checkpoints, same tokens per layer, same matrices."""
    stop = ConvergenceStop(tol=0.6, first_check=200, patience=2, n_probes=8)
    out = _torchrun(saved_model, tmp_path / "cache", ["--until-converged", "--tol", "0.6", "--first-check", "200",
                                                      "--probes", "8"])
    _, ref = _reference(saved_model, stop=stop)
    assert any(r["converged"] and r["count"] < 1500 - 8 for r in out["layers"])  # a layer stopped early
    for row in out["layers"]:
        layer = row["layer"]
        got = KeyCovariance.load(row["path"])
        assert got.key == ref[layer].key
        assert got.count == ref[layer].count
        assert [c["tokens"] for c in got.convergence["checkpoints"]] == \
            [c["tokens"] for c in ref[layer].convergence["checkpoints"]]
        assert got.convergence["converged"] == ref[layer].convergence["converged"]
        scale = float(ref[layer].mom2.abs().max())
        assert float((got.mom2 - ref[layer].mom2).abs().max()) <= 1e-10 * scale


def _double():
    a = tiny_adapter("gpt2")
    a.model.double()
    return a


def test_convergence_stop_freezes_layer_at_its_checkpoint():
    """A layer stopped at a checkpoint holds exactly the statistics of its first ``tokens_used`` tokens
    (probes held out), whatever other layers were collected with it."""
    a = _double()
    stop = ConvergenceStop(tol=0.3, first_check=100, patience=2, n_probes=4)
    covs = collect_covariances(a, [0, 3], TEXTS, 3000, max_length=20, batch_tokens=80, use_cache=False, stop=stop)
    alone = collect_covariances(a, [0], TEXTS, 3000, max_length=20, batch_tokens=80, use_cache=False, stop=stop)
    rec = covs[0].convergence
    assert rec["converged"] and rec["tokens_used"] == covs[0].count < 3000
    cps = rec["checkpoints"]
    assert [c["tokens"] for c in cps][-1] == covs[0].count
    assert all(c["rel_change_C"] < 0.3 and c["rel_change_u"] < 0.3 for c in cps[-2:])  # patience 2
    assert cps[0]["rel_change_C"] is None  # nothing to compare the first checkpoint with
    assert [c["tokens"] for c in cps] == sorted(c["tokens"] for c in cps)
    assert alone[0].count == covs[0].count
    assert torch.allclose(alone[0].mom2, covs[0].mom2, atol=1e-12, rtol=0)


def test_convergence_stop_key_and_metadata_round_trip(tmp_path):
    a = tiny_adapter("gpt2")
    stop = ConvergenceStop(tol=0.3, first_check=100, n_probes=4)
    covs = collect_covariances(a, [1], TEXTS, 2000, max_length=20, cache_dir=tmp_path, stop=stop)
    plain = collect_covariances(a, [1], TEXTS, 2000, max_length=20, cache_dir=tmp_path)
    assert covs[1].key != plain[1].key and covs[1].key.stop and not plain[1].key.stop
    assert plain[1].convergence is None and plain[1].count == 2000
    again = collect_covariances(a, [1], TEXTS, 2000, max_length=20, cache_dir=tmp_path, stop=stop)
    assert again[1].cache_hit and again[1].convergence == covs[1].convergence
    assert torch.equal(again[1].mom2.cpu(), covs[1].mom2.cpu())
    other = collect_covariances(a, [1], TEXTS, 2000, max_length=20, cache_dir=tmp_path,
                                stop=ConvergenceStop(tol=0.1, first_check=100, n_probes=4))
    assert not other[1].cache_hit and other[1].key.digest() != covs[1].key.digest()
    # a fixed-budget key keeps its digest from before the stop field: the empty field is left out
    assert StatsKey.from_dict({k: v for k, v in plain[1].key.to_dict().items() if k != "stop"}) == plain[1].key


def test_caller_probes_enter_the_key_and_are_not_held_out():
    a = _double()
    probes = {2: torch.randn(3, a.d_mlp, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    stop = ConvergenceStop(tol=1e-9, first_check=100, n_probes=4)  # never met: the budget runs out
    covs = collect_covariances(a, [2], TEXTS, 400, max_length=20, use_cache=False, stop=stop, probes=probes)
    rec = covs[2].convergence
    assert rec["probes"].startswith("sha256:") and rec["n_probes"] == 3
    held = collect_covariances(a, [2], TEXTS, 400, max_length=20, use_cache=False, stop=stop)
    assert held[2].convergence["probes"] == "heldout:4:0"
    assert held[2].key != covs[2].key
    assert not rec["converged"] and not held[2].convergence["converged"]
    assert covs[2].count == 400 and held[2].count == 400 - 4  # the caller's probes are not held out
    assert rec["checkpoints"][-1]["tokens"] == 400  # a last record where the budget ran out
    plain = collect_covariances(a, [2], TEXTS, 400, max_length=20, use_cache=False)
    assert torch.allclose(covs[2].mom2, plain[2].mom2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bad, field", [(dict(tol=0), "tol"), (dict(tol=float("nan")), "tol"),
                                        (dict(first_check=0), "first_check"), (dict(patience=1.5), "patience"),
                                        (dict(ridge=-1.0), "ridge")])
def test_bad_stop_settings_are_refused(bad, field):
    with pytest.raises(StatsError, match=field):
        ConvergenceStop(**bad)


def test_bad_probes_are_refused():
    a = tiny_adapter("gpt2")
    stop = ConvergenceStop()
    with pytest.raises(StatsError, match="layer 2"):
        collect_covariances(a, [1, 2], TEXTS, 200, use_cache=False, stop=stop, probes={1: torch.zeros(2, a.d_mlp)})
    with pytest.raises(StatsError, match="expected"):
        collect_covariances(a, [1], TEXTS, 200, use_cache=False, stop=stop, probes={1: torch.zeros(2, 5)})
    with pytest.raises(StatsError, match="convergence stop"):
        collect_covariances(a, [1], TEXTS, 200, use_cache=False, probes={1: torch.zeros(2, a.d_mlp)})


def test_shard_ownership_and_local_no_ops():
    s = Shard(rank=1, world_size=3)
    assert [b for b in range(9) if s.owns(b)] == [1, 4, 7] and not s.is_main
    local = Shard()
    t = torch.ones(3)
    local.all_reduce_([t])
    local.broadcast_(t)
    assert torch.equal(t, torch.ones(3)) and local.broadcast_object({"a": 1}) == {"a": 1}


def test_distributed_flag_without_torchrun_is_a_clear_error(monkeypatch):
    from typer.testing import CliRunner

    from superedit.cli import app

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    r = CliRunner().invoke(app, ["stats", "--distributed", "--layers", "0"])
    assert r.exit_code == 2 and "torchrun" in r.output
