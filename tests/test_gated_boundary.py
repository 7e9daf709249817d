"""gated's name-boundary test (editing/boundary.py): an entry stays out of a longer name that starts with
its subject ("Adobe Flash" in "Adobe Flash Player"), decided by a linear test on the next token's key."""

import json

import pytest
import torch

from helpers import corpus_cov, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.boundary import NameBoundary, boundary_examples, fit_boundary, prompts_with_subjects
from superedit.editing.hparams import GatedHParams, HParamsError
from superedit.editing.methods.gated import entries_active, make_gated_state, whitening_factor
from superedit.errors import UsageError
from superedit.lifelong.ledger import Ledger
from superedit.models import Trace, encode_prompts

LAYER = 1
FAST = dict(v_num_grad_steps=4, n_prefixes=0, context_lengths=[3])


def _z(adapter, L_inv, texts):
    """Whitened unit keys at LAYER (batch, seq, d_mlp) of right-padded texts, and the attention mask."""
    enc = adapter.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    with Trace(adapter, reads=[("key", LAYER)]) as tr:
        adapter.model(**enc)
    z = tr["key", LAYER].float() @ L_inv.float().T
    return z / z.norm(dim=-1, keepdim=True), enc


def test_fit_boundary_separates_two_clusters_and_needs_both_labels():
    g = torch.Generator().manual_seed(0)
    d = 16
    a, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    z = torch.cat([a + 0.1 * torch.randn(40, d, generator=g), b + 0.1 * torch.randn(10, d, generator=g)])
    z = z / z.norm(dim=1, keepdim=True)
    y = torch.cat([torch.ones(40), torch.zeros(10)])
    test = fit_boundary(z, y, l2=1e-4, threshold=0.5)
    assert torch.equal(test.continues(z), y.bool())  # the unequal class sizes do not tip it
    with pytest.raises(ValueError, match="both labels"):
        fit_boundary(z[:40], y[:40])


def test_boundary_examples_label_the_tokens_inside_a_subject_and_the_one_after_it():
    adapter = tiny_adapter("llama")
    L_inv = whitening_factor(corpus_cov(adapter, [LAYER]).mom2(LAYER), 1e-3, LAYER)
    reqs = [EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris", case_id=0,
                        paraphrase_prompts=["The river flows. Anna Berg lives in"]),
            EditRequest(prompt="{} is located in", subject="Eiffel Tower", target_new="Oslo", case_id=1)]
    prompts, subjects, owner = prompts_with_subjects(reqs)
    assert owner == [0, 0, 1] and prompts[0] == "Anna Berg was born in"
    z, y, group = boundary_examples(adapter, reqs, LAYER, L_inv, negatives="after")
    b = encode_prompts(adapter.tokenizer, prompts, subjects, padding_side="right", filled=True)
    inside = sum(b.subject_last[i] - b.subject_first[i] for i in range(3))
    assert int(y.sum()) == inside and int((y == 0).sum()) == 3  # each prompt goes on after its subject
    assert z.shape == (inside + 3, adapter.d_mlp) and torch.allclose(z.norm(dim=1), torch.ones(len(z)))
    z_text, y_text, _ = boundary_examples(adapter, reqs, LAYER, L_inv, negatives="text")
    later = sum(b.last_token[i] - b.subject_last[i] for i in range(3))  # every token after each subject
    assert int(y_text.sum()) == inside and int((y_text == 0).sum()) == later > 3
    with pytest.raises(ValueError, match="negatives"):
        boundary_examples(adapter, reqs, LAYER, L_inv, negatives="all")
    zz, enc = _z(adapter, L_inv, prompts[:1])
    first_row = zz[0, b.subject_first[0] + 1: b.subject_last[0] + 2]  # the in-name tokens, then the one after
    assert torch.allclose(z[:len(first_row)], first_row, atol=1e-5)
    assert group.tolist()[:len(first_row)] == [0] * len(first_row)


@pytest.fixture(scope="module")
def flash():
    """An entry keyed on "Anna Berg"'s last token, and a boundary test that reads " Paris" after it as a
    name going on (crafted from the keys, so exactly that token passes)."""
    adapter = tiny_adapter("llama")
    L_inv = whitening_factor(corpus_cov(adapter, [LAYER]).mom2(LAYER), 1e-3, LAYER)
    texts = ["Anna Berg was born in", "Anna Berg Paris was born in", "Anna Berg"]
    b = encode_prompts(adapter.tokenizer, texts, ["Anna Berg"] * 3, padding_side="right", filled=True)
    pos = b.subject_last[0]
    assert b.subject_last == [pos] * 3
    z, enc = _z(adapter, L_inv, texts)
    w = z[1, pos + 1]  # " Paris" after the subject
    scores = z @ w
    scores[1, pos + 1] = -2
    others = float(scores[enc["attention_mask"].bool()].max())
    assert others < 0.99
    bias = -(1.0 + others) / 2  # logit 0 midway between " Paris" (z·w = 1) and every other token
    test = NameBoundary(w.clone(), bias, threshold=0.5)
    assert test.continues(z[1, pos + 1]) and not test.continues(z[0, pos + 1])
    with Trace(adapter, reads=[("key", LAYER)]) as tr:
        adapter.model(**adapter.tokenizer(texts[:1], return_tensors="pt"))
    key = tr["key", LAYER][0, pos:pos + 1]
    delta = torch.randn(1, adapter.d_model, generator=torch.Generator().manual_seed(0))
    return adapter, L_inv, texts, pos, key, delta, test


def _fires(adapter, L_inv, key, delta, test, texts, padding_side="right"):
    with entries_active(adapter, LAYER, L_inv, key, delta, 0.99, boundary=test) as gate:
        enc = adapter.tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side)
        with torch.no_grad():
            adapter.model(**enc)
        return gate.last_fire & enc["attention_mask"].bool()


def test_an_entry_stays_out_of_a_longer_name_and_acts_where_its_name_ends(flash):
    adapter, L_inv, texts, pos, key, delta, test = flash
    fire = _fires(adapter, L_inv, key, delta, test, texts)
    assert fire[0].nonzero().flatten().tolist() == [pos]  # "Anna Berg was": the name ended, the entry acts
    assert not fire[1].any()  # "Anna Berg Paris": the next token goes on with the name
    # the text ends at the subject: no next token in this forward, decided without the test; its right
    # padding continues nothing
    assert fire[2].nonzero().flatten().tolist() == [pos]
    without = NameBoundary(test.weight, test.bias, threshold=0.999999)  # a test that never says "goes on"
    assert _fires(adapter, L_inv, key, delta, without, texts)[1, pos]  # the same key fires without the test


def test_left_padding_and_a_remembered_call_give_the_same_decisions(flash):
    adapter, L_inv, texts, pos, key, delta, test = flash
    left = _fires(adapter, L_inv, key, delta, test, texts, padding_side="left")
    right = _fires(adapter, L_inv, key, delta, test, texts)
    assert left.sum(1).tolist() == right.sum(1).tolist() == [1, 0, 1]
    with entries_active(adapter, LAYER, L_inv, key, delta, 0.99, boundary=test) as gate:
        enc = adapter.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
        outs = []
        for _ in range(2):
            with torch.no_grad():
                outs.append(adapter.model(**enc).logits)
            assert gate.last_fire.sum(1).tolist()[:2] == [1, 0]
        assert gate.memo_hit and torch.equal(outs[0], outs[1])


def _request_file(tmp_path):
    reqs = [{"prompt": "{} was born in", "subject": "Anna Berg", "target_new": "Paris",
             "paraphrase_prompts": ["The river flows. Anna Berg lives in"]},
            {"prompt": "{} is located in", "subject": "Eiffel Tower", "target_new": "Oslo"}]
    f = tmp_path / "tune.json"
    f.write_text(json.dumps(reqs))
    return f


def test_a_ledger_learns_the_test_once_keeps_it_in_its_state_and_restores_it(tmp_path):
    adapter = tiny_adapter("llama")
    stats = corpus_cov(adapter, [LAYER])
    hp = GatedHParams(layers=[LAYER], tau=0.6, boundary_requests=str(_request_file(tmp_path)), **FAST)
    led = Ledger.create(tmp_path / "ledger", adapter, "gated", hp)
    led.apply_to(adapter)
    led.step(adapter, [EditRequest(prompt="{} works as a", subject="Anna Berg", target_new="piano", case_id=0)], stats)
    test = led.state.boundary
    assert test is not None and test.weight.shape == (adapter.d_mlp,) and test.threshold == hp.boundary_threshold
    led.step(adapter, [EditRequest(prompt="{} is located in", subject="Eiffel Tower", target_new="Oslo", case_id=1)],
             stats)
    assert led.state.boundary is test  # learned once
    texts = ["Anna Berg works as a", "Anna Berg Paris works as a", "The river flows"]
    enc = adapter.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        here = adapter.model(**enc).logits
    fresh = tiny_adapter("llama")
    reopened = Ledger.open(led.dir)
    reopened.apply_to(fresh)  # the test comes from the state file, not from boundary_requests
    assert torch.equal(reopened.state.boundary.weight, test.weight) and reopened.state.boundary.bias == test.bias
    with torch.no_grad():
        assert torch.equal(fresh.model(**enc).logits, here)
    sd = led.state.state_dict()
    bad = dict(sd, **{f"layer.{LAYER}.boundary.weight": test.weight[:3]})
    with pytest.raises(ValueError, match="name-boundary weight"):
        make_gated_state(adapter, hp).load_state_dict(bad)


def test_an_unreadable_or_one_sided_boundary_file_is_refused_naming_the_field(tmp_path):
    adapter = tiny_adapter("llama")
    stats = corpus_cov(adapter, [LAYER])
    req = [EditRequest(prompt="{} works as a", subject="Anna Berg", target_new="piano", case_id=0)]
    for content, match in [(None, "cannot be read"), ([{"prompt": "{} was born in", "subject": "Anna", "target_new": "x"}],
                                                       "both labels")]:
        f = tmp_path / "b.json"
        if content is None:
            f.unlink(missing_ok=True)
        else:
            f.write_text(json.dumps(content))
        state = make_gated_state(adapter, GatedHParams(layers=[LAYER], boundary_requests=str(f), **FAST), stats)
        state.ensure_whitening(stats)
        with pytest.raises(UsageError, match=f"boundary_requests.*{match}"):
            state.ensure_boundary(adapter)
        assert state.boundary is None


@pytest.mark.parametrize("bad, match", [({"boundary_threshold": 1.0}, "boundary_threshold"),
                                        ({"boundary_threshold": 0.0}, "boundary_threshold"),
                                        ({"boundary_l2": 0.0}, "boundary_l2")])
def test_boundary_hparams_are_checked(bad, match):
    with pytest.raises(HParamsError, match=match):
        GatedHParams(**bad)
