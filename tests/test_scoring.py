"""The one teacher-forced scorer (superedit.eval.scoring) and the metrics that reduce over it."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_adapter
from superedit.data import EditRequest
from superedit.eval.metrics import batch_evaluate, evaluate_request, evaluate_requests
from superedit.eval.scoring import fact_recall, perplexity, score_targets

PROMPTS = ["Anna Berg was born in", "The Eiffel Tower, a famous tower, is located in", "Toko Yasuda plays the",
           "Apple A5 was created by", "a"]
TARGETS = ["Oslo", "Paris, the capital of France", "guitar", "Apple", "b c"]
REQS = [
    EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris", target_true="Bergen", case_id="a",
                paraphrase_prompts=["Anna Berg is a pianist from", "The birthplace of Anna Berg is"],
                neighborhood_prompts=["Toko Yasuda was born in", "The Eiffel Tower is located in"],
                neighborhood_answers=["Japan", "Oslo"]),
    EditRequest(prompt="{} is owned by", subject="Google Trends", target_new="Apple", target_true="Google",
                case_id="g", neighborhood_prompts=["Apple A5 was created by"], neighborhood_answers=["Apple"]),
    EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano", case_id="bare",
                paraphrase_prompts=["Toko Yasuda is famous for playing the"]),
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    return tiny_adapter(request.param)


def manual_scores(adapter, prompt, target):
    """log p and argmax of the target tokens from one unpadded forward pass of prompt + " " + target."""
    tok = adapter.tokenizer
    n = len(tok(prompt)["input_ids"])
    full = tok(prompt + " " + target)["input_ids"]
    with torch.no_grad():
        logits = adapter.model(torch.tensor([full])).logits[0].float()
    logp = F.log_softmax(logits[n - 1:len(full) - 1], -1)
    tgt = torch.tensor(full[n:])
    return full[n:], logp.gather(-1, tgt[:, None])[:, 0].tolist(), logp.argmax(-1).tolist()


def test_scores_match_one_unpadded_forward_pass(tiny):
    for p, t, sc in zip(PROMPTS, TARGETS, score_targets(tiny, PROMPTS, TARGETS, batch_size=3)):
        ids, lp, am = manual_scores(tiny, p, t)
        assert list(sc.target_ids) == ids and list(sc.argmax) == am
        assert max(abs(a - b) for a, b in zip(sc.logprobs, lp)) < 1e-5
        assert sc.logprob == pytest.approx(sum(lp), abs=1e-5)
        assert sc.nll == pytest.approx(-sum(lp) / len(lp), abs=1e-5)
        assert sc.prob == pytest.approx(math.exp(-sc.nll))
        assert sc.accuracy == sum(a == b for a, b in zip(am, ids)) / len(ids)
        assert sc.hit == (am == ids)


def test_batched_and_single_request_scores_agree(tiny):
    batched = score_targets(tiny, PROMPTS, TARGETS, batch_size=len(PROMPTS))
    chunked = score_targets(tiny, PROMPTS, TARGETS, batch_size=2)
    single = [score_targets(tiny, [p], [t])[0] for p, t in zip(PROMPTS, TARGETS)]
    for a, b, c in zip(batched, chunked, single):
        assert a.target_ids == b.target_ids == c.target_ids and a.argmax == b.argmax == c.argmax
        assert max(abs(x - y) for x, y in zip(a.logprobs, c.logprobs)) < 1e-6
        assert max(abs(x - y) for x, y in zip(b.logprobs, c.logprobs)) < 1e-6


def test_padding_side_and_training_mode_do_not_change_scores(tiny):
    ref = score_targets(tiny, PROMPTS, TARGETS)
    tok, model = tiny.tokenizer, tiny.model
    old = tok.padding_side
    tok.padding_side = "left"
    model.train()  # dropout would make scores random: the scorer runs in eval mode and restores the mode
    try:
        got = score_targets(tiny, PROMPTS, TARGETS)
        assert model.training
    finally:
        tok.padding_side = old
        model.eval()
    for a, b in zip(ref, got):
        assert a.argmax == b.argmax and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-6
    assert fact_recall(tiny, PROMPTS, TARGETS) == [s.hit for s in ref]


def test_perplexity_is_exp_mean_token_nll(tiny):
    texts = ["Anna Berg was born in Oslo.", "Toko Yasuda plays the guitar; Toko Yasuda is from Japan.", "x"]
    total, count = 0.0, 0
    for t in texts:
        ids = tiny.tokenizer(t)["input_ids"]
        if len(ids) < 2:  # one token: nothing to predict
            continue
        with torch.no_grad():
            logp = F.log_softmax(tiny.model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        total -= float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
        count += len(ids) - 1
    assert perplexity(tiny, texts, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-5)
    if len(tiny.tokenizer("x")["input_ids"]) == 1:
        assert math.isnan(perplexity(tiny, ["x"]))


def test_scorer_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        score_targets(tiny, PROMPTS[:2], TARGETS[:1])
    with pytest.raises(ValueError, match="empty target"):
        score_targets(tiny, PROMPTS[:1], [" "])
    assert score_targets(tiny, [], []) == []


def assert_batch_agrees_with_single(adapter, requests):
    """batch_evaluate (all requests in one scorer call) gives evaluate_request's numbers, key by key."""
    batch = batch_evaluate(adapter, requests, max_neighbours=None, batch_size=4)
    assert len(batch) == len(requests)
    for req, b in zip(requests, batch):
        one = evaluate_request(adapter, req)
        shared = set(one) & set(b)
        assert {"rewrite_prob_new", "rewrite_nll_new"} <= shared
        for key in shared:
            if key.startswith("_"):
                assert one[key] == b[key]
            else:
                assert b[key] == pytest.approx(one[key], abs=1e-6), key
        extra = set(b) - set(one)
        if req.target_true is None:  # the lifelong runner's success rule: every new token is the argmax
            assert b["efficacy_score"] == float(one["rewrite_acc"] == 1.0)
            if req.paraphrase_prompts:
                assert "paraphrase_score" in b
            assert extra <= {"efficacy_score", "paraphrase_score", "score"}
        else:
            assert not extra


def test_batch_evaluate_agrees_with_evaluate_request_on_tiny_models(tiny):
    assert_batch_agrees_with_single(tiny, REQS)
    # requests scored together or alone give the same numbers
    together = evaluate_requests(tiny, REQS)
    for req, t in zip(REQS, together):
        alone = evaluate_requests(tiny, [req])[0]
        assert set(t) == set(alone)
        for k in t:
            if not k.startswith("_"):
                assert t[k] == pytest.approx(alone[k], abs=1e-6)


def test_batch_evaluate_agrees_with_evaluate_request_on_the_testbed():
    from superedit.models import load_model
    from superedit.testbed.access import default_edit_requests
    from superedit.testbed.registry import resolve_builtin

    adapter = load_model("builtin", device="cpu")
    reqs = list(default_edit_requests(resolve_builtin("builtin"), 6, 0))
    assert_batch_agrees_with_single(adapter, reqs)
    capped = batch_evaluate(adapter, reqs, max_neighbours=1, paraphrases=False)
    for r, c in zip(reqs, capped):
        assert "paraphrase_score" not in c
        if r.neighborhood_prompts:
            assert len(c["_neighborhood_argmax"]) == 1
