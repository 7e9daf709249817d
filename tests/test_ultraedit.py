"""UltraEdit: the lifelong normaliser's statistics, the closed form, the features it reads, its state
through the protocol and the ledger, and a short run on the built-in testbed."""

import json

import pytest
import torch

from helpers import tiny_adapter
from superedit.data import EditRequest
from superedit.editing.hparams import HParamsError, UltraEditHParams
from superedit.editing.methods import get_method
from superedit.editing.methods.ultraedit import (batch_moments, edit_features, make_ultraedit_state, merge_moments,
                                                 standardise, ultraedit_solve, unmerge_moments)
from superedit.lifelong.ledger import Ledger
from superedit.models import encode_prompt_target
from superedit.models.positions import fill_template

F64 = torch.float64
REQS = [EditRequest(prompt=p, subject=s, target_new=n, case_id=i) for i, (p, s, n) in enumerate([
    ("{} was born in", "Anna Berg", "Paris"), ("{} plays the", "Toko Yasuda", "piano guitar"),
    ("{} is owned by", "Google Trends", "Apple"), ("{} was created by", "Apple A5", "Google")])]
HP = UltraEditHParams(layers=[1, 2], lr=1e-3, positions="all")


def test_moments_merge_like_one_pass_and_unmerge_back():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 7, generator=g, dtype=F64) * 3 + 1 for n in (1, 5, 2, 9)]
    total = (0, torch.zeros(7, dtype=F64), torch.zeros(7, dtype=F64))
    history = [total]
    for p in parts:
        total = merge_moments(total, batch_moments(p))
        history.append(total)
    n, mean, m2 = batch_moments(torch.cat(parts))
    assert total[0] == n == 17
    assert torch.allclose(total[1], mean, atol=1e-12) and torch.allclose(total[2], m2, atol=1e-10)
    for p, before in zip(reversed(parts), reversed(history[:-1])):
        total = unmerge_moments(total, batch_moments(p))
        assert total[0] == before[0]
        assert torch.allclose(total[1], before[1], atol=1e-10) and torch.allclose(total[2], before[2], atol=1e-9)
    with pytest.raises(ValueError):
        unmerge_moments(history[1], batch_moments(parts[1]))


def test_standardise_uses_the_sample_std_and_is_zero_for_one_row():
    z = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=F64)
    out = standardise(z, batch_moments(z), eps=0.0)
    assert torch.allclose(out, torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=F64) / 2 ** 0.5)
    one = z[:1]
    assert torch.equal(standardise(one, batch_moments(one), eps=1e-7), torch.zeros(1, 2, dtype=F64))


@pytest.mark.parametrize("n", [3, 12])  # fewer rows than d_mlp (N×N system) and more (d_mlp×d_mlp)
def test_solve_is_the_ridge_least_squares_map(n):
    g = torch.Generator().manual_seed(n)
    K, R = torch.randn(6, n, generator=g, dtype=F64), torch.randn(4, n, generator=g, dtype=F64)
    Y = ultraedit_solve(K, R, ridge=0.7)
    assert Y.shape == (6, n)
    expected = torch.linalg.solve(K @ K.T + 0.7 * torch.eye(6, dtype=F64), K @ R.T).T  # R Kᵀ (KKᵀ + λI)⁻¹
    assert torch.allclose(R @ Y.T, expected, atol=1e-10)


def test_features_are_the_down_projection_inputs_and_output_gradients():
    """Σ_i g_i k_iᵀ over every position is ∂L/∂W of the down-projection, for the same loss."""
    a = tiny_adapter("gpt2")
    keys, grads, rows = edit_features(a, REQS, [1], positions="all")
    assert keys[1].shape[0] == grads[1].shape[0] == sum(rows) and keys[1].shape[1] == a.d_mlp
    batch = encode_prompt_target(a.tokenizer, [fill_template(r.prompt, r.subject)[0] for r in REQS],
                                 [r.target_new for r in REQS])
    assert rows == batch.attention_mask.sum(1).tolist()
    _, _, target_rows = edit_features(a, REQS, [1], positions="target")
    assert target_rows == [len(t) for t in batch.target_ids] and target_rows[1] > 1  # one row per target token
    weight = a.site_module("value", 1).weight
    mask, labels = batch.loss_mask()
    weight.requires_grad_(True)
    try:
        logits = a.model(**batch.model_inputs()).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        (gw,) = torch.autograd.grad((-(logp * mask).sum(1) / mask.sum(1)).sum(), [weight])
    finally:
        weight.requires_grad_(False)
    outer = grads[1].T @ keys[1]  # (d_model, d_mlp)
    gw = gw.to(F64).T if gw.shape != outer.shape else gw.to(F64)  # GPT-2's Conv1D stores (in, out)
    assert torch.allclose(outer, gw, atol=1e-6 * float(gw.abs().max()))


def test_step_restores_the_model_and_its_state_resumes_exactly():
    a = tiny_adapter("gpt2")
    entry = get_method("ultraedit")
    assert entry.stateful and not entry.needs_stats
    before = {l: a.down_weight(l).clone() for l in HP.layers}
    state = entry.make_state(a, HP)
    first = entry.fn(a, REQS[:2], HP, None, state=state)
    assert all(torch.equal(a.down_weight(l), before[l]) for l in HP.layers)
    assert set(first.delta.layers) == {1, 2}
    rows = sum(r["rows"] for r in first.meta["requests"])
    assert all(state.moments[l][0] == rows and state.n_edits[l] == 2 for l in HP.layers)
    # a copy made from state_dict continues with the same bits
    copy = make_ultraedit_state(a, HP).load_state_dict(state.state_dict())
    r1 = entry.fn(a, REQS[2:], HP, None, state=state)
    r2 = entry.fn(a, REQS[2:], HP, None, state=copy)
    for l in HP.layers:
        assert torch.equal(r1.delta.layers[l].dense(F64), r2.delta.layers[l].dense(F64))
        assert all(torch.equal(x, y) for x, y in zip(state.moments[l][1:], copy.moments[l][1:]))
    # the normaliser carries history: the same batch on a fresh state gives another increment
    fresh = entry.fn(a, REQS[2:], HP, None)
    assert not torch.allclose(fresh.delta.layers[1].dense(F64), r1.delta.layers[1].dense(F64))
    # removing the last step's journal gives the statistics before it
    state.remove(r1.journal)
    after_first = make_ultraedit_state(a, HP)
    after_first.add(first.journal)
    for l in HP.layers:
        assert state.moments[l][0] == after_first.moments[l][0]
        assert torch.allclose(state.moments[l][1], after_first.moments[l][1], atol=1e-10)
        assert torch.allclose(state.moments[l][2], after_first.moments[l][2], atol=1e-8)


def test_ledger_steps_undo_and_reopen(tmp_path):
    a = tiny_adapter("gpt2")
    led = Ledger.create(tmp_path / "led", a, "ultraedit", HP)
    led.step(a, REQS[:2])
    state_one = {k: v.clone() for k, v in led.state.state_dict().items()}
    w_one = a.down_weight(1).clone()
    led.step(a, REQS[2:])
    assert not torch.equal(a.down_weight(1), w_one)
    led.undo()
    led.apply_to(a)
    assert torch.allclose(a.down_weight(1), w_one, atol=1e-6)
    for k, v in led.state.state_dict().items():
        assert torch.allclose(v.to(F64), state_one[k].to(F64), atol=1e-8), k
    led.close()
    reopened = Ledger.open(tmp_path / "led")
    loaded = reopened.load_state(tiny_adapter("gpt2"))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, led.state.state_dict()[k]), k


def test_hparams_are_validated():
    with pytest.raises(HParamsError, match="lr"):
        UltraEditHParams(lr=0.0)
    with pytest.raises(HParamsError, match="positions"):
        UltraEditHParams(positions="answer")
    with pytest.raises(HParamsError, match="layers"):
        UltraEditHParams(layers=[1, 1])


def test_lifelong_cli_on_the_testbed(tmp_path):
    from typer.testing import CliRunner

    from superedit.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["lifelong", "--methods", "ultraedit", "--edits", "6", "--eval-every", "6",
                                   "--probe-n", "10", "--out", str(out), "--no-report", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["profile"] == "testbed-small" and summary["methods"]["ultraedit"]["n_edits"] == 6
    assert summary["hparams"]["ultraedit"] == UltraEditHParams.from_dict(summary["hparams"]["ultraedit"]).to_dict()
    led = Ledger.open(out / "ultraedit" / "ledger")
    assert len(led.edits) == 6 and led.method == "ultraedit"
    steps = [json.loads(line) for line in (out / "ultraedit" / "steps.jsonl").read_text().splitlines()]
    assert sorted(s["start"] for s in steps if "success" in s) == list(range(6))  # every edit scored
