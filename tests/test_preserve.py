"""v*'s subject-preservation term (``preserve_factor``): which prompts it reads, how they weigh, and that it
keeps what the model says after them; the fast plan equals the plain one with it on, on every family."""

import pytest
import torch
import torch.nn.functional as F

from superedit.editing import values
from superedit.editing.attribute_templates import (ATTRIBUTE_PROMPTS, ATTRIBUTE_TEMPLATES, RELATION_KINDS, kind_of,
                                                  templates_for)
from superedit.editing.contexts import context_prefixes
from superedit.editing.hparams import HParamsError, ROMEHParams
from superedit.editing.values import (KL_ESSENCE, KL_OWN, KL_PRESERVE, kl_row_weights, optimize_values,
                                      value_rows)
from superedit.models import Trace, encode_prompts
from superedit.models.hooks import add_at_positions

ITEMS = [("{} was born in", "Anna Berg", "Paris"), ("{} is located in", "Eiffel Tower", "Oslo")]
PRESERVE = ["{} works as a", "The language of {} is", "{} is a member of"]


def test_weights_split_each_factor_over_a_requests_kept_rows():
    # two requests; per request: 1 essence row, its own prompt, 3 preservation prompts
    kinds = torch.tensor([KL_ESSENCE, KL_OWN, KL_PRESERVE, KL_PRESERVE, KL_PRESERVE] * 2)
    owner = torch.tensor([0] * 5 + [1] * 5)
    # request 0: own top 7, target 9 → its prompts answering 7 or 9 are left out, the one answering 3 kept;
    # request 1: own top 4, target 5 → all three kept
    top = torch.tensor([1, 7, 7, 9, 3, 2, 4, 6, 8, 0])
    w = kl_row_weights(kinds, owner, top, torch.tensor([9, 5]), kl_factor=0.5, preserve_factor=2.0, n=2)
    want = torch.tensor([0.5, 0, 0, 0, 2.0, 0.5, 0, 2 / 3, 2 / 3, 2 / 3])
    torch.testing.assert_close(w, want)


def test_rows_read_the_subject_for_essence_and_the_last_token_for_preservation(adapter):
    _, kl, kinds = value_rows(adapter, ITEMS, [""], essence=True, preserve=PRESERVE)
    assert kinds.tolist() == ([KL_ESSENCE, KL_OWN] + [KL_PRESERVE] * 3) * 2
    assert kl.owner.tolist() == [0] * 5 + [1] * 5
    lengths = kl.attention_mask.sum(1)
    ess = kinds == KL_ESSENCE
    assert torch.equal(kl.read_col[ess], kl.subject_last[ess])
    assert torch.equal(kl.read_col[~ess], lengths[~ess] - 1)
    own = encode_prompts(adapter.tokenizer, [p for p, _, _ in ITEMS], [s for _, s, _ in ITEMS], padding_side="right")
    for i in range(2):  # the own row is the request's prompt, without its target
        row = kl.input_ids[5 * i + 1, :int(lengths[5 * i + 1])]
        assert row.tolist() == own.input_ids[i, :int(own.attention_mask[i].sum())].tolist()
    _, kl_off, kinds_off = value_rows(adapter, ITEMS, [""])
    assert kinds_off.tolist() == [KL_ESSENCE, KL_ESSENCE]


def _drift(adapter, delta: torch.Tensor, layer: int, templates: list[str]) -> float:
    """Mean KL(P_δ ‖ P_orig) at the last token of ``templates`` filled with each request's subject, δ added at
    the subject's last token: measured independently of the loss, by a full forward."""
    subjects = [s for _, s, _ in ITEMS for _ in templates]
    b = encode_prompts(adapter.tokenizer, templates * len(ITEMS), subjects, padding_side="right",
                       device=adapter.device)
    rows = torch.arange(len(subjects))
    last = torch.tensor(b.last_token)
    owner = torch.arange(len(ITEMS)).repeat_interleave(len(templates))
    with torch.no_grad():
        orig = F.log_softmax(adapter.model(**b.model_inputs()).logits[rows, last].double(), -1)
        with Trace(adapter, edits={("value", layer): add_at_positions(b.subject_last, delta[owner])}):
            cur = F.log_softmax(adapter.model(**b.model_inputs()).logits[rows, last].double(), -1)
    return float(values.kl_rows_divergence(cur, orig).mean())


def test_preservation_keeps_the_subjects_other_answers(adapter, monkeypatch):
    """The same edit with the term on drifts less on the preserved prompts (a full forward measures it).
    (A tiny random model often answers every prompt with one token, so the rule that leaves out prompts
    answering like the edited one is switched off here; it has its own tests.)"""
    weights = values.kl_row_weights
    monkeypatch.setattr(values, "kl_row_weights", lambda kinds, owner, top, *a, **k: weights(
        kinds, owner, torch.where(kinds == KL_PRESERVE, -2, top), *a, **k))
    adapter.model.to(torch.float64)
    layer = 1
    # a small step and no norm clamp: on a tiny random model lr 0.5 puts δ at the clamp within a step, where
    # either loss can only turn it, not size it
    hp = ROMEHParams(layers=[layer], v_num_grad_steps=12, n_prefixes=1, context_lengths=[3], v_early_stop_nll=0.0,
                     v_lr=0.05, clamp_norm_factor=100.0)
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    free = optimize_values(adapter, ITEMS, layer, "value", hp, prefixes)
    d_free = _drift(adapter, torch.stack([r.delta for r in free]), layer, PRESERVE)
    assert d_free > 0
    # a weight that makes the term ten times the NLL it competes with (tiny random models' distributions move
    # by 1e-6 to 1e-4 nats; the NLL barely falls in 12 steps). The cut is 3× to 8× on most families, 1.5× on
    # gemma3_text's tiny model
    factor = 10 * free[0].nll_history[0] / d_free
    kept = optimize_values(adapter, ITEMS, layer, "value",
                           hp.model_copy(update={"preserve_factor": factor, "preserve_templates": PRESERVE}), prefixes)
    d_kept = _drift(adapter, torch.stack([r.delta for r in kept]), layer, PRESERVE)
    assert d_kept < 0.7 * d_free, (d_kept, d_free)


def test_a_prompt_asking_the_edited_question_is_left_out(adapter):
    """Preserving the request's own prompt would fight the edit: with only that prompt listed, every
    preservation row weighs 0 and v* is what it is with the term off."""
    adapter.model.to(torch.float64)
    hp = ROMEHParams(layers=[1], v_num_grad_steps=5, n_prefixes=1, context_lengths=[3], v_early_stop_nll=0.0)
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    off = optimize_values(adapter, ITEMS[:1], 1, "value", hp, prefixes)
    own = optimize_values(adapter, ITEMS[:1], 1, "value",
                          hp.model_copy(update={"preserve_factor": 5.0, "preserve_templates": [ITEMS[0][0]]}), prefixes)
    torch.testing.assert_close(own[0].target, off[0].target, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("site,layer", [("value", 1), ("resid", 2)])
def test_fast_plan_equals_plain_with_preservation(adapter, site, layer):
    """Preservation rows read their last token, after δ's position: the KV-cache plan must place it right."""
    adapter.model.to(torch.float64)
    hp = ROMEHParams(layers=[layer], v_num_grad_steps=4, n_prefixes=2, context_lengths=[3], preserve_factor=1.0,
                     preserve_templates=PRESERVE)
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    fast = optimize_values(adapter, ITEMS, layer, site, hp, prefixes)
    for read in {adapter.n_layers - 1}:
        adapter.memo[values._fast_plan_key(adapter, layer, site, read)] = False  # every row from the embeddings
    plain = optimize_values(adapter, ITEMS, layer, site, hp, prefixes)
    for f, p in zip(fast, plain):
        assert f.steps == p.steps
        assert f.nll_history == pytest.approx(p.nll_history, rel=1e-9, abs=1e-12)
        torch.testing.assert_close(f.target, p.target, rtol=1e-8, atol=1e-10)


def test_default_list_and_field_errors():
    assert ROMEHParams(preserve_factor=1.0).preserve_templates is None  # the default list is used
    assert len(ATTRIBUTE_TEMPLATES) >= 10 and all(t.count("{}") == 1 for t in ATTRIBUTE_TEMPLATES)
    for bad, why in ((["no slot"], "exactly one"), (["{} and {}"], "exactly one"), ([], "non-empty"),
                     ("{} was born in", "list"), ([3], "exactly one"), (["{}"], "words around")):
        with pytest.raises(HParamsError, match="preserve_templates"):
            ROMEHParams(preserve_templates=bad)
    with pytest.raises(HParamsError, match="preserve_factor"):
        ROMEHParams(preserve_factor=-1)


def test_a_request_reads_the_same_drawn_prompts_in_any_batch(adapter):
    """``preserve_n``: k of the list per request, drawn from the request itself, so batching changes nothing."""
    _, alone, kinds_alone = value_rows(adapter, ITEMS[1:], [""], preserve=ATTRIBUTE_TEMPLATES, preserve_n=4)
    _, both, kinds_both = value_rows(adapter, ITEMS[::-1], [""], preserve=ATTRIBUTE_TEMPLATES, preserve_n=4)
    assert int((kinds_alone == KL_PRESERVE).sum()) == 4
    first = both.owner == 0  # ITEMS[1], now batched with another request
    width = int(alone.attention_mask.sum(1).max())
    assert torch.equal(both.input_ids[first][:, :width] * alone.attention_mask, alone.input_ids * alone.attention_mask)
    drawn = values._preserve_draw(ATTRIBUTE_TEMPLATES, 4, "Anna Berg", "{} was born in")
    assert len(set(drawn)) == 4 and set(drawn) <= set(ATTRIBUTE_TEMPLATES)
    assert drawn == values._preserve_draw(ATTRIBUTE_TEMPLATES, 4, "Anna Berg", "{} was born in")
    assert values._preserve_draw(ATTRIBUTE_TEMPLATES, 0, "x", "{} y") == list(ATTRIBUTE_TEMPLATES)


def test_templates_of_the_requests_own_answer_kind_are_left_out():
    """``preserve_other_kinds``: a citizenship edit does not keep the answers of country prompts (they ask
    the edited question or a near-synonym); an unknown relation keeps every template."""
    countries = {t for t, k in ATTRIBUTE_PROMPTS if k == "country"}
    assert countries and set(templates_for(ATTRIBUTE_TEMPLATES, "P27")) == set(ATTRIBUTE_TEMPLATES) - countries
    assert templates_for(ATTRIBUTE_TEMPLATES, "university") == list(ATTRIBUTE_TEMPLATES)
    assert templates_for(ATTRIBUTE_TEMPLATES, None) == list(ATTRIBUTE_TEMPLATES)
    assert templates_for(["{} studied at"], "P27") == ["{} studied at"]  # a user's template has no kind
    assert kind_of("{} is best known for") is None
    # every kind a relation can have is the kind of some template, and the reverse
    assert set(RELATION_KINDS.values()) == {k for _, k in ATTRIBUTE_PROMPTS if k is not None}


def test_value_rows_leave_out_own_kind_per_request(adapter, monkeypatch):
    """The relation ids select each request's pool before the seeded draw; requests without one keep all."""
    items = ITEMS[:2]
    _, kl, kinds = value_rows(adapter, items, [""], essence=False, preserve=ATTRIBUTE_TEMPLATES,
                              relations=["P103", None])
    owners = kl.owner[kinds == KL_PRESERVE].tolist()
    languages = sum(1 for t in ATTRIBUTE_TEMPLATES if kind_of(t) == "language")
    assert languages and owners.count(0) == len(ATTRIBUTE_TEMPLATES) - languages
    assert owners.count(1) == len(ATTRIBUTE_TEMPLATES)
    drawn = {}
    real = values._preserve_draw

    def spy(pool, k, subject, prompt):
        drawn[subject] = real(pool, k, subject, prompt)
        return drawn[subject]

    monkeypatch.setattr(values, "_preserve_draw", spy)
    value_rows(adapter, items, [""], essence=False, preserve=ATTRIBUTE_TEMPLATES, preserve_n=4,
               relations=["P103", None])
    first, second = drawn[ITEMS[0][1]], drawn[ITEMS[1][1]]
    assert len(first) == 4 and not any(kind_of(t) == "language" for t in first)
    assert first == real(templates_for(ATTRIBUTE_TEMPLATES, "P103"), 4, ITEMS[0][1], ITEMS[0][0])
    assert second == real(ATTRIBUTE_TEMPLATES, 4, ITEMS[1][1], ITEMS[1][0])  # no relation: the whole list
    with pytest.raises(ValueError, match="relations"):
        value_rows(adapter, items, [""], preserve=ATTRIBUTE_TEMPLATES, relations=["P103"])


def test_optimize_values_passes_relations_only_with_the_option(adapter, monkeypatch):
    seen = []
    real = values.value_rows

    def spy(*a, **kw):
        seen.append(kw.get("relations"))
        return real(*a, **kw)

    monkeypatch.setattr(values, "value_rows", spy)
    layer = 1
    for flag, expected in ((False, None), (True, ["P103", None])):
        hp = ROMEHParams(layers=[layer], preserve_factor=1.0, preserve_n=2, preserve_other_kinds=flag,
                         v_num_grad_steps=1, kl_factor=0.0)
        optimize_values(adapter, ITEMS[:2], layer, "value", hp, [""], relations=["P103", None])
        assert seen[-1] == expected
    # split into passes of one request each: each pass gets its own request's relation
    seen.clear()
    optimize_values(adapter, ITEMS[:2], layer, "value", hp, [""], chunk_rows=1, relations=["P103", None])
    assert seen == [["P103"], [None]]
    with pytest.raises(ValueError, match="relations"):
        optimize_values(adapter, ITEMS[:2], layer, "value", hp, [""], relations=["P103"])
