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


def test_right_padding_after_a_subject_never_reads_as_the_name_going_on(flash):
    """A test that would read the pad's key as "continues": the padded row still fires where its text ends."""
    adapter, L_inv, texts, pos, key, delta, test = flash
    z, enc = _z(adapter, L_inv, texts)
    mask = enc["attention_mask"].bool()
    assert not mask[2, pos + 1]  # "Anna Berg" is right-padded after its subject
    w = z[2, pos + 1]
    real = float((z @ w)[mask].max())
    assert real < 0.99
    pads_go_on = NameBoundary(w.clone(), -(1.0 + real) / 2, threshold=0.5)
    assert pads_go_on.continues(z[2, pos + 1]) and not pads_go_on.continues(z[mask]).any()
    fire = _fires(adapter, L_inv, key, delta, pads_go_on, texts)
    assert fire[2].nonzero().flatten().tolist() == [pos]


def test_a_kv_cache_split_decides_as_the_whole_text_unless_it_falls_right_after_the_subject(flash):
    """Calls that resume a KV cache see the same next tokens as the full forward except at their own
    last token: split after " Paris" the entry stays silent as in the full text; split right after
    "Berg" the first call decides "Berg" without " Paris" and fires (the documented limit)."""
    from transformers import DynamicCache

    from superedit.editing.values import _cache_kwarg

    adapter, L_inv, texts, pos, key, delta, test = flash
    ids = adapter.tokenizer(texts[1], return_tensors="pt")["input_ids"]
    name = _cache_kwarg(adapter.model)
    with torch.no_grad(), entries_active(adapter, LAYER, L_inv, key, delta, 0.99, boundary=test) as gate:
        full = adapter.model(input_ids=ids).logits
        assert not gate.last_fire.any()
        for split, fires_first in ((pos + 2, False), (pos + 1, True)):
            cache = DynamicCache()
            first = adapter.model(input_ids=ids[:, :split], use_cache=True, **{name: cache}).logits
            assert bool(gate.last_fire.any()) == fires_first
            rest = adapter.model(input_ids=ids[:, split:], use_cache=True, **{name: cache}).logits
            chunked = torch.cat([first, rest], dim=1)
            assert torch.allclose(chunked, full, atol=1e-5) == (not fires_first)


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
    (tmp_path / "tune.json").unlink()  # the saved test is used: the tuning file is not read again
    reopened = Ledger.open(led.dir)
    reopened.apply_to(fresh)  # the test comes from the state file, not from boundary_requests
    assert torch.equal(reopened.state.boundary.weight, test.weight) and reopened.state.boundary.bias == test.bias
    with torch.no_grad():
        assert torch.equal(fresh.model(**enc).logits, here)
    sd = led.state.state_dict()
    bad = dict(sd, **{f"layer.{LAYER}.boundary.weight": test.weight[:3]})
    with pytest.raises(ValueError, match="name-boundary weight"):
        make_gated_state(adapter, hp).load_state_dict(bad)
    no_bias = {k: v for k, v in sd.items() if k != f"layer.{LAYER}.boundary.bias"}
    with pytest.raises(ValueError, match="come together"):
        make_gated_state(adapter, hp).load_state_dict(no_bias)


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


def test_a_question_gate_reads_its_subject_through_the_same_boundary(flash):
    """With a question gate the subject part decides whether the subject was named: stopped by the test in
    "Anna Berg Paris …", the entry never acts there, while "Anna Berg was born in" still gets its value."""
    adapter, L_inv, texts, pos, key, delta, test = flash
    q_layer = 2
    L_q = whitening_factor(corpus_cov(adapter, [q_layer]).mom2(q_layer), 1e-3, q_layer)
    qkeys = torch.randn(1, 1, adapter.d_mlp, generator=torch.Generator().manual_seed(1))
    question = (q_layer, L_q, qkeys, -1.0)  # τ_q = −1: every token asks, so only the subject part decides
    enc = adapter.tokenizer(texts[:2], return_tensors="pt", padding=True, padding_side="right")
    fired = {}
    for name, boundary in (("with", test), ("without", None)):
        with entries_active(adapter, LAYER, L_inv, key, delta, 0.99, question=question, boundary=boundary) as gate:
            with torch.no_grad():
                adapter.model(**enc)
            fired[name] = (gate.last_fire & enc["attention_mask"].bool()).any(1).tolist()
    assert fired == {"with": [True, False], "without": [True, True]}


def _fast_vs_plain(adapter, L_inv, key, delta, test, lookback):
    """v*'s rows for "Anna Berg Paris" (whose "Berg" is the prefix entry's subject end) and "Anna Berg":
    per row, the relative difference between the fast plan's reads and the plain forward's (δ = 0)."""
    from superedit.editing import values as V

    read_layer = adapter.n_layers - 1
    items = [("{} was born in", "Anna Berg Paris", "Oslo"), ("{} was born in", "Anna Berg", "Oslo")]
    rows, _, _ = V.value_rows(adapter, items, [""], essence=False)
    with torch.no_grad(), entries_active(adapter, LAYER, L_inv, key, delta, 0.99, boundary=test) as gate:
        adapter.memo[V._fast_plan_key(adapter, LAYER, "value", read_layer)] = True  # skip the one-time check
        fast, plain = V._prepare_rows(adapter, rows, LAYER, "value", read_layer, keep_reads=True,
                                      lookback=lookback(gate))
        want = V._take(plain["resid", read_layer], rows.read_row, rows.read_col, rows.input_ids.device).float()
        got = fast.forward_reads(adapter, "value", LAYER, None, read_layer).float()
    adapter.memo.clear()
    return [float((got[rows.read_row == r] - want[rows.read_row == r]).norm() / want[rows.read_row == r].norm())
            for r in range(len(items))]


def test_v_stars_fast_plan_recomputes_a_row_whose_cached_prefix_ends_inside_a_longer_name(flash):
    """The fast plan caches a row's positions before δ's in a separate forward; its last one ("Berg" in
    "Anna Berg Paris", δ at " Paris") has no next token there. rows_lookback recomputes such rows from
    their start, so the boundary test decides "Berg" as the full forward does."""
    from superedit.editing.methods.gated import rows_lookback

    adapter, L_inv, texts, pos, key, delta, test = flash
    fixed = _fast_vs_plain(adapter, L_inv, key, delta, test, lambda gate: rows_lookback([gate], 1))
    assert max(fixed) < 1e-5
    blind = _fast_vs_plain(adapter, L_inv, key, delta, test, lambda gate: 0)  # the prefix decided alone
    assert blind[0] > 1e-2 and blind[1] < 1e-5
