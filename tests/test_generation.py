"""Generation-based scoring: the matching rule and greedy continuations on tiny models."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_adapter
from superedit.data import EditRequest
from superedit.eval.generation import (edit_success, generation_scores, greedy_continuations, kept_answer,
                                       mentions)


def test_mentions_is_whole_word_and_case_insensitive():
    assert mentions("He was born in Paris, France.", "paris")
    assert not mentions("a Parisian café", "Paris")
    assert mentions("the  New\nYork Times", "New York")
    assert not mentions("anything", "") and not mentions("anything", None)
    assert mentions("C++ is fun", "C++") and not mentions("Oslon", "Oslo")
    assert edit_success("born in Oslo", "Oslo", "Paris") and not edit_success("Oslo or Paris", "Oslo", "Paris")
    assert kept_answer("speaks French", "French", "English") and not kept_answer("French, English", "French", "English")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_continuations_equal_a_plain_argmax_loop(family):
    a = tiny_adapter(family)
    prompts = ["Anna Berg was born in", "The Eiffel Tower is located in the city of", "Apple"]
    got = greedy_continuations(a, prompts, max_new_tokens=5, batch_size=2)  # padded batches of 2 and 1
    tok = a.tokenizer
    for prompt, text in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        for _ in range(5):
            nxt = a.model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        want = tok.decode(ids[0, len(tok(prompt)["input_ids"]):], skip_special_tokens=True)
        assert text == want


def test_generation_scores_reduce_the_continuations():
    a = tiny_adapter("gpt2")
    req = EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Oslo", target_true="Paris",
                      paraphrase_prompts=["Anna Berg is from", "Where was Anna Berg born? In"],
                      neighborhood_prompts=["Toko Yasuda was born in", "Apple was created by"],
                      neighborhood_answers=["Japan"])
    s = generation_scores(a, req, max_new_tokens=4)
    texts = s["gen_texts"]
    assert s["gen_efficacy"] == float(edit_success(texts["rewrite"], "Oslo", "Paris"))
    assert s["gen_paraphrase"] == sum(edit_success(t, "Oslo", "Paris") for t in texts["paraphrase"]) / 2
    assert s["gen_neighborhood"] == sum(kept_answer(t, "Japan", "Oslo") for t in texts["neighborhood"]) / 2
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_continuations(a, ["x"], max_new_tokens=0)


def test_evaluate_request_reports_generation_scores_and_summaries_carry_intervals():
    from superedit.eval.metrics import evaluate_request, summarize

    a = tiny_adapter("llama")
    req = EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Oslo", target_true="Paris",
                      paraphrase_prompts=["Anna Berg is from"], neighborhood_prompts=["Toko Yasuda was born in"],
                      neighborhood_answers=["Japan"])
    res = evaluate_request(a, req, greedy_tokens=4)
    want = generation_scores(a, req, max_new_tokens=4)
    for k in ("gen_efficacy", "gen_paraphrase", "gen_neighborhood"):
        assert res[k] == want[k]
    assert "gen_efficacy" not in evaluate_request(a, req)  # off by default in the library call
    vals = [{"efficacy_score": v} for v in (0.0, 1.0, 1.0, 1.0, 0.0, 1.0)]
    s = summarize(vals)
    lo, hi = s["ci"]["efficacy_score"]
    assert s["counts"]["efficacy_score"] == 6 and 0.0 <= lo <= s["means"]["efficacy_score"] <= hi <= 1.0 and lo < hi
