"""gated: lifelong edits as key–value entries behind a whitening-cosine gate (editing/methods/gated.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FAMILIES, corpus_cov, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.hparams import GatedHParams, HParamsError
from superedit.editing.methods import get_method
from superedit.editing.methods.gated import (entries_active, gated_step, installed_gate,
                                             make_gated_state, remove_memory, subject_rounds, whitening_factor)
from superedit.editing.run import run_edits
from superedit.errors import SupereditError
from superedit.lifelong.ledger import Ledger, LedgerError
from superedit.models import Trace

FAST = dict(v_num_grad_steps=6, n_prefixes=1, context_lengths=[3])
REQS = [EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris", target_true="Oslo", case_id=0),
        EditRequest(prompt="{} is located in", subject="Eiffel Tower", target_new="Oslo", target_true="Paris", case_id=1),
        EditRequest(prompt="{} works as a", subject="Anna Berg", target_new="piano", target_true="guitar", case_id=2)]
FOREIGN = ["The river flows to the sea", "Toko Yasuda plays the guitar"]


def _logits(adapter, texts):
    enc = adapter.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        return adapter.model(**enc).logits


@given(st.lists(st.sampled_from("abcd"), max_size=12))
@settings(max_examples=60, deadline=None)
def test_subject_rounds_split_repeats_and_keep_order(subjects):
    rounds = subject_rounds(subjects)
    assert sorted(i for r in rounds for i in r) == list(range(len(subjects)))
    for r in rounds:
        assert len({subjects[i] for i in r}) == len(r)  # a subject at most once per round
    for s in set(subjects):  # a subject's requests in their order, one per round from the first
        where = [k for k, r in enumerate(rounds) for i in r if subjects[i] == s]
        assert where == list(range(len(where)))


@pytest.mark.parametrize("family", FAMILIES)
def test_an_entry_acts_exactly_where_its_key_matches(family):
    """The gate adds δ at a token whose key is the entry's key (cosine 1) and leaves every token whose
    cosine is at most τ bit-exact — on every family's down-projection."""
    adapter = tiny_adapter(family)
    layer, pos = 1, 2
    stats = corpus_cov(adapter, [layer])
    texts = ["Anna Berg was born in", *FOREIGN]
    with Trace(adapter, reads=[("key", layer), ("value", layer)]) as plain:
        before = _logits(adapter, texts)
    K = plain["key", layer]  # (batch, seq, d_mlp), padding included
    delta = torch.randn(1, adapter.d_model, generator=torch.Generator().manual_seed(0))
    L_inv = whitening_factor(stats.mom2(layer), 1e-3, layer)
    z = K.double() @ L_inv.T
    z = z / z.norm(dim=-1, keepdim=True)
    cos = z @ z[0, pos]
    cos[0, pos] = -1
    tau = float(cos.max()) + 1e-3  # only token (0, pos) fires
    assert tau < 1
    with entries_active(adapter, layer, L_inv, K[0, pos:pos + 1], delta, tau):
        with Trace(adapter, reads=[("value", layer)]) as gated:
            after = _logits(adapter, texts)
    assert not adapter.site_module("key", layer)._forward_hooks  # the hook is removed
    diff = gated["value", layer] - plain["value", layer]
    assert torch.allclose(diff[0, pos], delta[0].to(diff.dtype), atol=1e-5)
    diff[0, pos] = 0
    assert torch.equal(diff, torch.zeros_like(diff))  # every other token of the layer: bit-exact
    assert torch.equal(after[1:], before[1:]) and torch.equal(after[0, :pos], before[0, :pos])
    assert not torch.equal(after[0, pos:], before[0, pos:])


def test_memory_add_remove_and_state_dict_round_trip():
    adapter = tiny_adapter("llama")
    hp = GatedHParams(layers=[1], tau=0.5, **FAST)
    mem = make_gated_state(adapter, hp)
    g = torch.Generator().manual_seed(0)

    def journal(uids):
        n = len(uids)
        return {"layer.1.keys": torch.randn(n, adapter.d_mlp, generator=g),
                "layer.1.values": torch.randn(n, adapter.d_model, generator=g),
                "layer.1.uid": torch.tensor(uids)}

    j0, j1 = journal([0, 1]), journal([2])
    mem.add(j0)
    mem.add(j1)
    assert len(mem) == 3 and mem.next_uid() == 3
    with pytest.raises(SupereditError, match="in the memory already"):
        mem.add(j1)
    mem.remove(j0)  # any edit comes out exactly
    assert mem.uid.tolist() == [2] and torch.equal(mem.values, j1["layer.1.values"])
    mem.add(j0)  # and goes back in uid order
    assert mem.uid.tolist() == [0, 1, 2] and torch.equal(mem.keys[:2, 0, 0], j0["layer.1.keys"])  # (n, d) = 1 context, 1 token
    with pytest.raises(SupereditError, match="context keys"):
        mem.add({**journal([7]), "layer.1.keys": torch.zeros(1, 3, adapter.d_mlp)})
    with pytest.raises(SupereditError, match="needs the key covariance"):
        mem.ensure_whitening(None)
    mem.whiten = torch.eye(adapter.d_mlp, dtype=torch.float64)
    again = make_gated_state(adapter, hp).load_state_dict(mem.state_dict())
    for k, v in mem.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert again.total_delta(1) is None
    bad = dict(mem.state_dict(), **{"layer.1.values": mem.values[:, :3]})
    with pytest.raises(ValueError, match="do not match"):
        make_gated_state(adapter, hp).load_state_dict(bad)


@pytest.fixture(scope="module", params=[1, 3], ids=["one-token", "three-token"])
def gated_run(tmp_path_factory, request):
    adapter = tiny_adapter("llama")
    stats = corpus_cov(adapter, [1])
    # no generated prefixes: k* is the key of the prompt itself, so the gate surely fires there
    hp = GatedHParams(layers=[1], tau=0.6, v_lr=0.2, gate_tokens=request.param, **{**FAST, "n_prefixes": 0})
    before = _logits(adapter, [r.prompt.format(r.subject) for r in REQS] + FOREIGN)
    W0 = adapter.down_weight(1).clone()
    led = Ledger.create(tmp_path_factory.mktemp("gated") / "ledger", adapter, "gated", hp)
    led.apply_to(adapter)
    steps = [led.step(adapter, REQS[:2], stats), led.step(adapter, REQS[2:], stats)]
    return adapter, stats, hp, led, steps, before, W0


def test_gated_edits_through_a_ledger_and_leaves_weights_and_foreign_text_alone(gated_run):
    adapter, stats, hp, led, steps, before, W0 = gated_run
    assert torch.equal(adapter.down_weight(1), W0)  # the weights never change
    assert all(not s[1].delta.layers for s in steps)
    assert len(led.state) == 3 and steps[1][1].meta["memory_entries"] == 3
    after = _logits(adapter, [r.prompt.format(r.subject) for r in REQS] + FOREIGN)
    # every edit's v* lowered its target's NLL, and its entry fires on its own prompt (the tiny random model's
    # target probabilities move too little for an efficacy check: the real-model tier measures that)
    for _, res in steps:
        assert all(v["v_nll_end"] < v["v_nll_start"] for v in res.meta["requests"])
    gate = installed_gate(adapter, 1)
    for r in REQS:
        fired = gate.fired
        _logits(adapter, [r.prompt.format(r.subject)])
        assert gate.fired > fired and int(gate.last_fire.sum()) == gate.fired - fired, r
    tok = adapter.tokenizer
    for i in range(len(FOREIGN)):  # text that matches no entry's key is computed exactly as before
        row = len(REQS) + i
        n = len(tok(FOREIGN[i])["input_ids"])
        assert torch.equal(after[row, :n], before[row, :n])


def test_a_fresh_model_with_the_ledger_applied_computes_the_same(gated_run):
    adapter, stats, hp, led, steps, before, W0 = gated_run
    texts = [r.prompt.format(r.subject) for r in REQS] + FOREIGN
    b = tiny_adapter("llama")
    reopened = Ledger.open(led.dir)
    reopened.apply_to(b)  # no stats: the whitening factor comes from the state file
    assert torch.equal(_logits(b, texts), _logits(adapter, texts))
    remove_memory(b, 1)
    assert installed_gate(b, 1) is None and torch.allclose(_logits(b, texts), before)


def test_any_gated_edit_can_be_undone_and_redone(gated_run, tmp_path):
    adapter, stats, hp, led, steps, before, W0 = gated_run
    import shutil

    shutil.copytree(led.dir, tmp_path / "ledger", ignore=shutil.ignore_patterns("lock"))
    with Ledger.open(tmp_path / "ledger", lock=True) as copy:
        b = tiny_adapter("llama")
        copy.load_state(b)
        copy.undo(0)  # not the last: gated's entries are independent
        assert copy.state.uid.tolist() == [2]
        copy.redo(0)
        assert copy.state.uid.tolist() == [0, 1, 2]
        assert torch.equal(copy.state.values, led.state.values)


def test_gated_is_refused_where_only_weight_deltas_are_applied(gated_run, tmp_path):
    adapter, stats, hp, led, steps, before, W0 = gated_run
    with pytest.raises(SupereditError, match="run it through a ledger"):
        run_edits(tiny_adapter("llama"), REQS[:1], "gated", hp, stats)
    with pytest.raises(LedgerError, match="not in the weights"):
        led.export(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SupereditError, match="edits weights"):
        get_method("rome").install(adapter, None)


def test_same_subject_requests_of_one_batch_build_on_each_other():
    """The second edit of a subject in a batch is optimised with the first one's entry acting."""
    adapter = tiny_adapter("llama")
    stats = corpus_cov(adapter, [1])
    hp = GatedHParams(layers=[1], tau=0.6, v_lr=1.0, **FAST)
    calls = []
    import superedit.editing.methods.gated as gated

    real = gated.optimize_values

    def spy(adapter, items, *a, **k):
        calls.append((len(items), installed := [h for h in adapter.site_module("key", 1)._forward_hooks.values()]))
        calls[-1] = (len(items), len(installed[0].values) if installed else 0)
        return real(adapter, items, *a, **k)

    gated.optimize_values = spy
    try:
        res = gated_step(adapter, REQS, hp, stats)
    finally:
        gated.optimize_values = real
    assert calls == [(2, 0), (1, 2)]  # round 1: both subjects, nothing acting; round 2: the first round's entries
    assert res.journal["layer.1.uid"].tolist() == [0, 1, 2]
    assert not adapter.site_module("key", 1)._forward_hooks


@pytest.mark.parametrize("bad, match", [({"layers": [1, 2]}, "exactly one layer"), ({"tau": 1.0}, "tau"),
                                        ({"norm_anchor": 80.0}, "norm anchor does not apply")])
def test_gated_hparams_are_checked(bad, match):
    with pytest.raises(HParamsError, match=match):
        GatedHParams(**bad)


def test_cli_edit_refuses_gated_without_sequential_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from superedit.cli import app

    res = CliRunner().invoke(app, ["edit", "--method", "gated", "--model", str(tmp_path / "no-such-model"),
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code != 0
    assert "run it through a ledger" in " ".join(res.output.split())  # not a model-loading error: refused first
    assert not (tmp_path / "out").exists()


class _FakeCache:
    """Stands in for a KV cache: the gate asks only its length and its identity."""

    def __init__(self, n: int = 0):
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


def _gate_on(keys, valid, calls):
    """Run ``_Gate`` (identity whitening, τ 0.9) over ``calls``: [(cache, (seq, d) keys)], one row each,
    each call filling its cache; the positions where the entry fired, per call."""
    from superedit.editing.methods.gated import _Gate

    d = keys.shape[-1]
    gate = _Gate(torch.eye(d, dtype=torch.float64), keys[None, None], torch.ones(1, 2), 0.9, "cpu", valid[None, None])
    out = []
    for call in calls:
        cache, k, pos = (*call, None) if len(call) == 2 else call
        gate.on_model_call(None, (), {"past_key_values": cache, "position_ids": pos})
        gate(None, (k[None],), torch.zeros(1, k.shape[0], 2))
        cache.n += k.shape[0]  # the forward fills its cache
        out.append(torch.nonzero(gate.last_fire[0]).flatten().tolist())
    return out


def test_a_multi_token_entry_fires_only_after_its_subjects_earlier_tokens():
    a, b, c = torch.eye(8)[:3]
    entry, both = torch.stack([c, b]), torch.tensor([True, True])  # subject "… b c": last c, before it b
    fresh = lambda k: (_FakeCache(0), k)
    assert _gate_on(entry, both, [fresh(torch.stack([a, b, c])), fresh(torch.stack([a, a, c])),
                                  fresh(torch.stack([c, b, c]))]) == [[2], [], [2]]
    assert _gate_on(entry, both, [fresh(c[None])]) == [[]]  # a fresh text's first token has nothing before it
    # a one-token subject (no valid earlier key) fires on its last token alone
    assert _gate_on(entry, torch.tensor([True, False]), [fresh(torch.stack([a, a, c]))]) == [[2]]
    # a forward that resumes the cache the previous call filled reads that call's tokens
    cache = _FakeCache(0)
    first = (cache, torch.stack([a, b]))
    assert _gate_on(entry, both, [first, (cache, c[None])]) == [[], [0]]
    other = _FakeCache(0)
    assert _gate_on(entry, both, [(other, torch.stack([a, a])), (other, c[None])]) == [[], []]
    # resuming a cache it did not see filled (a copy): the hidden token counts as matching
    assert _gate_on(entry, both, [(_FakeCache(0), torch.stack([a, a])), (_FakeCache(2), c[None])]) == [[], [0]]
    # a one-token text then its continuation: the history reaches the text's start, nothing is before it
    short = _FakeCache(0)
    assert _gate_on(torch.stack([c, b, a]), torch.ones(3, dtype=torch.bool),
                    [(short, b[None]), (short, c[None])]) == [[], []]
    assert _gate_on(torch.stack([c, b, a]), torch.ones(3, dtype=torch.bool),
                    [(short, b[None]), (_FakeCache(1), c[None])]) == [[], []]
    # a row of a left-padded cached batch (v*): its position ids say where its text starts
    assert _gate_on(entry, both, [(_FakeCache(3), c[None], torch.tensor([[0]]))]) == [[]]
    assert _gate_on(entry, both, [(_FakeCache(3), c[None], torch.tensor([[1]]))]) == [[0]]


def _multi_token_memory(adapter, text_ids, pos, before_key=None):
    """A gate_tokens-2 memory whose one entry holds the keys of ``text_ids`` at ``pos`` and ``pos − 1``
    (or ``before_key`` as the earlier one), whitened with C of the tiny corpus."""
    layer = 1
    hp = GatedHParams(layers=[layer], tau=0.9, gate_tokens=2, **FAST)
    mem = make_gated_state(adapter, hp, corpus_cov(adapter, [layer]))
    with Trace(adapter, reads=[("key", layer)], stop_after=True) as tr, torch.no_grad():
        adapter.model(input_ids=text_ids)
    k = tr["key", layer][0]
    before = k[pos - 1] if before_key is None else before_key
    mem.add({"layer.1.keys": torch.stack([k[pos], before])[None, None], "layer.1.valid": torch.ones(1, 1, 2),
             "layer.1.values": torch.randn(1, adapter.d_model, generator=torch.Generator().manual_seed(1)),
             "layer.1.uid": torch.tensor([0])})
    mem.ensure_whitening(None)
    return mem


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_kv_cache_continuation_computes_what_the_full_forward_does(family):
    """With a two-token entry firing right after the split, a forward resumed from the cache the first
    part filled (as ``generate`` does) gives the full forward's logits."""
    from superedit.editing.methods.gated import install_memory
    from superedit.editing.values import _cache_kwarg
    from transformers import DynamicCache

    adapter = tiny_adapter(family)
    ids = adapter.tokenizer("Anna Berg was born in the city of", return_tensors="pt")["input_ids"]
    split = 4
    mem = _multi_token_memory(adapter, ids, split)  # fires at token `split`, its earlier token in the cache
    install_memory(adapter, mem)
    try:
        with torch.no_grad():
            full = adapter.model(input_ids=ids).logits
            assert installed_gate(adapter, 1).last_fire[0].tolist()[split]
            cache = DynamicCache()
            name = _cache_kwarg(adapter.model)
            adapter.model(input_ids=ids[:, :split], use_cache=True, **{name: cache})
            rest = adapter.model(input_ids=ids[:, split:], use_cache=True, **{name: cache}).logits
            assert installed_gate(adapter, 1).last_fire[0, 0]
    finally:
        remove_memory(adapter, 1)
    assert torch.allclose(rest, full[:, split:], atol=1e-5)


def test_v_star_recomputes_the_tokens_a_multi_token_gate_reads():
    """v*'s fast plan (earlier positions in a KV cache) reproduces the full forward with a two-token
    entry whose last key matches the subject's last token but whose earlier key does not: with
    ``lookback`` 1 the gate sees the real earlier token; without, it cannot, and fires."""
    from dataclasses import replace

    from superedit.editing.methods.gated import install_memory
    from superedit.editing.values import _take, value_rows

    adapter = tiny_adapter("llama")
    layer, last = 1, adapter.n_layers - 1
    item = ("{} was born in", "Anna Berg", "Paris")
    nll, _, _ = value_rows(adapter, [item], [""])
    s = int(nll.subject_last[0])
    mem = _multi_token_memory(adapter, nll.input_ids[:1, :s + 1], s, before_key=torch.randn(adapter.d_mlp))
    install_memory(adapter, mem)
    try:
        with torch.no_grad(), Trace(adapter, reads=[("resid", layer - 1), ("resid", last)]) as plain:
            adapter.model(**nll.inputs())
            want = _take(plain["resid", last], nll.read_row, nll.read_col, "cpu")
            rows = replace(nll, hidden=plain["resid", layer - 1], arity=plain.arity["resid", layer - 1])
            got = {lb: rows.plan(adapter, by_split=True, lookback=lb).forward_reads(adapter, "value", layer, None, last)
                   for lb in (0, 1)}
    finally:
        remove_memory(adapter, 1)
    assert torch.allclose(got[1], want, atol=1e-4)
    assert not torch.allclose(got[0], want, atol=1e-2)  # the hidden earlier token counted as matching


def test_rows_lookback_asks_m_minus_1_only_where_a_last_key_matched_near_the_subject():
    from types import SimpleNamespace

    from superedit.editing.methods.gated import rows_lookback

    cand = torch.zeros(3, 8, dtype=torch.bool)
    cand[0, 4] = True  # at the subject's last token (4)
    cand[1, 1] = True  # before the window: that position is computed in the cached prefix, exactly
    cand[2, 7] = True  # past the window (4 .. 4 + m − 2 = 5): its m − 1 earlier tokens are recomputed anyway
    back = rows_lookback([SimpleNamespace(last_candidates=cand), SimpleNamespace(last_candidates=None)], 3)
    assert back(torch.tensor([4, 4, 4])).tolist() == [2, 0, 0]
    cand[2, 5] = True
    assert back(torch.tensor([4, 4, 4])).tolist() == [2, 0, 2]
    with pytest.raises(RuntimeError, match="rows"):
        back(torch.tensor([4, 4]))
