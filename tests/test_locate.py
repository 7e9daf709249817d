"""The position-group trace: consistent with single restorations, zero without noise, resumable."""

from __future__ import annotations

import pytest

from helpers import saved_tiny_model, tiny_adapter
from superedit.analysis.locate import locate_fact, run_locate, summarise_locate
from superedit.analysis.tracing import restored_probs, window_layers

FACT = {"prompt": "{} was born in the city of", "subject": "Anna Berg", "target": "Oslo"}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_groups_equal_explicit_restorations(family):
    a = tiny_adapter(family)
    rec = locate_fact(a, FACT, kinds=("mlp", "attn"), windows={"mlp": 2, "attn": 1}, samples=2, noise_scale=3.0)
    first, last = rec["subject_span"]
    T = len(rec["tokens"])
    for layer in (0, 3):
        sets = [[("mlp", L, last) for L in window_layers(layer, 2, a.n_layers)],
                [("attn", layer, t) for t in range(first, last)],
                [("mlp", L, T - 1) for L in window_layers(layer, 2, a.n_layers)]]
        ref = restored_probs(a, FACT, sets, 3.0, 2, 0)
        want = [p - ref["p_corrupt"] for p in ref["probs"]]
        got = [rec["ie"]["mlp"]["last subject token"][layer], rec["ie"]["attn"]["other subject tokens"][layer],
               rec["ie"]["mlp"]["last token"][layer]]
        assert got == pytest.approx(want, abs=1e-6)


def test_no_noise_means_no_effect_and_resume(tmp_path):
    a = tiny_adapter("llama")
    rec = locate_fact(a, FACT, kinds=("mlp",), samples=1, noise_scale=0.0)
    assert rec["p_clean"] == pytest.approx(rec["p_corrupt"], abs=1e-6)
    assert all(abs(v) < 1e-6 for g in rec["ie"]["mlp"].values() for v in g)
    facts = [FACT, {**FACT, "subject": "Toko Yasuda"}]
    out = tmp_path / "locate.jsonl"
    first = run_locate(a, facts[:1], out, kinds=("mlp",), samples=1)
    both = run_locate(a, facts, out, kinds=("mlp",), samples=1)  # the first fact is read back, not re-run
    assert len(out.read_text().splitlines()) == 2 and both[0] == first[0]
    summ = summarise_locate(both)
    assert summ["n_facts"] == 2 and len(summ["aie"]["mlp"]["last subject token"]["mean"]) == a.n_layers
    s = summ["aie"]["mlp"]["last token"]
    assert all(lo - 1e-12 <= m <= hi + 1e-12 for lo, m, hi in zip(s["ci_low"], s["mean"], s["ci_high"]))


def test_locate_command_writes_summary_and_figure(tmp_path):
    import json

    from typer.testing import CliRunner

    from helpers import SHARED_DATA
    from superedit.cli import app

    src = SHARED_DATA / "counterfact_sample.json"
    if not src.is_file():
        pytest.skip(f"shared data missing: {src}")
    model_dir = saved_tiny_model(tmp_path / "m")
    args = ["locate", "--model", str(model_dir), "--requests", str(src), "--n", "2", "--samples", "1",
            "--out", str(tmp_path / "loc"), "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n_facts"] == 2 and (tmp_path / "loc" / "locate.png").stat().st_size > 0
    bad = CliRunner().invoke(app, args[:-1] + ["--kinds", "mlp,ffn", "--json"])
    assert bad.exit_code == 2 and "kinds" in bad.stdout


def test_layer_stride_keeps_the_centred_windows():
    a = tiny_adapter("llama")
    full = locate_fact(a, FACT, kinds=("mlp",), windows={"mlp": 2}, samples=1)
    half = locate_fact(a, FACT, kinds=("mlp",), windows={"mlp": 2}, samples=1, layer_stride=2)
    assert half["layers"] == [0, 2]
    for g, vals in half["ie"]["mlp"].items():
        assert vals == pytest.approx([full["ie"]["mlp"][g][0], full["ie"]["mlp"][g][2]], abs=1e-6)
    assert summarise_locate([half])["aie"]["mlp"]["last token"]["peak_layer"] in (0, 2)
