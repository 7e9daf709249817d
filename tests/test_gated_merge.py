"""gated's gate holds entries with bit-identical keys (a fact edited again) as one entry, compares each
token against every distinct key once, and reuses its decision for an input equal to a recent one
(editing/methods/gated.py). None of this may change what the model computes."""

import pytest
import torch

from helpers import tiny_adapter
from superedit.editing.methods.gated import (_Gate, _QuestionGate, _make_gate, merge_identical_entries)


def _entries(n=5, c=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, c, 1, d, generator=g)
    qkeys = torch.randn(n, c, d, generator=g)
    values = torch.randn(n, 4, generator=g)
    return keys, qkeys, values


def test_merging_sums_the_values_of_bit_identical_entries_in_first_occurrence_order():
    keys, qkeys, values = _entries()
    keys[3], qkeys[3] = keys[1], qkeys[1]  # entry 3 re-edits entry 1's fact: same keys everywhere
    keys[4] = keys[0]  # same subject keys as entry 0 but another question: not the same entry
    k, ok, v, q, group = merge_identical_entries(keys, None, values, qkeys)
    assert group.tolist() == [0, 1, 2, 1, 3]
    assert torch.equal(k, keys[[0, 1, 2, 4]]) and torch.equal(q, qkeys[[0, 1, 2, 4]])
    assert torch.allclose(v, torch.stack([values[0], values[1] + values[3], values[2], values[4]]))
    assert ok.shape == (4, 3, 1) and bool(ok.all())
    # without a question gate, subject keys alone decide: entry 4 joins entry 0
    _, _, v2, _, group2 = merge_identical_entries(keys, None, values)
    assert group2.tolist() == [0, 1, 2, 1, 0] and torch.allclose(v2[0], values[0] + values[4])


def test_nothing_merges_without_duplicates_and_the_order_is_kept():
    keys, qkeys, values = _entries()
    k, _, v, q, group = merge_identical_entries(keys, None, values, qkeys)
    assert group.tolist() == list(range(5)) and torch.equal(k, keys) and torch.equal(v, values)
    valid = torch.ones(5, 3, 1, dtype=torch.bool)
    valid[2, 1] = False  # validity is part of an entry: same keys with other validity do not merge
    keys[2] = keys[0]
    assert merge_identical_entries(keys, valid, values)[4].tolist() == list(range(5))


@pytest.mark.parametrize("seed", range(4))
def test_a_merged_gate_adds_what_the_entries_add_one_by_one(seed):
    """The gate _make_gate builds (merged, distinct columns) against a plain _Gate over the entries as
    stored, on texts whose tokens sit near various entries' keys."""
    adapter = tiny_adapter("gpt2")
    d = adapter.d_mlp
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 2, 1, d, generator=g)
    keys = base[torch.tensor([0, 1, 0, 2, 3, 1, 0])]  # entries 0/2/6 and 1/5 are re-edits of one fact
    values = torch.randn(7, adapter.d_model, generator=g)
    whiten = torch.eye(d, dtype=torch.float64)
    x = torch.randn(3, 6, d, generator=g)
    x[0, 2] = base[0, 1, 0] * 2.0 + 0.01 * torch.randn(d, generator=g)  # near entry 0's second context
    x[1, 4] = base[1, 0, 0]
    x[2, 0] = base[3, 1, 0]
    plain = _Gate(whiten, keys, values, 0.9, "cpu", record=True)
    merged = _make_gate(adapter, 0, whiten, keys, values, 0.9, None, None, record=True)
    assert merged.values.shape[0] == 4  # four distinct facts
    out = torch.zeros(3, 6, adapter.d_model)
    want, got = plain(None, (x,), out), merged(None, (x,), out)
    assert want is not None and torch.allclose(got, want, atol=1e-5)
    # by hand: cosine of each token with each entry's key in each context (identity whitening)
    unit = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
    by_hand = ((unit(x)[:, :, None, None] * unit(keys[:, :, 0])[None, None]).sum(-1) > 0.9).any(-1)
    assert torch.allclose(got, by_hand.float() @ values, atol=1e-4)
    assert torch.equal(merged.last_fire_entries, plain.last_fire_entries)  # per entry as stored
    assert bool(merged.last_fire_entries[0, 2, [0, 2, 6]].all()) and merged.fired == plain.fired


def test_an_input_equal_to_the_last_one_reuses_the_decision_and_a_new_one_does_not():
    d = 8
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 2, 1, d, generator=g)
    gate = _Gate(torch.eye(d, dtype=torch.float64), keys, torch.randn(3, 4, generator=g), 0.9, "cpu")
    x = torch.randn(2, 5, d, generator=g)
    x[1, 3] = keys[2, 0, 0]
    first = gate.match(x)
    assert not gate.memo_hit and bool(first[1, 3, 2])
    again = gate.match(x.clone())  # equal, not the same object
    assert gate.memo_hit and torch.equal(again, first)
    y = x.clone()
    y[1, 3] = keys[0, 1, 0]  # another entry's key at the same place
    other = gate.match(y)
    assert not gate.memo_hit and bool(other[1, 3, 0]) and not bool(other[1, 3, 2])
    fresh = _Gate(torch.eye(d, dtype=torch.float64), keys, torch.randn(3, 4), 0.9, "cpu").match(y)
    assert torch.equal(other, fresh)
    gate._past = 4  # a forward that resumes a cache is never answered from the memo
    gate.match(y)
    assert not gate.memo_hit


def test_the_question_gate_reuses_its_decision_only_for_the_same_input_and_padding():
    d = 6
    a, b, c = torch.eye(d)[:3]
    eye = torch.eye(d, dtype=torch.float64)
    subject = _Gate(eye, a[None], torch.ones(1, 2), 0.9, "cpu")
    gate = _QuestionGate(subject, eye, c[None, None], torch.ones(1, 2), 0.9, "cpu")
    x = torch.stack([a, b, c])[None]  # the subject's key at position 0, the question's at 2
    q_other = torch.stack([a, b, b])[None]  # the question-layer input without the question

    def run(xs, xq, mask=None):
        gate.on_model_call(None, (), {} if mask is None else {"attention_mask": mask})
        gate.on_subject(None, (xs,), None)
        return gate(None, (xq,), torch.zeros(1, 3, 2))

    assert run(x, x)[0, 2].tolist() == [1.0, 1.0]
    assert run(x, x)[0, 2].tolist() == [1.0, 1.0] and gate._seen_reused  # same inputs: reused
    assert run(x, q_other) is None  # same subject input, other question-layer input: recomputed
    assert run(x, x, torch.tensor([[0, 1, 1]])) is None  # same input, other padding: recomputed
    assert run(x, x)[0, 2].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_repeated_and_interleaved_forwards_through_an_installed_question_gate_agree(family):
    """v*'s pattern (the same rows again and again) and evaluation's (new rows each call) give each
    batch the logits a fresh gate gives it."""
    from superedit.editing.methods.gated import entries_active

    adapter = tiny_adapter(family)
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(3, 2, 1, adapter.d_mlp, generator=g)
    qkeys = torch.randn(3, 2, adapter.d_mlp, generator=g)
    values = torch.randn(3, adapter.d_model, generator=g)
    eye = torch.eye(adapter.d_mlp, dtype=torch.float64)
    ids_a = torch.randint(0, adapter.model.config.vocab_size, (2, 7), generator=g)
    ids_b = torch.randint(0, adapter.model.config.vocab_size, (2, 7), generator=g)

    def logits(ids):
        with torch.no_grad():
            return adapter.model(input_ids=ids).logits

    from superedit.models import Trace

    def keys_of(ids, layer):
        with torch.no_grad(), Trace(adapter, reads=[("key", layer)], stop_after=True) as tr:
            adapter.model(input_ids=ids)
        return tr["key", layer]

    # entries keyed on batch a's own activations: they fire on a (at those tokens) and not on b
    sa, qa = keys_of(ids_a, 0), keys_of(ids_a, 1)
    keys = torch.stack([sa[0, 1], sa[1, 2], sa[0, 4]])[:, None, None]  # subjects named at a's tokens 1, 2, 4
    qkeys = torch.stack([qa[0, 5], qa[1, 6], qa[0, 6]])[:, None]  # questions asked later in the same rows
    question = (1, eye, qkeys, 0.99)
    with entries_active(adapter, 0, eye, keys, values, 0.99, question=question) as gate:
        a1, b1, a2 = logits(ids_a), logits(ids_b), logits(ids_a)
        fired_a = gate.last_fire.clone()
        a3 = logits(ids_a)
    with entries_active(adapter, 0, eye, keys, values, 0.99, question=question):
        b_fresh = logits(ids_b)
    with entries_active(adapter, 0, eye, keys, values, 0.99, question=question):
        a_fresh = logits(ids_a)
    plain_a, plain_b = logits(ids_a), logits(ids_b)
    assert bool(fired_a.any()) and not torch.allclose(a1, plain_a)  # the entries act on a ...
    assert torch.equal(b1, plain_b)  # ... and not on b, right after a (a memo keyed wrongly would)
    assert torch.equal(a1, a2) and torch.equal(a2, a3) and torch.equal(a1, a_fresh) and torch.equal(b1, b_fresh)


@pytest.mark.parametrize("seed", range(3))
def test_the_question_test_over_each_rows_named_entries_equals_the_test_over_all(seed):
    """Rows that name one or two of 12 subjects: the question gate compares their tokens only with
    those entries (``_asked``'s sparse path); the answer equals comparing with every entry."""
    d, n, c = 10, 12, 2
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(d, dtype=torch.float64)
    skeys = torch.randn(n, 1, 1, d, generator=g)
    qkeys = torch.randn(n, c, d, generator=g)
    subject = _Gate(eye, skeys, torch.ones(n, 3), 0.95, "cpu")
    gate = _QuestionGate(subject, eye, qkeys, torch.ones(n, 3), 0.6, "cpu")
    xs = torch.randn(4, 5, d, generator=g) * 0.1
    xq = torch.randn(4, 5, d, generator=g)
    for row, (named, pos) in enumerate([(3, 0), (7, 2), (3, 4), (11, 1)]):
        xs[row, pos] = skeys[named, 0, 0]
        xq[row, -1] = qkeys[named, row % c] + 0.3 * torch.randn(d, generator=g)  # asked at the end
    xq[1, 3] = qkeys[5, 0]  # another entry's question in a row that never named entry 5
    gate.on_model_call(None, (), {})
    gate.on_subject(None, (xs,), None)
    z = xq / xq.norm(dim=-1, keepdim=True)
    sparse = gate._asked(z)
    dense = ((z @ gate.unit_t).unflatten(-1, (n, c)) > gate.tau).any(-1)
    assert int(gate.seen.any(1).sum(1).max()) * 4 <= n  # the sparse path ran
    assert torch.equal(sparse & gate.seen, dense & gate.seen) and bool((dense & gate.seen).any())
    assert not bool(sparse[1, 3, 5])  # row 1 never named entry 5
