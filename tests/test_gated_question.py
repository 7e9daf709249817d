"""gated's question gate (``question_layer``): an entry acts only where its subject was named AND its
question is being asked, and adds its value at the question's last token (editing/methods/gated.py)."""

import pytest
import torch

from helpers import corpus_cov, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.hparams import GatedHParams, HParamsError
from superedit.editing.methods.gated import (gated_step, install_memory, installed_gate, make_gated_state,
                                             remove_memory)
from superedit.editing.values import optimize_values
from superedit.lifelong.ledger import Ledger
from superedit.models import Trace

FAST = dict(v_num_grad_steps=8, n_prefixes=0, kl_factor=0.0)
SUBJECT_LAYER, QUESTION_LAYER = 1, 2


def _keys(adapter, text, layer):
    ids = adapter.tokenizer(text, return_tensors="pt")["input_ids"]
    with Trace(adapter, reads=[("key", layer)], stop_after=True) as tr, torch.no_grad():
        adapter.model(input_ids=ids)
    return ids, tr["key", layer][0]


def _memory(adapter, text, subject_pos, tau_question=0.99):
    """One entry: subject key of ``text`` at ``subject_pos`` (layer 1), question key at its last token
    (layer 2), a random value; τ 0.99 on both so only those very keys match."""
    hp = GatedHParams(layers=[SUBJECT_LAYER], tau=0.99, question_layer=QUESTION_LAYER, tau_question=tau_question,
                      **FAST)
    mem = make_gated_state(adapter, hp, corpus_cov(adapter, [SUBJECT_LAYER, QUESTION_LAYER]))
    _, ks = _keys(adapter, text, SUBJECT_LAYER)
    _, kq = _keys(adapter, text, QUESTION_LAYER)
    mem.add({"layer.1.keys": ks[subject_pos][None], "layer.1.values": torch.randn(1, adapter.d_model) * 5,
             "layer.1.uid": torch.tensor([0]), "question.2.keys": kq[-1][None, None]})
    mem.ensure_whitening(None)
    return mem


@pytest.mark.parametrize("bad, match", [({"question_layer": 1}, "deeper than the subject gate"),
                                        ({"question_layer": 0}, "deeper than the subject gate"),
                                        ({"question_layer": 2, "kl_factor": 0.1}, "kl_factor"),
                                        ({"question_layer": 2, "kl_factor": 0, "preserve_factor": 1.0},
                                         "preserve_factor"),
                                        ({"question_layer": 2, "kl_factor": 0, "tau_question": 1.0},
                                         "tau_question")])
def test_question_gate_hparams_are_checked(bad, match):
    with pytest.raises(HParamsError, match=match):
        GatedHParams(layers=[1], **bad)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_entry_fires_only_at_its_question_after_its_subject(family):
    adapter = tiny_adapter(family)
    text = "Anna Berg was born in"
    ids, _ = _keys(adapter, text, SUBJECT_LAYER)
    subject_pos = len(adapter.tokenizer("Anna Berg")["input_ids"]) - 1
    mem = _memory(adapter, text, subject_pos)
    install_memory(adapter, mem, record=True)
    try:
        gate = installed_gate(adapter, SUBJECT_LAYER)
        with torch.no_grad():
            edited = adapter.model(input_ids=ids).logits
        fire = gate.last_fire[0]
        assert fire.tolist() == [False] * (ids.shape[1] - 1) + [True]  # the question's last token only
        assert torch.equal(gate.seen[0, :, 0], torch.arange(ids.shape[1]) >= subject_pos)
        # the question without its subject before it: the question key may match, the subject was not named
        other_ids = adapter.tokenizer("Toko Yasuda was born in", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            adapter.model(input_ids=other_ids)
        assert not bool(gate.last_fire.any())
    finally:
        remove_memory(adapter, SUBJECT_LAYER)
    with torch.no_grad():
        plain = adapter.model(input_ids=ids).logits
    # the value enters at the last token only: every earlier position computes what the unedited model does
    assert torch.equal(edited[0, :-1], plain[0, :-1]) and not torch.allclose(edited[0, -1], plain[0, -1])
    assert not installed_gate(adapter, SUBJECT_LAYER) and not adapter.site_module("key", QUESTION_LAYER)._forward_hooks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_kv_cache_continuation_remembers_the_subject(family):
    """As ``generate`` does: the subject in the first call, the question's last token in the second, which
    resumes the first call's cache; the logits equal the full forward's."""
    from transformers import DynamicCache

    from superedit.editing.values import _cache_kwarg

    adapter = tiny_adapter(family)
    text = "Anna Berg was born in"
    ids, _ = _keys(adapter, text, SUBJECT_LAYER)
    mem = _memory(adapter, text, len(adapter.tokenizer("Anna Berg")["input_ids"]) - 1)
    install_memory(adapter, mem)
    try:
        with torch.no_grad():
            full = adapter.model(input_ids=ids).logits
            cache, name = DynamicCache(), _cache_kwarg(adapter.model)
            adapter.model(input_ids=ids[:, :-1], use_cache=True, **{name: cache})
            rest = adapter.model(input_ids=ids[:, -1:], use_cache=True, **{name: cache}).logits
            assert installed_gate(adapter, SUBJECT_LAYER).last_fire[0, 0]
            # a fresh cache the gate did not see filled: nothing carried, the subject was not named in it
            adapter.model(input_ids=ids[:, :-1], use_cache=True, **{name: DynamicCache()})
            alone = adapter.model(input_ids=ids[:, -1:]).logits
            assert not installed_gate(adapter, SUBJECT_LAYER).last_fire.any()
    finally:
        remove_memory(adapter, SUBJECT_LAYER)
    assert torch.allclose(rest, full[:, -1:], atol=1e-5) and alone.shape == rest.shape


def test_state_dict_round_trip_keeps_the_question_keys():
    adapter = tiny_adapter("llama")
    mem = _memory(adapter, "Anna Berg was born in", 2)
    again = make_gated_state(adapter, mem.hparams).load_state_dict(mem.state_dict())
    for k, v in mem.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert "question.2.keys" in mem.state_dict() and "question.2.whiten" in mem.state_dict()
    missing = {k: v for k, v in mem.state_dict().items() if not k.startswith("question.2.keys")}
    with pytest.raises(ValueError, match="no 'question.2.keys'"):
        make_gated_state(adapter, mem.hparams).load_state_dict(missing)
    from superedit.errors import SupereditError
    with pytest.raises(SupereditError, match="carry no 'question.2.keys'"):
        mem.add({"layer.1.keys": torch.zeros(1, adapter.d_mlp), "layer.1.values": torch.zeros(1, adapter.d_model),
                 "layer.1.uid": torch.tensor([5])})
    mem.remove({"layer.1.uid": torch.tensor([0])})
    assert len(mem) == 0 and mem.qkeys.shape[0] == 0


def test_v_star_at_the_last_token_starts_from_that_tokens_value():
    """``delta_at="last"``: v₀ is the value site's output at the prompt's last token (not the subject's)."""
    adapter = tiny_adapter("llama")
    hp = GatedHParams(layers=[SUBJECT_LAYER], **FAST)
    res = optimize_values(adapter, [("{} was born in", "Anna Berg", "Paris")], QUESTION_LAYER, "value", hp, [""],
                          delta_at="last", exact=True)[0]
    ids = adapter.tokenizer("Anna Berg was born in", return_tensors="pt")["input_ids"]
    with Trace(adapter, reads=[("value", QUESTION_LAYER)], stop_after=True) as tr, torch.no_grad():
        adapter.model(input_ids=ids)
    assert torch.allclose(res.init, tr["value", QUESTION_LAYER][0, -1], atol=1e-6)
    assert res.nll_history[-1] < res.nll_history[0]
    with pytest.raises(ValueError, match="delta_at"):
        optimize_values(adapter, [("{} was born in", "Anna Berg", "Paris")], QUESTION_LAYER, "value", hp, [""],
                        delta_at="middle")


def test_question_gated_edits_through_a_ledger(tmp_path):
    """Two edits of one subject on two questions: each lowers its target's NLL, each entry fires on its
    own question only, text without the subject is unchanged, and undoing the second restores the first
    step's model exactly."""
    adapter = tiny_adapter("llama")
    stats = corpus_cov(adapter, [SUBJECT_LAYER, QUESTION_LAYER])
    hp = GatedHParams(layers=[SUBJECT_LAYER], tau=0.6, question_layer=QUESTION_LAYER, tau_question=0.95, v_lr=0.5,
                      **FAST)
    reqs = [EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris", target_true="Oslo",
                        case_id=0),
            EditRequest(prompt="{} works as a", subject="Anna Berg", target_new="piano", target_true="guitar",
                        case_id=1)]
    texts = ["Anna Berg was born in", "Anna Berg works as a", "The river flows to the sea"]

    def logits():
        enc = adapter.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
        with torch.no_grad():
            return adapter.model(**enc).logits

    before = logits()
    led = Ledger.create(tmp_path / "ledger", adapter, "gated", hp)
    led.apply_to(adapter)
    s1 = led.step(adapter, reqs[:1], stats)
    after_one = logits()
    s2 = led.step(adapter, reqs[1:], stats)
    for _, res in (s1, s2):
        assert all(v["v_nll_end"] < v["v_nll_start"] for v in res.meta["requests"])
        assert "question.2.keys" in res.journal
    led.apply_to(adapter)
    gate = installed_gate(adapter, SUBJECT_LAYER)
    install_memory(adapter, led.state, record=True)
    gate = installed_gate(adapter, SUBJECT_LAYER)
    after = logits()
    fired = gate.last_fire_entries  # (texts, seq, entries)
    n0 = len(adapter.tokenizer(texts[0])["input_ids"])
    n1 = len(adapter.tokenizer(texts[1])["input_ids"])
    assert fired[0, :n0, 0].tolist() == [False] * (n0 - 1) + [True] and not fired[0, :, 1].any()
    assert fired[1, :n1, 1].tolist() == [False] * (n1 - 1) + [True] and not fired[1, :, 0].any()
    assert not fired[2].any()
    n2 = len(adapter.tokenizer(texts[2])["input_ids"])
    assert torch.equal(after[2, :n2], before[2, :n2])
    led.undo(1)
    led.apply_to(adapter)
    assert torch.equal(logits(), after_one)
    remove_memory(adapter, SUBJECT_LAYER)


def test_a_padding_token_never_counts_as_naming_the_subject():
    """A padded position whose key matches an entry's subject key (identity whitening, unit keys) does
    not name the subject where the forward's attention mask says it is padding."""
    from superedit.editing.methods.gated import _Gate, _QuestionGate

    d = 6
    a, b, c = torch.eye(d)[:3]
    eye = torch.eye(d, dtype=torch.float64)
    subject = _Gate(eye, a[None], torch.ones(1, 2), 0.9, "cpu")
    gate = _QuestionGate(subject, eye, c[None, None], torch.ones(1, 2), 0.9, "cpu")
    x = torch.stack([a, b, c])[None]  # (1, 3, d): the subject's key at position 0, the question's at 2

    def run(mask):
        gate.on_model_call(None, (), {} if mask is None else {"attention_mask": mask})
        gate.on_subject(None, (x,), None)
        return gate(None, (x,), torch.zeros(1, 3, 2))

    assert run(None)[0, 2].tolist() == [1.0, 1.0] and gate.seen[0, :, 0].tolist() == [True, True, True]
    assert run(torch.tensor([[1, 1, 1]]))[0, 2].tolist() == [1.0, 1.0]
    assert run(torch.tensor([[0, 1, 1]])) is None and not bool(gate.seen.any())  # position 0 is padding
    # a mask that also covers cached positions (past + seq): its last seq columns apply
    assert run(torch.tensor([[1, 1, 0, 1, 1]])) is None
