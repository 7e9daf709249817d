"""Knowledge-in-superposition analysis and the interference forecast."""

import json
import math

import numpy as np
import pytest
import torch

from helpers import corpus_cov, tiny_adapter
from superedit.analysis.superposition import (SuperpositionError, analyze_keys, analyze_superposition,
                                              angle_mode, excess_kurtosis, m_convergence, offdiag, save_scaling,
                                              scaling_records, select_items, superposition_matrices, top_pairs)
from superedit.data import EditRequest
from superedit.editing.covariance import FixedCovariance
from superedit.errors import StatsError
from superedit.stats.whitening import Whitener

NAMES = ["Anna Berg", "Eiffel Tower", "Toko Yasuda", "Apple A5", "Google Trends", "Danielle Darrieux",
         "Oslo Bergen", "Paris France", "Japan Guitar", "Words Matter"]
TEMPLATES = ["{} was born in", "The capital of {} is", "{} is owned by", "People say {} works in"]
REQUESTS = [EditRequest(prompt=t, subject=f"{n} {k}" if k else n, target_new="Oslo", target_true="Paris",
                        relation_id=f"P{i % 3}", case_id=i)
            for i, (t, n, k) in enumerate((t, n, k) for k in ("", "II") for n in NAMES for t in TEMPLATES[:2])]


@pytest.fixture(scope="module")
def gpt2():
    return tiny_adapter("gpt2")


@pytest.fixture(scope="module")
def gpt2_cov(gpt2):
    return corpus_cov(gpt2, list(range(gpt2.n_layers)))


def spd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return A @ A.T + 0.5 * torch.eye(d, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ math
def test_p_matches_explicit_inverse_sqrt_and_diagonal_is_one():
    d, m = 12, 9
    C = spd(d)
    K = torch.randn(m, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mats = superposition_matrices(K, C)
    P = mats["P"]
    np.testing.assert_allclose(np.diag(P), 1.0, atol=1e-12)
    evals, evecs = np.linalg.eigh(C.numpy())
    C_mhalf = evecs @ np.diag(evals ** -0.5) @ evecs.T
    Y = K.numpy() @ C_mhalf  # rows C^-1/2 k_i (C^-1/2 symmetric)
    G = Y @ Y.T
    expected = G / np.diag(G)[:, None]
    np.testing.assert_allclose(P, expected, atol=1e-6, rtol=1e-6)
    assert not np.allclose(P, P.T)  # not symmetric in general
    np.testing.assert_allclose(mats["wcos"], G / np.sqrt(np.outer(np.diag(G), np.diag(G))), atol=1e-6)
    Q = K.numpy() @ K.numpy().T
    np.testing.assert_allclose(mats["Q"], Q, atol=1e-9)
    np.testing.assert_allclose(mats["acos"], Q / np.sqrt(np.outer(np.diag(Q), np.diag(Q))), atol=1e-9)
    assert mats["condition_number"] == pytest.approx(evals.max() / evals.min(), rel=1e-6)


def test_keys_orthogonal_in_whitening_space_give_identity():
    d, m = 10, 6
    C = spd(d, seed=3)
    evals, evecs = torch.linalg.eigh(C)
    C_half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    K = torch.stack([C_half @ torch.eye(d, dtype=torch.float64)[i] * (i + 1) for i in range(m)])
    mats = superposition_matrices(K, C)
    np.testing.assert_allclose(mats["P"], np.eye(m), atol=1e-9)
    np.testing.assert_allclose(mats["wcos"], np.eye(m), atol=1e-9)
    assert abs(mats["acos"] - np.eye(m)).max() > 1e-3  # but not orthogonal as activations


def test_whitener_solve_and_inner_agree():
    C = spd(8, seed=5)
    K = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    W = Whitener(C)
    torch.testing.assert_close(W.solve(K), torch.linalg.solve(C, K.T).T)
    torch.testing.assert_close(W.inner(K, K), K @ torch.linalg.solve(C, K.T))


def test_kurtosis_on_known_samples():
    rng = np.random.default_rng(0)
    assert abs(excess_kurtosis(rng.standard_normal(400_000))) < 0.05
    assert excess_kurtosis(rng.laplace(size=400_000)) == pytest.approx(3.0, abs=0.15)
    assert excess_kurtosis([-1.0, 1.0] * 50) == pytest.approx(-2.0, abs=1e-12)
    assert excess_kurtosis([-1.0, 0.0, 0.0, 1.0] * 25) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(excess_kurtosis([2.0, 2.0, 2.0]))


def test_angle_mode_and_offdiag():
    assert angle_mode([10.2, 10.7, 10.4, 50.0]) == pytest.approx(10.5)
    M = np.arange(9.0).reshape(3, 3)
    assert sorted(offdiag(M).tolist()) == [1, 2, 3, 5, 6, 7]


def test_top_pairs_order_and_items():
    P = np.array([[1.0, 0.2, -0.9], [0.5, 1.0, 0.1], [0.3, 0.05, 1.0]])
    items = [{"prompt": f"p{i}"} for i in range(3)]
    top = top_pairs(P, items, k=2)
    assert [(t["i"], t["j"]) for t in top] == [(1, 0), (2, 0)]
    assert top[0]["p"] == 0.5 and top[0]["p_ji"] == 0.2 and top[0]["item_i"]["prompt"] == "p1"
    assert (top_pairs(P, k=1, by="abs")[0]["i"], top_pairs(P, k=1, by="abs")[0]["j"]) == (0, 2)


def test_singular_covariance_needs_ridge():
    d = 8
    B = torch.randn(d, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    C = B @ B.T  # rank 3
    K = torch.randn(4, d, dtype=torch.float64)
    with pytest.raises(StatsError, match="--ridge"):
        superposition_matrices(K, C, layer=2)
    mats = superposition_matrices(K, C, ridge=1e-2)
    assert np.isfinite(mats["P"]).all() and mats["condition_number"] < 1e12
    with pytest.raises(StatsError, match="ridge must be a finite number"):
        Whitener(C, ridge=-1)


# ------------------------------------------------------------------------------------------ on a tiny model
def test_bad_inputs(gpt2, gpt2_cov):
    with pytest.raises(SuperpositionError, match="larger than the"):
        analyze_superposition(gpt2, REQUESTS[:5], gpt2_cov, layers=[1], m=6)
    with pytest.raises(IndexError, match="out of range"):
        analyze_superposition(gpt2, REQUESTS, gpt2_cov, layers=[gpt2.n_layers], m=4)
    with pytest.raises(SuperpositionError):
        analyze_superposition(gpt2, REQUESTS, gpt2_cov, layers=[1], m=4, fact_token="nope")
    singular = FixedCovariance({1: torch.zeros(gpt2.d_mlp, gpt2.d_mlp, dtype=torch.float64)})
    with pytest.raises(StatsError, match="--ridge"):
        analyze_superposition(gpt2, REQUESTS, singular, layers=[1], m=4)


def test_m_convergence_on_nested_subsets(gpt2, gpt2_cov):
    assert [i for i, _ in select_items(REQUESTS, 16, 7)] == [i for i, _ in select_items(REQUESTS, 32, 7)][:16]
    r16 = analyze_superposition(gpt2, REQUESTS, gpt2_cov, layers=[2], m=16, seed=7)
    r32 = analyze_superposition(gpt2, REQUESTS, gpt2_cov, layers=[2], m=32, seed=7)
    np.testing.assert_allclose(r32.layers[2].P[:16, :16], r16.layers[2].P, atol=1e-10)
    conv = {c["m"]: c for c in r32.layers[2].m_convergence}
    assert sorted(conv) == [16, 32]
    assert conv[16]["kurtosis"] == pytest.approx(r16.layers[2].stats["kurtosis"], abs=1e-9)
    assert conv[32]["kurtosis"] == pytest.approx(r32.layers[2].stats["kurtosis"], abs=1e-12)
    assert [c["m"] for c in m_convergence(np.eye(70))] == [16, 32, 64, 70]


def test_micro_end_to_end_writes_every_file(gpt2, gpt2_cov, tmp_path):
    from superedit.report.superposition_report import render_plots, write_report

    res = analyze_superposition(gpt2, REQUESTS, gpt2_cov, layers=[1, 3], m=12, seed=0, top_k=5)
    assert set(res.layers) == {1, 3}
    for l in (1, 3):
        st = res.layers[l].stats
        assert st["m"] == 12 and st["n_offdiag"] == 132 and 0 <= st["frac_abs_gt"] <= 1
        assert 0 <= st["angle_mode_whitening"] <= 180 and 0 <= st["angle_mode_activation"] <= 180
        np.testing.assert_allclose(np.diag(res.layers[l].P), 1.0)
    res.save(tmp_path)
    render_plots(tmp_path)
    write_report(tmp_path)
    expected = ["stats.json", "stats.csv", "m_convergence.csv", "kde.json", "top_pairs.json", "top_pairs.csv",
                "items.jsonl", "report.html", "plots/kde_P.png", "plots/kurtosis_by_layer.png",
                "plots/m_convergence.png"]
    for l in (1, 3):
        expected += [f"matrices/{n}_L{l}.npy" for n in ("P", "Q", "wcos", "acos")]
        expected += [f"plots/heatmap_L{l}.png", f"plots/angles_L{l}.png"]
    for name in expected:
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [r["layer"] for r in stats["layers"]] == [1, 3]
    np.testing.assert_allclose(np.load(tmp_path / "matrices" / "P_L3.npy"), res.layers[3].P)
    pairs = json.loads((tmp_path / "top_pairs.json").read_text())
    assert len(pairs) == 10 and pairs[0]["item_i"]["prompt"] and "relation" in pairs[0]["item_j"]
    html = (tmp_path / "report.html").read_text()
    assert html.count('<img src="plots/') == 3 + 2 * 2 and "src=\"http" not in html
    assert len((tmp_path / "stats.csv").read_text().splitlines()) == 3


def test_scaling_records_and_plot(tmp_path):
    from superedit.report.superposition_report import render_scaling

    results = []
    for n_layers, n_params, d in ((2, 1000, 6), (4, 5000, 8)):
        keys = {l: torch.randn(10, d, dtype=torch.float64, generator=torch.Generator().manual_seed(l))
                for l in range(n_layers)}
        cov = {l: spd(d, seed=l) for l in range(n_layers)}
        results.append(analyze_keys(keys, cov, model={"source": f"m{n_layers}", "n_params": n_params,
                                                      "n_layers": n_layers,
                                                      "training": {"epochs": 200, "recall": n_layers / 5}}))
    rows = scaling_records(results)
    assert rows[0]["train_epochs"] == 200 and rows[-1]["train_recall"] == 0.8  # the budget is recorded
    assert len(rows) == 6 and rows[-1]["relative_depth"] == 1.0 and rows[1]["relative_depth"] == 1.0
    save_scaling(rows, tmp_path)
    render_scaling(tmp_path)
    for name in ("scaling.json", "scaling.csv", "plots/scaling_kurtosis.png", "report.html"):
        assert (tmp_path / name).is_file(), name
    data = json.loads((tmp_path / "scaling.json").read_text())
    assert [m["n_params"] for m in data["models"]] == [1000, 5000]
    assert [m["train_recall"] for m in data["models"]] == [0.4, 0.8]


def test_scaling_warns_on_unequal_training_budgets(caplog):
    import logging
    from types import SimpleNamespace

    from superedit.commands.superposition import warn_unequal_budgets

    same = {"world": "synthetic", "seed": 0, "epochs": 200}
    runs = [SimpleNamespace(model={"source": "a", "training": same}),
            SimpleNamespace(model={"source": "b", "training": {**same, "epochs": 40}})]
    with caplog.at_level(logging.WARNING, logger="superedit"):
        warn_unequal_budgets(runs[:1] * 2)
        assert not caplog.records
        warn_unequal_budgets(runs)
    assert "differ in epochs" in caplog.text and "b: 40" in caplog.text


def test_cli_superposition_on_saved_tiny_model(gpt2, gpt2_cov, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from superedit.cli import app
    from superedit.data import save_requests_jsonl

    model_dir = tmp_path / "model"
    gpt2.model.save_pretrained(model_dir)
    gpt2.tokenizer.save_pretrained(model_dir)
    save_requests_jsonl(tmp_path / "reqs.jsonl", REQUESTS)
    monkeypatch.setattr("superedit.editing.covariance.CorpusCovariance", lambda adapter, corpus, **kw: gpt2_cov)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["superposition", "--model", str(model_dir), "--requests", str(tmp_path / "reqs.jsonl"),
                                 "--m", "8", "--layers", "2", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert [l["layer"] for l in result["layers"]] == [2] and (out / "report.html").is_file()
    r = CliRunner().invoke(app, ["superposition", "--model", str(model_dir), "--requests", str(tmp_path / "reqs.jsonl"),
                                 "--m", "999", "--layers", "1", "--out", str(out), "--json"])
    assert r.exit_code == 2 and "larger than the" in r.output
    r = CliRunner().invoke(app, ["superposition", "--model", str(model_dir), "--m", "8", "--out", str(out)])
    assert r.exit_code == 2 and "--requests is required" in r.output


def test_cli_scaling_from_saved_runs(tmp_path):
    """--from-runs builds the law from saved stats.json files (each model with its own items), checks every
    folder before writing, and refuses a folder that is not a run."""
    from typer.testing import CliRunner

    from superedit.cli import app

    runs = []
    for n_layers, n_params, d, source in ((2, 1000, 6, "builtin:tiny"), (3, 9000, 8, "pretrained:x")):
        keys = {l: torch.randn(10, d, dtype=torch.float64, generator=torch.Generator().manual_seed(l))
                for l in range(n_layers)}
        res = analyze_keys(keys, {l: spd(d, seed=l) for l in range(n_layers)},
                           model={"source": source, "n_params": n_params, "n_layers": n_layers,
                                  "training": {"epochs": 7, "recall": 0.5} if n_layers == 2 else None},
                           config={"m": 10, "seed": 0, "fact_token": "subject_last", "ridge": 0.0})
        runs.append(tmp_path / source.replace(":", "_"))
        res.save(runs[-1])
    out = tmp_path / "law"
    r = CliRunner().invoke(app, ["superposition", "--from-runs", ",".join(map(str, runs)), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "scaling.json").read_text())
    assert [m["model"] for m in data["models"]] == ["builtin:tiny", "pretrained:x"]
    assert [m["n_params"] for m in data["models"]] == [1000, 9000]
    assert data["models"][0]["train_epochs"] == 7 and "train_epochs" not in data["models"][1]
    assert len(data["rows"]) == 5 and data["rows"][-1]["relative_depth"] == 1.0
    kurt = json.loads((runs[1] / "stats.json").read_text())["kurtosis_by_layer"]
    assert [r["kurtosis"] for r in data["rows"][2:]] == pytest.approx([kurt[str(l)] for l in range(3)])
    html = (out / "report.html").read_text()
    assert "../pretrained_x/report.html" in html and (out / "plots" / "scaling_kurtosis.png").is_file()
    bad = tmp_path / "not-a-run"
    bad.mkdir()
    out2 = tmp_path / "law2"
    r = CliRunner().invoke(app, ["superposition", "--from-runs", f"{runs[0]},{bad}", "--out", str(out2)])
    assert r.exit_code == 2 and "stats.json: no such file" in r.output and not out2.exists()
    r = CliRunner().invoke(app, ["superposition", "--from-runs", str(runs[0]), "--out", str(out2)])
    assert r.exit_code == 2 and "at least two" in r.output
    r = CliRunner().invoke(app, ["superposition", "--from-runs", f"{runs[0]},{runs[0]}", "--out", str(out2)])
    assert r.exit_code == 2 and "same model twice" in r.output and not out2.exists()


# ------------------------------------------------------------------------------------------ forecast
def test_forecast_recommends_a_layer_and_checks_it(gpt2, gpt2_cov):
    from superedit.analysis.forecast import check_forecast, forecast_interference
    from superedit.editing.hparams import ROMEHParams

    hp = ROMEHParams(v_num_grad_steps=2, n_prefixes=0, context_lengths=[], kl_factor=0.0)
    before = gpt2.down_weight_param(1).detach().clone()
    edit, protected = REQUESTS[0], REQUESTS[1:9] + [REQUESTS[0]]
    fc = forecast_interference(gpt2, edit, protected, gpt2_cov, layers=[1, 2], hparams=hp, top_k=3)
    assert fc.recommended_layer in (1, 2) and len(fc.protected) == 8  # the edit itself is not protected
    lf = fc.layers[fc.recommended_layer]
    assert lf.interference == min(f.interference for f in fc.layers.values())
    assert len(lf.top) == 3 and lf.top[0]["predicted_shift"] == max(lf.predicted)
    np.testing.assert_allclose(lf.predicted, np.abs(lf.p) * lf.delta_norm)
    chk = check_forecast(gpt2, edit, protected, gpt2_cov, 1, hp, forecast=fc)
    assert chk["spearman_value"] is not None and math.isfinite(chk["spearman_value"])
    assert chk["spearman_value"] > 0.9  # ΔW kⱼ = pⱼ δ exactly for a ROME edit
    np.testing.assert_allclose(chk["measured_dv"], fc.layers[1].predicted, rtol=1e-3, atol=1e-6)
    assert all(x is not None and math.isfinite(x) for x in chk["delta_logp_true"])
    assert torch.equal(gpt2.down_weight_param(1), before)  # weights restored
